"""DCT family: every backend against scipy.fft in float64, keep, layouts, autograd, opcheck, compile, errors."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import scipy.fft
import torch
import torch.autograd.forward_ad as fwAD
from backend_targets import TARGETS

import ktkernels
from ktkernels.dct import op

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def dtypes_for(target) -> list[torch.dtype]:
    fp64 = [torch.float64] if target[0] in ("cpu", "torch") else []
    return [*fp64, torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: np.ndarray | torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the expected values' scale; NaN (an unwritten, poisoned element) fails."""
    actual = actual.detach().double().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the output (unwritten elements?)"
    if expected.numel():
        scale = max(expected.abs().max().item(), 1.0)
        err = (actual - expected).abs().max().item()
        assert err <= TOL[dtype] * scale, f"max abs error {err:.3e} > {TOL[dtype] * scale:.3e} ({dtype})"


def assert_rounded(actual: torch.Tensor, expected: np.ndarray | torch.Tensor, dtype: torch.dtype) -> None:
    """fp16/bf16 outputs: each element within one ulp of its own magnitude of the float64 value, plus 4e-6 of the
    largest for the fp32 accumulation. That is what rounding the fp32 result once gives; rounding an intermediate
    to the input dtype costs hundreds of ulps, which ``assert_close``'s scale-relative bound lets through."""
    actual = actual.detach().double().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if expected.numel():
        bound = torch.finfo(dtype).eps * expected.abs() + 4e-6 * expected.abs().max()
        excess = ((actual - expected).abs() - bound).max().item()
        assert excess <= 0, f"{dtype}: an element is {excess:.3e} past one ulp of the float64 value"


def make(shape, dtype, device, layout: str) -> torch.Tensor:
    if layout == "strided":
        big = torch.randn(*shape[:-2], 2 * shape[-2] + 1, shape[-1] + 3, dtype=torch.float64)
        x = big[..., 1::2, 2 : 2 + shape[-1]]
    else:
        x = torch.randn(shape, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def scipy_dct2(x: torch.Tensor, norm, inverse=False) -> np.ndarray:
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    return fn(x.double().cpu().numpy(), type=2, axes=(-2, -1), norm=norm)


def random_sizes(rng: random.Random, target, count: int) -> list[tuple[int, int]]:
    limit = 24 if target[0] == "triton" and target[1] == "cpu" else 64  # the interpreter is slow
    sizes = [(1, 1), (7, 7), (1, 5), (limit, 3)]
    return sizes + [(rng.randint(1, limit), rng.randint(1, limit)) for _ in range(count)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("norm", ["ortho", None])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_dct2d_and_idct2d_match_scipy(target, norm, layout):
    name, device = target
    rng = random.Random(hash((name, norm, layout)) % 1000)
    with ktkernels.use_backend(name):
        for h, w in random_sizes(rng, target, 4):
            for dtype in dtypes_for(target):
                x = make((2, 3, h, w), dtype, device, layout)
                y = ktkernels.dct2d(x, norm)
                assert_close(y, scipy_dct2(x, norm), dtype)
                if dtype in (torch.float16, torch.bfloat16):
                    assert_rounded(y, scipy_dct2(x, norm), dtype)
                if layout == "channels_last" and min(h, w) > 1:
                    assert y.is_contiguous(memory_format=torch.channels_last)
                assert_close(ktkernels.idct2d(x, norm), scipy_dct2(x, norm, inverse=True), dtype)
                kh, kw = rng.randint(1, h), rng.randint(1, w)
                assert_close(ktkernels.dct2d(x, norm, keep=(kh, kw)), scipy_dct2(x, norm)[..., :kh, :kw], dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dct2d_many_channels(target, layout):
    """More channels than one Triton program's tile holds (40 channels of 8 x 8 maps, 9 of 24 x 24): the last
    channel block is partly empty, and every channel must be transformed."""
    name, device = target
    with ktkernels.use_backend(name):
        for shape in ((1, 40, 8, 8), (2, 9, 24, 24)):
            for dtype in (torch.float32, torch.bfloat16):
                x = make(shape, dtype, device, layout)
                assert_close(ktkernels.dct2d(x), scipy_dct2(x, "ortho"), dtype)
                assert_close(ktkernels.idct2d(x, None), scipy_dct2(x, None, inverse=True), dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_the_op_refuses_sizes_past_the_transform(target):
    """``ktkernels::dct_transform`` itself (torch.ops, below the functional API's checks): keep beyond the size, or
    an adjoint input larger than its output, raises on every backend instead of reading past the planes."""
    name, device = target
    x = torch.randn(2, 3, 4, 4, device=device)
    with ktkernels.use_backend(name):
        with pytest.raises(ValueError, match=r"keep \[5, 4\] exceeds"):
            torch.ops.ktkernels.dct_transform(x, "dct", "ortho", [5, 4], False)
        with pytest.raises(ValueError, match="exceeds its output size"):
            torch.ops.ktkernels.dct_transform(x, "dct", "ortho", [4, 3], True)


def test_named_triton_backend_refuses_float64():
    """The Triton DCT kernels run fp32/fp16/bf16: a named ``triton`` backend raises on fp64 (``auto`` takes the
    reference), for every op of the family."""
    if not ktkernels.backend.has_triton():
        pytest.skip("triton is not installed")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    calls = {
        "dct2d": lambda: ktkernels.dct2d(x),
        "idct2d": lambda: ktkernels.idct2d(x),
        "dct": lambda: ktkernels.dct(x, dim=1),
        "dct_attention_map": lambda: ktkernels.dct_attention_map(x),
        "channel_power_mean": lambda: op.channel_power_mean(x, 2.0),
        "channel_power_mean_backward": lambda: op.channel_power_mean_backward(x, torch.ones(2, 4, 5).double(), 2.0),
    }
    with ktkernels.use_backend("triton"):
        for what, call in calls.items():
            with pytest.raises(RuntimeError, match="fp64"):
                call()
                pytest.fail(what)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] == "triton"])
def test_triton_takes_maps_up_to_its_on_chip_side(target, monkeypatch):
    """The Triton kernel holds whole (padded) planes on chip: maps up to ``TRITON_MAX_SIDE`` a side run it, wider ones
    (a 224 x 224 image) the reference's two GEMMs, with the same values, forward and backward, named or auto."""
    from ktkernels.dct import triton as kernels

    name, device = target
    launched = []
    basis2d = kernels.basis2d
    monkeypatch.setattr(kernels, "basis2d", lambda *args: launched.append(args[0].shape[2:]) or basis2d(*args))
    side = op.TRITON_MAX_SIDE
    for shape, expect_kernel in (((1, 1, side, 2), True), ((1, 1, 3, side + 1), False), ((1, 1, side + 5, 3), False)):
        launched.clear()
        x = make(shape, torch.float32, device, "nchw").requires_grad_()
        with ktkernels.use_backend(name):
            y = ktkernels.dct2d(x, keep=(2, 2) if shape[2] > side else None)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert bool(launched) == expect_kernel, (shape, launched)
        with ktkernels.use_backend("torch"):
            reference = ktkernels.dct2d(x, keep=(2, 2) if shape[2] > side else None)
        assert_close(y, reference, torch.float32)
        assert_close(grad, torch.autograd.grad(reference, x, torch.ones_like(reference))[0], torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_roundtrip_any_rank_and_1d(target):
    name, device = target
    with ktkernels.use_backend(name):
        for shape in [(5, 4), (3, 6, 5), (2, 3, 4, 5), (2, 2, 2, 3, 4)]:
            x = torch.randn(shape, dtype=torch.float32, device=device)
            torch.testing.assert_close(ktkernels.idct2d(ktkernels.dct2d(x)), x, rtol=1e-5, atol=1e-5)
            assert_close(ktkernels.dct2d(x, None), scipy_dct2(x, None), torch.float32)
            for dim in range(-x.dim(), x.dim()):
                for norm in ("ortho", None):
                    expected = scipy.fft.dct(x.double().cpu().numpy(), type=2, axis=dim, norm=norm)
                    assert_close(ktkernels.dct(x, dim=dim, norm=norm), expected, torch.float32)
                    torch.testing.assert_close(
                        ktkernels.idct(ktkernels.dct(x, dim, norm), dim, norm), x, rtol=1e-5, atol=1e-5
                    )


@pytest.mark.parametrize("target", TARGETS)
def test_empty_inputs(target):
    name, device = target
    with ktkernels.use_backend(name):
        x = torch.randn(0, 3, 5, 6, device=device)
        assert ktkernels.dct2d(x, keep=(2, 3)).shape == (0, 3, 2, 3)
        assert ktkernels.dct_attention_map(torch.randn(0, 3, 5, 6, device=device)).shape == (0, 5, 6)
        # an empty dim among the leading ones of a rank > 4 input, forward and backward
        x = torch.randn(2, 3, 0, 4, 5, device=device, requires_grad=True)
        assert ktkernels.dct2d(x, keep=(3, 2)).shape == (2, 3, 0, 3, 2)
        (grad,) = torch.autograd.grad(ktkernels.dct2d(x).sum(), x)
        assert grad.shape == x.shape
        assert ktkernels.idct(torch.randn(2, 3, 0, 5, device=device)).shape == (2, 3, 0, 5)


@pytest.mark.parametrize("target", TARGETS)
def test_backward_is_the_transposed_transform(target):
    """Gradients of every backend against the float64 reference's autograd (keep included)."""
    name, device = target
    for layout in ("nchw", "channels_last"):
        x64 = make((2, 3, 9, 6), torch.float64, "cpu", layout)
        grad = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        ref_x = x64.clone().requires_grad_()
        with ktkernels.use_backend("torch"):
            (ktkernels.dct2d(ref_x, keep=(4, 5)) * grad).sum().backward()
        x = x64.to(device=device, dtype=torch.float32).detach().requires_grad_()
        with ktkernels.use_backend(name):
            (ktkernels.dct2d(x, keep=(4, 5)) * grad.to(device, torch.float32)).sum().backward()
        assert_close(x.grad, ref_x.grad, torch.float32)
        if layout == "channels_last":
            assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] in ("cpu", "torch")])
def test_gradcheck_fp64(target):
    name, device = target
    with ktkernels.use_backend(name):
        x = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: ktkernels.dct2d(t, keep=(3, 2)), (x,))
        assert torch.autograd.gradgradcheck(lambda t: ktkernels.dct2d(t, None, keep=(3, 2)), (x,))
        assert torch.autograd.gradcheck(lambda t: ktkernels.idct2d(t), (x,))
        assert torch.autograd.gradcheck(lambda t: ktkernels.dct(t, dim=1), (x,))
        f = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
        for p in (1, 2, 3):
            assert torch.autograd.gradcheck(lambda t, p=p: ktkernels.dct_attention_map(t, p), (f,))


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] in ("cpu", "torch")])
def test_torch_func_and_forward_mode_match_the_reference(target):
    """torch.func (grad, per-sample grads, grad of grad, jvp) and torch.autograd.forward_ad through the DCT ops
    against the pure-PyTorch reference. The custom ops alone raise under torch.func.grad and drop a tangent
    silently (pytorch/pytorch#170834); the channel reduction has no double backward, and says so."""
    from ktkernels.dct.reference import channel_power_mean_reference, transform_reference

    name, device = target
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device)
    v = torch.randn_like(x)
    cases = [
        (lambda t: ktkernels.dct2d(t, keep=(3, 2)), lambda t: transform_reference(t, "dct", "ortho", [3, 2], False)),
        (lambda t: ktkernels.idct2d(t, None), lambda t: transform_reference(t, "idct", "backward", [5, 4], False)),
        (
            lambda t: ktkernels.dct(t, dim=1),
            lambda t: transform_reference(t.movedim(1, -1), "dct", "ortho", [3], False).movedim(-1, 1),
        ),  # fmt: skip
        (
            lambda t: ktkernels.dct_attention_map(t, 2.5),
            lambda t: transform_reference(channel_power_mean_reference(t, 2.5), "dct", "ortho", [5, 4], False),
        ),
    ]
    func = torch.func
    for index, (ours, reference) in enumerate(cases):
        transforms = {
            "grad": lambda f: func.grad(lambda t: f(t).sin().sum())(x),
            "per-sample grad": lambda f: func.vmap(func.grad(lambda t: f(t[None]).sin().sum()))(x),
            "jvp": lambda f: func.jvp(f, (x,), (v,))[1],
        }
        if index < 3:  # linear: every order
            transforms["grad of grad"] = lambda f: func.grad(
                lambda t: func.grad(lambda u: f(u).sin().sum())(t).square().sum()
            )(x)
        for what, transform in transforms.items():
            with ktkernels.use_backend(name):
                got = transform(ours)
            expected = transform(reference)
            torch.testing.assert_close(got, expected, msg=lambda m, w=what, i=index: f"{w}, case {i}: {m}")
            assert expected.abs().max() > 1e-6, (what, index)  # not trivially zero
        with ktkernels.use_backend(name), fwAD.dual_level():
            tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))).tangent
        torch.testing.assert_close(tangent, func.jvp(reference, (x,), (v,))[1])
        with ktkernels.use_backend(name), warnings.catch_warnings():  # plain vmap: the ops' own rules, no loop
            warnings.filterwarnings("error", message=".*batching rule.*")
            looped = torch.stack([ours(sample) for sample in x[:, None]])
            torch.testing.assert_close(func.vmap(ours)(x[:, None]), looped)
    with ktkernels.use_backend(name), pytest.raises(NotImplementedError, match="channel_power_mean_backward: diff"):
        func.grad(lambda t: func.grad(lambda u: ktkernels.dct_attention_map(u).sum())(t).square().sum())(x)
    leaf = x.clone().requires_grad_()
    with ktkernels.use_backend(name), pytest.raises(NotImplementedError, match="channel_power_mean_backward: diff"):
        (grad,) = torch.autograd.grad(ktkernels.dct_attention_map(leaf).sum(), leaf, create_graph=True)
        grad.square().sum().backward()  # the same error in eager autograd as under torch.func


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_dct_attention_map(target, layout):
    name, device = target
    for dtype in dtypes_for(target):
        for p in (1, 2, 2.5):
            f64 = make((2, 5, 6, 7), torch.float64, "cpu", layout)
            ref = f64.clone().requires_grad_()
            with ktkernels.use_backend("torch"):
                expected = ktkernels.dct_attention_map(ref, p, keep=(3, 7))
            grad = torch.randn_like(expected)
            (expected * grad).sum().backward()
            f = f64.to(device=device, dtype=dtype).detach().requires_grad_()
            with ktkernels.use_backend(name):
                a = ktkernels.dct_attention_map(f, p, keep=(3, 7))
                assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                (a * grad.to(device, a.dtype)).sum().backward()
            # low-precision features are rounded before the reduction: compare against the rounded input
            assert_close(a, expected if dtype == torch.float64 else _map_of(f.detach(), p), dtype)
            tol_dtype = dtype if dtype != torch.float32 else torch.float32
            assert_close(f.grad, ref.grad if dtype == torch.float64 else _map_grad(f.detach(), p, grad), tol_dtype)
            assert f.grad.stride() == f.stride() or layout == "strided"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dct_attention_map_tails_zeros_and_norm(target, layout):
    """17 x 17 maps (289 positions: more than one Triton spatial block, the last partly empty) of ReLU features
    (exact zeros, where |x|^p has gradient 0 for every p >= 1), and both norms."""
    name, device = target
    f64 = make((2, 3, 17, 17), torch.float64, "cpu", layout).relu()
    for p in (1, 2, 2.5):
        for norm in ("ortho", None):
            ref = f64.clone().requires_grad_()
            expected = ktkernels.dct2d(ref.abs().pow(p).mean(1), norm)  # the definition, through the torch reference
            grad = torch.randn_like(expected)
            (expected * grad).sum().backward()
            f = f64.to(device, torch.float32).requires_grad_()
            with ktkernels.use_backend(name):
                a = ktkernels.dct_attention_map(f, p, norm)
                (a * grad.to(device, a.dtype)).sum().backward()
            assert_close(a, expected, torch.float32)
            assert_close(f.grad, ref.grad, torch.float32)
            assert (f.grad.cpu()[f64 == 0] == 0).all(), f"p={p}: a zero feature must get gradient 0"


def _map_of(f: torch.Tensor, p: float) -> torch.Tensor:
    with ktkernels.use_backend("torch"):
        return ktkernels.dct_attention_map(f.double().cpu(), p, keep=(3, 7))


def _map_grad(f: torch.Tensor, p: float, grad: torch.Tensor) -> torch.Tensor:
    x = f.double().cpu().requires_grad_()
    with ktkernels.use_backend("torch"):
        (ktkernels.dct_attention_map(x, p, keep=(3, 7)) * grad).sum().backward()
    return x.grad


@pytest.mark.parametrize("target", TARGETS)
def test_opcheck(target):
    name, device = target
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    with ktkernels.use_backend(name):
        torch.library.opcheck(op.dct_transform, (x, "dct", "ortho", [3, 6], False))
        torch.library.opcheck(op.dct_transform, (x.detach()[..., :3, :4], "idct", "backward", [5, 6], True))
        torch.library.opcheck(op.dct_transform, (x.to(memory_format=torch.channels_last), "dct", "ortho", [5], False))
        torch.library.opcheck(op.channel_power_mean, (x, 2.0))
        torch.library.opcheck(op.channel_power_mean_backward, (x.detach(), torch.randn(2, 5, 6, device=device), 3.0))


def test_torch_compile_fullgraph_dynamic():
    fn = torch.compile(
        lambda t, f: (ktkernels.dct2d(t, keep=(3, 3)), ktkernels.dct_attention_map(f)), fullgraph=True, dynamic=True
    )
    for n in (2, 3):
        x = torch.randn(n, 4, 7, 6, requires_grad=True)
        f = torch.randn(n, 8, 5, 5)
        y, a = fn(x, f)
        torch.testing.assert_close(y, ktkernels.dct2d(x, keep=(3, 3)))
        torch.testing.assert_close(a, ktkernels.dct_attention_map(f))
        y.sum().backward()
        assert x.grad is not None


def test_modules():
    x = torch.randn(2, 3, 8, 6)
    assert torch.equal(ktkernels.DCT2d(keep=(2, 3))(x), ktkernels.dct2d(x, keep=(2, 3)))
    torch.testing.assert_close(ktkernels.IDCT2d(norm=None)(ktkernels.DCT2d(norm=None)(x)), x)
    assert "keep=(2, 3)" in repr(ktkernels.DCT2d(keep=(2, 3)))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ktkernels.dct2d(torch.randn(5)), ValueError, "rank >= 2"),
        (lambda: ktkernels.dct2d(torch.ones(4, 4, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), norm="forward"), ValueError, "norm"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=(5, 2)), ValueError, "keep"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=(0, 2)), ValueError, ">= 1"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=(1, 2, 3)), TypeError, "pair"),
        (lambda: ktkernels.dct(torch.randn(4, 4), dim=2), ValueError, "out of range"),
        (lambda: ktkernels.idct2d(torch.randn(3, 0)), ValueError, ">= 1"),
        (lambda: ktkernels.dct_attention_map(torch.randn(2, 3, 4)), ValueError, r"\(N, C, H, W\)"),
        (lambda: ktkernels.dct_attention_map(torch.randn(2, 3, 4, 4), p=0.5), ValueError, "p must be"),
        (lambda: ktkernels.dct_attention_map(torch.randn(2, 3, 4, 4), p=float("inf")), ValueError, "finite"),
        (lambda: ktkernels.dct2d([[1.0]]), TypeError, "Tensor"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=2.0), TypeError, "dct2d: keep must be an int or a pair"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=True), TypeError, "dct2d: keep must be an int or a pair"),
        (lambda: ktkernels.dct2d(torch.randn(4, 4), keep=(5, 2)), ValueError, r"dct2d: keep \[5, 2\] exceeds"),
        (lambda: ktkernels.dct(torch.randn(4, 4), dim=1.0), ValueError, "out of range"),
        # modules check their arguments when built, not at the first forward
        (lambda: ktkernels.DCT2d(keep=0), ValueError, "DCT2d: keep must be >= 1"),
        (lambda: ktkernels.DCT2d(keep="2"), TypeError, "DCT2d: keep must be an int or a pair"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_scalars_are_taken():
    """numpy integers and floats, as torch's own layers take them (e.g. sizes read from an array)."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(ktkernels.dct2d(x, keep=np.int64(2)), ktkernels.dct2d(x, keep=2))
    torch.testing.assert_close(ktkernels.dct2d(x, keep=(np.int32(3), 2)), ktkernels.dct2d(x, keep=(3, 2)))
    torch.testing.assert_close(ktkernels.dct(x, dim=np.int64(1)), ktkernels.dct(x, dim=1))
    torch.testing.assert_close(ktkernels.DCT2d(keep=np.int64(2))(x), ktkernels.dct2d(x, keep=2))
    torch.testing.assert_close(ktkernels.dct_attention_map(x, p=np.float32(3)), ktkernels.dct_attention_map(x, p=3))
