"""pytest-benchmark suite for the BlurPool family (compare runs over time with --benchmark-compare).

Run: ``pytest benchmarks --benchmark-enable`` (CPU: the 2-core target shape; GPU: a ResNet-50 shape).
In the normal test run benchmarks are disabled, so each case runs once as a smoke test.
Entries of one (device, kind, layout, mode) share a benchmark group, so the table compares them.
"""

import pytest
import torch

from ktkernels.bench import harness
from ktkernels.bench.blurpool import ours, recipe

GPU = torch.cuda.is_available()
PADS = (1, 2, 1, 2)
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]
IMPLS = [
    pytest.param(("cpu", "ktk-cpu"), id="cpu-ktk"),
    pytest.param(("cpu", "pytorch"), id="cpu-pytorch"),
    pytest.param(("cuda", "ktk-cuda"), id="cuda-ktk-cuda", marks=_gpu),
    pytest.param(("cuda", "ktk-triton"), id="cuda-ktk-triton", marks=_gpu),
    pytest.param(("cuda", "pytorch"), id="cuda-pytorch", marks=_gpu),
]
SHAPES = {"cpu": (16, 256, 56, 56), "cuda": (128, 256, 56, 56)}  # the maxblur stem uses C/4 at 2x the size


@pytest.mark.parametrize("mode", ["fwd", "f+b"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kind", ["blur", "maxblur"])
@pytest.mark.parametrize("impl", IMPLS)
def test_blurpool(benchmark, impl, kind, layout, mode):
    device, name = impl
    n, c, h, w = SHAPES[device]
    shape = (n, c // 4, 2 * h, 2 * w) if kind == "maxblur" else (n, c, h, w)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(memory_format=fmt)
    fn = recipe(kind, 4, PADS) if name == "pytorch" else ours(kind, 4, PADS, name.removeprefix("ktk-"))
    step = harness.fixed_step(mode, fn, x)
    if device == "cuda":
        timed = lambda: (step(), torch.cuda.synchronize())  # noqa: E731
    else:
        timed = step
    benchmark.group = f"{device} {kind} {layout} {mode} {tuple(shape)}"
    benchmark(timed)
