"""The multi-process commands the README gives run as written (CPU, gloo, 2-3 processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited with {p.returncode}:\n{out[-4000:]}"
    return out


def _bin(name):
    return str(Path(sys.executable).with_name(name))


@pytest.mark.parametrize("script", ["train_compat.py", "vocab_parallel.py"])
def test_help(script, tmp_path):
    out = _run([sys.executable, EXAMPLES / script, "--help"], tmp_path)
    assert "usage:" in out


def test_vocab_parallel_example_torchrun(tmp_path):
    out = _run([_bin("torchrun"), "--standalone", "--nproc-per-node", "3",
                EXAMPLES / "vocab_parallel.py", "--vocab", "301"], tmp_path)
    assert "3 ranks, vocabulary slices [101, 100, 100]" in out
    assert "max |vocab parallel - one device|" in out and "MISMATCH" not in out


# torchrun in the default run; the same script under `accelerate launch` (13 s more) in the slow
# run: the script and CompatTrainer are the same, only the launcher's environment differs
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_train_example_two_processes(launcher, tmp_path):
    pytest.importorskip("peft")
    cmd = {"torchrun": [_bin("torchrun"), "--standalone", "--nproc-per-node", "2"],
           "accelerate": [_bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", "0"]}[launcher]
    out_dir = tmp_path / "adapter"
    out = _run(cmd + [EXAMPLES / "train_compat.py", "--smoke", tmp_path / "models",
                      "--max-steps", "2", "--batch-size", "4", "--output-dir", out_dir], tmp_path)
    assert "saved to" in out and "(2 process(es))" in out
    assert (out_dir / "adapter_config.json").exists()
    assert (out_dir / "adapter_model.safetensors").exists()
    assert "compat/frac_to_old" in out
