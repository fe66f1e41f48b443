"""Internal DCT-family kernels (torch.ops.ktkernels_C.*) against float64 references.

dct_basis2d_(x, left, right, out):          out[n,c] = left @ x[n,c] @ right^T
channel_power_mean_(x, p, out):             out[n,h,w] = mean_c |x[n,c,h,w]|^p
channel_power_mean_backward_(x, g, p, gx):  gx = (p/C) |x|^(p-1) sign(x) g[n,h,w]

Every output starts as NaN; strided outputs are views into a NaN buffer whose other elements must stay NaN.
"""

from __future__ import annotations

import random

import pytest
import torch
from backend_targets import DEVICES
from layouts import check_untouched, make_input, make_output

from ktkernels import _C  # noqa: F401  (registers torch.ops.ktkernels_C)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Error bound relative to sum |left| |x| |right| (basis) or to |reference| (power mean), per dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
X_LAYOUTS = ["nchw", "channels_last", "strided_c", "transposed", "permuted"]
OUT_LAYOUTS = ["nchw", "channels_last", "strided"]

ops = torch.ops.ktkernels_C


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_x(shape, dtype, device, layout: str, zeros: bool = False) -> torch.Tensor:
    """Random x of `shape` in a layout: nchw | channels_last | strided_c (x[:, ::2] of a channels_last
    tensor) | transposed (H and W swapped in memory) | permuted (memory order H, N, W, C)."""
    n, c, h, w = shape
    values = torch.randn(n, c, h, w, dtype=torch.float64)
    if zeros:
        values = values.masked_fill(torch.rand(values.shape) < 0.2, 0.0)
    return make_input(values, dtype, device, layout)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, tol: float) -> None:
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "output has NaN (unwritten elements?)"
    if expected.numel() == 0:
        return
    err = (actual - expected).abs()
    limit = tol * (bound.double().cpu() + expected.abs()) + 1e-30
    worst = (err / limit).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds tolerance {tol:g} (ratio {worst:.2f})"


# ------------------------------------------------------------------------------------------------
# dct_basis2d_


def run_basis(x, ho, wo, out_layout):
    n, c, h, w = x.shape
    adt = acc_dtype(x.dtype)
    left = torch.randn(ho, h, dtype=torch.float64)
    right = torch.randn(wo, w, dtype=torch.float64)
    out, buf = make_output((n, c, ho, wo), x.dtype, x.device, out_layout)
    ops.dct_basis2d_(x, left.to(x.device, adt), right.to(x.device, adt), out)
    xd = x.detach().double().cpu()
    ref = torch.einsum("ah,nchw,bw->ncab", left, xd, right)
    bound = torch.einsum("ah,nchw,bw->ncab", left.abs(), xd.abs(), right.abs())
    assert_close(out, ref, bound, TOL[x.dtype])
    check_untouched(out, buf)
    return out


def random_sizes(rng: random.Random, count: int, hi: int = 64):
    return [(rng.randint(1, hi), rng.randint(1, hi), rng.randint(1, hi), rng.randint(1, hi)) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
def test_basis_random_sizes(device, dtype, x_layout):
    rng = random.Random(f"{dtype}-{x_layout}")
    for i, (h, w, ho, wo) in enumerate(random_sizes(rng, 6)):
        n, c = rng.randint(1, 3), rng.choice([1, 3, 8, 19])
        x = make_x((n, c, h, w), dtype, device, x_layout)
        run_basis(x, ho, wo, OUT_LAYOUTS[i % len(OUT_LAYOUTS)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
def test_basis_layout_pairs(device, x_layout, out_layout):
    # Truncating (DCT with fewer coefficients) and expanding (its adjoint) bases, odd rectangular planes,
    # channel counts around the channel-block sizes.
    for (h, w, ho, wo), c in [((7, 5, 4, 3), 16), ((5, 9, 11, 12), 33), ((14, 14, 14, 14), 24), ((1, 1, 2, 1), 9)]:
        x = make_x((2, c, h, w), torch.float32, device, x_layout)
        run_basis(x, ho, wo, out_layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_basis_edge_shapes(device, dtype):
    # Empty batch or channels: nothing to do, nothing written.
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8)]:
        x = make_x(shape, dtype, device, "nchw")
        run_basis(x, 4, 4, "nchw")
    # Empty planes into a non-empty output: empty sums, so zeros (the NaN-poisoned output must be written).
    for h, w, ho, wo in [(0, 4, 3, 2), (5, 0, 2, 3)]:
        for layout in ["nchw", "channels_last"]:
            out = run_basis(make_x((2, 10, h, w), dtype, device, layout), ho, wo, layout)
            assert (out == 0).all()
    # 1-pixel planes and lines, to and from larger grids.
    for h, w, ho, wo in [(1, 1, 1, 1), (1, 1, 5, 3), (1, 7, 1, 7), (6, 1, 2, 1), (3, 2, 1, 1)]:
        for layout in ["nchw", "channels_last"]:
            run_basis(make_x((2, 10, h, w), dtype, device, layout), ho, wo, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last", "transposed"])
def test_basis_large_planes(device, x_layout):
    # 64 and 90 a side: the GPU's fused path with more than 48 KiB of shared memory (opt-in); a few
    # hundred a side (fp32) or 130 (fp64): beyond shared memory, the tiled two-pass fallback.
    cases = [
        ((64, 64, 64, 64), torch.float32),
        ((90, 90, 90, 90), torch.bfloat16),
        ((200, 150, 180, 160), torch.float32),
        ((130, 129, 130, 64), torch.float64),
    ]
    for (h, w, ho, wo), dtype in cases:
        x = make_x((1, 3, h, w), dtype, device, x_layout)
        run_basis(x, ho, wo, "channels_last" if x_layout == "channels_last" else "nchw")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_basis_many_planes(device, dtype, x_layout):
    # Enough small planes that GPU blocks take several planes each (crossing images when C is odd) and
    # CPU channel blocks split C.
    for n, c, h, w, ho, wo in [(64, 17, 6, 5, 3, 4), (8, 100, 7, 7, 7, 7), (3, 40, 4, 9, 9, 2)]:
        run_basis(make_x((n, c, h, w), dtype, device, x_layout), ho, wo, x_layout)


@pytest.mark.parametrize("device", DEVICES)
def test_basis_is_dct(device):
    # With orthonormal DCT-II rows, the forward then the transposed bases give back the input.
    def dct_matrix(k: int) -> torch.Tensor:
        i = torch.arange(k, dtype=torch.float64)
        m = torch.cos(torch.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * k)) * (2.0 / k) ** 0.5
        m[0] /= 2**0.5
        return m

    x = make_x((2, 5, 12, 9), torch.float32, device, "channels_last")
    dh, dw = dct_matrix(12).float().to(device), dct_matrix(9).float().to(device)
    y = torch.empty_like(x)
    ops.dct_basis2d_(x, dh, dw, y)
    z = torch.empty_like(x)
    ops.dct_basis2d_(y, dh.t().contiguous(), dw.t().contiguous(), z)
    torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_basis_errors(device):
    x = torch.randn(2, 3, 8, 6, device=device)
    left, right = torch.randn(4, 8, device=device), torch.randn(5, 6, device=device)
    out = torch.empty(2, 3, 4, 5, device=device)
    ops.dct_basis2d_(x, left, right, out)
    with pytest.raises(RuntimeError, match="left"):
        ops.dct_basis2d_(x, left.double(), right, out)
    with pytest.raises(RuntimeError, match="left"):
        ops.dct_basis2d_(x, torch.randn(4, 7, device=device), right, out)
    with pytest.raises(RuntimeError, match="right"):
        ops.dct_basis2d_(x, left, right.t(), out)
    with pytest.raises(RuntimeError, match="out"):
        ops.dct_basis2d_(x, left, right, torch.empty(2, 3, 5, 5, device=device))
    with pytest.raises(RuntimeError, match="out"):
        ops.dct_basis2d_(x, left, right, out.half())
    with pytest.raises(RuntimeError, match="4-D"):
        ops.dct_basis2d_(x[0], left, right, out)
    with pytest.raises(RuntimeError):
        ops.dct_basis2d_(x.int(), left, right, out)


# ------------------------------------------------------------------------------------------------
# channel_power_mean_ and its backward

PS = [1.0, 2.0, 3.0, 1.5, 4.0, 2.7]  # 1, 2: special cases; 3, 1.5, 4: exact powers; 2.7: pow


def power_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.detach().double().cpu().abs().pow(p).mean(1)


def power_grad_reference(x: torch.Tensor, g: torch.Tensor, p: float) -> torch.Tensor:
    xd, gd = x.detach().double().cpu(), g.detach().double().cpu()
    c = x.shape[1]
    if p == 1.0:
        return xd.sign() / c * gd[:, None]
    return (p / c) * xd.abs().pow(p - 1) * xd.sign() * gd[:, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
@pytest.mark.parametrize("p", PS)
def test_power_mean(device, dtype, x_layout, p):
    rng = random.Random(int(p * 10) + len(x_layout))
    # (2, 5, 7, 1): one column, so the positions are one axis along H (its stride differs from W's when transposed).
    shapes = [(2, 1, 5, 7), (3, 3, 1, 1), (1, 8, 9, 4), (2, 17, 6, 6), (2, 40, 3, 5), (1, 70, 33, 2), (2, 5, 7, 1)]
    shapes.append((rng.randint(1, 3), rng.randint(1, 64), rng.randint(1, 40), rng.randint(1, 40)))
    for shape in shapes:
        x = make_x(shape, dtype, device, x_layout, zeros=True)
        out = torch.full((shape[0], shape[2], shape[3]), float("nan"), dtype=acc_dtype(dtype), device=device)
        ops.channel_power_mean_(x, p, out)
        ref = power_reference(x, p)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close(out, ref, torch.full_like(ref, 1e-3), tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
@pytest.mark.parametrize("p", PS)
def test_power_mean_backward(device, dtype, x_layout, p):
    # The last, one column (positions along H), gets the strided grad_x (OUT_LAYOUTS[5 % 3]).
    shapes = [(2, 1, 5, 7), (3, 3, 1, 1), (1, 8, 9, 4), (2, 17, 6, 6), (2, 40, 3, 5), (2, 5, 7, 1)]
    for i, shape in enumerate(shapes):
        x = make_x(shape, dtype, device, x_layout, zeros=True)
        g = torch.randn(shape[0], shape[2], shape[3], dtype=acc_dtype(dtype), device=device)
        gx, buf = make_output(shape, dtype, device, OUT_LAYOUTS[i % len(OUT_LAYOUTS)])
        ops.channel_power_mean_backward_(x, g, p, gx)
        ref = power_grad_reference(x, g, p)
        assert_close(gx, ref, torch.full_like(ref, 1e-3), TOL[dtype] if dtype != torch.float32 else 1e-5)
        check_untouched(gx, buf)
        if p in (1.0, 2.0, 1.5):  # sign(0) = 0 and |0|^(p-1) = 0 give exact zeros
            assert (gx[x == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_power_mean_high_exponents(device, dtype, x_layout):
    # Exponents up to 15.5 use square-and-multiply on the CPU (every bit of k, and the half's sqrt); 16 and 17.25
    # take pow. 3 channels run the planar loops, 20 the channel-inner ones.
    for p in [8.0, 9.5, 13.0, 15.5, 16.0, 17.25]:
        for shape in [(2, 3, 5, 4), (2, 20, 3, 5)]:
            x = make_x(shape, dtype, device, x_layout, zeros=True)
            out = torch.full((shape[0], shape[2], shape[3]), float("nan"), dtype=dtype, device=device)
            ops.channel_power_mean_(x, p, out)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert_close(out, power_reference(x, p), torch.zeros(out.shape), tol)
            g = torch.randn(shape[0], shape[2], shape[3], dtype=dtype, device=device)
            gx, _ = make_output(shape, dtype, device, "nchw")
            ops.channel_power_mean_backward_(x, g, p, gx)
            assert_close(gx, power_grad_reference(x, g, p), torch.zeros(shape), tol)
            assert (gx[x == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_power_mean_empty_and_errors(device):
    x = torch.randn(0, 3, 4, 4, device=device)
    ops.channel_power_mean_(x, 2.0, torch.empty(0, 4, 4, device=device))
    ops.channel_power_mean_backward_(x, torch.empty(0, 4, 4, device=device), 2.0, torch.empty_like(x))
    x = torch.randn(2, 3, 4, 5, device=device)
    out = torch.empty(2, 4, 5, device=device)
    with pytest.raises(RuntimeError, match="out"):
        ops.channel_power_mean_(x, 2.0, out.double())
    with pytest.raises(RuntimeError, match="out"):
        ops.channel_power_mean_(x, 2.0, torch.empty(2, 5, 4, device=device))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.channel_power_mean_(x, 2.0, torch.empty(2, 5, 4, device=device).transpose(1, 2))
    with pytest.raises(RuntimeError, match="grad_map"):
        ops.channel_power_mean_backward_(x, torch.empty(2, 4, 4, device=device), 2.0, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="grad_x"):
        ops.channel_power_mean_backward_(x, out, 2.0, torch.empty_like(x).half())


def test_power_mean_large_channels_threads():
    # Many channels and positions: several OpenMP tasks, two chunks of channels (256 + 44) and the 16-lane
    # partial sums with their zero-padded tail.
    x = make_x((3, 300, 17, 19), torch.float32, "cpu", "channels_last")
    for p in PS:
        out = torch.full((3, 17, 19), float("nan"))
        ops.channel_power_mean_(x, p, out)
        assert_close(out, power_reference(x, p), torch.zeros(3, 17, 19), 1e-5)
