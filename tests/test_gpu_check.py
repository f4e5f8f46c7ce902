"""benchmarks/gpu_check.sh --dry-run: every step printed, every Python entry point imported."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    names = " ".join(steps)
    for step in ("env", "pytest-gpu", "correctness", "bench muscle_fast[triton]",
                 "bench muscle_fast[triton,inplace]", "bench eager", "bench liger",
                 "bench torch.compile", "sparse-correctness", "sparse-headline", "sass"):
        assert f"== {step}" in names, step
    assert "imports ok" in proc.stdout
    # at most 8 files, and the step timeouts leave the whole check under 8 minutes
    limits = [int(s.split("(timeout ")[1].split("s)")[0]) for s in steps if "(timeout " in s]
    assert sum(limits) <= 480, limits
    assert len(os.listdir(tmp_path / "out")) <= 8
