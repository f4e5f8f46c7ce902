"""The demo: its update, its splits, the results.json layout (quick mode, end to end)."""
import argparse
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from muscle_fast.train.demo import (
    CACHE_ROWS,
    CACHE_TOPK_K,
    COMPAT_ROWS,
    DEFAULT_SEEDS,
    OPS,
    ROW_NAMES,
    V1,
    V2,
    DemoConfig,
    _corpus_items,
    _encode,
    _encode_pretrain,
    _op,
    _pretrain_text,
    _seed_list,
    add_demo_arguments,
    build_tokenizer,
    corpus_floor,
    demo_main,
    pretrain_base,
    split_items,
    summarize,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DELTA_KEYS = {"acc", "nfr", "pfr", "d_nfr_c", "d_pct_nfr_c", "dacc_c"}


def test_demo_task_and_update():
    assert [_op(o, 7, 5, 9) for o in OPS] == [7, 9, 9, 5, 1, 2]  # add: 21 % 10, add2: 12 % 10
    cfg = DemoConfig()
    # a real update: a new pre-training run on another mix, longer: v2's corpus adds the
    # arithmetic v1's lacks and drops two ops v1 saw
    assert cfg.v2.steps > cfg.v1.steps
    mix1, mix2 = dict(cfg.v1.mix), dict(cfg.v2.mix)
    assert [o for o in OPS if mix1[o] == 0] == ["add", "add2"]
    assert [o for o in OPS if mix2[o] == 0] == ["max", "min"]
    # task adapters: a linear-decay schedule, evaluated about once per epoch of the train split
    n_train = cfg.n_pool - round(cfg.val_frac * cfg.n_pool)
    assert cfg.task_eval_every == math.ceil(n_train / cfg.task_batch)
    assert cfg.task_inits == 2
    # v1 has a fixed budget; v2 pre-trains until converged on its own corpus
    assert cfg.v1.converge_tol is None and cfg.v2.converge_tol is not None
    assert cfg.v2.max_runs >= 2  # a v2 run still on a plateau at its cap is run again


def test_corpus_items_and_ids_are_the_plain_calls():
    """The fast pre-training batch: the same draws as rng.choice(p=...) + rng.integers, and the
    same ids as the tokenizer (so bases, and every number, are unchanged)."""
    import numpy as np
    import torch

    tok = build_tokenizer()
    for spec in (V1, V2):
        ops = [o for o, w in spec.mix if w > 0]
        p = np.array([w for _, w in spec.mix if w > 0], dtype=float)
        p /= p.sum()
        r1, r2 = np.random.default_rng(802), np.random.default_rng(802)
        for _ in range(5):
            want = [(ops[r1.choice(len(ops), p=p)], *map(int, r1.integers(0, 10, 3)))
                    for _ in range(64)]
            got = _corpus_items(r2, spec, 64)
            assert got == want
            assert torch.equal(_encode_pretrain(tok, got),
                               _encode(tok, [_pretrain_text(it) for it in want]))


def test_corpus_floor():
    # v2's mix: first, last 1/6 each, add, add2 1/3 each; three uniform digits; 7 tokens
    items = [("first", 1, 2, 3), ("add", 4, 5, 6)]
    want = (math.log(6) + math.log(3) + 6 * math.log(10)) / 14
    assert math.isclose(corpus_floor(V2, items), want)


def test_pretrain_restarts_a_run_that_did_not_converge():
    """A run still above the floor after its step budget is a failed run: a new init (seed +
    1000 k) trains again, and the run with the lowest held-out loss is kept."""
    from dataclasses import replace

    cfg = DemoConfig.quick()
    tok = build_tokenizer()
    spec = replace(cfg.v2, steps=6, check_every=3, converge_tol=-1.0, max_runs=3)  # unreachable
    _, info = pretrain_base(spec, cfg, tok, 5, quiet=True)
    runs = info["runs"]
    assert [r["seed"] for r in runs] == [5, 1005, 2005]
    assert all(r["steps_run"] == 6 and r["converged"] is False for r in runs)
    assert info["held_out_loss"] == min(r["held_out_loss"] for r in runs)
    assert info["seed"] == min(runs, key=lambda r: r["held_out_loss"])["seed"]
    # a run that converges is not restarted
    spec = replace(spec, converge_tol=10.0)
    _, info = pretrain_base(spec, cfg, tok, 5, quiet=True)
    assert [r["seed"] for r in info["runs"]] == [5] and info["converged"] is True
    assert info["steps_run"] == 3


def test_task_rows_end_at_the_answer():
    """The answer is the last token and the only label; a trailing <eos> (unlabelled) would not
    change the loss or its gradient under causal attention, so task_rows leaves it out."""
    import torch

    from muscle_fast.train.demo import _collate, _tiny_llama, task_rows

    tok = build_tokenizer()
    items = [("max", 3, 9, 1), ("add", 4, 5, 6), ("first", 7, 0, 2)]
    rows = task_rows(tok, items)
    b = _collate(rows)
    assert (b["labels"][:, :-1] == -100).all()
    assert b["labels"][:, -1].tolist() == tok.convert_tokens_to_ids(["9", "5", "7"])
    with_eos = {"input_ids": torch.cat([b["input_ids"], torch.full((3, 1), tok.eos_token_id)], 1)}
    with_eos["attention_mask"] = torch.ones_like(with_eos["input_ids"])
    with_eos["labels"] = torch.cat([b["labels"], torch.full((3, 1), -100)], 1)
    model = _tiny_llama(DemoConfig.quick().v1, len(tok), 0)
    grads = []
    for batch in (b, with_eos):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_demo_splits_are_disjoint():
    cfg = DemoConfig(seed=4)
    test, train, val = split_items(cfg)
    assert len(test) == cfg.n_test >= 3000
    assert len(val) == round(cfg.val_frac * cfg.n_pool) and len(train) + len(val) == cfg.n_pool
    assert not (set(test) & set(train)) and not (set(test) & set(val))
    assert not (set(train) & set(val)) and len(set(test)) == len(test)
    assert split_items(DemoConfig(seed=4)) == (test, train, val)  # the seed decides


def test_seed_list():
    assert _seed_list("0,1,2") == [0, 1, 2]
    assert _seed_list("0-4") == [0, 1, 2, 3, 4]
    assert _seed_list("7") == [7]
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.seeds == list(DEFAULT_SEEDS) and args.out == "muscle_demo"


def test_summarize():
    def seed(s, nfr_m, nfr_ce):
        models = {"v1": {"acc": 0.5}, "v2": {"acc": 0.6, "nfr": 0.1, "pfr": 0.2,
                                            "n_negative_flips": 10}}
        for row, nfr in (("muscle", nfr_m), ("ce_control", nfr_ce)):
            models[row] = {"acc": 0.6, "nfr": nfr, "pfr": 0.2, "d_nfr_c": nfr - 0.1,
                           "d_pct_nfr_c": (nfr - 0.1) / 0.1, "dacc_c": 0.0}
        return {"seed": s, "n_test": 100, "models": models}

    s = summarize([seed(0, 0.05, 0.09), seed(1, 0.08, 0.07)])
    e = s["rows"]["muscle"]["d_pct_nfr_c"]
    assert math.isclose(e["mean"], -0.35) and math.isclose(e["min"], -0.5)
    assert math.isclose(e["max"], -0.2)
    assert s["target"]["mean_d_pct_nfr_c_le_-30pct"] is True
    assert [p["beats_ce_control"] for p in s["target"]["per_seed"]] == [True, False]
    assert s["target"]["met"] is False


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--quick", "--quiet", "--out", str(out), "--seeds", "3", "--jobs", "1"])
    assert demo_main(args) == 0

    r = json.loads((out / "results.json").read_text())
    assert set(r) == {"seeds", "summary", "wall_s"}
    png = (out / "flips.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    (entry,) = r["seeds"]
    assert set(entry) == {"seed", "n_test", "models"} and entry["seed"] == 3
    n = entry["n_test"]
    assert n == DemoConfig.quick().n_test
    m = entry["models"]
    assert list(m) == ["v1", "v2", *COMPAT_ROWS]
    assert set(m["v1"]) == {"acc"}
    assert set(m["v2"]) == {"acc", "nfr", "pfr", "n_negative_flips"}
    v1, v2 = m["v1"]["acc"], m["v2"]["acc"]
    assert m["v2"]["n_negative_flips"] == round(m["v2"]["nfr"] * n)
    assert math.isclose(v2 - v1, m["v2"]["pfr"] - m["v2"]["nfr"], abs_tol=1e-9)
    for row in COMPAT_ROWS:
        e = m[row]
        assert set(e) == DELTA_KEYS, row
        for key in ("acc", "nfr", "pfr"):
            assert 0 <= e[key] <= 1 and abs(e[key] * n - round(e[key] * n)) < 1e-6
        assert math.isclose(e["acc"] - v1, e["pfr"] - e["nfr"], abs_tol=1e-9), row
        assert math.isclose(e["dacc_c"], e["acc"] - v2, abs_tol=1e-9), row
        assert math.isclose(e["d_nfr_c"], e["nfr"] - m["v2"]["nfr"], abs_tol=1e-9), row
    assert r["summary"]["seeds"] == [3]
    assert r["summary"]["rows"]["muscle"]["dacc_c"]["min"] == m["muscle"]["dacc_c"]

    d = json.loads((out / "details.json").read_text())["seeds"][0]
    for name in ("v1", "v2"):  # kept at the best validation loss seen
        info = d["task_adapters"][name]
        assert info["best_val_loss"] == min(v for _, v in info["val_curve"])
        assert info["val_curve"][-1][0] == DemoConfig.quick().task_steps  # every step ran
        inits = info["inits"]  # the init with the lower best validation loss is kept
        assert len(inits) == DemoConfig.quick().task_inits == 2
        assert len({i["seed"] for i in inits}) == 2
        assert info["best_val_loss"] == min(i["best_val_loss"] for i in inits)
    b = d["bases"]["v2"]  # the checkpoint kept has the lowest held-out pre-training loss
    assert b["held_out_loss"] == min(v for _, v in b["held_out_curve"])
    assert b["steps_run"] <= DemoConfig.quick().v2.steps and b["floor"] > 0
    c = d["checks"]  # the setting's per-seed conditions, also in the summary
    assert r["summary"]["checks"] == [{"seed": 3, **c}]
    assert c["v2_better"] == (v2 > v1) and c["n_test_ge_3000"] is False
    assert c["negative_flips_ge_100"] == (m["v2"]["n_negative_flips"] >= 100)
    assert c["ce_control_val_loss"] == d["val_loss_after_compat"]["ce_control"]
    assert c["v2_adapter_best_val_loss"] == d["task_adapters"]["v2"]["best_val_loss"]
    assert c["adapter_converged"] == (c["ce_control_val_loss"] >= c["v2_adapter_best_val_loss"])
    assert d["n_train"] + d["n_val"] == DemoConfig.quick().n_pool
    for row in COMPAT_ROWS:
        log = d["train_log"][row]
        assert log and all(math.isfinite(h["loss"]) for h in log)
    assert all(h["frac_to_old"] == 1.0 for h in d["train_log"]["all_old"])
    assert all(h["ce"] == pytest.approx(h["loss"], rel=1e-5) for h in d["train_log"]["ce_control"])
    run = out / "run_seed3"
    for row in COMPAT_ROWS:  # plain peft adapters
        assert (run / f"compat_{row}" / "adapter_model.safetensors").exists()
    assert len(list((out / "cache").glob("base_v*"))) == 2
    _check_cache_rows(m, d, run)


def _check_cache_rows(m, d, run):
    """Issue 24: MUSCLE trained from a teacher cache of each kind, beside the live row. The
    ``hidden`` cache is exact: the same steps, the same adapter, the same answers as live; the
    ``topk`` cache keeps a real cut of the vocabulary and trains another adapter."""
    import torch
    from safetensors.torch import load_file

    rows = list(m)
    assert rows[rows.index("muscle") + 1:rows.index("muscle") + 3] == list(CACHE_ROWS)
    assert ROW_NAMES["muscle_cache_hidden"] == "MUSCLE (cache: hidden)"
    assert ROW_NAMES["muscle_cache_topk"] == f"MUSCLE (cache: topk, k={CACHE_TOPK_K})"
    assert 1 < CACHE_TOPK_K < len(build_tokenizer()) == 22  # a real cut of the vocabulary
    caches = d["teacher_caches"]
    assert caches["muscle_cache_hidden"]["kind"] == "hidden"
    assert caches["muscle_cache_hidden"]["k"] is None
    assert caches["muscle_cache_topk"]["kind"] == "topk"
    assert caches["muscle_cache_topk"]["k"] == DemoConfig.quick().cache_topk_k == CACHE_TOPK_K
    for c in caches.values():
        assert c["n_tokens"] > 0 and c["bytes_per_token"] > 0 and c["build_s"] >= 0
    for kind in CACHE_ROWS.values():
        assert (run / f"teacher_cache_{kind}" / "manifest.json").exists()
    # hidden: exact, so the row is the live MUSCLE row, answer for answer
    live, hidden = m["muscle"], m["muscle_cache_hidden"]
    assert hidden["nfr"] == live["nfr"] and hidden == live
    assert d["flip_grids"]["muscle_cache_hidden"] == d["flip_grids"]["muscle"]
    assert d["n_negative_flips"]["muscle_cache_hidden"] == d["n_negative_flips"]["muscle"]
    log_live, log_hidden = d["train_log"]["muscle"], d["train_log"]["muscle_cache_hidden"]
    assert [h["step"] for h in log_hidden] == [h["step"] for h in log_live]
    for a, b in zip(log_live, log_hidden):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["frac_to_old"] == a["frac_to_old"]
    w = {row: load_file(str(run / f"compat_{row}" / "adapter_model.safetensors"))
         for row in ("muscle", *CACHE_ROWS)}
    assert set(w["muscle_cache_hidden"]) == set(w["muscle"]) == set(w["muscle_cache_topk"])
    for key, t in w["muscle"].items():
        torch.testing.assert_close(w["muscle_cache_hidden"][key], t, rtol=1e-5, atol=1e-7)
    # topk (k < V): an approximation, so its steps are not the live ones
    assert any(not torch.equal(w["muscle_cache_topk"][key], t) for key, t in w["muscle"].items())


@pytest.mark.slow
def test_demo_two_seeds_parallel_reuses_bases(tmp_path):
    out = tmp_path / "demo"
    argv = ["--quick", "--quiet", "--out", str(out), "--seeds", "0,1", "--jobs", "2"]
    parse = add_demo_arguments(argparse.ArgumentParser()).parse_args
    assert demo_main(parse(argv)) == 0
    first = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in first["seeds"]] == [0, 1]
    bases = sorted(p.name for p in (out / "cache").glob("base_v*"))
    assert len(bases) == 4
    assert demo_main(parse(argv)) == 0  # cached bases: the same numbers again
    second = json.loads((out / "results.json").read_text())
    assert second["seeds"] == first["seeds"]
    assert sorted(p.name for p in (out / "cache").glob("base_v*")) == bases
