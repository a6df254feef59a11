#!/usr/bin/env bash
# Build the ignored wheels/ folder that benchmarks/gpu_suite.sh installs from on a lent GPU machine,
# which has PyTorch and accelerate but no network, no diffusers and no PyAV.
#
#     bash tools/build_wheels.sh            # -> wheels/ (run with network, from any Python)
#     bash tools/build_wheels.sh DIR        # -> DIR
#
# Wheels for CPython 3.12 on manylinux x86_64 (glibc 2.28 or newer: PyAV ships only manylinux_2_28),
# with their dependencies, of: diffusers and av (the versions this checkout's Python has, if it has
# them, so the GPU run's reference is the one the tests use), pytest and hypothesis (the test run),
# tqdm, huggingface_hub, safetensors (streamdec's own dependencies that may be missing there), and
# fastvae without dependencies (torch and triton come with the machine's PyTorch). Not taken:
# torch, accelerate (there already) and numpy (accelerate needs it, so it is there; 16 MB kept out
# to stay under the 64 MiB a device run may carry). transformers is not needed (nothing imports it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels}
PY=${PYTHON:-python3}
TARGET=(--only-binary :all: --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)

pinned() {  # NAME==VERSION where this Python has NAME, else NAME
    local version
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) && echo "$1==$version" || echo "$1"
}

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download "${TARGET[@]}" -d "$OUT" \
    "$(pinned diffusers)" "$(pinned av)" pytest hypothesis tqdm huggingface_hub safetensors
"$PY" -m pip download "${TARGET[@]}" --no-deps -d "$OUT" fastvae
rm -f "$OUT"/numpy-*.whl
echo "built $OUT: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
ls "$OUT"
