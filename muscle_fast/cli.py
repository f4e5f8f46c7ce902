"""``muscle-fast`` command line: one subcommand per small ``_add_<name>(subparsers)`` function.

To add a subcommand, write ``_add_<name>(sub)`` that registers its parser with
``set_defaults(func=...)`` (the function takes the parsed args and returns an exit code) and
append it to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys

_FLIPS_HELP = """\
Compare an old model (Mv1) with its update (Mv2), and optionally with the compatible update
(Mv2C, e.g. the new base with a MUSCLE compatibility adapter), instance by instance.

inputs (JSON Lines, one file per model):
  * lm-evaluation-harness per-sample logs: samples_<task>_<date>.jsonl written by
    `lm_eval --log_samples`. Instances are matched by doc_id (and checked by doc_hash); the
    score is the per-sample field named by --metric (acc, acc_norm, exact_match, ...). With
    --metric rouge1 and no such field, ROUGE-1 F1 is computed from the generation and target.
    A log with several filters needs --filter.
  * plain JSONL: {"id": ..., "prediction": ..., "label": ...} (acc: prediction == label;
    exact_match: equal after stripping whitespace; rouge1: ROUGE-1 F1 from rouge-score), or
    {"id": ..., "score": ...}, or {"id": ..., FIELD: number}.
  Ids present in one file and not another are an error (or --intersect); so is any malformed
  line, reported as file:line.

metrics (rates over the n matched instances, printed in %):
  acc_*    mean score of each model (accuracy for 0/1 scores)
  NFR      negative flip rate: old right, new wrong (graded scores: D = S_new - S_old < 0)
  PFR      positive flip rate: old wrong, new right (D > 0)
  NFR_mc   inconsistency flips: new wrong and new answer != old answer (needs the answers:
           lm-eval logs and prediction/label files have them, score-only files do not)
  m_g/m_r  mean gain over positive flips / mean regression (magnitude) over negative flips
  with --compat: NFR_c (old -> compat), dNFR_c = NFR_c - NFR, d%NFR_c = dNFR_c / NFR
  (0 when both are 0, +inf when only NFR is 0), dacc_c = acc_c - acc_new, dm_g, dm_r.
"""


def _run_flips(args: argparse.Namespace) -> int:
    from muscle_fast import flips as F

    try:
        paths = {"old": args.old, "new": args.new}
        if args.compat:
            paths["compat"] = args.compat
        logs = {
            n: F.read_eval_log(p, metric=args.metric, filter=args.filter) for n, p in paths.items()
        }
        keys, n_dropped = F.align_logs(logs, intersect=args.intersect)
    except F.FlipsInputError as e:
        print(f"muscle-fast flips: error: {e}", file=sys.stderr)
        return 2
    if n_dropped:
        print(
            f"muscle-fast flips: --intersect: dropped {n_dropped} instance(s) not present in "
            f"every file; comparing {len(keys)}",
            file=sys.stderr,
        )
    report = F.flip_report(logs, keys, n_dropped)
    F.render_table(report)
    if args.json:
        F.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        F.plot_flips(report, logs, keys, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _add_flips(sub) -> None:
    p = sub.add_parser(
        "flips",
        help="negative/positive flip rates between model versions, from evaluation logs",
        description=_FLIPS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--old",
        required=True,
        metavar="OLD",
        help="per-instance results of the old model Mv1 (.jsonl)",
    )
    p.add_argument(
        "--new",
        required=True,
        metavar="NEW",
        help="per-instance results of the updated model Mv2 (.jsonl)",
    )
    p.add_argument(
        "--compat",
        metavar="COMPAT",
        help="per-instance results of the compatible model Mv2C (.jsonl), optional",
    )
    p.add_argument(
        "--metric",
        metavar="acc|exact_match|rouge1|FIELD",
        help="per-instance score (default: acc if the log has it, else exact_match, "
        "else the log's first metric; 'score' for score-only files)",
    )
    p.add_argument(
        "--filter",
        metavar="NAME",
        help="lm-eval filter to read when a log holds several (e.g. strict-match)",
    )
    p.add_argument(
        "--intersect",
        action="store_true",
        help="compare only the instances present in every file, saying how many "
        "were dropped (default: such a mismatch is an error)",
    )
    p.add_argument(
        "--json", metavar="OUT.json", help="write the metrics as JSON (rates as fractions)"
    )
    p.add_argument(
        "--plot",
        metavar="FLIPS.png",
        help="draw the flips: 2x2 outcome grids for 0/1 scores, the distribution of "
        "D = S_new - S_old for graded scores",
    )
    p.set_defaults(func=_run_flips)


_DEMO_HELP = """\
The end-to-end MUSCLE update on this machine's CPU, from scratch, in a few minutes: for each
seed, two tiny Llama-architecture bases sharing one tokenizer are pre-trained on a synthetic
corpus of digit operations (v2 = a new pre-training run: its own init, a corpus mix richer in
arithmetic and without two ops v1 saw, more steps); a LoRA task adapter is trained on each base
(train split, kept at its best validation loss); the old and new task models are evaluated on
3000 held-out items (accuracy, negative flips); then compatibility adapters, trainable copies of
the new task adapter, are trained with fused_compat_loss for mask="muscle", "old_correct", plain
KD ("all_old") and a CE-only control. Prints a table per seed and a summary over seeds, writes
results.json, details.json and flips.png to --out. Bases are cached in --out.
"""


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end MUSCLE update on tiny Llama models (CPU, minutes)",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def run(args: argparse.Namespace) -> int:
        from muscle_fast.train.demo import demo_main

        return demo_main(args)

    from muscle_fast.train.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=run)


_SUBCOMMANDS = [_add_flips, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muscle-fast",
        description="muscle_fast: fused MUSCLE compatibility loss, its tools and its metrics.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``muscle-fast`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
