#!/usr/bin/env bash
# bench/gpu_check.py on a lent GPU machine in one call, from the repo root: `bash bench/gpu_run.sh [OUTDIR [ARGS]]`
# (ARGS go to gpu_check.py).
# That machine has numba-cuda, torch and transformers but no network, and its numpy is too new for its numba-cuda:
# first, here, `pip download numpy==2.4.6 --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_27_x86_64 -d .whl` (plus a wheel of any other package it lacks), and carry `.whl`.
# tinyhun is not installed there: its tree is assembled under /tmp with kernels/ as tinyhun/kernels (what the
# package-dir mapping does on install), and gpu_check runs from that copy. Output: OUTDIR (default $OUT/gpu)
# holds results.json and report.md; the whole log goes to OUTDIR/../gpu_check.log as it runs.
set -euo pipefail
out=${1:-${OUT:?give OUTDIR or set OUT}/gpu}
shift || true
log=$(dirname "$out")/gpu_check.log
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tinyhun-site \
        .whl/*.whl
    export PYTHONPATH=/tmp/tinyhun-site${PYTHONPATH:+:$PYTHONPATH}
fi
run=/tmp/tinyhun-run
rm -rf "$run"
mkdir -p "$run"
cp -r tinyhun tests bench weights pyproject.toml "$run"/
cp -r kernels "$run"/tinyhun/kernels
cd "$run"
export PYTHONPATH=$run:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$log" || true
python3 -c 'import numba, numba.cuda, numpy; print("numpy", numpy.__version__, "numba", numba.__version__)' | tee -a "$log"
python3 bench/gpu_check.py "$out" "$@" 2>&1 | tee -a "$log"
