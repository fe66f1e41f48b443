#!/usr/bin/env bash
# One GPU lease in one command: build, GPU tests, benchmark table. Logs and results go to $OUT.
# Usage on the GPU box (torch preinstalled, offline): OUT=/tmp/out bash benchmarks/run_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv > "$OUT/nvidia_smi.txt"
MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build ok"
# Three shards in parallel: Triton compiles are CPU-bound and the box has 16 cores.
python -m pytest -m gpu -q -p no:cacheprovider -k "cuda and not triton" > "$OUT/test_cuda.log" 2>&1 &
python -m pytest -m gpu -q -p no:cacheprovider -k "triton-gpu and matches_reference" > "$OUT/test_triton_a.log" 2>&1 &
python -m pytest -m gpu -q -p no:cacheprovider -k "triton and not matches_reference" > "$OUT/test_triton_b.log" 2>&1 &
wait
for f in "$OUT"/test_*.log; do echo "== $f"; grep -E "passed|failed|error" "$f" | tail -3; grep -E "^FAILED|^ERROR" "$f" | head -15; done
python -m ktkernels.bench blurpool --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -100
