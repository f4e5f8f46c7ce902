"""The demo's quick mode, end to end: pre-training, task adapters, CompatTrainer per mask, report."""
import argparse
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from muscle_fast.train.demo import OPS, DemoConfig, _op, add_demo_arguments, demo_main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_task_and_update():
    assert [_op(o, 7, 5, 9) for o in OPS] == [7, 9, 9, 5, 1, 2]  # add: 21 % 10, add2: 12 % 10
    cfg = DemoConfig()
    # the controlled update: same architecture and tokenizer, v2 pre-trained longer
    assert cfg.v2_steps > cfg.v1_steps


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--quick", "--quiet", "--out", str(out), "--seed", "3"])
    assert demo_main(args) == 0

    r = json.loads((out / "results.json").read_text())
    png = (out / "flips.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert r["config"]["seed"] == 3
    assert set(r["compat"]) == set(DemoConfig.masks)
    n = r["flip_report_muscle"]["n"]
    assert n == DemoConfig.quick().n_test
    for key in ("acc_v1", "acc_v2", "nfr", "pfr"):
        assert 0 <= r[key] <= 1
        assert abs(r[key] * n - round(r[key] * n)) < 1e-6  # a count over the test items
    # acc_v2 - acc_v1 = PFR - NFR, whatever the models learned
    assert math.isclose(r["acc_v2"] - r["acc_v1"], r["pfr"] - r["nfr"], abs_tol=1e-9)
    for mask, row in r["compat"].items():
        assert math.isclose(row["dacc_c"], row["acc_c"] - r["acc_v2"], abs_tol=1e-9), mask
        assert math.isclose(row["dnfr_c"], row["nfr_c"] - r["nfr"], abs_tol=1e-9), mask
        log = r["train_log"][mask]
        assert log and all(math.isfinite(h["loss"]) for h in log)
        if mask == "all_old":
            assert all(h["compat/frac_to_old"] == 1.0 for h in log)
    assert set(r["per_op_acc"]) == set(OPS)
    assert r["flip_report_muscle"]["acc_c"] == r["compat"]["muscle"]["acc_c"]
    # the compatibility adapters are saved as plain peft adapters; bases are cached
    run = out / "run_seed3"
    for mask in DemoConfig.masks:
        assert (run / f"compat_{mask}" / "adapter_model.safetensors").exists()
    assert len(list((out / "cache").glob("base_v*"))) == 2
