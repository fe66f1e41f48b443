#!/usr/bin/env bash
# Precompile, on this CPU machine, every Triton kernel of the GPU run's blurpool tables (bench blurpool and both tune
# tables) and of the blur-pool GPU tests for sm_90, into build/triton-cache-sm90.tgz. A lease carries it (run's
# carry: build/triton-cache-sm90.tgz) and benchmarks/run_gpu.sh unpacks it into TRITON_CACHE_DIR, so the box
# compiles none of those kernels (a planar max-blur kernel takes up to a minute of ptxas). Triton's cache key hashes
# Triton's own files, so the kernels are compiled by the box's Python and Triton build (3.12 and 3.6.0,
# ../shared/env.md) in a venv of their own. benchmarks/NOTES.md, "Precompiled Triton cache", has the measurements.
# Usage: PYTHON=python3.12 bash benchmarks/triton_cache_sm90.sh   (about 25 minutes on 2 cores)
#        bash benchmarks/triton_cache_sm90.sh --check   (before a lease: exit 1 unless the tgz matches the kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
TRITON=${TRITON:-3.6.0}
VENV=${CACHE_VENV:-build/venv-triton-$TRITON}
# The hash of every blur-pool kernel's Triton cache key (source and starting line: codegen.kernel_fingerprint).
fingerprint() { PYTHONPATH=. TRITON_INTERPRET=0 "$VENV/bin/python" -m ktkernels.bench codegen --fingerprint; }
if [ "${1:-}" = --check ]; then
  carried=$(tar xzf build/triton-cache-sm90.tgz -O triton-cache-sm90/KERNELS 2>/dev/null || echo none)
  tree=$(fingerprint)
  if [ "$carried" = "$tree" ]; then echo "build/triton-cache-sm90.tgz matches the kernels ($tree)"; exit 0; fi
  echo "build/triton-cache-sm90.tgz is stale: kernels $carried, tree $tree (rebuild: bash $0)"
  exit 1
fi
if ! [ -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" numpy
  "$VENV/bin/python" -m pip install -q --no-deps "triton==$TRITON"  # over the one torch pins: the box's Triton
fi
# The GPU tests' kernels too: test_blurpool.py and test_blurpool_api.py run the same test bodies at the same shapes
# under the interpreter (backend "triton-interp") as on the GPU ("triton-gpu"), so their interpreted launches are the
# GPU tests' launches.
make build > /dev/null
rm -f build/test-launches.jsonl.*
KTK_RECORD_TRITON_LAUNCHES="$PWD/build/test-launches.jsonl" .venv/bin/python -m pytest -q -n "${JOBS:-$(nproc)}" \
  tests/test_blurpool.py tests/test_blurpool_api.py -k triton -p no:cacheprovider > build/test-launches.log 2>&1 || { tail -20 build/test-launches.log; exit 1; }
rm -rf build/triton-cache-sm90 build/triton-cache-sm90.tgz
PYTHONPATH=. "$VENV/bin/python" -m ktkernels.bench codegen --fill-cache build/triton-cache-sm90 \
  --test-launches build/test-launches.jsonl --jobs "${JOBS:-$(nproc)}"
# Which Triton build and ptxas made the keys: run_gpu.sh prints the box's for comparison.
PYTHONPATH=. "$VENV/bin/python" -m ktkernels.bench codegen --triton-build > build/triton-cache-sm90/BUILD
# Which kernels: a move of one line above a kernel changes its key, and the box would compile it again.
fingerprint > build/triton-cache-sm90/KERNELS
# A launch needs only the cubin and the metadata: Triton loads those files of a cached group that exist, and the IRs
# and sources are 92% of the bytes. Groups list their files by absolute path: run_gpu.sh puts in the folder it unpacks
# to (a placeholder until then).
find build/triton-cache-sm90 -type f ! -name "*.json" ! -name "*.cubin" ! -name BUILD ! -name KERNELS -delete
sed -i "s|$(realpath build/triton-cache-sm90)|@TRITON_CACHE_DIR@|g" build/triton-cache-sm90/*/__grp__*.json
tar czf build/triton-cache-sm90.tgz -C build triton-cache-sm90
echo "$(cat build/triton-cache-sm90/BUILD), kernels $(cat build/triton-cache-sm90/KERNELS): $(du -h build/triton-cache-sm90.tgz | cut -f1) in build/triton-cache-sm90.tgz"
