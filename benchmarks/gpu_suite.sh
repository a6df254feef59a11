#!/usr/bin/env bash
# streamdec's GPU checks in one run of at most 8 minutes on one GPU (the standing order: the first
# thing a session with a lent GPU runs):
#   1. install the wheels carried in wheels/ (no network there: build it with tools/build_wheels.sh),
#   2. the `cuda`-marked tests,
#   3. benchmarks/gpu.py with the time that is left (results: docs/benchmarks/gpu-<device>.json).
# Where the device tool sets $OUT, the results and this run's log are copied there to come back.
#
#     bash benchmarks/gpu_suite.sh             # on the GPU machine (Python 3.12, x86_64)
#     bash benchmarks/gpu_suite.sh --dry-run   # on a CPU: installs nothing, tiny sizes, plumbing only
#
# GPU_SUITE_SECONDS (default 450): the whole run's limit; STREAMDEC_WHEELS (default wheels): the folder.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=""
[ "${1:-}" = "--dry-run" ] && DRY_RUN="--dry-run"
LIMIT=${GPU_SUITE_SECONDS:-450}
TEST_LIMIT=${GPU_SUITE_TEST_SECONDS:-120}
WHEELS=${STREAMDEC_WHEELS:-wheels}
PY=${PYTHON:-$(command -v python || command -v python3)}
RESULTS=$(mktemp -d)
LOG="$RESULTS/gpu_suite.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # streamdec from this checkout, not installed
exec > >(tee "$LOG") 2>&1
log() { echo "[gpu_suite +${SECONDS}s] $*"; }

log "1/3 wheels"
if [ -n "$DRY_RUN" ]; then
    log "dry run: installing nothing (this Python's packages are used)"
elif [ -d "$WHEELS" ]; then
    install() {  # without --upgrade: what the machine has (torch, accelerate, numpy, ...) stays as it is
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@" \
            || "$PY" -m pip install -q --no-index --find-links "$WHEELS" --break-system-packages "$@"
    }  # (the second try for a system Python that refuses pip: the machine is thrown away after)
    install diffusers av pytest hypothesis tqdm huggingface_hub safetensors || log "WARNING: some wheels did not install"
    # fastvae alone and without dependencies: it needs triton, which comes with a CUDA build of torch
    install --no-deps fastvae || log "WARNING: fastvae did not install"
else
    log "WARNING: no $WHEELS folder: diffusers, PyAV and fastvae are missing unless the machine has them"
fi
"$PY" - <<'PY'
import importlib.metadata as m
import torch
names = ("torch", "diffusers", "av", "fastvae", "triton", "accelerate", "numpy", "pytest")
versions = []
for name in names:
    try:
        versions.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print("  ", ", ".join(versions))
print("   CUDA:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY

log "2/3 cuda-marked tests (at most ${TEST_LIMIT} s)"
timeout "$TEST_LIMIT" "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --continue-on-collection-errors \
    -o addopts="" 2>&1 | tail -40
log "tests: exit ${PIPESTATUS[0]} (5: none selected, 124: stopped at the limit)"

BUDGET=$((LIMIT - SECONDS - 20))
log "3/3 benchmarks/gpu.py (budget ${BUDGET} s)"
if [ "$BUDGET" -lt 30 ]; then
    log "SKIPPED: too little time left"
else
    timeout $((BUDGET + 15)) "$PY" benchmarks/gpu.py $DRY_RUN --budget "$BUDGET" --out "$RESULTS"
    log "gpu.py: exit $?"
fi

if [ -z "$DRY_RUN" ]; then
    mkdir -p docs/benchmarks
    cp "$RESULTS"/gpu-*.json docs/benchmarks/ 2>/dev/null && log "results in docs/benchmarks/"
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RESULTS"/* "$OUT"/ && log "results and log copied to \$OUT"
fi
log "done in ${SECONDS} s; results: $RESULTS"
