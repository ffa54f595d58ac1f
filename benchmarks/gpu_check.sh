#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one go (issue 18): install, the GPU tests, the
# measurements; PASS/FAIL lines and JSON under benchmarks/results/. A few minutes.
#
#   bash benchmarks/gpu_check.sh              # from the repo root, on a machine with CUDA
#   bash benchmarks/gpu_check.sh --allow-cpu  # dry run of the script itself, no GPU:
#                                             # small sizes, nothing judged
#   bash benchmarks/gpu_check.sh --copy-to DIR  # also copy this run's files into DIR
#   CKPTSTORE_GPU_NO_INSTALL=1 ...            # use $PYTHON (default python3) as it is
#
# On this project's lent GPU machine (no network; its image has torch, numpy, xxhash,
# fsspec, pytest, but not zstandard): once, here, put zstandard's wheel in .whl/
# (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl zstandard==0.25.0
# then run, with .whl carried and a timeout that leaves room for a rerun (~480 s):
#   bash benchmarks/gpu_check.sh --copy-to "$OUT"
# and commit the JSON files that come back under benchmarks/results/.
#
# Install: a venv (outside the tree, $CKPTSTORE_GPU_VENV, default /tmp/ckptstore-gpu-venv)
# that sees the machine's own CUDA build of torch (--system-site-packages), then
# `pip install -e .[dev]`. Without network, wheels put in .whl/ are installed instead
# (pip download ... -d .whl zstandard xxhash fsspec s3fs ...), and the package itself
# without its dependencies.
#
# Checks:
#   tests          pytest tests/test_cuda.py tests/test_cuda_staging.py
#                  tests/test_cuda_incremental.py (-m cuda tests run,
#                  nothing skipped where two GPUs exist; with one GPU the two-GPU tests skip)
#   stall, durable, load, pinned bytes, incremental saves    benchmarks/gpu_check.py
#   training overhead   the reference loop (--size medium) saving every 50 steps vs
#                  --no-checkpoint, benchmarks/bench_train.py; target <= 2%
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# The tree itself, whatever the install does (an offline editable install can fail).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ALLOW_CPU=0
COPY_TO=""
usage="usage: bash benchmarks/gpu_check.sh [--allow-cpu] [--copy-to DIR]"
while [ $# -gt 0 ]; do
    case "$1" in
        --allow-cpu) ALLOW_CPU=1 ;;
        --copy-to)
            [ $# -ge 2 ] || { echo "$usage: --copy-to needs a directory" >&2; exit 2; }
            COPY_TO=$2
            shift
            ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done

OUT=benchmarks/results
mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
LOG="$OUT/gpu-check-$STAMP.log"
VENV=${CKPTSTORE_GPU_VENV:-/tmp/ckptstore-gpu-venv}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
declare -A VERDICT
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
copy_out() {  # on every exit: this run's files into --copy-to's directory
    if [ -n "$COPY_TO" ]; then
        mkdir -p "$COPY_TO" && cp "$OUT"/gpu-check-*"$STAMP"* "$COPY_TO"/ 2>/dev/null
        for f in "${BENCH_JSON:-}" "${TRAIN_JSON:-}"; do
            [ -n "$f" ] && [ -f "$f" ] && cp "$f" "$COPY_TO"/
        done
    fi
    return 0
}
trap copy_out EXIT
verdict() {  # name, PASS|FAIL|DRY|SKIP, detail
    VERDICT[$1]="$2"
    [ "$2" = FAIL ] && FAILED=1
    say "$2 $1: $3"
}

run_script() {  # tag, script, args...: run it, keep its output; sets rc and JSON (its results file)
    local tag=$1
    shift
    "$PY" "$@" --out "$OUT" 2>&1 | tee "$OUT/gpu-check-$STAMP-$tag.txt" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    JSON=$(sed -n 's/^results: //p' "$OUT/gpu-check-$STAMP-$tag.txt" | tail -1)
}

# ---- install --------------------------------------------------------------------------
start=$(date +%s)
if [ "${CKPTSTORE_GPU_NO_INSTALL:-0}" = 1 ]; then
    say "install skipped (CKPTSTORE_GPU_NO_INSTALL=1): using $(command -v "$PY")"
elif ! { [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1; }; then
    # No venv here: the machine's python as it is, the carried wheels beside it.
    say "no venv could be made: using $(command -v "$PY") with .whl/ in $VENV-site"
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --target "$VENV-site" .whl/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="$PYTHONPATH:$VENV-site"
    fi
else
    if [ ! -f "$VENV/.ckptstore-torch" ]; then
        # The machine's python may itself be a venv (its torch then is not in the base
        # site-packages that --system-site-packages shows): point at torch's own folder.
        torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null)
        if [ -n "$torch_site" ]; then
            purelib=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            echo "$torch_site" >"$purelib/_machine_torch.pth"
        fi
        touch "$VENV/.ckptstore-torch"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    PY=python
    links=()
    [ -d .whl ] && links=(--find-links .whl)
    if ! "$PY" -m pip install -q --retries 1 --timeout 15 "${links[@]}" -e ".[dev]" >>"$LOG" 2>&1; then
        say "pip install -e .[dev] failed (offline?): installing .whl/ and the package alone"
        if [ -d .whl ]; then
            "$PY" -m pip install -q --no-index --no-deps .whl/*.whl >>"$LOG" 2>&1
        fi
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
    fi
fi
missing=$("$PY" - <<'EOF'
import importlib
names = ["torch", "numpy", "zstandard", "xxhash", "fsspec", "pytest", "ckptstore"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    verdict install FAIL "missing: $missing (carry their wheels in .whl/)"
    exit 1
fi
"$PY" - <<'EOF' | tee -a "$LOG"
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = [torch.cuda.get_device_name(i) for i in range(n)]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {n} GPU(s): {names}")
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" = 0 ] && [ "$ALLOW_CPU" = 0 ]; then
    verdict cuda FAIL "no CUDA device (torch.cuda.is_available() is False); --allow-cpu for a dry run"
    exit 1
fi
say "install: $(( $(date +%s) - start )) s"

# ---- the GPU tests ----------------------------------------------------------------------
start=$(date +%s)
"$PY" -m pytest -ra -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_staging.py \
    tests/test_cuda_incremental.py 2>&1 | tee "$OUT/gpu-check-$STAMP-pytest.txt" | tee -a "$LOG" | tail -25
rc=${PIPESTATUS[0]}
summary=$(grep -E '^[0-9]+ (passed|failed)|(passed|failed|skipped).* in [0-9.]+s' "$OUT/gpu-check-$STAMP-pytest.txt" | tail -1)
# "SKIPPED [N] file:line: cuda: needs ...": N tests per line
skipped_cuda=$(sed -n 's/^SKIPPED \[\([0-9]*\)\].*cuda: needs.*/\1/p' "$OUT/gpu-check-$STAMP-pytest.txt" |
    awk '{n += $1} END {print n + 0}')
if [ "$rc" != 0 ]; then
    verdict tests FAIL "pytest exit $rc: $summary"
elif [ "$GPUS" = 0 ]; then
    verdict tests DRY "$summary (every cuda test skipped: no GPU)"
else
    verdict tests PASS "$summary ($skipped_cuda skipped for want of GPUs)"
fi
say "tests: $(( $(date +%s) - start )) s"

# ---- stall, durable, load, pinned bytes, incremental saves ---------------------------
start=$(date +%s)
if [ "$ALLOW_CPU" = 1 ] && [ "$GPUS" = 0 ]; then
    bench=(--allow-cpu --size-mb 128 --repeats 2)
else
    bench=(--size-mb 2048 --repeats 3)
fi
run_script bench benchmarks/gpu_check.py "${bench[@]}"
BENCH_JSON=$JSON
if [ "$rc" != 0 ] || [ -z "$BENCH_JSON" ]; then
    verdict measurements FAIL "benchmarks/gpu_check.py exit $rc"
else
    while read -r word name rest; do
        verdict "$name" "$word" "$rest"
    done < <(grep -E '^(PASS|FAIL|DRY) ' "$OUT/gpu-check-$STAMP-bench.txt" | sed 's/: / /')
fi
say "measurements: $(( $(date +%s) - start )) s"

# ---- training overhead ----------------------------------------------------------------------
start=$(date +%s)
if [ "$GPUS" = 0 ]; then
    train=(--device cpu --size tiny --steps 60 --save-every 20 --repeats 1)
else
    train=(--device cuda --size medium --steps 300 --save-every 50 --repeats 2)
fi
run_script train benchmarks/bench_train.py "${train[@]}"
TRAIN_JSON=$JSON
if [ "$rc" != 0 ] || [ -z "$TRAIN_JSON" ]; then
    verdict training_overhead FAIL "benchmarks/bench_train.py exit $rc"
else
    overhead=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['overhead']['median'])" "$TRAIN_JSON")
    pct=$("$PY" -c "print(f'{100 * float(\"$overhead\"):.2f}%')")
    if [ "$GPUS" = 0 ]; then
        verdict training_overhead DRY "$pct (CPU dry run, not judged)"
    elif "$PY" -c "import sys; sys.exit(0 if float('$overhead') <= 0.02 else 1)"; then
        verdict training_overhead PASS "$pct (target <= 2%)"
    else
        verdict training_overhead FAIL "$pct (target <= 2%)"
    fi
fi
say "training overhead: $(( $(date +%s) - start )) s"

# ---- summary ------------------------------------------------------------------------------
SUMMARY="$OUT/gpu-check-summary-$STAMP.json"
{
    echo "{"
    echo "  \"date\": \"$STAMP\", \"gpus\": $GPUS, \"dry_run\": $([ "$GPUS" = 0 ] && echo true || echo false),"
    echo "  \"measurements\": \"${BENCH_JSON:-}\", \"training\": \"${TRAIN_JSON:-}\", \"log\": \"$LOG\","
    echo "  \"verdicts\": {"
    sep=""
    for k in "${!VERDICT[@]}"; do
        printf '%s    "%s": "%s"' "$sep" "$k" "${VERDICT[$k]}"
        sep=$',\n'
    done
    printf '\n  }\n}\n'
} >"$SUMMARY"
say "summary: $SUMMARY"
if [ "$FAILED" = 1 ]; then
    say "gpu_check: FAIL"
    exit 1
fi
say "gpu_check: $([ "$GPUS" = 0 ] && echo "DRY RUN (no GPU: nothing judged)" || echo PASS)"
