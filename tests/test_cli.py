"""`muscle-fast` command line: every error one line and exit 2; help that names what runs."""
import importlib

import pytest

from muscle_fast import cli
from muscle_fast.cli import main


def _bench_module():
    mod = cli._bench_main()
    if mod is None:
        pytest.skip("the benchmark harness is not in this installation")
    return mod


def test_an_os_error_is_one_line_and_exit_2(monkeypatch, capsys):
    """Any path a command cannot read or write ends in one line and exit 2, not a traceback."""
    def run(args):
        raise PermissionError(13, "Permission denied", "/data/out.json")

    monkeypatch.setattr(cli, "_run_flips", run)
    assert main(["flips", "--old", "a", "--new", "b"]) == 2
    err = capsys.readouterr().err
    assert err == "muscle-fast flips: error: /data/out.json: Permission denied\n"


def test_bench_help_names_the_command_and_the_real_default_out(capsys, monkeypatch, tmp_path):
    mod = _bench_module()
    monkeypatch.setattr(mod.H, "RESULTS", tmp_path / "rows")  # what an installed wheel sets
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"], prog="muscle-fast bench")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: muscle-fast bench") and "python -m benchmarks" not in text
    assert f"{tmp_path / 'rows'}/cpu.csv" in text.replace(" ", "")  # argparse may wrap the path
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert capsys.readouterr().out.startswith("usage: muscle-fast bench")


def test_bench_table_fits_100_columns(capsys):
    """Printed to a file or a pipe, the table stays readable: no line over 100 columns."""
    mod = _bench_module()
    env = {"device": "cpu AMD EPYC (2 cores)", "threads": 2, "torch": "2.13.0+cpu",
           "triton": "3.9.0", "commit": "4c7765f", "date": "2026-11-25 11:48"}
    case = {"op": "linear_compat_loss", "mode": "full", "mask": "old_correct", "N": 16384,
            "V": 128256, "dtype": "bf16"}
    rows = [dict(case, backend="eager", status="ok", median_ms=170.75, p20_ms=164.472,
                 p80_ms=177.259, peak_mb=156.2, gbps=0.38, floor_fraction=0.0262,
                 design_fraction="", note=""),
            dict(case, backend="muscle_fast[triton,inplace]", status="ok", median_ms=12.153,
                 p20_ms=12.0, p80_ms=13.01, peak_mb=123456.7, gbps=1234.5,
                 floor_fraction=0.9123, design_fraction=0.8765, note="in place: " + "x" * 150),
            dict(case, backend="liger", status="skipped", note="liger-kernel is not installed")]
    mod.print_table(rows, 14.66e9, env)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    for text in ("muscle_fast[triton,inplace]", "12.15 (12-13.01)", "0.9123", "0.8765", "liger", "skipped",
                 "not installed", "14.05x", "N=16384", "V=128256", "bf16", "old_correct"):
        assert text in out, text


def test_demo_seeds_error_is_human(capsys):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--seeds", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "_seed_list" not in err and "--seeds" in err and "'x'" in err
    assert "comma-separated" in err
    importlib.import_module("muscle_fast.train.demo")
