"""What the blur-pool Triton kernels compile to on sm_90, checked without a GPU (``python -m ktkernels.bench codegen``).

The channels_last blur is memory bound. On the H100 the blur that reached 93-97% of copy (k3) had 32 resident warps
per SM, the k4 blur (61-68%) had 12, and bf16 ran at fp32's speed with half the bytes because every tap was a
scalar load (benchmarks/NOTES.md, "codegen"). Vector loads, occupancy and the instructions issued per byte are
properties of the compiled code, so they are pinned here, on any machine with triton's CUDA tools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
CUDA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUDA_TOOLS.exists(), reason="triton without its bundled CUDA tools")
REPO = Path(__file__).resolve().parents[1]

# The ``bench codegen`` runs these tests read, each through the fixture of its name: the blur-pool family at the
# benchmark shapes, and every kernel variant of the interpreter tests (bf16, where registers run out first).
RUNS = {
    "kernels": ("--families", "blurpool", "--dtypes", "float32,bfloat16", "--layouts", "NHWC,NCHW"),
    "geometries": ("--families", "blurpool-geometries", "--dtypes", "bfloat16", "--layouts", "NHWC,NCHW"),
}
RUN_TIMEOUT_S = 900
_started: list[subprocess.Popen] = []  # the runs this process started (held, so they are reaped)


def start_runs(run_dir: Path, items: list[pytest.Item]) -> None:
    """Start in the background each run of ``RUNS`` that ``items`` use, unless a process of this session already has.

    On a cold Triton cache the runs compile for minutes (ptxas). conftest calls this as soon as the session's
    tests are collected, so the compiles overlap the rest of the suite and run once, not once per pytest-xdist
    worker that picks up one of these tests: the first process to create ``<run>.started`` starts the run, and
    every test waits for its result.
    """
    if not CUDA_TOOLS.exists():
        return
    for name in RUNS:
        if any(name in getattr(item, "fixturenames", ()) for item in items):
            _start(run_dir, name)


def _start(run_dir: Path, name: str) -> None:
    stem = run_dir / f"codegen-{name}"
    try:
        os.close(os.open(f"{stem}.started", os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return
    # The recorder needs the real JIT kernels: the interpreter that conftest switches on must stay off.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "ktkernels.bench", "codegen", *RUNS[name], "--json"]
    # .rc appears last: then .json and .err are complete (124: the run timed out).
    script = f'timeout {RUN_TIMEOUT_S} "$@" > "$0.json" 2> "$0.err"; echo $? > "$0.rc.part" && mv "$0.rc.part" "$0.rc"'
    _started.append(subprocess.Popen(["sh", "-c", script, str(stem), *command], cwd=REPO, env=env))


def codegen(request: pytest.FixtureRequest, run_dir: Path) -> list[dict]:
    """The records of ``python -m ktkernels.bench codegen RUNS[name] --json`` for the fixture ``name`` requested."""
    name = request.fixturename
    _start(run_dir, name)  # when conftest did not (a session that skipped its collection hook)
    stem = run_dir / f"codegen-{name}"
    rc, deadline = Path(f"{stem}.rc"), time.monotonic() + RUN_TIMEOUT_S + 60
    while not rc.exists():
        assert time.monotonic() < deadline, f"bench codegen {' '.join(RUNS[name])} never finished"
        time.sleep(0.5)
    assert rc.read_text().strip() == "0", f"exit {rc.read_text().strip()}: {Path(f'{stem}.err').read_text()[-3000:]}"
    return json.loads(Path(f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def kernels(request, codegen_run_dir) -> dict[tuple[str, str], dict]:
    """(case, kernel + constexprs) -> codegen record, for the blur-pool family in both layouts."""
    return {(r["case"], f"{r['kernel']} {r['constexprs']}"): r for r in codegen(request, codegen_run_dir)}


@pytest.fixture(scope="module")
def geometries(request, codegen_run_dir) -> list[dict]:
    """Codegen records of every kernel variant that the interpreter tests run, in bf16."""
    return codegen(request, codegen_run_dir)


def _find(kernels: dict, case: str, kernel: str, *constexprs: str) -> dict:
    found = [
        r for (c, k), r in kernels.items() if c == case and k.startswith(kernel) and all(s in k for s in constexprs)
    ]
    assert len(found) == 1, f"{case} {kernel} {constexprs}: {sorted(k for c, k in kernels if c == case)}"
    return found[0]


# What an H100 moves per microsecond in a copy (benchmarks/results/blurpool_h100_7a723e5.md: 2960-2972 GB/s), and the
# elements each blur direction moves at the benchmark's L2 shape: x and y (forward), or g and gx (backward).
COPY_BYTES_PER_US = 2960e3
L2_BLUR_ELEMENTS = 128 * 256 * (56 * 56 + 28 * 28)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("case", ["adobe k4 L2 down", "timm k3 L2 down"])
def test_blur_issues_in_well_under_its_byte_time(kernels, case, dtype, size, layout):
    """A memory-bound kernel reaches the copy bandwidth only if the H100 can issue its instructions in well under
    the time its bytes take. The per-output gathers that the rolling kernels replaced needed 0.8-1.8x that time
    (fp32 and bf16 NCHW, bf16 forward and every backward in channels_last; NOTES "rolling"): pinned at 0.6."""
    byte_us = L2_BLUR_ELEMENTS * size / COPY_BYTES_PER_US
    for kernel in ("_rolling_blur_kernel", "_rolling_blur_adjoint_kernel"):
        record = _find(kernels, f"{case}, {dtype} {layout}", kernel)
        assert record["issue_us"] <= 0.6 * byte_us, (record, byte_us)
        assert record["spill_bytes"] == 0 and record["warps_per_sm"] >= 16, record


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,taps", [("adobe k4 L2 down", 4), ("timm k3 L2 down", 3)])
def test_channels_last_blur_taps_are_vector_loads(kernels, case, taps, dtype):
    """channels_last: every tap of every x row is one 16-byte load per thread along C, every output row one
    16-byte store; the scalar loads left are the weights."""
    forward = _find(kernels, f"{case}, {dtype} NHWC", "_rolling_blur_kernel", "PLANAR=False")
    rows = 2 * 6 + taps  # R = 7 output rows at stride 2
    assert forward["memory"].get("LDG.E.128", 0) >= rows * taps, forward
    assert set(forward["memory"]) == {"LDG.E", "LDG.E.128", "STG.E.128"}, forward
    backward = _find(kernels, f"{case}, {dtype} NHWC", "_rolling_blur_adjoint_kernel", "PLANAR=False")
    assert set(backward["memory"]) == {"LDG.E", "LDG.E.128", "STG.E.128"}, backward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,taps", [("adobe k4 L2 down", 4), ("timm k3 L2 down", 3)])
def test_planar_blur_rows_are_vector_loads(kernels, case, taps, dtype):
    """NCHW: each x row's aligned group is one 16-byte load, outputs are stored as vectors, and the phase split and
    interleave stay in registers (no shared-memory layout conversion). The gather kernel the planar kernels
    replaced issued 64-104 scalar loads and scalar stores at 16 warps/SM (benchmarks/NOTES.md, "planar")."""
    forward = _find(kernels, f"{case}, {dtype} NCHW", "_rolling_blur_kernel", "PLANAR=True")
    backward = _find(kernels, f"{case}, {dtype} NCHW", "_rolling_blur_adjoint_kernel", "PLANAR=True")
    assert forward["memory"].get("LDG.E.128", 0) >= 2 * 6 + taps, forward
    assert forward["memory"].get("STG.E.64", 0) >= 7 and "STG.E" not in forward["memory"], forward
    assert backward["memory"].get("STG.E.128", 0) >= 14 and "STG.E" not in backward["memory"], backward
    for record in (forward, backward):
        assert not any(op.startswith(("LDS", "STS")) for op in record["memory"]), record


# The max-blur stem at batch 128: x (64 x 112 x 112), the output (56 x 56) and the uint8 codes (111 x 111) per
# image and channel, forward; the backward moves the same (gradient, codes, grad_input).
STEM_X, STEM_OUT, STEM_CODES = 128 * 64 * 112 * 112, 128 * 64 * 56 * 56, 128 * 64 * 111 * 111


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype,size,bound", [("float32", 4, 0.8), ("bfloat16", 2, 1.5)])
def test_max_blur_issue_time_against_its_byte_time(kernels, layout, dtype, size, bound):
    """The max-blur kernels take a max and, where they own it, an argmax per window element, so they are issue-
    bound even though each x row is loaded once. The banded/routing kernels the rolling ones replaced needed
    2.2-2.9x their byte time in fp32 and 3.8-5.4x in bf16; the rolling kernels needed 0.6-1.0x and 1.1-2.0x, and
    need 0.5-0.72x and 0.87-1.41x since a forward thread shares the columns of two outputs' windows (NCHW) and
    the backward splits planar codes in registers (triton 3.6 and 3.8), pinned here."""
    byte_us = ((STEM_X + STEM_OUT) * size + STEM_CODES) / COPY_BYTES_PER_US
    for kernel in ("_rolling_max_blur_kernel", "_rolling_max_blur_backward_kernel"):
        record = _find(kernels, f"maxblur k4 stem, {dtype} {layout}", kernel)
        assert record["issue_us"] <= bound * byte_us, (record, byte_us)
        assert record["spill_bytes"] == 0 and record["warps_per_sm"] >= 12, record


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_max_blur_without_codes_drops_the_argmax(kernels, layout, dtype):
    """With no backward to come the forward neither forms nor stores codes: no uint8 stores, and the argmax's
    instructions and registers go (sm_90, triton 3.8: 0.60-0.63x the instructions, 16-20 -> 24-28 warps/SM)."""
    full = _find(kernels, f"maxblur k4 stem, {dtype} {layout}", "_rolling_max_blur_kernel")
    inference = _find(kernels, f"maxblur k4 stem inference, {dtype} {layout}", "_rolling_max_blur_kernel")
    assert "CODES=True" in full["constexprs"] and "CODES=False" in inference["constexprs"]
    assert "STG.E.U8" not in inference["memory"] and sum(
        v for k, v in full["memory"].items() if k.startswith("STG")
    ) > (sum(v for k, v in inference["memory"].items() if k.startswith("STG"))), (full, inference)
    assert inference["instructions"] <= 0.75 * full["instructions"], (full, inference)
    assert inference["warps_per_sm"] > full["warps_per_sm"] and inference["spill_bytes"] == 0, (full, inference)


def test_every_tested_geometry_compiles_without_spills(geometries):
    """The interpreter runs kernel variants that the GPU compiler may reject (it is stricter about constants).

    bf16 has the most elements per thread, so it is where registers run out first.
    """
    kernels = {r["kernel"] for r in geometries}
    assert kernels == {
        "_rolling_blur_kernel",
        "_rolling_blur_adjoint_kernel",
        "_rolling_max_blur_kernel",
        "_rolling_max_blur_backward_kernel",
        "_gather_kernel",
        "_max_blur_kernel",
        "_max_blur_backward_kernel",
    }, kernels
    spilled = [(r["case"], r["kernel"], r["constexprs"], r["spill_bytes"]) for r in geometries if r["spill_bytes"]]
    assert not spilled, spilled


# Run with the interpreter off (conftest turns it on for this process): compiles one small blur for sm_90 twice,
# once through ``codegen.compile_for`` and once through ``JITFunction.run`` under a driver that reports an sm_90 GPU
# (run compiles, then fails to launch), each into its own cache, and prints both caches' keys.
_SAME_KEY_SCRIPT = """
import json, os, sys, tempfile, torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from ktkernels.bench import codegen
from ktkernels.blurpool import op

def call():
    x = codegen._input((2, 3, 13, 10), torch.float32, "NCHW")
    y = op.blur_pool2d(x, 4, 2, [1, 2, 1, 2], "reflect")
    y.backward(torch.empty_like(y))

class H100:
    def get_current_device(self): return 0
    def get_current_stream(self, device): return 0
    def get_current_target(self): return GPUTarget(*codegen.H100)

launches, caches = codegen.record({"small blur": call}), {}
for name in ("compile_for", "run"):
    knobs.cache.dir = caches[name] = tempfile.mkdtemp()
    for launch in launches:
        if name == "compile_for":
            codegen.compile_for(launch)
        else:
            driver.set_active(H100())
            launch.kernel.device_caches.clear()
            try:
                launch.kernel.run(*launch.args, grid=(1,), warmup=False, **launch.kwargs)
            except AttributeError:  # no launcher on this fake GPU: the compile before it is what counts
                pass
gpu_run = {codegen._specialisation(launch) for launch in codegen.gpu_run_launches((torch.bfloat16,), ("NCHW",))}
print(json.dumps({"kernels": [launch.kernel.__name__ for launch in launches],
                  "keys": {name: sorted(os.listdir(path)) for name, path in caches.items()},
                  "gpu_run_kernels": sorted({key.split()[0].rsplit(".", 1)[1] for key in gpu_run})}))
"""


def test_precompiled_cache_holds_the_keys_a_gpu_launch_looks_up():
    """``bench codegen --fill-cache`` precompiles the GPU run's kernels so that a GPU box compiles none of them: that
    needs the cache keys a launch on an sm_90 GPU computes, which ``JITFunction.run`` is checked against here."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _SAME_KEY_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(result["kernels"]) == ["_rolling_blur_adjoint_kernel", "_rolling_blur_kernel"], result
    keys = result["keys"]
    assert len(keys["run"]) == 2 and keys["compile_for"] == keys["run"], keys
    assert result["gpu_run_kernels"] == [
        "_rolling_blur_adjoint_kernel",
        "_rolling_blur_kernel",
        "_rolling_max_blur_backward_kernel",
        "_rolling_max_blur_kernel",
    ], result


def test_recorded_test_launches_rebuild_with_their_specialisation(tmp_path):
    """``--fill-cache --test-launches`` compiles what a test run launched under the interpreter, from JSON: each
    argument must come back with what Triton specialises on (dtype, 16-byte alignment, integer values), here for a
    strided (unaligned) bf16 input and a channels_last one, forward and backward."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records interpreted launches (a GPU machine runs the compiled kernels)")
    import torch
    import triton.language as tl

    from ktkernels import use_backend
    from ktkernels.bench import codegen
    from ktkernels.blurpool import op

    base = torch.randn(2, 4, 11, 19, dtype=torch.bfloat16)
    inputs = [base[:, 1:, :, 1::2], base.contiguous(memory_format=torch.channels_last)]
    seen = []
    stop = codegen.record_interpreted_launches(str(tmp_path / "launches"))
    try:
        with use_backend("triton"):
            for x in inputs:
                x = x.detach().requires_grad_()
                y = op.blur_pool2d(x, 4, 2, [1, 2, 1, 2], "reflect")
                y.backward(torch.ones_like(y))
                seen.append((x.data_ptr() % 16 == 0, x.stride()))
    finally:
        stop()
    launches = codegen.recorded_launches(str(tmp_path / "launches"))
    assert [launch.kernel.fn.__name__ for launch in launches] == [
        "_rolling_blur_kernel",
        "_rolling_blur_adjoint_kernel",
    ] * 2
    for launch, (aligned, stride) in zip(launches[::2], seen, strict=True):
        x = launch.args[0]
        assert x.dtype == torch.bfloat16 and x.stride() == stride and (x.data_ptr() % 16 == 0) == aligned
    assert not seen[0][0] and seen[1][0]  # the slice is unaligned, the channels_last copy aligned
    assert all(isinstance(a, int) for a in launches[0].args[4:]) and launches[0].kwargs["ACC"] == tl.float32


KERNEL_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def _scale(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)
"""


def test_kernel_fingerprint_follows_source_and_line(tmp_path, monkeypatch):
    """A carried Triton cache (triton_cache_sm90.sh) is found only while every kernel keeps its source and starting
    line: the fingerprint that guards it must change with either, and not with a change below the kernels."""
    import importlib

    from ktkernels.bench import codegen

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the JIT kernels, not the interpreter's stand-ins
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no .pyc of an earlier variant with the same size and mtime
    monkeypatch.syspath_prepend(str(tmp_path))
    variants = {
        "base": KERNEL_SOURCE,
        "below": KERNEL_SOURCE + "\n# a comment below the kernel moves nothing\n",
        "moved": "import math  # one more line above the kernel\n" + KERNEL_SOURCE,
        "edited": KERNEL_SOURCE.replace("* 2", "* 3"),
    }
    prints = {}
    for name, text in variants.items():
        (tmp_path / "fp_kernels.py").write_text(text)
        monkeypatch.delitem(sys.modules, "fp_kernels", raising=False)
        importlib.invalidate_caches()
        prints[name] = codegen.kernel_fingerprint(("fp_kernels",))
    assert prints["below"] == prints["base"], prints
    assert len({prints["base"], prints["moved"], prints["edited"]}) == 3, prints


def test_triton_build_names_the_parts_of_the_cache_key(monkeypatch):
    """``--triton-build`` (stored with a packed cache, printed by run_gpu.sh on the box): Triton's version, its key and
    a hash of the sm_90 backend's ptxas, the parts of every kernel's cache key that come from the machine."""
    import re

    import triton
    from triton.backends.nvidia import compiler

    from ktkernels.bench import codegen

    line = codegen.triton_build()
    assert re.fullmatch(rf"{re.escape(triton.__version__)} [0-9a-f]{{16}} ptxas [0-9a-f]{{8}}", line), line
    monkeypatch.setattr(compiler, "get_ptxas_version", lambda arch=80: "another ptxas")
    other = codegen.triton_build()
    assert other.split()[:2] == line.split()[:2] and other != line
