"""pytest-benchmark suite for the DCT family (compare runs over time with --benchmark-compare), and the recipes' checks.

Run: ``pytest benchmarks/bench_dct.py --benchmark-enable`` (CPU: tiny shapes; GPU: a ResNet-50 stage shape).
In the normal test run benchmarks are disabled, so each case runs once as a smoke test.
Entries of one (device, op, layout, mode, shape) share a benchmark group, so the table compares them.

The unit tests pin the two recipes the benchmark compares against (torch-dct's FFT algorithm and the matmul
basis) to ``scipy.fft.dctn(norm='ortho')`` in float64, and ``ktkernels.dct2d`` to them when it exists.
"""

import numpy as np
import pytest
import scipy.fft
import torch

import ktkernels
from ktkernels.bench import dct, harness

GPU = torch.cuda.is_available()
HAS_DCT = dct.has_api()
NO_DCT = "ktkernels.dct2d / dct_attention_map not in this build"
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]
IMPLS = [
    pytest.param(("cpu", "ktk-cpu"), id="cpu-ktk"),
    pytest.param(("cpu", "matmul"), id="cpu-matmul"),
    pytest.param(("cpu", "fft"), id="cpu-fft"),
    pytest.param(("cuda", "ktk-cuda"), id="cuda-ktk-cuda", marks=_gpu),
    pytest.param(("cuda", "ktk-triton"), id="cuda-ktk-triton", marks=_gpu),
    pytest.param(("cuda", "matmul"), id="cuda-matmul", marks=_gpu),
    pytest.param(("cuda", "fft"), id="cuda-fft", marks=_gpu),
]
# CPU: tiny (the suite stays under a few seconds); GPU: ResNet-50's layer3 output at batch 128.
SHAPES = {"cpu": [(2, 16, 14, 14), (2, 32, 7, 7)], "cuda": [(128, 1024, 14, 14), (128, 2048, 7, 7)]}


def _impl(op: str, device: str, name: str, size: int):
    if name.startswith("ktk"):
        backend = name.removeprefix("ktk-")
        if backend not in dct.available_backends(torch.device(device))[0]:
            pytest.skip(f"{name} cannot run the DCT ops here: {dct.available_backends(torch.device(device))[1]}")
        return dct.ours(op, backend)
    if name == "fft":
        return dct.dct2d_fft
    if op == "dct2d":
        return dct.matmul_recipe(size, size, torch.float32, torch.device(device))
    return dct.attention_recipe(size, size, torch.device(device))


@pytest.mark.parametrize("mode", ["fwd", "f+b"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("size_index", [0, 1], ids=["14x14", "7x7"])
@pytest.mark.parametrize("op", ["dct2d", "dct_attention_map"])
@pytest.mark.parametrize("impl", IMPLS)
def test_dct(benchmark, impl, op, size_index, layout, mode):
    device, name = impl
    if op == "dct_attention_map" and name == "fft":
        pytest.skip("the attention-map recipe uses the matmul DCT")
    shape = SHAPES[device][size_index]
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(memory_format=fmt)
    fn = _impl(op, device, name, shape[-1])
    step = harness.fixed_step(mode, fn, x)
    timed = (lambda: (step(), torch.cuda.synchronize())) if device == "cuda" else step
    benchmark.group = f"{device} {op} {layout} {mode} {tuple(shape)}"
    benchmark(timed)


SCIPY_SHAPES = [(3, 5, 4), (2, 3, 7, 7), (1, 2, 8, 6), (2, 1, 2, 3, 1)]


def _scipy_dct2(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"))


@pytest.mark.parametrize("shape", SCIPY_SHAPES, ids=str)
def test_recipes_match_scipy(shape):
    """Both recipes are the orthonormal 2-D DCT-II, forward and gradient (the inverse DCT of the output grad)."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    expected = _scipy_dct2(x.detach())
    expected_grad = torch.from_numpy(scipy.fft.idctn(g.numpy(), axes=(-2, -1), norm="ortho"))
    for recipe in (dct.dct2d_fft, dct.dct2d_matmul):
        y = recipe(x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], expected_grad, rtol=1e-12, atol=1e-12)


def test_dct_matrix_is_orthonormal_dct2():
    d = dct.dct_matrix(9)
    torch.testing.assert_close(d @ d.T, torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(d, torch.from_numpy(scipy.fft.dct(np.eye(9), axis=0, norm="ortho")))


@pytest.mark.skipif(not HAS_DCT, reason=NO_DCT)
@pytest.mark.parametrize("shape", SCIPY_SHAPES, ids=str)
def test_ktkernels_dct2d_matches_recipes(shape):
    x = torch.randn(shape, dtype=torch.float64)
    y = ktkernels.dct2d(x)
    torch.testing.assert_close(y, dct.dct2d_fft(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, dct.dct2d_matmul(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, _scipy_dct2(x), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_DCT, reason=NO_DCT)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_ktkernels_attention_map_matches_recipe(layout):
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64).to(memory_format=fmt)
    expected = _scipy_dct2(x.pow(2).mean(1))
    torch.testing.assert_close(ktkernels.dct_attention_map(x).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dct.attention_recipe(7, 6, x.device)(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_benchmark_table_records_failures(tmp_path):
    """The whole report path at a toy size: bf16 FFT is a recorded error (with its text), not a crash."""
    rows = dct.run(
        torch.device("cpu"),
        batch=1,
        dtypes=[torch.float32, torch.bfloat16],
        layouts=["NCHW", "NHWC"],
        compile_recipe=False,
        cases=[("toy", 4, 6)],
        attention_cases=[("toy", 4, 6)],
        reps=1,
    )
    harness.finish(rows, 10.0)
    fft_bf16 = [r for r in rows if r.impl == "fft" and r.dtype == "bfloat16"]
    assert fft_bf16 and all(r.ms is None and "BFloat16" in r.error for r in fft_bf16)
    assert all(r.ms for r in rows if r.impl != "fft" or r.dtype == "float32")
    env = {"device": "cpu", "torch": "", "triton": "", "commit": "", "date": "", "device_type": "cpu"}
    table = dct.write(rows, env, 10.0, tmp_path, "dct_toy")
    assert "Unsupported dtype BFloat16" in table and (tmp_path / "dct_toy.json").exists()


@pytest.mark.skipif(not HAS_DCT, reason=NO_DCT)
def test_forward_and_backward_run_on_the_named_backend(monkeypatch):
    """The backward ops pick their backend when autograd calls them: the timed step must hold the backend."""
    seen = []
    resolve = ktkernels.backend.resolve

    def spy(*args, **kwargs):
        seen.append(ktkernels.backend.get_backend())
        return resolve(*args, **kwargs)

    monkeypatch.setattr(ktkernels.backend, "resolve", spy)
    x = torch.randn(2, 3, 5, 5)
    harness.fixed_step("f+b", dct.ours("dct2d", "torch"), x)()
    assert seen and set(seen) == {"torch"}
