#!/usr/bin/env bash
# A GPU lease: build, CUDA tests, benchmark tables, then the Triton GPU tests.
# Usage on the GPU box (torch preinstalled, offline): OUT=/tmp/out STEPS="build test blurpool" bash benchmarks/run_gpu.sh
# (carry build/triton-cache-sm90.tgz, made by benchmarks/triton_cache_sm90.sh, and the tables compile nothing).
# One device command may run 10 minutes, so a lease runs this in parts; every part rebuilds (about 60 s) because
# the box keeps nothing between commands. Parts: build test blurpool tune profile model dct losses train ktft triton
# (default: all).
# The `test` part runs every gpu test under pytest-xdist (the box has it; TEST_K="expr" selects as pytest -k,
# TEST_ARGS adds words without spaces); `triton` re-runs only the Triton ones
# in shards, for a box without xdist. Pass KTK_COMMIT=<sha> when the copied tree has no .git: the tables' headers
# record it (ktkernels.bench.harness.source_commit).
# The tables compile their Triton kernels first in JIT_WORKERS processes (one
# max-blur kernel can take a minute of ptxas; serially, the compiles took most of a 300 s part). The device tool
# returns at most 8 files: PACK=1 tars $OUT into one archive. DEADLINE (default 570 s) ends every part that long
# after the start, so that the packing happens before the tool's own limit; LIMIT_<part> caps one part.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
STEPS=" ${STEPS:-build test blurpool tune profile model dct losses train ktft triton} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
# The device tool kills a command at its limit (590-600 s), and then nothing gets packed: every part ends by
# DEADLINE seconds after the start (0: none), later parts are skipped, and the results are packed.
START=$SECONDS
DEADLINE=${DEADLINE:-570}
left() { if [ "$DEADLINE" -gt 0 ]; then echo $((DEADLINE - (SECONDS - START))); else echo 1000000; fi; }
# limit NAME CMD...: run CMD under `timeout` of LIMIT_<NAME> (default 590 s), or of what is left before DEADLINE,
# so that one slow part cannot eat the lease.
limit() {
  local v="LIMIT_$1" t l; shift; t=${!v:-590}; l=$(left)
  if [ "$l" -le 5 ]; then echo "skipped, past DEADLINE: $*"; return 124; fi
  [ "$l" -lt "$t" ] && t=$l
  timeout "$t" "$@"
}
# tests_limit DEFAULT: seconds for a pytest run that gets SIGINT at its limit and 30 s more to report (0: skip).
tests_limit() { local t=$1 l; l=$(($(left) - 35)); [ "$l" -lt "$t" ] && t=$l; [ "$t" -gt 5 ] && echo "$t" || echo 0; }
LIMIT_tune_blur=${LIMIT_tune_blur:-${LIMIT_tune:-590}}
mkdir -p "$OUT"
# Kernels precompiled on the dev machine for this box's Python and Triton (benchmarks/triton_cache_sm90.sh), when the
# lease carries build/triton-cache-sm90.tgz. triton_cache.txt says whether the two Triton builds' keys agree (else
# every kernel compiles here as before) and how many kernels the run still compiled here.
if [ -f build/triton-cache-sm90.tgz ]; then
  mkdir -p /tmp/ktk-triton && tar xzf build/triton-cache-sm90.tgz -C /tmp/ktk-triton
  export TRITON_CACHE_DIR=/tmp/ktk-triton/triton-cache-sm90
  sed -i "s|@TRITON_CACHE_DIR@|$TRITON_CACHE_DIR|g" "$TRITON_CACHE_DIR"/*/__grp__*.json  # absolute paths in groups
  # Triton's version, key and ptxas enter every kernel's cache key; so does any TRITON_* setting that changes a compile.
  echo "this box: $(TRITON_INTERPRET=0 python3 -m ktkernels.bench codegen --triton-build 2>&1 | tail -1)" \
    > "$OUT/triton_cache.txt"
  echo "carried: $(cat "$TRITON_CACHE_DIR/BUILD"), $(ls "$TRITON_CACHE_DIR" | wc -l) entries" >> "$OUT/triton_cache.txt"
  env | grep "^TRITON_" >> "$OUT/triton_cache.txt"
  cat "$OUT/triton_cache.txt"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia_smi.txt"
# pyproject.toml's SPDX license string needs setuptools >= 77 (this build is not isolated: the box's own one).
python3 -c "import setuptools; print('setuptools', setuptools.__version__)" > "$OUT/build.log" 2>&1
if MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; then
  echo "build ok"
else  # the Triton parts need no ktkernels._C, and run from the source tree (the repository root is the cwd)
  tail -60 "$OUT/build.log"; echo "BUILD FAILED: no C++/CUDA backends; the parts go on (Triton needs neither)"
fi
# The carried kernels are found only if no kernel's source or starting line moved since the cache was packed.
if [ -n "${TRITON_CACHE_DIR:-}" ]; then
  tree=$(TRITON_INTERPRET=0 python3 -m ktkernels.bench codegen --fingerprint 2>&1 | tail -1)
  carried=$(cat "$TRITON_CACHE_DIR/KERNELS" 2>/dev/null || echo none)
  [ "$carried" = "$tree" ] && verdict="match" || verdict="STALE: each changed or moved kernel compiles here"
  echo "kernels: carried $carried, this tree $tree ($verdict)" | tee -a "$OUT/triton_cache.txt"
fi
# A private libstdc++ inside _C (a static-only compiler runtime) makes C++ error messages segfault; setup.py
# links torch's libstdc++ to prevent it: say so loudly if it happened anyway.
copies=$(nm -C --defined-only ktkernels/_C*.so 2>/dev/null | grep -cE "std::locale::|std::codecvt<")
[ "${copies:-0}" = 0 ] || echo "WARNING: ktkernels._C defines $copies libstdc++ locale symbols (a private libstdc++ copy)"
if step test; then  # every gpu test (CUDA and Triton) in parallel workers: the Triton JIT per shape is CPU-bound
  # -v names each test as it ends, and the limit sends SIGINT (pytest then prints its failures and summary), so a
  # run cut off by TEST_TIMEOUT still says which tests passed and why the failed ones failed.
  # --continue-on-collection-errors: a module that needs ktkernels._C (a failed build) must not stop the others.
  t=$(tests_limit "${TEST_TIMEOUT:-420}")
  if [ "$t" -gt 0 ]; then
    timeout -s INT -k 30 "$t" python3 -m pytest tests benchmarks -m gpu -v -rfE -p no:cacheprovider \
      --continue-on-collection-errors -n "${TEST_JOBS:-12}" ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} \
      > "$OUT/test_gpu.log" 2>&1
    tail -1 "$OUT/test_gpu.log"
  else
    echo "skipped, past DEADLINE: test"
  fi
fi
if step blurpool; then
  limit blurpool python3 -m ktkernels.bench blurpool --jit-workers "${JIT_WORKERS:-14}" --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  grep -E "^\|" "$OUT/bench.log"
fi
if step tune; then  # Triton settings: the max-blur stem per shape (blurpool.MAX_BLUR_TUNE), the blur per prefetch (BLUR_TUNE)
  limit tune python3 -m ktkernels.bench blurpool --tune-max-blur --no-compile --jit-workers "${JIT_WORKERS:-14}" --out "$OUT" > "$OUT/bench_tune.log" 2>&1
  grep -E "^\|" "$OUT/bench_tune.log"
  limit tune_blur python3 -m ktkernels.bench blurpool --tune-blur --no-compile --jit-workers "${JIT_WORKERS:-14}" --out "$OUT" > "$OUT/bench_tune_blur.log" 2>&1
  grep -E "^\|" "$OUT/bench_tune_blur.log"
fi
if step profile; then  # hardware counters (ncu) of the Triton max-blur stem per tuned shape and of the NCHW blur
  # (MemoryWorkloadAnalysis_Tables: L1 sectors per request, which tests NOTES.md's "L1 wavefronts" hypothesis)
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  profile_run() {  # NAME ARGS...: each Triton kernel of the table once under ncu, compiled beforehand outside it
    local name=$1; shift
    limit profile python3 -m ktkernels.bench blurpool --launch-once --jit-workers "${JIT_WORKERS:-14}" "$@" > /dev/null 2>&1
    limit profile "$ncu" --target-processes all -k regex:_rolling --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section MemoryWorkloadAnalysis_Tables --csv --page details \
      python3 -m ktkernels.bench blurpool --launch-once "$@" > "$OUT/ncu_$name.csv" 2> "$OUT/ncu_$name.log"
    echo "ncu $name: $(grep -c '_rolling' "$OUT/ncu_$name.csv") metric rows"
  }
  profile_run maxblur --tune-max-blur
  profile_run blur_nchw --cases "adobe k4 L2 down,adobe k4 L3 down,adobe k4 L4 down" --layouts NCHW
fi
if step model; then  # the ResNet-50 training step: six variants, two cold compiles (~4 minutes)
  limit model python3 -m ktkernels.bench model --out "$OUT" ${MODEL_BENCH_ARGS:-} > "$OUT/bench_model.log" 2>&1
  grep -E "^\|" "$OUT/bench_model.log"
fi
if step dct; then  # ~64 recipe compiles: split with DCT_BENCH_ARGS="--dtypes float32" etc. if it runs long
  limit dct python3 -m ktkernels.bench dct --out "$OUT" ${DCT_BENCH_ARGS:-} > "$OUT/bench_dct.log" 2>&1
  grep -E "^\|" "$OUT/bench_dct.log"
fi
if step losses; then  # 4 cases x 2 dtypes, ~24 recipe compiles: split with LOSSES_BENCH_ARGS="--dtypes float32" etc.
  limit losses python3 -m ktkernels.bench losses --out "$OUT" ${LOSSES_BENCH_ARGS:-} > "$OUT/bench_losses.log" 2>&1
  grep -E "^\|" "$OUT/bench_losses.log"
fi
if step train; then  # the KTFT step (4 variants, two cold ResNet-50 compiles, ~4 minutes) + the cached loader (4096 JPEGs)
  limit train python3 -m ktkernels.bench train --out "$OUT" ${TRAIN_BENCH_ARGS:-} > "$OUT/bench_train.log" 2>&1
  grep -E "^\|" "$OUT/bench_train.log"
fi
if step ktft; then  # a short real run: JPEG ImageFolder (100 classes) -> prepare (K=25) -> ResNet-50 KTFT, 2 epochs
  python3 -c "from pathlib import Path; from ktkernels.bench.train import synthetic_image_folder as f; \
f(Path('/tmp/ktft/train'), 3000, 100, 16); f(Path('/tmp/ktft/val'), 1000, 100, 16, seed=1)"
  { limit ktft python3 -m ktkernels.train prepare /tmp/ktft/train --out /tmp/ktft/cache --per-class 25 --no-progress &&
    limit ktft python3 -m ktkernels.train train --data /tmp/ktft/cache --val /tmp/ktft/val --arch resnet50 --new-head \
      --epochs 2 --batch-size 128 --log-every 5 --run-dir "$OUT/ktft_run" --no-progress ${KTFT_ARGS:-}
  } > "$OUT/ktft_run.log" 2>&1
  tail -n 8 "$OUT/ktft_run.log"; rm -f "$OUT/ktft_run/checkpoint.pt" "$OUT/ktft_run/student.pt"
  rm -rf "$OUT/ktft_run/cache"
fi
if step triton; then
  t=$(tests_limit "${TRITON_TEST_TIMEOUT:-400}")
  for k in "triton-gpu and blur_pool2d_matches" "triton-gpu and (max_blur or 1d)" "triton and not (blur_pool2d_matches or max_blur or 1d)"; do
    [ "$t" -gt 0 ] || { echo "skipped, past DEADLINE: triton"; break; }
    timeout -s INT -k 30 "$t" python3 -m pytest tests benchmarks -m gpu -v -rfE -p no:cacheprovider \
      --continue-on-collection-errors -k "$k" > "$OUT/test_triton_$(echo "$k" | tr -dc a-z | cut -c1-16).log" 2>&1 &
  done
  wait
fi
for f in "$OUT"/test_*.log; do [ -e "$f" ] && { echo "== $f: $(tail -1 "$f")"; grep -E "^(FAILED|ERROR)" "$f" | head -10; }; done
# The carried kernels hold no PTX (triton_cache_sm90.sh keeps only cubins): each .ptx is a kernel compiled here.
[ -n "${TRITON_CACHE_DIR:-}" ] && echo "kernels compiled on this box: $(find "$TRITON_CACHE_DIR" -name '*.ptx' | wc -l)" |
  tee -a "$OUT/triton_cache.txt"
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/results.tgz "$OUT/results.tgz"
fi
