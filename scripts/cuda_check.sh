#!/usr/bin/env bash
# The CUDA checks, for a machine with a CUDA GPU and a preinstalled torch (no network, no pip).
#
#   scripts/cuda_check.sh OUT_DIR
#
# Runs from the checkout (PYTHONPATH=the checkout), inside about 9½ minutes:
#   1. pytest verify tests -m cuda   (-n 4 only if pytest-xdist is installed; skip reasons shown;
#      among them tests/test_autocast_cuda.py: the mixed-precision examples and an fp16 + scaler
#      train on CUDA, graded with the low dtype's bounds)
#   2. refnet verify --device cuda --dtype all --json (every main-job example, among them the
#      training step's clipping, accumulation and LR schedule (train_step), the residual FFN
#      blocks (ffn_stack), bf16 autocast (spiral_bf16), fp16 autocast with a GradScaler
#      (circles_fp16_scaler), every mirrored activation and both norms under autocast
#      (autocast_activations), GELU/SiLU and the norm layers: CUDA's autocast op lists and
#      kernels, graded at the CUDA tiers)
#   3. a short refnet train on CUDA (xor, 300 steps)
#   4. refnet bench --device cuda --json (CUDA events, the mnist_bf16 autocast row, and the
#      captured CUDA-graph step;
#      torch.compile only with CUDA_CHECK_COMPILE=1: it needs a compiler toolchain and minutes)
# and writes every log and JSON into OUT_DIR (at most 8 files): checks.txt (what ran, what was
# skipped and why, what failed), pytest.log, verify.log, verify.json, train.log,
# train_summary.json, bench.log, bench.json.
#
# Exit status: 0 every check that ran passed (also: no CUDA device, everything skipped, said so);
# 1 a check failed or timed out; 2 usage error (missing/extra argument, OUT_DIR not a folder) or
# torch not importable.  Works with torch 2.11 and later; uses python3 unless PYTHON is set.
set -u

usage() {
    echo "usage: scripts/cuda_check.sh OUT_DIR  (one folder for the logs and JSON; created if missing)" >&2
    exit 2
}
[ "$#" -eq 1 ] && [ -n "$1" ] || usage
case "$1" in -*) usage ;; esac
if [ -e "$1" ] && [ ! -d "$1" ]; then
    echo "cuda_check: OUT_DIR: $1 exists and is not a folder" >&2
    exit 2
fi
mkdir -p "$1" 2>/dev/null || { echo "cuda_check: OUT_DIR: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# Seconds per step: 9½ minutes in all, with room for start-up (a lent device has 15 minutes).
T_PYTEST=210 T_VERIFY=200 T_TRAIN=40 T_BENCH=120

REPORT="$OUT/checks.txt"
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }

# One probe for everything the script needs to know (each python start imports torch: seconds).
probe=$("$PY" - 2>/dev/null <<'EOF'
import importlib.util
import torch
have = [m for m in ("pytest", "xdist", "hypothesis") if importlib.util.find_spec(m)]
if torch.cuda.is_available():
    print(f"cuda torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0)}")
else:
    print(f"none torch {torch.__version__}")
print(" ".join(have))
EOF
) || { echo "cuda_check: torch is not importable with $PY (set PYTHON to the interpreter that has it)" >&2; exit 2; }
device_line=$(printf '%s\n' "$probe" | sed -n 1p)
installed=" $(printf '%s\n' "$probe" | sed -n 2p) "
has_module() { case "$installed" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ "${device_line%% *}" != cuda ]; then
    say "cuda_check: no CUDA device: skipped (${device_line#* } sees none); nothing ran"
    exit 0
fi
say "cuda_check: ${device_line#* }"
for m in pytest xdist hypothesis; do
    if has_module "$m"; then say "  $m: installed"; else say "  $m: not installed"; fi
done

RAN=() SKIPPED=() FAILED=()
with_timeout() {  # with_timeout SECONDS CMD...: run with a time limit where `timeout` exists
    local limit=$1
    shift
    if command -v timeout >/dev/null 2>&1; then timeout "$limit" "$@"; else "$@"; fi
}
step() {  # step NAME SECONDS LOG CMD...
    local name=$1 limit=$2 log=$3
    shift 3
    say "== $name (limit ${limit} s): $*"
    local t0=$SECONDS status
    with_timeout "$limit" "$@" >"$log" 2>&1
    status=$?
    tail -n 5 "$log" | sed 's/^/   | /' | tee -a "$REPORT"
    local took=$((SECONDS - t0))
    if [ "$status" -eq 0 ]; then
        RAN+=("$name: passed (${took} s)")
    elif [ "$status" -eq 124 ]; then
        FAILED+=("$name: timed out after ${limit} s (log: $(basename "$log"))")
    else
        FAILED+=("$name: exit $status (${took} s, log: $(basename "$log"))")
    fi
}

# 1. the pytest CUDA checks
if has_module pytest; then
    par=()
    if has_module xdist; then par=(-n 4); else SKIPPED+=("pytest -n: pytest-xdist not installed, ran serially"); fi
    has_module hypothesis || SKIPPED+=("spec fuzzing (verify/test_fuzz_specs.py): hypothesis not installed")
    step "pytest -m cuda" "$T_PYTEST" "$OUT/pytest.log" \
        "$PY" -m pytest verify tests -m cuda -q -rs ${par[@]+"${par[@]}"}
    # the tests pytest skipped, with its reasons
    while IFS= read -r line; do
        SKIPPED+=("pytest: ${line#SKIPPED }")
    done < <(grep -E '^SKIPPED' "$OUT/pytest.log" || true)
else
    SKIPPED+=("pytest -m cuda: pytest not installed")
fi

# 2. every document example on CUDA, both dtypes
step "refnet verify --device cuda" "$T_VERIFY" "$OUT/verify.log" \
    "$PY" -m refnet verify --device cuda --dtype all --json "$OUT/verify.json"

# 3. a short training run on CUDA (its outputs in a scratch folder; the summary kept)
scratch=$(mktemp -d)
step "refnet train --device cuda" "$T_TRAIN" "$OUT/train.log" \
    "$PY" -m refnet train --example xor --device cuda --steps 300 --out "$scratch/train" --quiet
[ -f "$scratch/train/summary.json" ] && cp "$scratch/train/summary.json" "$OUT/train_summary.json"
rm -rf "$scratch"

# 4. the bench on CUDA: CUDA events, and the CUDA-graph step
compile=(--no-compile)
if [ "${CUDA_CHECK_COMPILE:-0}" = 1 ]; then
    compile=()
else
    SKIPPED+=("bench torch.compile variant: off unless CUDA_CHECK_COMPILE=1")
fi
step "refnet bench --device cuda" "$T_BENCH" "$OUT/bench.log" \
    "$PY" -m refnet bench --device cuda ${compile[@]+"${compile[@]}"} --json "$OUT/bench.json"

say ""
say "ran and passed (${#RAN[@]}):"
for s in ${RAN[@]+"${RAN[@]}"}; do say "  $s"; done
say "skipped (${#SKIPPED[@]}):"
for s in ${SKIPPED[@]+"${SKIPPED[@]}"}; do say "  $s"; done
say "failed (${#FAILED[@]}):"
for s in ${FAILED[@]+"${FAILED[@]}"}; do say "  $s"; done
say "logs and JSON: $OUT"
[ "${#FAILED[@]}" -eq 0 ]
