"""Step 5 of the demo: the numbers of a seed and of all seeds. The paper's columns per row, the
four rungs of the ladder per seed (is this a setting where a compatibility method can be judged
at all?), the goal, and the tables and lines printed."""
from __future__ import annotations

import math

import numpy as np

from .setting import COMPAT_ROWS, OPS, ROW_NAMES

# rung 1: "within a few points", and both models right on items the other gets wrong
ACC_GAP_MAX = 0.05
FLIP_MIN = 0.05
N_TEST_MIN = 3000
# rung 3: plain KD from v1 may cost at most this much accuracy (the paper: it gained 2.17)
KD_DACC_MIN = -0.01
# the goal (the paper's effect)
GOAL_SEED = -0.15
GOAL_MEAN = -0.30
GOAL_DACC = -0.01


def row_metrics(old_correct, old_pred, correct, pred) -> dict:
    """acc, NFR, PFR, NFR_mc and the negative flips of a task model against v1."""
    from muscle_fast import metrics

    f = metrics.discriminative_flips(old_correct, correct, old_pred, pred)
    return {"acc": float(np.mean(correct)), "nfr": f.nfr, "pfr": f.pfr, "nfr_mc": f.nfr_mc,
            "n_negative_flips": int(np.sum(old_correct & ~correct))}


def noise_bound(a, b) -> float:
    """Two standard errors of the paired accuracy difference of two models on the same items
    (McNemar's: sqrt(discordant items) / n): a change in accuracy within it is noise."""
    return 2.0 * math.sqrt(float(np.sum(a != b))) / len(a)


def rungs(cfg, models: dict, correct: dict, adapters: dict, logs: dict) -> dict:
    """The ladder of one seed: each rung's numbers and whether it holds (None: not measured,
    because its row was not run)."""
    v1, v2 = models["v1"], models["v2"]
    r1 = {"acc_v1": v1["acc"], "acc_v2": v2["acc"], "nfr": v2["nfr"], "pfr": v2["pfr"],
          "n_test": len(correct["v1"])}
    r1["holds"] = (abs(v1["acc"] - v2["acc"]) <= ACC_GAP_MAX + 1e-12 and v2["nfr"] >= FLIP_MIN
                   and v2["pfr"] >= FLIP_MIN and r1["n_test"] >= N_TEST_MIN)
    r2 = {"kept_step": {n: adapters[n]["best_step"] for n in ("v1", "v2")},
          "task_steps": cfg.task_steps}
    ok = all(s < cfg.task_steps for s in r2["kept_step"].values())
    for row in ("ce_control", "ce_control_4x"):
        if row in models:
            d, bound = models[row]["dacc_c"], noise_bound(correct["v2"], correct[row])
            r2[row] = {"dacc_c": d, "noise": bound, "within_noise": d <= bound}
            ok = ok and d <= bound
    r2["holds"] = ok if "ce_control" in models else None
    r3 = {"holds": None}
    if "all_old" in models:
        d = models["all_old"]["dacc_c"]
        r3 = {"dacc_c": d, "d_pct_nfr_c": models["all_old"]["d_pct_nfr_c"],
              "holds": d >= KD_DACC_MIN - 1e-12}
    r4 = {"holds": None}
    if "muscle" in models:
        m = models["muscle"]
        log = logs["muscle"]
        r4 = {"d_pct_nfr_c": m["d_pct_nfr_c"], "dacc_c": m["dacc_c"],
              "to_v1_first": log[0]["frac_to_old"], "to_v1_last": log[-1]["frac_to_old"],
              "acc_new_first": log[0]["acc_new"], "acc_new_last": log[-1]["acc_new"]}
        if "ce_control" in models:
            c = models["ce_control"]
            r4.update(ce_d_pct_nfr_c=c["d_pct_nfr_c"], ce_dacc_c=c["dacc_c"])
        r4["holds"] = goal_of_seed(models)["met"]
    return {"1_realistic_update": r1, "2_converged_adapters": r2, "3_kd_from_v1_can_help": r3,
            "4_muscle_vs_control": r4}


def goal_of_seed(models: dict) -> dict:
    m, c = models["muscle"], models.get("ce_control")
    g = {"d_pct_nfr_c_le_-15pct": m["d_pct_nfr_c"] <= GOAL_SEED,
         "dacc_c_ge_-1pt": m["dacc_c"] >= GOAL_DACC - 1e-12,
         "nfr_below_ce_control": None if c is None else m["nfr"] < c["nfr"]}
    g["met"] = all(v is not False for v in g.values())
    return g


def seed_result(cfg, out: dict, test, n_train: int, n_val: int) -> dict:
    """The results.json entry and the details of one seed, from its finished units
    (``out[(kind, name)]``)."""
    from dataclasses import asdict
    import json

    correct = {n: out["adapter", n]["correct"] for n in ("v1", "v2")}
    preds = {n: out["adapter", n]["pred"] for n in ("v1", "v2")}
    for row in cfg.rows:
        correct[row], preds[row] = out["compat", row]["correct"], out["compat", row]["pred"]
    o, po = correct["v1"], preds["v1"]
    models = {"v1": {"acc": float(o.mean())}, "v2": row_metrics(o, po, correct["v2"], preds["v2"])}
    for row in cfg.rows:
        models[row] = row_metrics(o, po, correct[row], preds[row])
        v2 = models["v2"]
        d = models[row]["nfr"] - v2["nfr"]
        models[row].update(d_nfr_c=d, d_pct_nfr_c=_relative(d, v2["nfr"]),
                           dacc_c=models[row]["acc"] - v2["acc"])
    ops = np.array([it[0] for it in test])
    per_op = {op: {n: float(c[ops == op].mean()) for n, c in correct.items()} for op in OPS}
    adapters = {n: out["adapter", n]["info"] for n in ("v1", "v2")}
    logs = {row: out["compat", row]["train_log"] for row in cfg.rows}
    units = {f"{k}_{n}": {"seconds": j["seconds"], "cpu_s": j["cpu_s"]} for (k, n), j in out.items()}
    details = {
        "seed": cfg.seed,
        "config": json.loads(json.dumps(asdict(cfg), default=list)),
        "n_train": n_train, "n_val": n_val, "n_test": len(test),
        "bases_cached": {n: out["base", n]["cached"] for n in ("v1", "v2")},
        "bases": {n: out["base", n]["info"] for n in ("v1", "v2")},
        "task_adapters": adapters,
        "train_answer_tokens_right": {n: out["adapter", n]["train_right"] for n in ("v1", "v2")},
        "val_loss_after_compat": {row: out["compat", row]["val_loss"] for row in cfg.rows},
        "rungs": rungs(cfg, models, correct, adapters, logs),
        "flip_grids": {n: [[int(np.sum(o & c)), int(np.sum(o & ~c))],
                           [int(np.sum(~o & c)), int(np.sum(~o & ~c))]]
                       for n, c in correct.items() if n != "v1"},
        "per_op_acc": per_op,
        "train_log": logs,
        "teacher_caches": {row: out["compat", row]["cache"] for row in cfg.rows
                           if out["compat", row]["cache"] is not None},
        "jobs": units, "cpu_s": round(sum(j["cpu_s"] for j in units.values()), 1),
    }
    return {"result": {"seed": cfg.seed, "n_test": len(test), "models": models},
            "details": details}


def _relative(d: float, base: float) -> float:
    from muscle_fast.metrics import relative_change

    return relative_change(d, base)


def summarize(seed_results: list[dict], seed_rungs: list[dict] | None = None) -> dict:
    """Mean, min and max over seeds of every rate and delta of every row (fractions), each
    seed's rungs, and the goal: MUSCLE's d%NFR_c <= -15 % on every seed and <= -30 % on average,
    dacc_c >= -1 point and NFR below the CE control's on every seed."""
    rows = {}
    for name in ("v1", "v2", *COMPAT_ROWS):
        entries = [r["models"][name] for r in seed_results if name in r["models"]]
        if not entries:
            continue
        rows[name] = {}
        for key in entries[0]:
            vals = [float(e[key]) for e in entries if e[key] is not None]
            finite = [v for v in vals if math.isfinite(v)]
            rows[name][key] = {"mean": float(np.mean(finite)) if finite else None,
                               "min": min(vals) if vals else None,
                               "max": max(vals) if vals else None}
    out = {"seeds": [r["seed"] for r in seed_results], "rows": rows}
    if seed_rungs is not None:
        out["rungs"] = [{"seed": r["seed"], **{k: v["holds"] for k, v in g.items()}}
                        for r, g in zip(seed_results, seed_rungs)]
    if "muscle" in rows:
        per_seed = [{"seed": r["seed"], **goal_of_seed(r["models"])} for r in seed_results]
        mean_pct = rows["muscle"]["d_pct_nfr_c"]["mean"]
        mean_ok = mean_pct is not None and mean_pct <= GOAL_MEAN
        out["goal"] = {"per_seed": per_seed, "mean_d_pct_nfr_c": mean_pct,
                       "mean_d_pct_nfr_c_le_-30pct": mean_ok,
                       "met": mean_ok and all(p["met"] for p in per_seed)}
    return out


# ---------------------------------------------------------------- printing


def pct(x, signed: bool = False) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def seed_table(r: dict, details: dict):
    """The paper-style table of one seed (a rich Table)."""
    from rich.table import Table

    m = r["models"]
    t = Table(title=f"seed {r['seed']}: update v1 -> v2 on {r['n_test']} held-out items "
                    f"({m['v2']['n_negative_flips']} negative flips); values in %")
    for c in ("row", "acc", "NFR", "PFR", "NFR_mc", "dNFR_c", "d%NFR_c", "dacc_c", "to v1"):
        t.add_column(c, justify="left" if c == "row" else "right")
    t.add_row(ROW_NAMES["v1"], pct(m["v1"]["acc"]), *[""] * 7)
    v2 = m["v2"]
    t.add_row(ROW_NAMES["v2"], pct(v2["acc"]), pct(v2["nfr"]), pct(v2["pfr"]), pct(v2["nfr_mc"]),
              "", "", "", "")
    for row in COMPAT_ROWS:
        if row in m:
            e, log = m[row], details["train_log"][row]
            to_v1 = f"{100 * log[0]['frac_to_old']:.0f} -> {100 * log[-1]['frac_to_old']:.0f}"
            t.add_row(ROW_NAMES[row], pct(e["acc"]), pct(e["nfr"]), pct(e["pfr"]),
                      pct(e["nfr_mc"]), pct(e["d_nfr_c"], True), pct(e["d_pct_nfr_c"], True),
                      pct(e["dacc_c"], True), to_v1 if row != "ce_control" and
                      row != "ce_control_4x" else "")
    return t


def rung_lines(seed: int, g: dict) -> list[str]:
    """The ladder of one seed, a line per rung."""
    yn = {True: "HOLDS", False: "FAILS", None: "not run"}
    r1, r2, r3, r4 = (g[k] for k in ("1_realistic_update", "2_converged_adapters",
                                     "3_kd_from_v1_can_help", "4_muscle_vs_control"))
    lines = [f"seed {seed}, rung 1, a realistic update: {yn[r1['holds']]} (acc v1 "
             f"{pct(r1['acc_v1'])} / v2 {pct(r1['acc_v2'])}, within {100 * ACC_GAP_MAX:.0f} points; "
             f"NFR {pct(r1['nfr'])} and PFR {pct(r1['pfr'])}, each >= {100 * FLIP_MIN:.0f}%; "
             f"{r1['n_test']} held-out items, >= {N_TEST_MIN})"]
    ce = "; ".join(f"{ROW_NAMES[k]} dacc {pct(r2[k]['dacc_c'], True)} (noise {pct(r2[k]['noise'])})"
                   for k in ("ce_control", "ce_control_4x") if k in r2)
    lines.append(f"seed {seed}, rung 2, converged task adapters: {yn[r2['holds']]} (kept step v1 "
                 f"{r2['kept_step']['v1']}, v2 {r2['kept_step']['v2']} of {r2['task_steps']}; "
                 f"{ce or 'no CE control row'}; more CE must not raise accuracy past the noise)")
    lines.append(f"seed {seed}, rung 3, distillation from v1 can help: {yn[r3['holds']]}"
                 + ("" if r3["holds"] is None else
                    f" (plain KD from v1: dacc {pct(r3['dacc_c'], True)}, must be >= "
                    f"{100 * KD_DACC_MIN:+.0f} point; d%NFR_c {pct(r3['d_pct_nfr_c'], True)})"))
    if r4["holds"] is None:
        lines.append(f"seed {seed}, rung 4, MUSCLE against the control: not run")
    else:
        ce = ("" if "ce_d_pct_nfr_c" not in r4 else
              f"; CE control d%NFR_c {pct(r4['ce_d_pct_nfr_c'], True)}, dacc "
              f"{pct(r4['ce_dacc_c'], True)}")
        lines.append(
            f"seed {seed}, rung 4, MUSCLE against the control: {'MEETS' if r4['holds'] else 'MISSES'}"
            f" the goal (MUSCLE d%NFR_c {pct(r4['d_pct_nfr_c'], True)}, dacc "
            f"{pct(r4['dacc_c'], True)}{ce}; the mask sends {100 * r4['to_v1_first']:.1f}% of "
            f"the training tokens to v1 at the first step, {100 * r4['to_v1_last']:.1f}% at the "
            f"last; the student is right on {100 * r4['acc_new_first']:.1f}% -> "
            f"{100 * r4['acc_new_last']:.1f}% of them)")
    return lines


def summary_lines(s: dict) -> list[str]:
    """The summary as plain text lines: mean (min..max) over seeds of every rate and delta, the
    rungs per seed, and the verdict against the goal."""
    def cell(e, signed=False):
        if e["mean"] is None:
            return "n/a"
        return f"{pct(e['mean'], signed)} ({pct(e['min'], signed)}..{pct(e['max'], signed)})"

    head = f"summary over seeds {','.join(map(str, s['seeds']))}: mean (min..max), in %"
    lines = [head + " (d%NFR_c means leave out infinite values)"]
    keys = (("acc", "acc", False), ("nfr", "NFR", False), ("pfr", "PFR", False),
            ("nfr_mc", "NFR_mc", False), ("d_nfr_c", "dNFR_c", True),
            ("d_pct_nfr_c", "d%NFR_c", True), ("dacc_c", "dacc_c", True))
    width = max(len(ROW_NAMES[name]) for name in s["rows"])
    for name, e in s["rows"].items():
        parts = [f"{label} {cell(e[k], signed)}" for k, label, signed in keys if k in e]
        lines.append(f"  {ROW_NAMES[name]:<{width}} " + " | ".join(parts))
    yn = {True: "holds", False: "FAILS", None: "not run"}
    names = {"1_realistic_update": "1 realistic update", "2_converged_adapters":
             "2 converged adapters", "3_kd_from_v1_can_help": "3 KD from v1 can help",
             "4_muscle_vs_control": "4 MUSCLE meets the goal"}
    for r in s.get("rungs", []):
        lines.append(f"rungs, seed {r['seed']}: " + ", ".join(
            f"{names[k]} {yn[r[k]]}" for k in names))
    if "goal" in s:
        g = s["goal"]
        lines.append(f"goal: MUSCLE's mean d%NFR_c <= -30%: "
                     f"{'yes' if g['mean_d_pct_nfr_c_le_-30pct'] else 'no'} "
                     f"({pct(g['mean_d_pct_nfr_c'], True)})")
        for p in g["per_seed"]:
            lines.append(f"  seed {p['seed']}: d%NFR_c <= -15% "
                         f"{'yes' if p['d_pct_nfr_c_le_-15pct'] else 'no'}, dacc_c >= -1 point "
                         f"{'yes' if p['dacc_c_ge_-1pt'] else 'no'}, NFR below the CE control's "
                         f"{ {True: 'yes', False: 'no', None: 'n/a'}[p['nfr_below_ce_control']]}")
        # the verdict names every rung that fails and where, met or not: a goal met on seeds
        # whose setting is off (an update v2 wins by far, adapters more CE still improves) is
        # read with that caveat
        failed = []
        for k in names:
            where = [str(r["seed"]) for r in s.get("rungs", []) if r[k] is False]
            if where:
                failed.append(f"{names[k]} on seed{'s' if len(where) > 1 else ''} "
                              f"{', '.join(where)}")
        rungs_said = ("" if not s.get("rungs") else f"; rungs that fail: {'; '.join(failed)}"
                      if failed else "; every rung holds")
        lines.append(f"goal {'MET' if g['met'] else 'NOT MET'}{rungs_said}")
    return lines
