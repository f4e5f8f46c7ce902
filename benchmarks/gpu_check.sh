#!/usr/bin/env bash
# One prepared GPU check (issue 14 item 4): run as is on an H100/H200 machine, from the
# repository root, with the image's python3 (torch + triton, no package registry):
#
#     bash benchmarks/gpu_check.sh OUT_DIR            # at most 480 s of step timeouts in all
#     bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # CPU: print every step, import every entry point
#
# Steps, each under its own timeout so that a slow one leaves the rest their time:
#   1 env.txt          GPU, driver, python, torch, triton, numpy, commit
#   2 pytest_gpu.txt   pytest -m gpu
#   3 correctness.txt  every mask at V=128256 and at the odd V=128257 (bf16; the odd rows take
#                      the head peel, whose alignment claims a GPU is the first to test)
#                      against float64 on 64 rows; then sparse teachers (top-k + tail, k=64:
#                      both, and the old one only) at V=128256 against the float64 k+1-category
#                      loss
#   + sparse headline  (bench.log) bf16, N=8192, V=128256, k=64, muscle, fwd+bwd in place: both
#                      teachers sparse vs both dense, one run, with each design's bytes
#   4 gpu.csv          the headline benchmark (bf16, N=8192, V=128256, muscle, full): muscle_fast
#                      triton and triton,inplace, eager, Liger, torch.compile; one harness call per
#                      peer, so each row is in the CSV as soon as it is measured
#   5 sass.csv/.json   the compiled-code report (benchmarks/sass.py) for the card present
#   + bench.log        the harness's output;  summary.txt: each step's exit status and time
# Liger-Kernel: a wheel under ./.whl/ (benchmarks/README.md, "GPU check") is installed with
# --no-index --no-deps into OUT_DIR's sibling scratch folder; without one the peer is skipped.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
SCRATCH="${TMPDIR:-/tmp}/muscle_fast_gpu_check"
export PYTHONPATH="$ROOT:$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S LOG_FILE COMMAND...
  local name="$1" limit="$2" log="$3"; shift 3
  echo "== $name (timeout ${limit}s): $*" | tee -a "$SUMMARY"
  if [ "$DRY" = 1 ]; then return 0; fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  tail -n 5 "$log"
  return 0
}

if [ "$DRY" = 1 ]; then
  echo "dry run: every step below is printed, not run; every Python entry point is imported"
  "$PY" - <<'EOF' || exit 1
import importlib
for m in ("muscle_fast", "benchmarks.harness", "benchmarks.__main__", "benchmarks.sass"):
    importlib.import_module(m)
from benchmarks.harness import PEER_NAMES, sparse_correctness, sparse_headline, vocab_correctness  # noqa: F401
from benchmarks.sass import Variant, default_variants, main  # noqa: F401
for peer in ("muscle_fast[triton]", "muscle_fast[triton,inplace]", "eager", "liger", "torch.compile"):
    assert peer in PEER_NAMES, peer
print("imports ok:", len(default_variants()), "compiled-code variants")
EOF
  "$PY" -m benchmarks --help > /dev/null || exit 1
  "$PY" -m benchmarks.sass --help > /dev/null || exit 1
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/test_compat_loss.py \
    > /dev/null || exit 1
fi

# 1 environment
ENV_LOG="$OUT/env.txt"
step env 15 "$ENV_LOG" bash -c "date -u; uname -a; nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null;
  $PY - <<'EOF'
import sys, numpy, torch, triton
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'triton', triton.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs',
          round(p.total_memory / 2**30, 1), 'GiB', 'L2', getattr(p, 'L2_cache_size', '?'))
EOF"

# Liger-Kernel from a carried wheel, if any
WHEEL="$(ls "$ROOT"/.whl/liger_kernel-*.whl 2>/dev/null | head -n 1)"
if [ -n "$WHEEL" ]; then
  step liger-install 10 "$ENV_LOG" "$PY" -m pip install --no-index --no-deps --target "$SCRATCH/site" "$WHEEL"
else
  echo "== liger: no wheel under .whl/: the liger peer will be skipped" | tee -a "$SUMMARY"
fi

# 2 the gpu-marked tests
step pytest-gpu 70 "$OUT/pytest_gpu.txt" "$PY" -m pytest -m gpu -q -p no:cacheprovider -x tests

# 3 every mask at the real vocabulary vs float64
step correctness 70 "$OUT/correctness.txt" "$PY" -c \
  "import sys; from benchmarks.harness import vocab_correctness as c; sys.exit(c(128256) + c(128257))"
step sparse-correctness 15 "$OUT/correctness.txt" "$PY" -c \
  "import sys; from benchmarks.harness import sparse_correctness as c; sys.exit(c(128256))"

# 4 the headline benchmark, one peer per call (rows appended as measured)
# (timeouts: first compile included; torch.compile's compile is the longest)
for peer_limit in "muscle_fast[triton]:50" "muscle_fast[triton,inplace]:35" "eager:45" "liger:45" \
                  "torch.compile:65"; do
  peer="${peer_limit%:*}"
  step "bench $peer" "${peer_limit##*:}" "$OUT/bench.log" "$PY" -m benchmarks --n 8192 \
    --v 128256 --dtype bf16 --mask muscle --mode full --peers "$peer" --out "$OUT/gpu.csv"
done

# the sparse kernel's headline row (both designs in one run; lines in bench.log)
step sparse-headline 25 "$OUT/bench.log" "$PY" -c \
  "from benchmarks.harness import sparse_headline as h; h(8192, 128256, 64)"

# 5 the compiled-code report for the card present
ARCH="$( [ "$DRY" = 1 ] && echo sm_90 || "$PY" -c 'import torch; p = torch.cuda.get_device_capability(); print(f"sm_{p[0]}{p[1]}")' 2>/dev/null || echo sm_90)"
step sass 45 "$OUT/bench.log" "$PY" -m benchmarks.sass --arch "$ARCH" --v 128256 --dtype bf16 \
  --csv "$OUT/sass.csv" --json "$OUT/sass.json"

echo "== done: $(ls "$OUT" | wc -l) files in $OUT" | tee -a "$SUMMARY"
