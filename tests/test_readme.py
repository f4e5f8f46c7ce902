"""The README's usage example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(capsys):
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    exec(compile(code, "README.md:usage", "exec"), {})
    out = capsys.readouterr().out
    assert "frac_to_old" in out and "torch" in out
