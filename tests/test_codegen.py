"""What the blur-pool Triton kernels compile to on sm_90, checked without a GPU (``python -m ktkernels.bench codegen``).

The channels_last blur is memory bound. On the H100 the blur that reached 93-97% of copy (k3) had 32 resident warps
per SM, the k4 blur (61-68%) had 12, and bf16 ran at fp32's speed with half the bytes because every tap was a
scalar load (benchmarks/NOTES.md, "codegen"). Vector loads and occupancy are properties of the compiled code,
so they are pinned here, on any machine with triton's CUDA tools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
CUDA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUDA_TOOLS.exists(), reason="triton without its bundled CUDA tools")
REPO = Path(__file__).resolve().parents[1]


def codegen(*args: str) -> list[dict]:
    """``python -m ktkernels.bench codegen ARGS --json`` in a subprocess: its records."""
    # The recorder needs the real JIT kernels: the interpreter that conftest switches on must stay off.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "ktkernels.bench", "codegen", *args, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def kernels() -> dict[tuple[str, str], dict]:
    """(case, kernel + constexprs) -> codegen record, for the blur-pool family in both layouts."""
    records = codegen("--families", "blurpool", "--dtypes", "float32,bfloat16", "--layouts", "NHWC,NCHW")
    return {(r["case"], f"{r['kernel']} {r['constexprs']}"): r for r in records}


def _find(kernels: dict, case: str, kernel: str, *constexprs: str) -> dict:
    found = [
        r for (c, k), r in kernels.items() if c == case and k.startswith(kernel) and all(s in k for s in constexprs)
    ]
    assert len(found) == 1, f"{case} {kernel} {constexprs}: {sorted(k for c, k in kernels if c == case)}"
    return found[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,taps", [("adobe k4 L2 down", 16), ("timm k3 L2 down", 9)])
def test_blur_taps_are_vector_loads(kernels, case, taps, dtype):
    forward = _find(kernels, f"{case}, {dtype} NHWC", "_gather_kernel", f"KH={int(taps**0.5)} ")
    # One 16-byte load per tap and thread; the scalar loads left are the (index, weight) tables.
    assert forward["memory"].get("LDG.E.128", 0) >= taps, forward
    assert forward["memory"].get("LDG.E", 0) <= 16, forward
    assert forward["spill_bytes"] == 0, forward
    assert forward["warps_per_sm"] >= 24, forward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,rows", [("adobe k4 L2 down", 4), ("timm k3 L2 down", 3)])
def test_planar_blur_rows_are_vector_loads(kernels, case, rows, dtype):
    """NCHW: each row's aligned group is one 16-byte load, outputs are stored as vectors, and the phase split and
    interleave stay in registers (no shared-memory layout conversion). The gather kernel it replaces issued
    64-104 scalar loads and scalar stores at 16 warps/SM (benchmarks/NOTES.md, "planar")."""
    forward = _find(kernels, f"{case}, {dtype} NCHW", "_planar_blur_kernel")
    backward = _find(kernels, f"{case}, {dtype} NCHW", "_planar_blur_adjoint_kernel")
    assert forward["memory"].get("LDG.E.128", 0) >= rows, forward
    assert forward["memory"].get("STG.E.64", 0) >= 1 and "STG.E" not in forward["memory"], forward
    assert backward["memory"].get("STG.E.128", 0) >= 1 and "STG.E" not in backward["memory"], backward
    for record in (forward, backward):
        assert not any(op.startswith(("LDS", "STS")) for op in record["memory"]), record
        assert record["spill_bytes"] == 0 and record["warps_per_sm"] >= 28, record


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_max_blur_loads_each_window_element_once(kernels, dtype):
    forward = _find(kernels, f"maxblur k4 stem, {dtype} NHWC", "_max_blur_kernel", "DH=4 DW=4 KMAX=2")
    # The stem's window is (4 + 2 - 1)^2 = 25 x loads per thread, plus the band-table loads; the gather
    # that recomputed every window (4 * 4 taps x 2 * 2 maxes, and the codes again) issued 96.
    loads = sum(n for op, n in forward["memory"].items() if op.startswith("LDG"))
    assert loads <= 25 + 24, forward
    assert forward["spill_bytes"] == 0 and forward["warps_per_sm"] >= 16, forward
    # The backward loads the 3 x 3 gradient window of an input position once for its 4 window slots.
    backward = _find(kernels, f"maxblur k4 stem, {dtype} NHWC", "_max_blur_backward_kernel", "DH=3 DW=3 KMAX=2")
    assert backward["spill_bytes"] == 0 and backward["warps_per_sm"] >= 32, backward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planar_max_blur_loads_groups_not_gathers(kernels, dtype):
    """NCHW stem: each of the 5 x rows is 3 group loads of 2 outputs x 2 columns (vector loads, at most 2
    instructions each), plus the table loads; the banded kernel there issued 60 scalar loads (50 in bf16)."""
    forward = _find(kernels, f"maxblur k4 stem, {dtype} NCHW", "_planar_max_blur_kernel", "DH=4", "KMAX=2")
    loads = sum(n for op, n in forward["memory"].items() if op.startswith("LDG"))
    assert loads <= 5 * 3 * 2 + 10 and "LDG.E.U16" not in forward["memory"], forward
    assert forward["spill_bytes"] == 0 and forward["warps_per_sm"] >= 16, forward
    # The backward writes its 2 x 2 input columns per thread as one vector (the routing kernel: scalar stores).
    backward = _find(kernels, f"maxblur k4 stem, {dtype} NCHW", "_planar_max_blur_backward_kernel", "KMAX=2")
    assert not any(op in backward["memory"] for op in ("STG.E", "STG.E.U16")), backward
    assert backward["spill_bytes"] == 0 and backward["warps_per_sm"] >= 28, backward


def test_every_tested_geometry_compiles_without_spills():
    """The interpreter runs kernel variants that the GPU compiler may reject (it is stricter about constants).

    bf16 has the most elements per thread, so it is where registers run out first.
    """
    records = codegen("--families", "blurpool-geometries", "--dtypes", "bfloat16", "--layouts", "NHWC,NCHW")
    kernels = {r["kernel"] for r in records}
    assert kernels == {
        "_gather_kernel",
        "_planar_blur_kernel",
        "_planar_blur_adjoint_kernel",
        "_max_blur_kernel",
        "_planar_max_blur_kernel",
        "_planar_max_blur_backward_kernel",
        "_max_blur_backward_kernel",
    }, kernels
    spilled = [(r["case"], r["kernel"], r["constexprs"], r["spill_bytes"]) for r in records if r["spill_bytes"]]
    assert not spilled, spilled
