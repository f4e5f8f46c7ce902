"""``muscle-fast`` command line: one subcommand per small ``_add_<name>(subparsers)`` function.

To add a subcommand, write ``_add_<name>(sub)`` that registers its parser with
``set_defaults(func=...)`` (the function takes the parsed args and returns an exit code) and
append it to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

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


def _check_output(option: str, path) -> str | None:
    """Why ``path`` (given to ``option``) cannot be written as a file, or None; checked before
    any work so that a typo costs nothing."""
    p = Path(path)
    if p.is_dir():
        return f"{option} {path}: is a directory, expected a file name"
    parent = p.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a directory"
        return f"{option} {path}: the directory {parent} {what}"
    return None


def _run_flips(args: argparse.Namespace) -> int:
    from muscle_fast import flips as F

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and _check_output(option, path)
        if problem:
            print(f"muscle-fast flips: error: {problem}", file=sys.stderr)
            return 2
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
The end-to-end MUSCLE update on this machine's CPU, from scratch, in about five minutes. For
each seed: two tiny Llama-architecture bases sharing one tokenizer are pre-trained on a synthetic
corpus of digit operations; v2 is a new pre-training run (its own init, a corpus that drops
`max`, which v1's has, and adds `add2`, which v1's lacks, trained until converged). A LoRA task
adapter is trained on each base for a task no base saw, 'Q op a b c A r1 r2', whose labels carry
20% irreducible noise, with the loss over context and answer tokens; it is kept at its best
validation loss. The old and new task models answer 3000 held-out items (accuracy, negative
flips). Then rows trained from the new task adapter with fused_compat_loss: MUSCLE (live, and
from a teacher cache), mask "old_correct", plain KD from v1 ("all_old"), the likelihood masks
with CE, and the CE-only control at the same and at 4x the steps.

Prints a table per seed, the four rungs per seed (a realistic update; converged task adapters;
distillation from v1 can help; MUSCLE against the control), a summary over seeds and the verdict
against the goal (MUSCLE's d%NFR_c <= -15% on every seed and <= -30% on average, dacc_c >= -1
point, NFR below the CE control's). Writes results.json, details.json and flips.png to --out;
the bases are cached there and reused by the next run. Results and their history:
muscle_fast/train/DEMO_RESULTS.md.
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


_BENCH_HELP = """\
Runs the benchmark harness (the repository's benchmarks/ folder, shipped in the wheel as
muscle_fast._benchmarks); every argument is passed on to it: `muscle-fast bench --help` lists
them. From an installed wheel the result rows are appended to ./muscle_fast_bench/ unless --out
or --no-save is given.
"""

_NO_HARNESS = """\
muscle-fast bench: the benchmark harness is not in this installation. It lives in the
repository's benchmarks/ folder; from a checkout run
    pip install -e ".[bench]" && muscle-fast bench ARGS
or, without installing, from the checkout's root:
    PYTHONPATH=. python -m benchmarks ARGS"""


def _bench_main():
    """The harness's __main__ module: the wheel's copy, else the checkout's; None if neither."""
    try:
        return importlib.import_module("muscle_fast._benchmarks.__main__")
    except ModuleNotFoundError as e:
        if e.name not in ("muscle_fast._benchmarks", "muscle_fast._benchmarks.__main__"):
            raise
    import muscle_fast

    root = Path(muscle_fast.__file__).resolve().parents[1]
    if not (root / "benchmarks" / "harness.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.__main__")


def _run_bench(argv: list[str]) -> int:
    mod = _bench_main()
    if mod is None:
        print(_NO_HARNESS, file=sys.stderr)
        return 2
    if {"site-packages", "dist-packages"} & set(Path(mod.__file__).parts):
        mod.H.RESULTS = Path.cwd() / "muscle_fast_bench"  # never append rows inside site-packages
    return mod.main(argv, prog="muscle-fast bench")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="the benchmark harness (every peer, correctness first; `bench --help` for options)",
        description=_BENCH_HELP,
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _run_bench(args.args))


_CACHE_HELP = """\
Run MUSCLE's two teachers (the old task model and the new task model) once over a tokenized
training set and store what the compatibility loss needs, so that training
(CompatArguments(teacher_cache=OUT)) loads only the new base + compatibility adapter and runs
no teacher forward. Prints the cache's size before it starts; resumable: run the same command
again after an interruption and only the missing shards are built.

which kind:
  hidden  (default) exact: each teacher's last hidden state (the input of its output head, in
          the model's dtype) plus the old model's head. Training replays the heads: the loss
          is MUSCLE's own, at any --temperature and mask. Bytes per token 2 x H x element size
          (2.3 KB at H=576 in bf16, 16 KB at H=4096). Pick it unless disk is the constraint;
          it needs output heads that are plain linear maps (no logit soft-capping/scaling).
  topk    compact: both teachers as top-k ids + log-probabilities at --temperature plus the
          tail mass, the argmax and the label's log-probability. Bytes per token
          2 x (8 k + 12) (2.1 KB at k=128); no teacher weights during training. An
          approximation (the exact KL over k+1 categories): it fixes T and the labels; see
          benchmarks/NOTES.md "Teacher cache" for its error by k and T. Pick it when hidden
          states do not fit on disk, or a head is not a plain linear map.

data: JSON Lines, one row per line: {"input_ids": [...], "labels": [...], "attention_mask":
[...]} (labels and attention_mask optional; right padding), or a datasets.save_to_disk folder.
Rows are matched at training time by their tokens, in any order.
"""


def _add_cache_teachers(sub) -> None:
    p = sub.add_parser(
        "cache-teachers",
        help="run the old and new task models once over the training set and store their "
        "outputs (train the compatibility adapter without them)",
        description=_CACHE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--old-base", required=True, metavar="PATH",
                   help="old base model (AutoModelForCausalLM.from_pretrained)")
    p.add_argument("--old-adapter", metavar="DIR",
                   help="old task adapter (peft); omit when --old-base is the whole old model")
    p.add_argument("--new-base", required=True, metavar="PATH", help="new base model")
    p.add_argument("--new-adapter", metavar="DIR",
                   help="new task adapter (peft), the one the compatibility adapter starts from")
    p.add_argument("--data", required=True, metavar="FILE.jsonl|DIR",
                   help="tokenized training rows")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache folder")
    p.add_argument("--kind", choices=("hidden", "topk"), default="hidden",
                   help="what to store (default: hidden, exact; see above)")
    p.add_argument("--k", type=int, metavar="K",
                   help="top-k entries per token for --kind topk (default 128)")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="the training temperature; fixed by --kind topk (default 2.0)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer recorded by fingerprint (default: none recorded)")
    p.add_argument("--gguf-file", metavar="NAME",
                   help="load both bases (and --tokenizer) from this GGUF file in their folders")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype to load the models in (default: as saved)")
    p.add_argument("--device", default="cpu", help="device of the teacher forwards (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--rows-per-shard", type=int, default=512,
                   help="rows per shard file: the most an interruption loses (default 512)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache of another build in --out (default: an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from muscle_fast.train.cache import TeacherCacheError, cache_teachers_main

        try:
            return cache_teachers_main(args)
        except TeacherCacheError as e:
            print(f"muscle-fast cache-teachers: error: {e}", file=sys.stderr)
            return 2

    p.set_defaults(func=run)


_SUBCOMMANDS = [_add_flips, _add_demo, _add_bench, _add_cache_teachers]

# An optional dependency's import name -> the extra of each command that needs it.
_EXTRA_FOR = {
    "demo": ("train", {"transformers", "peft", "accelerate", "tqdm", "matplotlib", "safetensors"}),
    "flips": ("eval", {"rouge_score", "matplotlib", "lm_eval"}),
    "bench": ("bench", {"matplotlib", "pandas", "pytest_benchmark"}),
    "cache-teachers": ("train", {"transformers", "peft", "accelerate", "tqdm", "safetensors",
                                 "datasets"}),
}


def _missing_extra(command: str, err: ModuleNotFoundError) -> str | None:
    """The message naming the extra to install when `err` is one of its packages, else None."""
    extra, modules = _EXTRA_FOR.get(command, (None, set()))
    name = (err.name or "").split(".")[0]
    if extra is None or name not in modules:
        return None
    return (
        f"muscle-fast {command}: needs the '{name}' package, from the '{extra}' extra:\n"
        f'    pip install "muscle_fast[{extra}]"'
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("muscle_fast")
    except PackageNotFoundError:
        v = "(not installed)"
    try:
        from muscle_fast import _native

        cpu = f"native CPU kernel: {_native.best_isa()}"
    except Exception:  # noqa: BLE001 - any failure means: no native kernel here
        cpu = "no native CPU kernel (impl='torch' on the CPU)"
    return f"muscle-fast {v} ({cpu}; Python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it imports the package)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muscle-fast",
        description="muscle_fast: fused MUSCLE compatibility loss, its tools and its metrics.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``muscle-fast`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option belongs to the harness, --help included
        command, run = "bench", lambda: _run_bench(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return run()
    except ModuleNotFoundError as e:
        msg = _missing_extra(command, e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2
    except OSError as e:  # a path the user named cannot be read or written: one line, as above
        where = f"{e.filename}: " if e.filename else ""
        print(f"muscle-fast {command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
