"""Flip reports on real evaluation logs: readers, alignment, the report, its table and its plot.

Inputs (one file per model, JSON Lines):

* lm-evaluation-harness per-sample logs, ``samples_<task>_<date>.jsonl`` written by
  ``lm_eval --log_samples`` (one record per ``doc_id`` and filter). The score is the record's
  per-sample metric field (``acc``, ``acc_norm``, ``exact_match``, ...); ``rouge1`` is computed
  from the generation (``filtered_resps[0]``) and ``target`` when the log has no such field.
  The chosen answer is recovered from ``filtered_resps``: the argmax of the choice
  log-likelihoods for multiple-choice tasks (per character for ``acc_norm``, per byte for
  ``acc_bytes``, as lm-eval scores them), the generated text for generation tasks.
* plain JSONL: ``{"id": ..., "prediction": ..., "label": ...}`` (score ``acc``: prediction ==
  label; ``exact_match``: equal after stripping whitespace; ``rouge1``: ROUGE-1 F1), or
  ``{"id": ..., "score": ...}``, or ``{"id": ..., FIELD: ...}`` for any numeric FIELD.

Every problem is a :class:`FlipsInputError` naming the file (and line): nothing is skipped
silently.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muscle_fast import metrics as M

__all__ = [
    "EvalLog",
    "FlipsInputError",
    "align_logs",
    "flip_report",
    "plot_flips",
    "read_eval_log",
    "render_table",
    "write_json",
]

_SHOW = 5  # how many offending ids an error names


class FlipsInputError(ValueError):
    """An evaluation log that cannot be read or compared, with the file and line at fault."""


@dataclass
class EvalLog:
    """One model's per-instance results, keyed by instance id (``doc_id`` or ``id``)."""

    path: str
    fmt: str  # "lm-eval" or "jsonl"
    metric: str
    order: list[Any]
    scores: dict[Any, float]
    preds: dict[Any, Any] | None  # the chosen answer, None when it cannot be recovered
    pred_note: str | None  # why preds is None
    labels: dict[Any, Any] = field(default_factory=dict)  # target / label, to cross-check files
    hashes: dict[Any, str] = field(default_factory=dict)  # lm-eval doc_hash
    filter: str | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def _records(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FlipsInputError(f"{path}: cannot read: {e.strerror or e}") from None
    n_rec = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FlipsInputError(
                f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
            ) from None
        if not isinstance(rec, dict):
            raise FlipsInputError(
                f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
            )
        n_rec += 1
        yield lineno, rec
    if n_rec == 0:
        raise FlipsInputError(f"{path}: no records (the file is empty)")


def _key(value: Any, path: Path, lineno: int, name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FlipsInputError(
            f"{path}:{lineno}: '{name}' must be an integer or a string, got {value!r}"
        )
    return value


def _mc_loglikelihoods(resps: Any) -> list[float] | None:
    """The choice log-likelihoods of an lm-eval multiple-choice record, else None."""
    if not isinstance(resps, list) or not resps:
        return None
    lls = []
    for r in resps:
        if not (isinstance(r, list) and len(r) == 2 and str(r[1]) in ("True", "False")):
            return None
        try:
            lls.append(float(r[0]))
        except (TypeError, ValueError):
            return None
    return lls


def _continuations(rec: dict) -> list[str] | None:
    args = rec.get("arguments")
    if not isinstance(args, dict):
        return None
    conts = []
    for i in range(len(args)):
        a = args.get(f"gen_args_{i}")
        if not isinstance(a, dict) or not isinstance(a.get("arg_1"), str):
            return None
        # lm-eval logs target_delimiter + choice; its acc_norm divides by len(choice)
        c = a["arg_1"]
        conts.append(c.removeprefix(" "))
    return conts


def _lm_eval_answer(rec: dict, metric: str) -> Any:
    """The answer the model chose, from ``filtered_resps``, or None if unrecoverable."""
    fr = rec.get("filtered_resps")
    lls = _mc_loglikelihoods(fr)
    if lls is not None:
        scale = np.ones(len(lls))
        if metric in ("acc_norm", "acc_bytes"):
            conts = _continuations(rec)
            if conts is None or len(conts) != len(lls):
                return None
            lens = [len(c.encode("utf-8")) if metric == "acc_bytes" else len(c) for c in conts]
            if min(lens) == 0:
                return None
            scale = np.asarray(lens, dtype=np.float64)
        return int(np.argmax(np.asarray(lls) / scale))
    if isinstance(fr, list) and len(fr) == 1 and isinstance(fr[0], str):
        return fr[0]
    return None


def read_eval_log(path, metric: str | None = None, filter: str | None = None) -> EvalLog:
    """Read one model's per-instance results (lm-eval sample log or plain JSONL).

    Args:
        path: the ``.jsonl`` file.
        metric: ``acc``, ``exact_match``, ``rouge1`` or any numeric per-instance field. None:
            ``acc`` if present, else ``exact_match``, else the first of the log's ``metrics``
            (lm-eval); ``acc`` for prediction/label files; ``score`` for score files.
        filter: the lm-eval filter to read when a log holds several (e.g. ``strict-match``).

    Returns:
        EvalLog. Raises FlipsInputError on anything that cannot be read as asked.
    """
    path = Path(path)
    recs = list(_records(path))
    first = recs[0][1]
    fmt = "lm-eval" if "doc_id" in first else "jsonl" if "id" in first else None
    if fmt is None:
        raise FlipsInputError(
            f"{path}:{recs[0][0]}: a record needs 'doc_id' (an lm-eval sample log) or 'id' "
            f"(plain JSONL), found keys {sorted(first)[:8]}"
        )
    id_name = "doc_id" if fmt == "lm-eval" else "id"

    chosen_filter = None
    if fmt == "lm-eval":
        filters = sorted({str(r.get("filter")) for _, r in recs})
        if filter is not None:
            if filter not in filters:
                raise FlipsInputError(
                    f"{path}: no samples with filter {filter!r}; it has {filters}"
                )
            chosen_filter = filter
        elif len(filters) > 1:
            raise FlipsInputError(
                f"{path}: the log holds several lm-eval filters {filters}; choose one with --filter"
            )
        else:
            chosen_filter = filters[0]
        recs = [(ln, r) for ln, r in recs if str(r.get("filter")) == chosen_filter]
    elif filter is not None:
        raise FlipsInputError(
            f"{path}: --filter applies to lm-eval sample logs, this is plain JSONL"
        )

    if metric is None:
        if fmt == "lm-eval":
            listed = first.get("metrics") if isinstance(first.get("metrics"), list) else []
            metric = (
                "acc"
                if "acc" in first
                else "exact_match"
                if "exact_match" in first
                else (listed[0] if listed else None)
            )
            if metric is None:
                raise FlipsInputError(f"{path}:{recs[0][0]}: no metric field found; pass --metric")
        else:
            metric = "score" if "score" in first and "prediction" not in first else "acc"

    order, scores, preds, labels, hashes, lines = [], {}, {}, {}, {}, {}
    to_rouge = []  # (key, prediction, reference) computed in one batch below
    for lineno, rec in recs:
        if id_name not in rec:
            raise FlipsInputError(f"{path}:{lineno}: missing '{id_name}'")
        k = _key(rec[id_name], path, lineno, id_name)
        if k in lines:
            raise FlipsInputError(
                f"{path}:{lineno}: {id_name} {k!r} repeats line {lines[k]}"
                + (f" (filter {chosen_filter!r})" if fmt == "lm-eval" else "")
            )
        lines[k] = lineno
        order.append(k)
        if fmt == "lm-eval":
            labels[k] = rec.get("target")
            if isinstance(rec.get("doc_hash"), str):
                hashes[k] = rec["doc_hash"]
            preds[k] = _lm_eval_answer(rec, metric)
            if metric in rec:
                v = rec[metric]
            elif metric == "rouge1" and isinstance(preds[k], str):
                to_rouge.append((k, preds[k], str(rec.get("target", ""))))
                continue
            else:
                have = rec.get("metrics", [])
                raise FlipsInputError(
                    f"{path}:{lineno}: no field {metric!r} in this sample (its metrics: {have})"
                    + (
                        "; rouge1 needs a generation in filtered_resps"
                        if metric == "rouge1"
                        else ""
                    )
                )
        else:
            has_pl = "prediction" in rec and "label" in rec
            if has_pl:
                preds[k], labels[k] = rec["prediction"], rec["label"]
            if metric in rec:
                v = rec[metric]
            elif has_pl and metric == "acc":
                v = float(rec["prediction"] == rec["label"])
            elif has_pl and metric == "exact_match":
                v = float(str(rec["prediction"]).strip() == str(rec["label"]).strip())
            elif has_pl and metric == "rouge1":
                to_rouge.append((k, str(rec["prediction"]), str(rec["label"])))
                continue
            else:
                raise FlipsInputError(
                    f"{path}:{lineno}: no field {metric!r}, and no 'prediction' and 'label' to "
                    f"compute it from (keys: {sorted(rec)[:8]})"
                )
        if isinstance(v, bool):
            v = float(v)
        if not _is_number(v):
            raise FlipsInputError(f"{path}:{lineno}: {metric!r} must be a finite number, got {v!r}")
        scores[k] = float(v)

    if to_rouge:
        vals = M.rouge1([p for _, p, _ in to_rouge], [r for _, _, r in to_rouge])
        scores.update({k: v for (k, _, _), v in zip(to_rouge, vals)})

    pred_note = None
    if fmt == "jsonl" and not preds:
        preds, pred_note = None, "score-only file: no predictions"
    elif fmt == "lm-eval":
        bad = [k for k in order if preds[k] is None]
        if bad:
            preds, pred_note = (
                None,
                f"answers not recoverable from filtered_resps (doc_id {bad[0]})",
            )
        else:
            wrong = [k for k in order if _answer_contradicts(preds[k], labels[k], scores[k])]
            if wrong:
                preds = None
                pred_note = (
                    f"answers from filtered_resps disagree with {metric!r} (doc_id {wrong[0]})"
                )
    return EvalLog(
        str(path), fmt, metric, order, scores, preds, pred_note, labels, hashes, chosen_filter
    )


def _answer_contradicts(pred: Any, target: Any, score: float) -> bool:
    """For a multiple-choice answer and an integer gold index, correctness must match the score."""
    if not isinstance(pred, int) or score not in (0.0, 1.0):
        return False
    try:
        gold = int(str(target))
    except ValueError:
        return False
    return (pred == gold) != (score == 1.0)


def _fmt_ids(ids: Sequence[Any]) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:_SHOW])
    return shown + (", ..." if len(ids) > _SHOW else "")


def align_logs(logs: dict[str, EvalLog], intersect: bool = False):
    """Match instances by id across the logs named ``{"old": ..., "new": ..., ["compat": ...]}``.

    Returns ``(keys, n_dropped)``, keys in the old log's order. Ids present in some logs and not
    in others raise FlipsInputError (counted, a few named) unless ``intersect``. Instances whose
    ``doc_hash`` or label differ between logs always raise: the logs are not of one dataset.
    """
    names = list(logs)
    ref = logs[names[0]]
    for n in names[1:]:
        if logs[n].metric != ref.metric:
            raise FlipsInputError(
                f"{names[0].upper()} is scored by {ref.metric!r} and {n.upper()} by "
                f"{logs[n].metric!r}; pass --metric to use one score for every file"
            )
    common = set(ref.scores)
    for n in names[1:]:
        common &= set(logs[n].scores)
    problems = []
    for n in names:
        extra = [k for k in logs[n].order if k not in common]
        if extra:
            others = " and ".join(m.upper() for m in names if m != n)
            problems.append(
                f"{len(extra)} instance(s) of {n.upper()} ({logs[n].path}) are missing from "
                f"{others}: {_fmt_ids(extra)}"
            )
    keys = [k for k in ref.order if k in common]
    if not keys:
        raise FlipsInputError("the logs have no instance id in common; " + "; ".join(problems))
    n_dropped = len(set().union(*(set(l.scores) for l in logs.values())) - common)
    if problems and not intersect:
        raise FlipsInputError(
            "; ".join(problems) + f". Pass --intersect to compare the {len(keys)} common instances."
        )
    for a, b in zip(names, names[1:]):
        la, lb = logs[a], logs[b]
        for what, da, db in (
            ("doc_hash", la.hashes, lb.hashes),
            ("label/target", la.labels, lb.labels),
        ):
            diff = [k for k in keys if k in da and k in db and da[k] != db[k]]
            if diff:
                raise FlipsInputError(
                    f"{len(diff)} instance(s) have a different {what} in {a.upper()} ({la.path}) "
                    f"and {b.upper()} ({lb.path}): {_fmt_ids(diff)}; are they logs of one dataset?"
                )
    return keys, n_dropped


def flip_report(logs: dict[str, EvalLog], keys: Sequence[Any], n_dropped: int = 0) -> dict:
    """The paper's metrics over aligned instances, as a JSON-ready dict (rates are fractions)."""
    _old, new = logs["old"], logs["new"]
    compat = logs.get("compat")
    s = {n: np.array([l.scores[k] for k in keys]) for n, l in logs.items()}
    binary = all(bool(np.all((v == 0) | (v == 1))) for v in s.values())
    metric = new.metric
    rep: dict[str, Any] = {
        "metric": metric,
        "kind": "discriminative" if binary else "generative",
        "n": len(keys),
        "n_dropped": n_dropped,
        "files": {n: l.path for n, l in logs.items()},
    }
    upd = M.generative_flips(s["old"], s["new"])
    rep.update(acc_old=upd.score_old, acc_new=upd.score_new)
    if compat is not None:
        rep["acc_c"] = float(s["compat"].mean())
    rep.update(nfr=upd.nfr, pfr=upd.pfr, nfr_mc=None, nfr_mc_note=None)

    pred_notes = [f"{n.upper()}: {l.pred_note}" for n, l in logs.items() if l.preds is None]
    if not binary:
        rep["nfr_mc_note"] = "scores are not 0/1, so 'wrong' is undefined"
    elif pred_notes:
        rep["nfr_mc_note"] = "; ".join(pred_notes)
    else:
        p = {n: [l.preds[k] for k in keys] for n, l in logs.items()}
        rep["nfr_mc"] = M.discriminative_flips(s["old"], s["new"], p["old"], p["new"]).nfr_mc
        if compat is not None:
            rep["nfr_mc_c"] = M.discriminative_flips(
                s["old"], s["compat"], p["old"], p["compat"]
            ).nfr_mc
    rep.update(m_g=upd.m_g, m_r=upd.m_r, n_negative=upd.n_negative, n_positive=upd.n_positive)
    if compat is not None:
        c = M.compat_deltas(s["old"], s["new"], s["compat"])
        cf = M.generative_flips(s["old"], s["compat"])
        rep.update(
            nfr_c=c.nfr_c,
            pfr_c=cf.pfr,
            dnfr_c=c.dnfr_c,
            dpct_nfr_c=c.dpct_nfr_c,
            dacc_c=c.dacc_c,
            m_g_c=cf.m_g,
            m_r_c=cf.m_r,
            dm_g=c.dm_g,
            dm_r=c.dm_r,
            n_negative_c=cf.n_negative,
            n_positive_c=cf.n_positive,
        )
    if binary:
        rep["counts"] = outcome_counts({n: s[n].astype(bool) for n in ("old", "new", "compat")
                                        if n in s})
    return rep


def outcome_counts(correct: dict[str, np.ndarray]) -> dict[str, int]:
    """Instances per joint outcome of 0/1-scored models, keyed by name and outcome:
    ``{"old correct, new wrong, compat correct": 3, ...}`` (every combination, correct first).
    (Before issue 23 this was an unlabelled nested list indexed [old][new][compat], 1 = correct.)"""
    names = list(correct)
    counts = {}
    for outcome in itertools.product((True, False), repeat=len(names)):
        hit = np.ones(len(correct[names[0]]), dtype=bool)
        for name, c in zip(names, outcome):
            hit &= correct[name] == c
        key = ", ".join(f"{n} {'correct' if c else 'wrong'}" for n, c in zip(names, outcome))
        counts[key] = int(hit.sum())
    return counts


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "-inf" if x < 0 else "nan"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(report: dict, path) -> None:
    """Write the report; an infinite d%NFR_c (NFR == 0 < NFR_c) is written as the string "inf"."""
    Path(path).write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def render_table(report: dict, console=None) -> None:
    """Print the report with rich in the paper's layout: a row per model, values in %."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
            console = Console(width=max(console.width, 140))
    has_c = "acc_c" in report
    m = report["metric"]
    cols = ["model", m, "NFR", "PFR", "NFR_mc", "m_g", "m_r"]
    rows = [
        ["old (Mv1)", _pct(report["acc_old"]), "", "", "", "", ""],
        [
            "new (Mv2)",
            _pct(report["acc_new"]),
            _pct(report["nfr"]),
            _pct(report["pfr"]),
            _pct(report["nfr_mc"]),
            _pct(report["m_g"]),
            _pct(report["m_r"]),
        ],
    ]
    if has_c:
        cols += ["dNFR_c", "d%NFR_c", f"d{m}_c", "dm_g", "dm_r"]
        rows = [r + [""] * 5 for r in rows]
        rows.append(
            [
                "compat (Mv2C)",
                _pct(report["acc_c"]),
                _pct(report["nfr_c"]),
                _pct(report["pfr_c"]),
                _pct(report.get("nfr_mc_c")),
                _pct(report["m_g_c"]),
                _pct(report["m_r_c"]),
                _pct(report["dnfr_c"], True),
                _pct(report["dpct_nfr_c"], True),
                _pct(report["dacc_c"], True),
                _pct(report["dm_g"], True),
                _pct(report["dm_r"], True),
            ]
        )
    title = f"Model update flips on {m} ({report['kind']}), n={report['n']}" + (
        f", {report['n_dropped']} dropped by --intersect" if report["n_dropped"] else ""
    )
    table = Table(
        title=title,
        caption=(
            "values in % (scores x 100). NFR/PFR: negative/positive flips from old; NFR_mc: new "
            "wrong with a different answer; m_g/m_r: mean gain/regression over the flips; "
            "d*_c: compat minus new (d%NFR_c: relative to NFR)"
        ),
    )
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for name, l in report["files"].items():
        console.print(f"  {name:>6}: {l}", soft_wrap=True)
    if report["nfr_mc"] is None:
        console.print(f"  NFR_mc n/a: {report['nfr_mc_note']}")
    if has_c and math.isinf(report["dpct_nfr_c"]):
        console.print(
            "  d%NFR_c is +inf: the plain update has no negative flip (NFR = 0) "
            "but the compatible model has some."
        )


def plot_flips(report: dict, logs: dict[str, EvalLog], keys: Sequence[Any], path) -> None:
    """Draw the flips: 2x2 outcome grids (old vs new[, old vs compat]) for 0/1 scores, the
    distribution of D = S_new - S_old and S_old vs S_new for graded scores. Saves a PNG."""
    # a bare Figure renders through Agg without touching pyplot's global backend
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    s = {n: np.array([l.scores[k] for k in keys]) for n, l in logs.items()}
    others = [n for n in ("new", "compat") if n in s]
    label = {"new": "new (Mv2)", "compat": "compatible (Mv2C)"}
    n = len(keys)
    if report["kind"] == "discriminative":
        fig = Figure(figsize=(5.2 * len(others), 4.6))
        axes = fig.subplots(1, len(others), squeeze=False)
        o = s["old"].astype(bool)
        for ax, name in zip(axes[0], others):
            w = s[name].astype(bool)
            grid = np.array([[np.sum(o & w), np.sum(o & ~w)], [np.sum(~o & w), np.sum(~o & ~w)]])
            kinds = [["kept correct", "NEGATIVE FLIP"], ["positive flip", "kept wrong"]]
            colors = [["#d9ead3", "#e06666"], ["#93c47d", "#eeeeee"]]
            for i in range(2):
                for j in range(2):
                    ax.add_patch(Rectangle((j, 1 - i), 1, 1, color=colors[i][j], ec="white", lw=3))
                    ax.text(
                        j + 0.5,
                        1.5 - i + 0.12,
                        f"{grid[i, j]}",
                        ha="center",
                        va="center",
                        fontsize=20,
                        weight="bold",
                    )
                    ax.text(
                        j + 0.5,
                        1.5 - i - 0.18,
                        f"{100 * grid[i, j] / n:.1f}%\n{kinds[i][j]}",
                        ha="center",
                        va="center",
                        fontsize=10,
                    )
            ax.set_xlim(0, 2), ax.set_ylim(0, 2)
            ax.set_xticks([0.5, 1.5], [f"{label[name]}\ncorrect", f"{label[name]}\nwrong"])
            ax.set_yticks([1.5, 0.5], ["old (Mv1)\ncorrect", "old (Mv1)\nwrong"])
            ax.tick_params(length=0)
            nfr = report["nfr"] if name == "new" else report["nfr_c"]
            pfr = report["pfr"] if name == "new" else report["pfr_c"]
            ax.set_title(f"old -> {label[name]}\nNFR {100 * nfr:.1f}%   PFR {100 * pfr:.1f}%")
            ax.set_aspect("equal")
    else:
        fig = Figure(figsize=(11, 4.6))
        ax_h, ax_s = fig.subplots(1, 2)
        bins = (
            np.linspace(-1, 1, 41) if all(np.all((v >= 0) & (v <= 1)) for v in s.values()) else 40
        )
        colors = {"new": "#3d85c6", "compat": "#e69138"}
        for name in others:
            d = s[name] - s["old"]
            nfr = np.mean(d < 0)
            ax_h.hist(
                d,
                bins=bins,
                alpha=0.6,
                color=colors[name],
                label=f"{label[name]}: NFR {100 * nfr:.1f}%, PFR {100 * np.mean(d > 0):.1f}%",
            )
            ax_s.scatter(s["old"], s[name], s=14, alpha=0.6, color=colors[name], label=label[name])
        ax_h.axvline(0, color="black", lw=1)
        ax_h.set_xlabel(f"D = {report['metric']}(model) - {report['metric']}(old)")
        ax_h.set_ylabel("instances")
        ax_h.set_title("per-instance change (left of 0: negative flips)")
        ax_h.legend(fontsize=9)
        lo = min(float(v.min()) for v in s.values())
        hi = max(float(v.max()) for v in s.values())
        ax_s.plot([lo, hi], [lo, hi], color="black", lw=1)
        ax_s.set_xlabel(f"{report['metric']} of old (Mv1)")
        ax_s.set_ylabel(f"{report['metric']} of updated model")
        ax_s.set_title("below the diagonal: regressed")
        ax_s.legend(fontsize=9)
    fig.suptitle(f"{report['metric']}, n={n}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
