"""Internal losses-family kernels (torch.ops.ktkernels_C.*) against the float64 reference (ktkernels/losses).

transfer_stats_(s, t, basis, sq, proj):                 sq = sum_hw (s - t)^2, proj[0|1] = basis @ s|t per plane
transfer_grad_(s, t, basis, pixel_coef, coef, grad):    grad = pixel_coef (s - t) + coef @ basis per plane
soft_target_forward_(s, t, T, rows):                    rows = [kl, logsumexp(s/T), logsumexp(t/T)]
soft_target_backward_(s, t, T, rows, grad_rows, gs, gt)

The references are the contract functions of ktkernels/losses/reference.py evaluated in float64. Every output
starts as NaN; strided outputs are views into a NaN buffer whose other elements must stay NaN.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from backend_targets import DEVICES, GPU
from layouts import check_untouched, make_input, make_output

from ktkernels import _C  # noqa: F401  (registers torch.ops.ktkernels_C)
from ktkernels.losses import reference as ref
from ktkernels.losses.basis import projection_basis

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Error bounds: TOL_ACC relative to a bound of the accumulated magnitudes (the kernels accumulate in float32,
# float64 for float64 data); TOL_OUT relative to |reference| for the rounding of a low-precision output;
# ATOL for float16 outputs below its subnormal range.
TOL_ACC = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
TOL_OUT = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ATOL = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 6e-8, torch.bfloat16: 0.0}
LAYOUTS = ["nchw", "channels_last", "strided_c", "strided_w", "transposed", "permuted"]
GRAD_LAYOUTS = ["nchw", "channels_last", "strided"]

ops = torch.ops.ktkernels_C


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_x(shape, dtype, device, layout: str, scale: float = 1.0) -> torch.Tensor:
    """Random features in a layout: nchw | channels_last | strided_c (x[:, ::2] of a channels_last tensor) |
    strided_w (x[..., ::2]) | transposed (H and W swapped in memory) | permuted (memory order H, N, W, C)."""
    n, c, h, w = shape
    values = torch.randn(n, c, h, w, dtype=torch.float64) * scale
    return make_input(values, dtype, device, layout)


def assert_close(actual, expected, bound, tol_acc: float, tol_out: float = 0.0, atol=0.0) -> None:
    """|actual - expected| <= tol_acc * bound + tol_out * |expected| + atol elementwise; no NaN or inf where the
    reference is finite."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "output has NaN (unwritten elements?)"
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all(), "output has inf where the reference is finite"
    assert torch.equal(actual[~finite], expected[~finite]), "infinite entries differ"
    if not finite.any():
        return
    a, e = actual[finite], expected[finite]
    err = (a - e).abs()
    if isinstance(atol, torch.Tensor):
        atol = atol.double().cpu().expand(expected.shape)[finite]
    limit = tol_acc * bound.double().cpu()[finite] + tol_out * e.abs() + atol + 1e-300
    worst = (err / limit).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds tolerance (ratio {worst:.2f})"


# ------------------------------------------------------------------------------------------------
# transfer_stats_


def run_stats(s, t, basis):
    """Runs transfer_stats_ into NaN-filled outputs and checks them against the float64 contract."""
    n, c = s.shape[:2]
    adt = acc_dtype(s.dtype)
    j = basis.shape[0]
    sq = torch.full((n, c), float("nan"), dtype=adt, device=s.device)
    proj = torch.full((2, n, c, j), float("nan"), dtype=adt, device=s.device)
    ops.transfer_stats_(s, t, basis, sq, proj)
    sd, td, bd = s.double().cpu(), t.double().cpu(), basis.double().cpu()
    sq_ref, proj_ref = ref.transfer_stats(sd, td, bd)
    proj_bound = torch.stack([ref.transfer_stats(x.abs(), x.abs(), bd.abs())[1][0] for x in (sd, td)])
    assert_close(sq, sq_ref, sq_ref, TOL_ACC[s.dtype])
    assert_close(proj, proj_ref, proj_bound, TOL_ACC[s.dtype])
    return sq, proj


def make_basis(j: int, hw: int, dtype, device) -> torch.Tensor:
    return torch.randn(j, hw, dtype=torch.float64).to(device, acc_dtype(dtype))


STATS_SHAPES = [(2, 3, 5, 7), (1, 9, 1, 1), (3, 1, 4, 1), (2, 16, 7, 7), (1, 37, 3, 11), (2, 70, 6, 5), (3, 8, 1, 9)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transfer_stats(device, dtype, layout):
    for i, shape in enumerate(STATS_SHAPES):
        j = [0, 1, 4][i % 3]
        s = make_x(shape, dtype, device, layout)
        # The teacher sometimes in another layout: the strides of s and t are independent.
        t = make_x(shape, dtype, device, layout if i % 2 else LAYOUTS[(i + 1) % len(LAYOUTS)])
        run_stats(s, t, make_basis(j, shape[2] * shape[3], dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed"])
def test_transfer_stats_projection_bases(device, layout):
    # The bases the loss uses (GAP, low-pass DCT, none) on odd feature maps.
    for mode, keep in [("gap", 1), ("dct_lowpass", 2), ("dct_lowpass", 4), ("none", 1)]:
        for dtype in [torch.float64, torch.float32]:
            s = make_x((2, 12, 7, 5), dtype, device, layout)
            t = make_x((2, 12, 7, 5), dtype, device, layout)
            run_stats(s, t, projection_basis(mode, keep, 7, 5, acc_dtype(dtype), device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided_w", "transposed"])
def test_transfer_stats_large_planes(device, dtype, layout):
    # More positions than a CPU segment (planar) or a GPU split; channels-inner blocks of positions. Transposed
    # planes do not merge into one axis, so a CPU segment ends inside a row (4096 = 57 x 71 + 49).
    for shape, j in [((1, 2, 67, 71), 2), ((2, 24, 40, 33), 3), ((1, 9, 1, 5000), 1)]:
        s = make_x(shape, dtype, device, layout)
        t = make_x(shape, dtype, device, layout)
        run_stats(s, t, make_basis(j, shape[2] * shape[3], dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_transfer_stats_many_planes(device, layout):
    # Enough planes that GPU blocks take several each and channel tiles split C; J above one register chunk.
    for shape, j in [((64, 17, 5, 3), 4), ((4, 200, 7, 7), 1), ((3, 40, 4, 9), 18)]:
        s = make_x(shape, torch.float32, device, layout)
        t = make_x(shape, torch.float32, device, layout)
        run_stats(s, t, make_basis(j, shape[2] * shape[3], torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_transfer_stats_empty(device):
    # No planes: nothing to write. No positions: zero sums.
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5), (2, 3, 4, 0)]:
        for j in [0, 2]:
            s, t = torch.randn(shape, device=device), torch.randn(shape, device=device)
            sq, proj = run_stats(s, t, make_basis(j, shape[2] * shape[3], torch.float32, device))
            assert (sq == 0).all() and (proj == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_transfer_stats_deterministic(device, layout):
    s = make_x((2, 48, 30, 30), torch.float32, device, layout)
    t = make_x((2, 48, 30, 30), torch.float32, device, layout)
    basis = make_basis(4, 900, torch.float32, device)
    first = run_stats(s, t, basis)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = run_stats(s, t, basis)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ------------------------------------------------------------------------------------------------
# transfer_grad_


def run_grad(s, t, basis, grad_layout):
    n, c, h, w = s.shape
    adt = acc_dtype(s.dtype)
    j = basis.shape[0]
    pixel_coef = torch.tensor([0.37], dtype=adt, device=s.device)
    coef = torch.randn(n, c, j, dtype=torch.float64).to(s.device, adt)
    grad, buf = make_output(s.shape, s.dtype, s.device, grad_layout)
    ops.transfer_grad_(s, t, basis, pixel_coef, coef, grad)
    sd, td, bd, pd, cd = (x.double().cpu() for x in (s, t, basis, pixel_coef, coef))
    expected = ref.transfer_grad(sd, td, bd, pd, cd)
    bound = ref.transfer_grad(sd.abs(), -td.abs(), bd.abs(), pd.abs(), cd.abs())
    assert_close(grad, expected, bound, TOL_ACC[s.dtype], TOL_OUT[s.dtype], ATOL[s.dtype])
    check_untouched(grad, buf)
    return grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transfer_grad(device, dtype, layout):
    for i, shape in enumerate(STATS_SHAPES):
        j = [0, 1, 4][i % 3]
        s = make_x(shape, dtype, device, layout)
        t = make_x(shape, dtype, device, LAYOUTS[(i + 2) % len(LAYOUTS)])
        run_grad(s, t, make_basis(j, shape[2] * shape[3], dtype, device), GRAD_LAYOUTS[i % len(GRAD_LAYOUTS)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
def test_transfer_grad_large(device, grad_layout):
    # Basis rows in groups of four and a remainder.
    for shape, j, layout in [
        ((1, 2, 67, 71), 6, "nchw"),
        ((1, 2, 67, 71), 2, "transposed"),  # a CPU segment ends inside a row (see the stats test)
        ((2, 24, 40, 33), 5, "channels_last"),
    ]:
        s = make_x(shape, torch.float32, device, layout)
        t = make_x(shape, torch.float32, device, "channels_last")
        run_grad(s, t, make_basis(j, shape[2] * shape[3], torch.float32, device), grad_layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transfer_mixed_layouts(device, dtype):
    # The student's layout picks the loops (channels-inner here, with whole vectors of channels); the teacher and
    # the gradient may each be in another layout, the gradient also a view with a channel stride of 2.
    for shape, j in [((2, 16, 5, 7), 3), ((1, 24, 3, 4), 1)]:
        basis = make_basis(j, shape[2] * shape[3], dtype, device)
        s = make_x(shape, dtype, device, "channels_last")
        for t_layout, grad_layout in [("nchw", "strided_c"), ("strided_c", "channels_last"), ("transposed", "nchw")]:
            t = make_x(shape, dtype, device, t_layout)
            run_stats(s, t, basis)
            run_grad(s, t, basis, grad_layout)


@pytest.mark.parametrize("device", DEVICES)
def test_transfer_grad_empty(device):
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5)]:
        s, t = torch.randn(shape, device=device), torch.randn(shape, device=device)
        run_grad(s, t, make_basis(2, shape[2] * shape[3], torch.float32, device), "nchw")


@pytest.mark.parametrize("device", DEVICES)
def test_transfer_errors(device):
    s, t = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 5, device=device)
    basis = torch.randn(2, 20, device=device)
    sq, proj = torch.empty(2, 3, device=device), torch.empty(2, 2, 3, 2, device=device)
    ops.transfer_stats_(s, t, basis, sq, proj)
    with pytest.raises(RuntimeError, match="t must have"):
        ops.transfer_stats_(s, t[:, :2], basis, sq, proj)
    with pytest.raises(RuntimeError, match="t dtype"):
        ops.transfer_stats_(s, t.double(), basis, sq, proj)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.transfer_stats_(s[0], t[0], basis, sq, proj)
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.transfer_stats_(s.int(), t.int(), basis, sq, proj)
    with pytest.raises(RuntimeError, match="basis"):
        ops.transfer_stats_(s, t, torch.randn(2, 19, device=device), sq, proj)
    with pytest.raises(RuntimeError, match="basis"):
        ops.transfer_stats_(s, t, basis.double(), sq, proj)
    with pytest.raises(RuntimeError, match="basis"):
        ops.transfer_stats_(s, t, torch.randn(20, 2, device=device).t(), sq, proj)
    with pytest.raises(RuntimeError, match="basis"):
        ops.transfer_stats_(s.double(), t.double(), basis, sq.double(), proj.double())
    with pytest.raises(RuntimeError, match="sq"):
        ops.transfer_stats_(s, t, basis, torch.empty(3, 2, device=device), proj)
    with pytest.raises(RuntimeError, match="sq"):
        ops.transfer_stats_(s, t, basis, torch.empty(3, 2, device=device).t(), proj)
    with pytest.raises(RuntimeError, match="proj"):
        ops.transfer_stats_(s, t, basis, sq, torch.empty(2, 2, 3, 3, device=device))
    with pytest.raises(RuntimeError, match="proj"):
        ops.transfer_stats_(s, t, basis, sq, proj.half())
    with pytest.raises(RuntimeError, match="proj must be contiguous"):
        ops.transfer_stats_(s, t, basis, sq, sq.view(1, 2, 3, 1).expand(2, 2, 3, 2))
    with pytest.raises(RuntimeError):  # outputs aliasing each other
        both = torch.empty(2 * 3 + 2 * 2 * 3 * 2, device=device)
        ops.transfer_stats_(s, t, basis, both[:6].view(2, 3), both[4:28].view(2, 2, 3, 2))

    pc, coef, grad = torch.ones(1, device=device), torch.randn(2, 3, 2, device=device), torch.empty_like(s)
    ops.transfer_grad_(s, t, basis, pc, coef, grad)
    with pytest.raises(RuntimeError, match="pixel_coef"):
        ops.transfer_grad_(s, t, basis, torch.ones((), device=device), coef, grad)
    with pytest.raises(RuntimeError, match="pixel_coef"):
        ops.transfer_grad_(s, t, basis, pc.double(), coef, grad)
    with pytest.raises(RuntimeError, match="coef"):
        ops.transfer_grad_(s, t, basis, pc, torch.randn(2, 3, 3, device=device), grad)
    with pytest.raises(RuntimeError, match="coef"):
        ops.transfer_grad_(s, t, basis, pc, torch.randn(2, 2, 3, device=device).transpose(1, 2), grad)
    with pytest.raises(RuntimeError, match="grad"):
        ops.transfer_grad_(s, t, basis, pc, coef, grad.half())
    with pytest.raises(RuntimeError, match="grad"):
        ops.transfer_grad_(s, t, basis, pc, coef, torch.empty(2, 3, 5, 4, device=device))
    with pytest.raises(RuntimeError, match="overlap"):
        ops.transfer_grad_(s, t, basis, pc, coef, torch.empty(2, 3, 4, 1, device=device).expand(2, 3, 4, 5))
    with pytest.raises(RuntimeError):  # in place on the student
        ops.transfer_grad_(s, t, basis, pc, coef, s)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="no GPU")
def test_transfer_cross_device_errors():
    s, t = torch.randn(2, 3, 4, 5, device="cuda"), torch.randn(2, 3, 4, 5, device="cuda")
    basis = torch.randn(2, 20, device="cuda")
    with pytest.raises(RuntimeError, match="t is on"):
        ops.transfer_stats_(s, t.cpu(), basis, torch.empty(2, 3, device="cuda"), torch.empty(2, 2, 3, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="pixel_coef"):  # a host scalar would need a sync
        ops.transfer_grad_(s, t, basis, torch.ones(1), torch.randn(2, 3, 2, device="cuda"), torch.empty_like(s))


# ------------------------------------------------------------------------------------------------
# soft_target_forward_ / soft_target_backward_


def make_logits(n: int, k: int, dtype, device, scale: float = 3.0, row_stride: str = "contiguous") -> torch.Tensor:
    """Random (N, K) logits: contiguous rows, rows of a wider buffer ('wide'), or every other row ('skip')."""
    values = torch.randn(n, k, dtype=torch.float64) * scale
    if row_stride == "wide":
        x = torch.empty(n, k + 5, dtype=dtype, device=device)[:, 2 : 2 + k]
    elif row_stride == "skip":
        x = torch.empty(2 * n, k, dtype=dtype, device=device)[::2]
    else:
        x = torch.empty(n, k, dtype=dtype, device=device)
    x.copy_(values)
    return x


def soft_forward(s, t, temperature):
    rows = torch.full((s.shape[0], 3), float("nan"), dtype=acc_dtype(s.dtype), device=s.device)
    ops.soft_target_forward_(s, t, temperature, rows)
    return rows


def soft_scale(s, t, temperature):
    """Per-row magnitude that the float rounding of z/T, its maximum and the log-sums scale with."""
    zs, zt = s.double().cpu() / temperature, t.double().cpu() / temperature
    if s.shape[1] == 0:
        return torch.ones(s.shape[0], dtype=torch.float64)
    return zs.abs().amax(1) + zt.abs().amax(1) + math.log(s.shape[1]) + 1


def check_forward(s, t, temperature):
    rows = soft_forward(s, t, temperature)
    expected = ref.soft_target_stats(s.double().cpu(), t.double().cpu(), temperature)
    scale = soft_scale(s, t, temperature)[:, None].expand(-1, 3)
    assert_close(rows, expected, scale + expected.abs(), TOL_ACC[s.dtype])
    return rows


def check_backward(s, t, temperature, rows):
    n, k = s.shape
    grad_rows = torch.randn(n, dtype=torch.float64).to(s.device, acc_dtype(s.dtype))
    gs = torch.full((n, k), float("nan"), dtype=s.dtype, device=s.device)
    gt = torch.full((n, k), float("nan"), dtype=s.dtype, device=s.device)
    ops.soft_target_backward_(s, t, temperature, rows, grad_rows, gs, gt)
    sd, td, gd = s.double().cpu(), t.double().cpu(), grad_rows.double().cpu()
    rows64 = ref.soft_target_stats(sd, td, temperature)
    exp_s, exp_t = ref.soft_target_grads(sd, td, temperature, rows64, gd)
    # Error bounds from the rounding of log p (relative eps * the magnitudes of z/T and lse) and of kl.
    lps, lpt = sd / temperature - rows64[:, 1:2], td / temperature - rows64[:, 2:3]
    ps, pt = lps.exp(), lpt.exp()
    es = (sd / temperature).abs() + rows64[:, 1:2].abs() + 1
    et = (td / temperature).abs() + rows64[:, 2:3].abs() + 1
    g = gd.abs()[:, None] / temperature
    bound_s = g * (ps * es + pt * et)
    kl_err = soft_scale(s, t, temperature)[:, None] + rows64[:, 0:1].abs()
    bound_t = g * pt * ((lpt.abs() + lps.abs() + rows64[:, 0:1].abs() + 1) * (es + et) + kl_err)
    tol_acc, tol_out, atol = TOL_ACC[s.dtype], TOL_OUT[s.dtype], ATOL[s.dtype]
    # Probabilities below the accumulation type's normal range (e^-87 in float32) underflow.
    tiny = 1e-300 if s.dtype == torch.float64 else 1e-37
    atol_s = atol + g * tiny
    atol_t = atol + g * tiny * (lpt.abs() + lps.abs() + rows64[:, 0:1].abs() + 1)
    assert_close(gs, exp_s, bound_s, tol_acc, tol_out, atol_s)
    assert_close(gt, exp_t, bound_t, tol_acc, tol_out, atol_t)
    return gs, gt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 1000, 5000])
def test_soft_target(device, dtype, k):
    for i, (n, temperature) in enumerate([(3, 1.0), (5, 4.0), (1, 0.5)]):
        row_stride = ["contiguous", "wide", "skip"][i]
        s = make_logits(n, k, dtype, device, row_stride=row_stride)
        t = make_logits(n, k, dtype, device, row_stride=["skip", "contiguous", "wide"][i])
        rows = check_forward(s, t, temperature)
        check_backward(s, t, temperature, rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_target_extreme_logits(device, dtype):
    scales = [1e4, 1e30] if dtype in (torch.float32, torch.float64) else [1e4]
    for scale in scales:
        for temperature in [1.0, 4.0]:
            s = make_logits(4, 1000, dtype, device, scale=scale)
            t = make_logits(4, 1000, dtype, device, scale=scale)
            t[0] = s[0]  # identical rows: kl = 0 exactly
            rows = check_forward(s, t, temperature)
            assert rows[0, 0].item() == 0.0
            gs, gt = check_backward(s, t, temperature, rows)
            assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device", DEVICES)
def test_soft_target_identical_and_constant(device):
    s = make_logits(3, 7, torch.float32, device)
    rows = check_forward(s, s.clone(), 2.0)
    assert (rows[:, 0] == 0).all()
    c = torch.full((2, 10), 5.0, device=device)
    rows = check_forward(c, torch.zeros_like(c), 1.0)
    torch.testing.assert_close(rows[:, 1], torch.full((2,), 5.0 + math.log(10), device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_soft_target_backward_skips_empty(device):
    s, t = make_logits(4, 9, torch.float32, device), make_logits(4, 9, torch.float32, device)
    rows = soft_forward(s, t, 2.0)
    g = torch.randn(4, device=device)
    full_s, full_t = torch.empty_like(s), torch.empty_like(t)
    ops.soft_target_backward_(s, t, 2.0, rows, g, full_s, full_t)
    only_s = torch.full_like(s, float("nan"))
    ops.soft_target_backward_(s, t, 2.0, rows, g, only_s, torch.empty(0, device=device))
    only_t = torch.full_like(t, float("nan"))
    ops.soft_target_backward_(s, t, 2.0, rows, g, torch.empty(0, device=device), only_t)
    assert torch.equal(only_s, full_s) and torch.equal(only_t, full_t)
    ops.soft_target_backward_(s, t, 2.0, rows, g, torch.empty(0, device=device), torch.empty(0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_soft_target_empty(device):
    s = torch.randn(0, 10, device=device)
    soft_forward(s, s.clone(), 1.0)
    ops.soft_target_backward_(
        s,
        s.clone(),
        1.0,
        torch.empty(0, 3, device=device),
        torch.empty(0, device=device),
        torch.empty_like(s),
        torch.empty_like(s),
    )
    # No classes: the sum over them is 0 and logsumexp is -inf, as in the reference.
    s = torch.randn(3, 0, device=device)
    rows = check_forward(s, s.clone(), 1.0)
    assert (rows[:, 0] == 0).all() and (rows[:, 1:] == float("-inf")).all()
    ops.soft_target_backward_(
        s, s.clone(), 1.0, rows, torch.ones(3, device=device), torch.empty_like(s), torch.empty_like(s)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_soft_target_deterministic(device):
    s, t = make_logits(6, 3001, torch.float32, device), make_logits(6, 3001, torch.float32, device)
    assert torch.equal(soft_forward(s, t, 3.0), soft_forward(s, t, 3.0))


@pytest.mark.parametrize("device", DEVICES)
def test_soft_target_errors(device):
    s, t = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    rows = torch.empty(4, 3, device=device)
    ops.soft_target_forward_(s, t, 2.0, rows)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.soft_target_forward_(s[0], t[0], 2.0, rows)
    with pytest.raises(RuntimeError, match="t must have"):
        ops.soft_target_forward_(s, t[:, :5], 2.0, rows)
    with pytest.raises(RuntimeError, match="t dtype"):
        ops.soft_target_forward_(s, t.half(), 2.0, rows)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.soft_target_forward_(s.t().contiguous().t(), t, 2.0, rows)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.soft_target_forward_(s, t, 0.0, rows)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.soft_target_forward_(s, t, float("inf"), rows)
    with pytest.raises(RuntimeError, match="rows"):
        ops.soft_target_forward_(s, t, 2.0, torch.empty(4, 2, device=device))
    with pytest.raises(RuntimeError, match="rows"):
        ops.soft_target_forward_(s, t, 2.0, rows.double())
    with pytest.raises(RuntimeError, match="rows"):
        ops.soft_target_forward_(s, t, 2.0, torch.empty(3, 4, device=device).t())
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.soft_target_forward_(s.int(), t.int(), 2.0, rows)

    g, gs, gt = torch.randn(4, device=device), torch.empty_like(s), torch.empty_like(t)
    ops.soft_target_backward_(s, t, 2.0, rows, g, gs, gt)
    with pytest.raises(RuntimeError, match="grad_rows"):
        ops.soft_target_backward_(s, t, 2.0, rows, torch.randn(5, device=device), gs, gt)
    with pytest.raises(RuntimeError, match="rows"):
        ops.soft_target_backward_(s, t, 2.0, rows[:3], g, gs, gt)
    with pytest.raises(RuntimeError, match="grad_s"):
        ops.soft_target_backward_(s, t, 2.0, rows, g, gs.double(), gt)
    with pytest.raises(RuntimeError, match="grad_t"):
        ops.soft_target_backward_(s, t, 2.0, rows, g, gs, torch.empty(4, 7, device=device))
    with pytest.raises(RuntimeError, match="grad_t"):
        ops.soft_target_backward_(s, t, 2.0, rows, g, gs, torch.empty(6, 4, device=device).t())
    with pytest.raises(RuntimeError):  # the two gradients in one buffer
        ops.soft_target_backward_(s, t, 2.0, rows, g, gs, gs)
    with pytest.raises(RuntimeError):  # in place on the logits
        ops.soft_target_backward_(s, t, 2.0, rows, g, s, gt)


def test_soft_target_many_rows_threads():
    # Many short rows over several OpenMP tasks; rows of random sizes.
    rng = random.Random(0)
    for _ in range(3):
        n, k = rng.randint(50, 300), rng.randint(2, 40)
        s, t = make_logits(n, k, torch.float32, "cpu"), make_logits(n, k, torch.float32, "cpu")
        check_backward(s, t, 2.0, check_forward(s, t, 2.0))


# ----------------------------------------------------------------------------------------------
# fp16 on the CPU: widened exactly, then the fp32 kernels


def every_finite_half(shape, seed: int) -> torch.Tensor:
    """Every finite fp16 value (subnormals and +-65504 included), shuffled and repeated to fill ``shape``."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    values = values[torch.isfinite(values)]
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(seed))]
    n = math.prod(shape)
    return values.repeat(-(-n // values.numel()))[:n].view(shape)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_fp16_runs_the_fp32_kernels_on_exactly_widened_inputs(layout):
    """The CPU kernels widen fp16 exactly (eight lanes at a time in the vector paths: csrc/common/cpu_convert.h)
    and then run the fp32 maths in the same order, so on every finite fp16 value the statistics equal those of
    the fp32 kernels on the widened tensors bit for bit, and the fp16 gradients equal the fp32 ones rounded."""
    s, t = every_finite_half((4, 16, 32, 32), 0), every_finite_half((4, 16, 32, 32), 1)
    if layout == "channels_last":  # 16 contiguous channels: the eight-lane path
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    basis = make_basis(4, 32 * 32, torch.float16, "cpu")
    stats = []
    for a, b in ((s, t), (s.float(), t.float())):
        sq, proj = torch.empty(4, 16), torch.empty(2, 4, 16, 4)
        ops.transfer_stats_(a, b, basis, sq, proj)
        stats.append((sq, proj))
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])

    logits_s, logits_t = every_finite_half((16, 1003), 2), every_finite_half((16, 1003), 3)  # 1003: a lane tail
    grad_rows = torch.randn(16)
    results = []
    for a, b in ((logits_s, logits_t), (logits_s.float(), logits_t.float())):
        rows = soft_forward(a, b, 4000.0)  # a temperature that keeps most of the row in play
        gs, gt = torch.empty_like(a), torch.empty_like(b)
        ops.soft_target_backward_(a, b, 4000.0, rows, grad_rows, gs, gt)
        results.append((rows, gs, gt))
    (rows16, gs16, gt16), (rows32, gs32, gt32) = results
    assert torch.isfinite(rows32).all()
    assert torch.equal(rows16, rows32)
    assert torch.equal(gs16, gs32.half()) and torch.equal(gt16, gt32.half())
