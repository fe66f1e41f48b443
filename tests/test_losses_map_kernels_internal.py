"""Internal attention-map distance kernels (torch.ops.ktkernels_C.*) against the float64 reference.

attention_map_distance_(map_s, map_t, kind, left, right, dist):
    dist[n] = attention_map_distance(map_s, map_t, MAP_KINDS[kind])[n]   (ktkernels/losses/reference.py)
attention_map_distance_backward_(map_s, map_t, grad_dist, kind, left, right, grad_map_s):
    grad_map_s = torch.autograd.grad(dist, map_s, grad_dist) of that reference

The tables come from ktkernels.losses.basis.map_tables. Every output starts as NaN, so an element a kernel
forgets shows up. float64 is held to rounding error; float32 to a bound of the order of PyTorch's own float32
error (the min-max normalisations and the transform amplify rounding, most for the 56 x 56 DCT-KD maps).
"""

from __future__ import annotations

import pytest
import torch
from backend_targets import DEVICES, GPU

from ktkernels import _C  # noqa: F401  (registers torch.ops.ktkernels_C)
from ktkernels.losses.basis import MAP_KINDS, map_tables
from ktkernels.losses.reference import attention_map_distance

DTYPES = [torch.float64, torch.float32]
KINDS = list(range(len(MAP_KINDS)))
SIZES = [(1, 1), (7, 7), (5, 9), (14, 14), (28, 28), (56, 56), (1, 6)]
# Forward: relative to |dist|; backward: relative to the sample's largest |gradient|.
FWD_TOL = {torch.float64: 1e-12, torch.float32: 5e-5}
BWD_TOL = {torch.float64: 1e-10, torch.float32: 5e-4}
# The AT kinds only normalise: float32 stays close to its epsilon.
AT_TOL32 = 1e-5
# Largest map side the CUDA kernels of kinds 2..4 take (attention_map_cuda.h: kMaxTransformSide).
CUDA_MAX_SIDE = 64

ops = torch.ops.ktkernels_C


def make_maps(n: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """Attention maps as real ones are: non-negative means over channels of squared features."""
    return torch.randn(n, 4, h, w, dtype=torch.float64).pow(2).mean(dim=1).to(dtype)


def tables(kind: int, h: int, w: int, dtype, device):
    return map_tables(MAP_KINDS[kind], h, w, dtype, device)


def run_forward(s: torch.Tensor, t: torch.Tensor, kind: int) -> torch.Tensor:
    left, right = tables(kind, s.shape[1], s.shape[2], s.dtype, s.device)
    dist = torch.full((s.shape[0],), float("nan"), dtype=s.dtype, device=s.device)
    ops.attention_map_distance_(s, t, kind, left, right, dist)
    return dist


def run_backward(s: torch.Tensor, t: torch.Tensor, g: torch.Tensor, kind: int) -> torch.Tensor:
    left, right = tables(kind, s.shape[1], s.shape[2], s.dtype, s.device)
    grad = torch.full_like(s, float("nan"))
    ops.attention_map_distance_backward_(s, t, g, kind, left, right, grad)
    return grad


def reference(s: torch.Tensor, t: torch.Tensor, g: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist, grad of map_s) of the reference in float64 on the CPU, from the same (rounded) inputs."""
    x = s.detach().double().cpu().requires_grad_()
    dist = attention_map_distance(x, t.detach().double().cpu(), MAP_KINDS[kind])
    if x.numel() == 0:
        return dist.detach(), torch.zeros_like(x)
    (grad,) = torch.autograd.grad(dist, x, g.detach().double().cpu())
    return dist.detach(), grad


def assert_dist_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "dist has NaN (unwritten elements?)"
    err = (actual - expected).abs()
    limit = tol * expected.abs() + 1e-300
    assert (err <= limit).all(), f"dist error {err.max().item():.3e} exceeds tolerance {tol:g}"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Per sample, relative to the largest |gradient| (an all-zero reference gradient must come out zero)."""
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "gradient has NaN (unwritten elements?)"
    for n in range(expected.shape[0]):
        err = (actual[n] - expected[n]).abs().max().item()
        scale = expected[n].abs().max().item()
        assert err <= tol * scale + 1e-300, f"sample {n}: gradient error {err:.3e} vs scale {scale:.3e}, tol {tol:g}"


def check_against_reference(s, t, g, kind, fwd_tol=None, bwd_tol=None) -> None:
    dtype = s.dtype
    if fwd_tol is None:
        fwd_tol = AT_TOL32 if dtype == torch.float32 and kind < 2 else FWD_TOL[dtype]
    if bwd_tol is None:
        bwd_tol = AT_TOL32 if dtype == torch.float32 and kind < 2 else BWD_TOL[dtype]
    ref_dist, ref_grad = reference(s, t, g, kind)
    assert_dist_close(run_forward(s, t, kind), ref_dist, fwd_tol)
    assert_grad_close(run_backward(s, t, g, kind), ref_grad, bwd_tol)


# ------------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_matches_reference(device, dtype, kind):
    for i, (h, w) in enumerate(SIZES):
        n = (1, 3)[i % 2]
        s = make_maps(n, h, w, dtype).to(device)
        t = make_maps(n, h, w, dtype).to(device)
        g = torch.randn(n, dtype=torch.float64).to(device, dtype)
        check_against_reference(s, t, g, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_uniform_maps_and_swapped_roles(device, kind):
    # torch.rand maps (uniform, not squares); the teacher's gradient is the same op with the maps swapped.
    s = torch.rand(3, 6, 10, dtype=torch.float64, device=device)
    t = torch.rand(3, 6, 10, dtype=torch.float64, device=device)
    g = torch.randn(3, dtype=torch.float64, device=device)
    check_against_reference(s, t, g, kind)
    x = t.detach().cpu().requires_grad_()
    (grad_t,) = torch.autograd.grad(attention_map_distance(s.cpu(), x, MAP_KINDS[kind]), x, g.cpu())
    assert_grad_close(run_backward(t, s, g, kind), grad_t, BWD_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_zero_grad_dist(device, dtype, kind):
    s, t = make_maps(3, 5, 9, dtype).to(device), make_maps(3, 5, 9, dtype).to(device)
    g = torch.tensor([0.0, 1.5, 0.0], dtype=dtype, device=device)
    grad = run_backward(s, t, g, kind).cpu()
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    assert (grad[1] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_identical_maps(device, dtype, kind):
    # d = 0: the square-root kinds have a zero (not NaN) gradient there, at_code's is 2 (q_s - q_t) = 0.
    s = make_maps(3, 7, 7, dtype).to(device)
    g = torch.randn(3, dtype=dtype, device=device)
    dist = run_forward(s, s.clone(), kind).cpu()
    grad = run_backward(s, s.clone(), g, kind).cpu()
    assert (dist == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_constant_maps(device, dtype, kind):
    # A constant (or zero) map hits the 1e-12 clamps of the normalisations: finite values, no NaN, and in
    # float64 the reference's (huge: 1 / 1e-12 per clamp) gradient. Every min and max is a tie there, so this
    # also checks the first-index rule. float32 loses more to the cancellations around those huge values.
    for h, w in [(7, 7), (5, 9), (28, 28), (1, 6)]:
        s = make_maps(4, h, w, dtype)
        t = make_maps(4, h, w, dtype)
        s[0] = 0.5
        s[1] = 0.0
        s[2] = 0.25
        if kind >= 2:  # both constant: D_s = D_t = 0 exactly (for AT, q_s = q_t up to rounding: ill-posed)
            t[2] = 0.75
        s, t = s.to(device), t.to(device)
        g = torch.randn(4, dtype=torch.float64).to(device, dtype)
        if dtype == torch.float64:
            check_against_reference(s, t, g, kind)
        else:
            check_against_reference(s, t, g, kind, bwd_tol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_maps_below_the_norm_clamp(device, dtype, kind):
    # Tiny but non-zero maps: the norm (AT) and the range (DCT-KD) fall below the 1e-12 clamp, which then
    # passes no gradient to them; sample 1's norm sits just below the clamp (0.999999e-12).
    s = make_maps(3, 6, 7, torch.float64)
    t = make_maps(3, 6, 7, torch.float64)
    s[0] *= 1e-15
    s[1] *= 1e-12 / s[1].norm()
    s[1] *= 0.999999
    t[2] *= 1e-16
    s, t = s.to(device, dtype), t.to(device, dtype)
    g = torch.randn(3, dtype=torch.float64).to(device, dtype)
    if dtype == torch.float64:
        check_against_reference(s, t, g, kind)
    else:
        check_against_reference(s, t, g, kind, bwd_tol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: MAP_KINDS[k])
def test_empty_batch(device, kind):
    s = torch.empty(0, 5, 9, dtype=torch.float64, device=device)
    left, right = tables(kind, 5, 9, torch.float64, device)
    dist = torch.empty(0, dtype=torch.float64, device=device)
    grad = torch.empty_like(s)
    ops.attention_map_distance_(s, s.clone(), kind, left, right, dist)
    ops.attention_map_distance_backward_(s, s.clone(), dist, kind, left, right, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_grad_dist(device):
    # grad_dist may be any 1-D view, e.g. the expanded gradient of dist.sum().
    s, t = make_maps(3, 7, 7).to(device), make_maps(3, 7, 7).to(device)
    for kind in KINDS:
        g = torch.tensor(0.7, dtype=torch.float64, device=device).expand(3)
        grad = run_backward(s, t, g, kind)
        assert torch.equal(grad, run_backward(s, t, g.contiguous(), kind))
        g2 = torch.randn(6, dtype=torch.float64, device=device)[::2]
        assert torch.equal(run_backward(s, t, g2, kind), run_backward(s, t, g2.contiguous(), kind))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    s, t = make_maps(16, 14, 14).to(device), make_maps(16, 14, 14).to(device)
    g = torch.randn(16, dtype=torch.float64, device=device)
    for kind in KINDS:
        assert torch.equal(run_forward(s, t, kind), run_forward(s, t, kind))
        assert torch.equal(run_backward(s, t, g, kind), run_backward(s, t, g, kind))


# ------------------------------------------------------------------------------------------------
# CUDA: against the CPU kernels, and the size limit


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="no GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    # (32, 64) in fp32 and (8, 64) in fp64 ask for 48 KiB of dynamic shared memory or just under it, which with the
    # kernel's static scratch needs the opt-in (they failed to launch without it).
    for h, w in [(1, 1), (5, 9), (56, 56), (64, 64), (64, 3), (32, 64), (8, 64), (300, 200)]:
        s, t = make_maps(5, h, w, dtype), make_maps(5, h, w, dtype)
        g = torch.randn(5, dtype=dtype)
        kinds = KINDS if max(h, w) <= CUDA_MAX_SIDE else [0, 1]
        for kind in kinds:
            dist_cpu, grad_cpu = run_forward(s, t, kind), run_backward(s, t, g, kind)
            dist_gpu = run_forward(s.cuda(), t.cuda(), kind).cpu()
            grad_gpu = run_backward(s.cuda(), t.cuda(), g.cuda(), kind).cpu()
            assert_dist_close(dist_gpu, dist_cpu.double(), tol)
            assert_grad_close(grad_gpu, grad_cpu.double(), tol * 10)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="no GPU")
def test_cuda_size_limit():
    side = CUDA_MAX_SIDE + 1
    s = make_maps(2, side, 8).cuda()
    for kind in (2, 3, 4):
        with pytest.raises(RuntimeError, match="64"):
            run_forward(s, s.clone(), kind)


# ------------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments():
    s, t = make_maps(2, 5, 9), make_maps(2, 5, 9)
    left, right = tables(3, 5, 9, torch.float64, "cpu")
    dist = torch.empty(2, dtype=torch.float64)
    grad = torch.empty_like(s)
    g = torch.ones(2, dtype=torch.float64)
    fwd = ops.attention_map_distance_
    bwd = ops.attention_map_distance_backward_

    def raises(fn, *args, match=None):
        with pytest.raises(RuntimeError, match=match):
            fn(*args)

    raises(fwd, s, t, 5, left, right, dist, match="kind")
    raises(fwd, s, t, -1, left, right, dist, match="kind")
    raises(fwd, s[0], t[0], 3, left, right, dist, match="3-D")
    raises(fwd, s.float(), t, 3, left.float(), right.float(), dist.float(), match="dtype")
    raises(fwd, s.half(), t.half(), 3, left.half(), right.half(), dist.half(), match="float32 or float64")
    left_t, right_t = tables(3, 9, 5, torch.float64, "cpu")
    raises(fwd, s.transpose(1, 2), t.transpose(1, 2), 3, left_t, right_t, dist, match="contiguous")
    raises(fwd, s, make_maps(2, 5, 8), 3, left, right, dist, match="shape")
    raises(fwd, s, t, 3, right, left, dist, match="left")
    raises(fwd, s, t, 3, left, right[:1], dist, match="right")
    raises(fwd, s, t, 3, left.float(), right, dist, match="left")
    raises(fwd, s, t, 3, left, right, torch.empty(3, dtype=torch.float64), match="dist")
    raises(fwd, s, t, 3, left, right, torch.empty(4, dtype=torch.float64)[::2], match="contiguous")
    raises(fwd, s, t, 3, left, right, s.reshape(-1)[:2])  # dist overlaps map_s
    empty = torch.empty(2, 0, 9, dtype=torch.float64)
    raises(fwd, empty, empty.clone(), 0, left, right, dist, match="H, W >= 1")
    raises(bwd, s, t, g, 3, left, right, torch.empty(2, 5, 8, dtype=torch.float64), match="grad_map_s")
    raises(bwd, s, t, g.float(), 3, left, right, grad, match="grad_dist")
    raises(bwd, s, t, torch.ones(3, dtype=torch.float64), 3, left, right, grad, match="grad_dist")
    raises(bwd, s, t, g, 3, left, right, s)  # grad_map_s is map_s
    raises(bwd, s, t, g, 3, left, right, torch.empty(2, 1, 9, dtype=torch.float64).expand(2, 5, 9))
    # The AT kinds do not read the tables: their (2, 0, 0) placeholders, or anything else, are accepted.
    fwd(s, t, 0, *tables(0, 5, 9, torch.float64, "cpu"), dist)
    fwd(s, t, 1, torch.empty(0), torch.empty(0), dist)
