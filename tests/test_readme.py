"""The README's usage example runs as written."""
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(capsys):
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile(code, "README.md:usage", "exec"), {})
    out = capsys.readouterr().out
    # e.g. float(loss) on a tensor that requires grad warns; the example must not
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "requires_grad" in m], messages
    assert "frac_to_old" in out and "torch" in out
