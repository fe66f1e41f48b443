"""Transfer losses: every backend against the float64 reference (values and gradients), layouts, dtypes,
per-sample weights, extreme logits, opcheck, gradcheck, torch.compile, the multi-stage modules, errors."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from backend_targets import GPU, TARGETS

import ktkernels
from ktkernels.losses import op, reference

# Relative to the reference's scale. The map pipelines min-max normalise twice (fp32 error grows with 1/range).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAP_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def dtypes_for(target) -> list[torch.dtype]:
    fp64 = [torch.float64] if target[0] in ("cpu", "torch") else []
    return [*fp64, torch.float32, torch.float16, torch.bfloat16]


def interpreted(target) -> bool:
    return target == ("triton", "cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Max abs error <= tol * max |expected|, plus one subnormal step of actual's dtype (fp16 gradients of
    mean-reduced losses are tiny)."""
    info = torch.finfo(actual.dtype)
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten, poisoned elements?)"
    if expected.numel():
        scale = max(expected.abs().max().item(), 1e-30)
        err = (actual - expected).abs().max().item()
        bound = tol * scale + info.tiny * info.eps
        assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"


def features(shape, dtype, device, layout: str, positive: bool = False) -> torch.Tensor:
    """Float64 values rounded to ``dtype``; 'strided' is a non-contiguous view of a larger tensor."""
    if layout == "strided":
        n, c, h, w = shape
        x = torch.randn(n, 2 * c, h, w + 3, dtype=torch.float64)[:, ::2, :, 1 : w + 1]
    else:
        x = torch.randn(shape, dtype=torch.float64)
    x = x.abs() if positive else x
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def grads64(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Value and gradients of the reference ``fn`` in float64 at the (rounded) inputs."""
    leaves = [x.detach().double().cpu().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return [value.detach(), *torch.autograd.grad(value, leaves)]


# ----------------------------------------------------------------------------------------------
# Pixel / global


def reference_pixel_global(w_pixel, w_global, mode, keep):
    def fn(s, t):
        terms = reference.pixel_global_terms(s, t, mode, keep)
        return w_pixel * terms[0] + w_global * terms[1]

    return fn


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_pixel_global_matches_float64_reference(target, layout):
    name, device = target
    shapes = (
        [(2, 3, 5, 7), (1, 1, 1, 1), (3, 5, 1, 6)]
        if interpreted(target)
        else [(2, 3, 5, 7), (1, 1, 1, 1), (3, 33, 9, 4), (2, 17, 16, 16)]
    )
    with ktkernels.use_backend(name):
        for shape in shapes:
            for dtype in dtypes_for(target):
                for mode, keep in [("gap", 1), ("dct_lowpass", 2), ("dct_lowpass", 3), ("cosine", 1), ("none", 1)]:
                    s = features(shape, dtype, device, layout).requires_grad_(True)
                    t = features(shape, dtype, device, layout).requires_grad_(True)
                    loss = ktkernels.pixel_global_transfer_loss(s, t, 0.7, 1.3, mode, keep)
                    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
                    value, ref_s, ref_t = grads64(reference_pixel_global(0.7, 1.3, mode, keep), s, t)
                    what = f"{shape} {dtype} {mode} keep={keep}"
                    assert_close(loss, value, TOL[dtype], what)
                    assert_close(grad_s, ref_s, TOL[dtype], what + " grad_s")
                    assert_close(grad_t, ref_t, TOL[dtype], what + " grad_t")
                    assert grad_s.dtype == dtype and grad_s.stride() == s.stride() or layout == "strided"
                    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
                        assert grad_s.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("target", TARGETS)
def test_pixel_global_on_resnet50_stages(target):
    """The four ResNet-50 stage shapes (batch 2; one sample for the interpreter), bf16 and fp32, channels_last."""
    name, device = target
    batch = 1 if interpreted(target) else 2
    module = ktkernels.PixelGlobalTransferLoss(w_global=2.0)
    stages = {"layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14), "layer4": (2048, 7)}
    with ktkernels.use_backend(name):
        for dtype in (torch.float32, torch.bfloat16):
            student = {k: features((batch, c, h, h), dtype, device, "channels_last") for k, (c, h) in stages.items()}
            teacher = {k: features((batch, c, h, h), dtype, device, "channels_last") for k, (c, h) in stages.items()}
            for f in student.values():
                f.requires_grad_(True)
            out = module(student, teacher)
            grads = torch.autograd.grad(out.total, list(student.values()))
            for (key, s), grad in zip(student.items(), grads, strict=True):
                value, ref_s, _ = grads64(reference_pixel_global(1.0, 2.0, "gap", 1), s, teacher[key])
                assert_close(out.terms[f"{key}.pixel"] + 2.0 * out.terms[f"{key}.global"], value, TOL[dtype], key)
                assert_close(grad, ref_s, TOL[dtype], key + " grad")


@pytest.mark.parametrize("target", TARGETS)
def test_pixel_global_weights_of_any_sign(target):
    """Negative, zero and Tensor weights: ``w_global == 0`` may skip the global reduction, a negative one may not."""
    name, device = target
    s = features((2, 3, 4, 5), torch.float32, device, "nchw").requires_grad_(True)
    t = features((2, 3, 4, 5), torch.float32, device, "nchw")
    with ktkernels.use_backend(name):
        for w_pixel, w_global in [(1.0, -0.5), (-1.0, 2.0), (0.0, 1.0), (1.0, 0.0), (1.0, torch.tensor(-0.5))]:
            loss = ktkernels.pixel_global_transfer_loss(s, t, w_pixel, w_global, "gap")
            (grad,) = torch.autograd.grad(loss, s)
            value, ref_s, _ = grads64(reference_pixel_global(w_pixel, float(w_global), "gap", 1), s, t)
            what = f"w_pixel={w_pixel} w_global={w_global}"
            assert_close(loss, value, TOL[torch.float32], what)
            assert_close(grad, ref_s, TOL[torch.float32], what + " grad")


def test_teacher_without_grad_gets_none_and_batch_zero():
    s = torch.randn(0, 3, 4, 4, requires_grad=True)
    loss = ktkernels.pixel_global_transfer_loss(s, torch.randn(0, 3, 4, 4))
    assert loss.item() == 0
    loss.backward()
    assert s.grad.shape == s.shape and s.grad.abs().sum() == 0
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    (grad_s,) = torch.autograd.grad(ktkernels.pixel_global_transfer_loss(s, t.detach()), (s,))
    assert torch.isfinite(grad_s).all()


def test_mixed_dtypes_accumulate_in_fp32():
    s = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    t = torch.randn(2, 8, 6, 6)
    loss = ktkernels.pixel_global_transfer_loss(s, t)
    assert loss.dtype == torch.float32
    assert_close(loss, reference_pixel_global(1.0, 1.0, "gap", 1)(s.double(), t.double()), TOL[torch.float32])


def test_dct_lowpass_interpolates_between_gap_and_pixel():
    s, t = torch.randn(2, 3, 5, 6, dtype=torch.float64), torch.randn(2, 3, 5, 6, dtype=torch.float64)
    gap = ktkernels.pixel_global_transfer_loss(s, t, 0.0, 1.0, "gap")
    assert torch.allclose(ktkernels.pixel_global_transfer_loss(s, t, 0.0, 1.0, "dct_lowpass", keep=1), gap)
    pixel = ktkernels.pixel_global_transfer_loss(s, t, 1.0, 0.0)
    assert torch.allclose(ktkernels.pixel_global_transfer_loss(s, t, 0.0, 1.0, "dct_lowpass", keep=6), pixel)
    cos = 1 - torch.nn.functional.cosine_similarity(s.mean((2, 3)), t.mean((2, 3))).mean()
    assert torch.allclose(ktkernels.pixel_global_transfer_loss(s, t, 0.0, 1.0, "cosine"), cos)


def test_mentee_rmse():
    a, b = torch.randn(4, 10, dtype=torch.float64, requires_grad=True), torch.randn(4, 10, dtype=torch.float64)
    loss = ktkernels.mentee_rmse_loss(a, b)
    assert torch.allclose(loss, (a - b).pow(2).mean().sqrt())
    (grad,) = torch.autograd.grad(loss, a)
    assert torch.allclose(grad, (a - b).detach() / (a.numel() * loss.detach()))
    (grad0,) = torch.autograd.grad(ktkernels.mentee_rmse_loss(a, a.detach()), a)
    assert (grad0 == 0).all()
    for shape in [(0, 5), (0, 2, 3), (0,)]:  # an empty batch of any rank: 0, as for (0, C, H, W)
        assert ktkernels.mentee_rmse_loss(torch.zeros(shape), torch.zeros(shape)).item() == 0


# ----------------------------------------------------------------------------------------------
# Attention maps: DCT-KD and attention transfer


def reference_map_loss(kind, p, weights, per_position):
    def fn(s, t):
        maps = [x.abs().pow(p).mean(dim=1) for x in (s, t)]
        dist = reference.attention_map_distance(maps[0], maps[1], kind)
        if weights is not None:
            dist = dist * weights.double()
        return dist.sum() / (s.shape[0] * (s.shape[2] * s.shape[3] if per_position else 1))

    return fn


MAP_CASES = [
    ("dct", "a", "dct_a", False),
    ("dct", "b", "dct_b", False),
    ("dct", "dct", "dct", False),
    ("at", "code", "at_code", True),
    ("at", "paper", "at_paper", False),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_map_losses_match_float64_reference(target, layout):
    name, device = target
    shapes = [((2, 6, 7, 7), (2, 4, 7, 7)), ((3, 5, 5, 9), (3, 5, 5, 9)), ((1, 3, 1, 1), (1, 2, 1, 1))]
    if not interpreted(target):
        shapes.append(((2, 16, 14, 14), (2, 32, 14, 14)))
    with ktkernels.use_backend(name):
        for s_shape, t_shape in shapes:
            weights = torch.tensor([1.0, 0.0, 0.5][: s_shape[0]], device=device)
            for dtype in dtypes_for(target):
                for family, variant, kind, per_position in MAP_CASES:
                    s = features(s_shape, dtype, device, layout, positive=True).requires_grad_(True)
                    t = features(t_shape, dtype, device, layout, positive=True).requires_grad_(True)
                    if family == "dct":
                        loss = ktkernels.dct_attention_loss(s, t, variant, sample_weights=weights)
                        fn = reference_map_loss(kind, 2, weights.cpu(), False)
                    else:
                        loss = ktkernels.attention_transfer_loss(s, t, 2, variant)
                        fn = reference_map_loss(kind, 2, None, per_position)
                    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
                    value, ref_s, ref_t = grads64(fn, s, t)
                    what = f"{s_shape} {dtype} {kind}"
                    assert_close(loss, value, MAP_TOL[dtype], what)
                    # The gradients are stored in the features' dtype.
                    grad_tol = max(MAP_TOL[dtype] * 10, TOL[dtype])
                    assert_close(grad_s, ref_s, grad_tol, what + " grad_s")
                    assert_close(grad_t, ref_t, grad_tol, what + " grad_t")


@pytest.mark.parametrize("target", TARGETS)
def test_map_distance_edge_cases(target):
    """Identical maps (d = 0: gradient 0, not NaN), constant maps (the clamp), maps over 64 (the reference)."""
    name, device = target
    with ktkernels.use_backend(name):
        for kind in op.MAP_KINDS:
            m = torch.rand(2, 5, 6, device=device, requires_grad=True)
            for other in (m.detach().clone(), torch.ones(2, 5, 6, device=device)):
                dist = op.attention_map_distance(m, other, kind)
                (grad,) = torch.autograd.grad(dist.sum(), m)
                assert torch.isfinite(dist).all() and torch.isfinite(grad).all(), kind
            same = op.attention_map_distance(m, m.detach().clone(), kind)
            assert (same.abs() < 1e-6).all(), kind
        if not interpreted(target):
            big_s, big_t = torch.rand(1, 70, 66, device=device), torch.rand(1, 70, 66, device=device)
            expected = reference.attention_map_distance(big_s.double(), big_t.double(), "dct_b")
            assert_close(op.attention_map_distance(big_s, big_t, "dct_b"), expected, MAP_TOL[torch.float32])


def _map_distance_and_grad(m: torch.Tensor, other: torch.Tensor, kind: str, backend_name: str):
    m = m.detach().requires_grad_()
    with ktkernels.use_backend(backend_name):
        dist = op.attention_map_distance(m, other, kind)
        (grad,) = torch.autograd.grad(dist, m, torch.linspace(0.5, 1.5, len(dist), device=m.device))
    return dist, grad


@pytest.mark.parametrize("target", TARGETS)
def test_map_distance_of_zero_and_transposed_maps(target):
    """A student map of zeros (a dead layer: AT's normalisation divides by its clamped norm, so the gradient is
    large, not 0) or of tiny values (a norm just below the clamp, which then passes no gradient to it), and maps that
    are transposed views (non-contiguous), against float64 on every kind."""
    name, device = target
    rng = torch.Generator().manual_seed(5)
    t = torch.rand(2, 5, 6, generator=rng, dtype=torch.float64)
    zero = torch.zeros(2, 5, 6, dtype=torch.float64)
    wide = torch.rand(2, 6, 5, generator=rng, dtype=torch.float64)
    wide_t = torch.rand(2, 6, 5, generator=rng, dtype=torch.float64)
    for kind in op.MAP_KINDS:
        cases = {"transposed": (wide.transpose(1, 2), wide_t.transpose(1, 2))}
        if kind.startswith("at"):  # DCT-KD's min-max normalisation of a constant map is its own edge (clamped)
            cases["zero student"] = (zero, t)
            cases["tiny student"] = (t * (0.9e-12 / t.norm(dim=(1, 2), keepdim=True)), t)
        for what, (m, other) in cases.items():
            expected, expected_grad = _map_distance_and_grad(m, other, kind, "torch")
            m32, other32 = m.to(device, torch.float32), other.to(device, torch.float32)
            dist, grad = _map_distance_and_grad(m32, other32, kind, name)
            assert_close(dist, expected, MAP_TOL[torch.float32], f"{kind} {what}")
            assert_close(grad, expected_grad, MAP_TOL[torch.float32] * 10, f"{kind} {what} grad")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="no GPU")
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_map_distance_past_2_31_elements(backend_name):
    """The map kernels offset sample n by n * H * W: with 64 x 64 maps, samples past 524288 start past 2^31
    elements, where an int32 offset wraps (the interpreter cannot run half a million programs: a GPU test)."""
    n = 2**31 // (64 * 64) + 2
    if torch.cuda.mem_get_info()[0] < 4 * n * 64 * 64 * 4 + 2**30:  # s, t, the gradient, the reference copies
        pytest.skip("needs about 36 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.rand(n, 64, 64, device="cuda", generator=gen)
    t = torch.rand(n, 64, 64, device="cuda", generator=gen)
    _check_the_last_maps(s, t, backend_name)


def _check_the_last_maps(s: torch.Tensor, t: torch.Tensor, backend_name: str) -> None:
    last = slice(len(s) - 3, len(s))
    for kind in ("at_code", "dct_b"):
        with ktkernels.use_backend(backend_name):
            dist = op.attention_map_distance(s, t, kind)
            grad = op.attention_map_distance_backward(s, t, torch.ones_like(dist), kind)
        ref_s = s[last].double().requires_grad_()
        with ktkernels.use_backend("torch"):
            expected = op.attention_map_distance(ref_s, t[last].double(), kind)
        (expected_grad,) = torch.autograd.grad(expected.sum(), ref_s)
        assert_close(dist[last], expected, MAP_TOL[torch.float32], kind)
        assert_close(grad[last], expected_grad, MAP_TOL[torch.float32] * 10, f"{kind} grad")
        del dist, grad


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0][0] == "triton"])
def test_triton_takes_maps_up_to_its_on_chip_side(target, monkeypatch):
    """The Triton map kernel holds a whole map on chip: maps up to ``MAP_MAX`` a side run it, a map wider or taller
    than that the reference, forward and backward, with the same values."""
    from ktkernels.losses import triton as kernels

    name, device = target
    launched = []
    launch = kernels._map_launch
    monkeypatch.setattr(kernels, "_map_launch", lambda *args: launched.append(args[0].shape[1:]) or launch(*args))
    side = op.MAP_MAX
    for shape, expect_kernel in (((1, side, 3), True), ((1, 3, side + 6), False), ((1, side + 6, 3), False)):
        launched.clear()
        m, other = torch.rand(shape, device=device), torch.rand(shape, device=device)
        dist, grad = _map_distance_and_grad(m, other, "dct_b", name)
        assert bool(launched) == expect_kernel, (shape, launched)
        expected, expected_grad = _map_distance_and_grad(m.double(), other.double(), "dct_b", "torch")
        assert_close(dist, expected, MAP_TOL[torch.float32], str(shape))
        assert_close(grad, expected_grad, MAP_TOL[torch.float32] * 10, f"{shape} grad")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
@pytest.mark.parametrize("target", TARGETS)
def test_non_finite_inputs_make_every_loss_non_finite(target):
    """A NaN or inf in one sample's features or logits must show in the loss (NaN or inf), as in F.normalize,
    torch.norm and kl_div: a sample that silently counts as 0 would hide a diverging run. (The guards at d = 0 and
    p_t = 0 once took NaN for 0 on the CPU and reference backends, while Triton returned NaN.) So must the
    gradients of that sample, and only of that sample."""
    name, device = target
    s, t = torch.rand(2, 3, 4, 5, device=device) + 0.1, torch.rand(2, 3, 4, 5, device=device) + 0.1
    logits_s, logits_t = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    losses = {
        "pixel_global": ktkernels.pixel_global_transfer_loss,
        "at_code": lambda a, b: ktkernels.attention_transfer_loss(a, b, mode="code"),
        "at_paper": lambda a, b: ktkernels.attention_transfer_loss(a, b, mode="paper"),
        **{f"dct_{v}": lambda a, b, v=v: ktkernels.dct_attention_loss(a, b, variant=v) for v in ("a", "b", "dct")},
        "soft_target": lambda a, b: ktkernels.soft_target_loss(a, b, 4.0),
    }
    with ktkernels.use_backend(name):
        for what, loss in losses.items():
            clean = (logits_s, logits_t) if what == "soft_target" else (s, t)
            assert torch.isfinite(loss(*clean)), what
            for side, bad in itertools.product((0, 1), (float("nan"), float("inf"))):
                inputs = [x.clone() for x in clean]
                inputs[side][0].view(-1)[2] = bad
                inputs = [x.requires_grad_() for x in inputs]
                value = loss(*inputs)
                case = f"{what}: {bad} in the {('student', 'teacher')[side]}"
                assert not torch.isfinite(value), f"{case} gave {value}"
                for grad in torch.autograd.grad(value, inputs):
                    assert not torch.isfinite(grad[0]).all() and torch.isfinite(grad[1]).all(), f"{case}: {grad}"


def test_teacher_correct_mask_and_weights_keep_divisor_n():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    mask = ktkernels.teacher_correct_mask(logits, torch.tensor([0, 0, 0]))
    assert mask.tolist() == [1.0, 0.0, 1.0]
    s, t = torch.rand(3, 4, 7, 7), torch.rand(3, 4, 7, 7)
    per_sample = [ktkernels.dct_attention_loss(s[i : i + 1], t[i : i + 1]) for i in range(3)]
    masked = ktkernels.dct_attention_loss(s, t, sample_weights=mask)
    assert torch.allclose(masked, (per_sample[0] + per_sample[2]) / 3, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Soft targets


def reference_soft_target(temperature):
    def fn(s, t):
        log_p_s = torch.log_softmax(s / temperature, dim=1)
        p_t = torch.softmax(t / temperature, dim=1)
        return torch.nn.functional.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / s.shape[0]

    return fn


@pytest.mark.parametrize("target", TARGETS)
def test_soft_target_matches_distill_kl(target):
    name, device = target
    # K past one Triton block (forward 4096 classes, backward 1024): the online log-sum-exp and the tail block
    sizes = [(3, 1), (4, 7), (2, 1000), (2, 1500), (1, 5000)] + ([] if interpreted(target) else [(64, 1000)])
    with ktkernels.use_backend(name):
        for n, k in sizes:
            for dtype in dtypes_for(target):
                for temperature in (1.0, 4.0):
                    s = (3 * torch.randn(n, k, dtype=torch.float64)).to(device, dtype).requires_grad_(True)
                    t = (3 * torch.randn(n, k, dtype=torch.float64)).to(device, dtype).requires_grad_(True)
                    loss = ktkernels.soft_target_loss(s, t, temperature)
                    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
                    value, ref_s, ref_t = grads64(reference_soft_target(temperature), s, t)
                    what = f"({n}, {k}) {dtype} T={temperature}"
                    assert_close(loss, value, TOL[dtype] * 10, what)
                    assert_close(grad_s, ref_s, TOL[dtype] * 10, what + " grad_s")
                    assert_close(grad_t, ref_t, TOL[dtype] * 10, what + " grad_t")


@pytest.mark.parametrize("target", TARGETS)
def test_soft_target_extreme_logits_stay_finite(target):
    name, device = target
    cases = [(torch.float32, 1e4), (torch.float32, 1e30), (torch.bfloat16, 1e4), (torch.float16, 6e4)]
    with ktkernels.use_backend(name):
        for dtype, scale in cases:
            base = (torch.randn(4, 1000, dtype=torch.float64) * scale).clamp(
                -6e4, 6e4 if dtype == torch.float16 else 1e38
            )
            s = base.to(device, dtype).requires_grad_(True)
            t = torch.roll(base, 1, dims=1).to(device, dtype).requires_grad_(True)
            loss = ktkernels.soft_target_loss(s, t, 4.0)
            grad_s, grad_t = torch.autograd.grad(loss, (s, t))
            assert torch.isfinite(loss) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
            value = grads64(reference_soft_target(4.0), s, t)[0]
            assert_close(loss, value, 1e-4, f"{dtype} x{scale}")
            equal = ktkernels.soft_target_loss(s, s.detach(), 4.0)
            assert equal.abs().item() <= 1e-6 * max(1.0, scale), (dtype, scale, equal)


@pytest.mark.parametrize("target", TARGETS)
def test_soft_target_masked_teacher_class(target):
    """A -inf teacher logit (p_t = 0) adds 0 to the KL (0 log 0 = 0, as DistillKL's kl_div with a probability
    target) and gets a zero gradient: the loss and the gradients equal those of the float64 KL in log space with
    the class at -1e30 (DistillKL's own teacher gradient is NaN there: xlogy's derivative at 0)."""
    name, device = target

    def log_space_kl(s, t):
        log_p_s, log_p_t = (torch.log_softmax(x / 2.0, dim=1) for x in (s, t))
        return torch.nn.functional.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * 4.0 / s.shape[0]

    with ktkernels.use_backend(name):
        for dtype in dtypes_for(target):
            s = (3 * torch.randn(3, 9, dtype=torch.float64)).to(device, dtype).requires_grad_(True)
            t = (3 * torch.randn(3, 9, dtype=torch.float64)).to(device, dtype)
            t[:, 2], t[0, 5] = float("-inf"), float("-inf")
            finite = torch.where(torch.isinf(t), -1e30, t.double()).cpu()  # float64: -1e30 stays finite
            t.requires_grad_(True)
            loss = ktkernels.soft_target_loss(s, t, 2.0)
            grad_s, grad_t = torch.autograd.grad(loss, (s, t))
            value, ref_s, ref_t = grads64(log_space_kl, s, finite)
            assert_close(loss, value, TOL[dtype] * 10, f"{dtype} loss")
            assert_close(grad_s, ref_s, TOL[dtype] * 10, f"{dtype} grad_s")
            assert_close(grad_t, ref_t, TOL[dtype] * 10, f"{dtype} grad_t")
            assert (grad_t[torch.isinf(t)] == 0).all()


def test_soft_target_strided_logits_and_module():
    s = torch.randn(8, 20)[:, ::2]
    t = torch.randn(10, 8).T
    expected = reference_soft_target(2.0)(s.double(), t.double())
    out = ktkernels.SoftTargetLoss(temperature=2.0, weight=0.5)(s, t)
    assert_close(out.terms["soft_target"], expected, 1e-5)
    assert_close(out.total, 0.5 * expected, 1e-5)


# ----------------------------------------------------------------------------------------------
# opcheck, gradcheck, compile


def _op_samples(device="cpu", dtype=torch.float32):
    s = torch.randn(2, 3, 5, 4, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(2, 3, 5, 4, device=device, dtype=dtype)
    maps = torch.rand(2, 6, 5, device=device, dtype=dtype, requires_grad=True), torch.rand(2, 6, 5, device=device)
    logits = torch.randn(3, 11, device=device, dtype=dtype, requires_grad=True), torch.randn(3, 11, device=device)
    return [
        (op.pixel_global_terms, (s, t, "gap", 1)),
        (op.pixel_global_terms, (s.detach().contiguous(memory_format=torch.channels_last), t, "dct_lowpass", 2)),
        (op.pixel_global_terms, (s, t, "cosine", 1)),
        (op.attention_map_distance, (maps[0], maps[1].to(dtype), "dct_a")),
        (op.attention_map_distance, (maps[0], maps[1].to(dtype), "at_paper")),
        (op.soft_target_kl, (logits[0], logits[1].to(dtype), 3.0)),
    ]


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_opcheck(backend_name):
    with ktkernels.use_backend(backend_name):
        for fn, args in _op_samples():
            torch.library.opcheck(fn, args)


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_gradcheck_float64(backend_name):
    with ktkernels.use_backend(backend_name):
        s = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        for mode in ("gap", "dct_lowpass", "cosine"):
            assert torch.autograd.gradcheck(
                lambda a, b, m=mode: ktkernels.pixel_global_transfer_loss(a, b, 0.3, 2.0, m), (s, t)
            )
        pos_s, pos_t = s.detach().abs().requires_grad_(True), t.detach().abs().requires_grad_(True)
        for variant in ("a", "b", "dct"):
            assert torch.autograd.gradcheck(
                lambda a, b, v=variant: ktkernels.dct_attention_loss(a, b, v), (pos_s, pos_t)
            )
        for mode in ("code", "paper"):
            assert torch.autograd.gradcheck(
                lambda a, b, m=mode: ktkernels.attention_transfer_loss(a, b, 2, m), (pos_s, pos_t)
            )
        z_s = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
        z_t = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: ktkernels.soft_target_loss(a, b, 3.0), (z_s, z_t))


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_torch_func_grad_and_per_sample_grads(backend_name):
    """torch.func.grad (student and teacher) and per-sample gradients (vmap over grad) of every loss equal eager
    autograd's; forward mode and double backward raise NotImplementedError naming the op (the custom ops alone
    raise under torch.func.grad and drop a tangent silently, pytorch/pytorch#170834)."""
    import torch.autograd.forward_ad as fwAD

    s = torch.randn(3, 4, 5, 6, dtype=torch.float64).abs()
    t = torch.randn(3, 4, 5, 6, dtype=torch.float64).abs()
    z_s, z_t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    cases = [
        (lambda a, b: ktkernels.pixel_global_transfer_loss(a, b, 0.3, 2.0, "dct_lowpass"), s, t),
        (lambda a, b: ktkernels.pixel_global_transfer_loss(a, b, 0.3, 2.0, "cosine"), s, t),
        (lambda a, b: ktkernels.mentee_rmse_loss(a, b), s, t),
        (lambda a, b: ktkernels.dct_attention_loss(a, b, "dct"), s, t),
        (lambda a, b: ktkernels.attention_transfer_loss(a, b, 2, "paper"), s, t),
        (lambda a, b: ktkernels.soft_target_loss(a, b, 3.0), z_s, z_t),
    ]
    func = torch.func
    with ktkernels.use_backend(backend_name), warnings.catch_warnings():
        # vmap folds the per-sample ops into one call; the KTFT terms reduce over the batch, so it loops over them
        # (and torch says so)
        warnings.filterwarnings("error", message=".*batching rule for ktkernels::")
        warnings.filterwarnings("ignore", message=".*batching rule for ktkernels::(pixel_global_terms|transfer_grad)")
        for index, (loss, a, b) in enumerate(cases):
            got = func.grad(loss, argnums=(0, 1))(a, b)
            leaves = a.clone().requires_grad_(), b.clone().requires_grad_()
            expected = torch.autograd.grad(loss(*leaves), leaves)
            torch.testing.assert_close(got, expected, msg=lambda m, i=index: f"case {i}: {m}")
            per_sample = func.vmap(func.grad(lambda u, w, f=loss: f(u[None], w[None])))(a, b)
            looped = torch.stack([func.grad(loss)(u[None], w[None])[0] for u, w in zip(a, b, strict=True)])
            torch.testing.assert_close(per_sample, looped, msg=lambda m, i=index: f"case {i}: {m}")
            batched = func.vmap(loss)(a[:, None], b[:, None])  # plain vmap: the ops' own rules
            looped = torch.stack([loss(u[None], w[None]) for u, w in zip(a, b, strict=True)])
            torch.testing.assert_close(batched, looped, msg=lambda m, i=index: f"case {i}: {m}")
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                func.jvp(lambda u, f=loss, w=b: f(u, w), (a,), (torch.ones_like(a),))
            with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
                loss(fwAD.make_dual(a, torch.ones_like(a)), b)
            # double backward: the same error in eager autograd (not torch's RuntimeError naming no ktkernels op)
            leaf = a.clone().requires_grad_()
            (grad,) = torch.autograd.grad(loss(leaf, b), leaf, create_graph=True)
            with pytest.raises(NotImplementedError, match=r"ktkernels::\w+_backward|ktkernels::transfer_grad: diff"):
                grad.square().sum().backward()


@pytest.mark.slow
def test_compile_fullgraph_modules():
    torch._dynamo.reset()
    pixel = ktkernels.PixelGlobalTransferLoss(["a", "b"], [1.0, 0.5], global_mode="dct_lowpass")
    dct = ktkernels.DCTAttentionLoss(variant="a")
    soft = ktkernels.SoftTargetLoss(4.0)

    def step(fs, ft, zs, zt, mask):
        return pixel(fs, ft).total + dct(fs, ft, mask).total + soft(zs, zt).total

    fs = {"a": torch.rand(2, 4, 7, 7, requires_grad=True), "b": torch.rand(2, 8, 5, 5, requires_grad=True)}
    ft = {k: torch.rand_like(v) for k, v in fs.items()}
    zs, zt = torch.randn(2, 10, requires_grad=True), torch.randn(2, 10)
    mask = torch.tensor([1.0, 0.0])
    compiled = torch.compile(step, fullgraph=True)
    eager = step(fs, ft, zs, zt, mask)
    got = compiled(fs, ft, zs, zt, mask)
    assert torch.allclose(got, eager, rtol=1e-5)
    grads = torch.autograd.grad(got, [*fs.values(), zs])
    expected = torch.autograd.grad(eager, [*fs.values(), zs])
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Modules and errors


def test_modules_pair_stages_by_name_and_position():
    s = {"l1": torch.randn(2, 4, 6, 6), "l2": torch.randn(2, 8, 3, 3)}
    t = {"l2": torch.randn(2, 8, 3, 3), "l1": torch.randn(2, 4, 6, 6)}
    out = ktkernels.PixelGlobalTransferLoss(weights={"l2": 3.0})(s, t)
    expected = sum(
        w * reference_pixel_global(1.0, 1.0, "gap", 1)(s[k].double(), t[k].double()) for k, w in (("l1", 1), ("l2", 3))
    )
    assert_close(out.total, expected, 1e-5)
    assert set(out.terms) == {"l1.pixel", "l1.global", "l2.pixel", "l2.global"}
    assert all(not v.requires_grad for v in out.terms.values())
    listed = ktkernels.PixelGlobalTransferLoss(["l1", "l2"], [1.0, 3.0])
    as_lists = ktkernels.PixelGlobalTransferLoss(weights={"1": 3.0})([s["l1"], s["l2"]], [t["l1"], t["l2"]])
    assert torch.allclose(listed(s, t).total, out.total) and torch.allclose(as_lists.total, out.total)
    only = ktkernels.PixelGlobalTransferLoss(stages=["l2"])(s, t)
    assert set(only.terms) == {"l2.pixel", "l2.global"}
    at = ktkernels.AttentionTransferLoss(weights={"l1": 1000.0})(s, t)
    assert set(at.terms) == {"l1.at", "l2.at"}
    dct = ktkernels.DCTAttentionLoss()(s, t, sample_weights=torch.ones(2))
    assert torch.allclose(dct.total, dct.terms["l1.dct"] + dct.terms["l2.dct"])


def test_annealed_weight():
    w = ktkernels.AnnealedWeight(2.0, 0.0, 10)
    assert [w(e) for e in (0, 5, 10, 20)] == [2.0, 1.0, 0.0, 0.0]
    assert ktkernels.AnnealedWeight(1.0, 3.0, 0)(0) == 3.0
    with pytest.raises(ValueError, match="epochs"):
        ktkernels.AnnealedWeight(1.0, 0.0, -1)


def _f(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


PG, DCT, AT, SOFT = (
    ktkernels.pixel_global_transfer_loss,
    ktkernels.dct_attention_loss,
    ktkernels.attention_transfer_loss,
    ktkernels.soft_target_loss,
)
INT = torch.int32


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: PG(_f(2, 3, 4), _f(2, 3, 4)), ValueError, "N, C, H, W"),
        (lambda: PG(_f(2, 3, 4, 4), _f(2, 3, 4, 5)), ValueError, "shapes differ"),
        (lambda: PG(_f(1, 1, 2, 2).to(INT), _f(1, 1, 2, 2).to(INT)), TypeError, "floating"),
        (lambda: PG(_f(1, 1, 2, 2), _f(1, 1, 2, 2), global_mode="mean"), ValueError, "global_mode"),
        (lambda: PG(_f(1, 1, 2, 2), _f(1, 1, 2, 2), global_mode="dct_lowpass", keep=0), ValueError, "keep"),
        (lambda: DCT(_f(2, 3, 4, 4), _f(2, 3, 5, 4)), ValueError, "N, H and W"),
        (lambda: DCT(_f(2, 3, 4, 4), _f(2, 3, 4, 4), variant="c"), ValueError, "variant"),
        (lambda: DCT(_f(2, 3, 4, 4), _f(2, 3, 4, 4), sample_weights=torch.ones(3)), ValueError, "sample_weights"),
        (lambda: DCT(_f(2, 3, 4), _f(2, 3, 4)), ValueError, "N, C, H, W"),
        (lambda: AT(_f(2, 3, 4, 4), _f(2, 3, 4, 4), mode="x"), ValueError, "mode"),
        (lambda: AT(_f(2, 3, 4, 4), _f(2, 3, 4, 4), p=0.5), ValueError, "p must be"),
        (lambda: SOFT(_f(2, 5), _f(2, 6)), ValueError, "one shape"),
        (lambda: SOFT(_f(2, 5), _f(2, 5), temperature=0), ValueError, "temperature"),
        (lambda: SOFT(_f(2, 5, 1), _f(2, 5, 1)), ValueError, r"\(N, K\)"),
        (lambda: SOFT(_f(2, 5).to(INT), _f(2, 5).to(INT)), TypeError, "floating"),
        (lambda: ktkernels.mentee_rmse_loss(_f(2, 5), _f(2, 4)), ValueError, "differ"),
        (lambda: ktkernels.PixelGlobalTransferLoss()({"a": _f(1, 2, 3, 3)}, {"b": _f(1, 2, 3, 3)}), KeyError, "lack"),
        (lambda: ktkernels.PixelGlobalTransferLoss()({"a": _f(1, 2, 3, 3)}, {"a": _f(1, 3, 3, 3)}), ValueError, "'a'"),
        (lambda: ktkernels.PixelGlobalTransferLoss(weights={"z": 1.0})({"a": _f(1, 1, 1, 1)}, {"a": _f(1, 1, 1, 1)}),
         KeyError, "unknown"),
        (lambda: ktkernels.PixelGlobalTransferLoss()(_f(1, 2, 3, 3), _f(1, 2, 3, 3)), TypeError, "dict or a list"),
        (lambda: ktkernels.PixelGlobalTransferLoss()({}, {}), ValueError, "no stages"),
        (lambda: ktkernels.PixelGlobalTransferLoss(weights=[1.0]), ValueError, "weights given as a list"),
        (lambda: ktkernels.DCTAttentionLoss()({"a": _f(1, 2, 3, 3)}, {"a": _f(1, 2, 4, 3)}), ValueError, "stage 'a'"),
        (lambda: ktkernels.SoftTargetLoss(temperature=-1.0), ValueError, "temperature"),
        (lambda: ktkernels.SoftTargetLoss(temperature=float("inf")), ValueError, "finite"),
        (lambda: SOFT(_f(2, 5), _f(2, 5), temperature=float("inf")), ValueError, "finite"),
        (lambda: SOFT(_f(2, 5), _f(2, 5), temperature=1e300), ValueError, "square"),
        (lambda: SOFT(_f(2, 5), _f(2, 5), temperature=1e-300), ValueError, "square"),
        (lambda: SOFT(_f(2, 5), _f(2, 5), temperature=True), ValueError, "temperature"),
        (lambda: SOFT([1.0], _f(2, 5)), TypeError, "Tensor"),
        (lambda: ktkernels.mentee_rmse_loss([1.0], _f(2, 5)), TypeError, "Tensor"),
        (lambda: PG(_f(1, 1, 2, 2), [1.0]), TypeError, "Tensor"),
        (lambda: PG(_f(1, 1, 2, 2), _f(1, 1, 2, 2), keep=2.0), ValueError, "keep"),
        (lambda: PG(_f(1, 1, 2, 2), _f(1, 1, 2, 2), global_mode="dct_lowpass", keep=True), ValueError, "keep"),
        (lambda: AT(_f(2, 3, 0, 4), _f(2, 3, 0, 4)), ValueError, "H, W >= 1"),
        (lambda: DCT(_f(2, 3, 4, 0), _f(2, 3, 4, 0), variant="dct"), ValueError, "H, W >= 1"),
        (lambda: AT(_f(2, 3, 4, 4), _f(2, 3, 4, 4), p=float("inf")), ValueError, "finite"),
        (lambda: ktkernels.teacher_correct_mask(_f(4, 10), torch.zeros(4, 1, dtype=torch.long)), ValueError, "(N,)"),
        (lambda: ktkernels.teacher_correct_mask(_f(10), torch.tensor(3)), ValueError, r"\(N, K\)"),
        (lambda: ktkernels.teacher_correct_mask(_f(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, "K >= 1"),
        (lambda: ktkernels.teacher_correct_mask(_f(4, 10), torch.zeros(4)), TypeError, "integers"),
        # modules check their arguments when built, not at the first forward
        (lambda: ktkernels.PixelGlobalTransferLoss(keep=0), ValueError, "keep must be an int >= 1"),
        (lambda: ktkernels.DCTAttentionLoss(p=0.5), ValueError, "DCTAttentionLoss: p must be"),
        (lambda: ktkernels.AttentionTransferLoss(p=True), ValueError, "AttentionTransferLoss: p must be"),
    ],
)  # fmt: skip
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_scalars_are_taken():
    """numpy integers and floats, as torch's own layers take them (e.g. hyper-parameters read from an array)."""
    s, t = _f(2, 3, 5, 4, dtype=torch.float64), _f(2, 3, 5, 4, dtype=torch.float64)
    z_s, z_t = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    cases = [
        (lambda k: PG(s, t, global_mode="dct_lowpass", keep=k), np.int64(2), 2),
        (lambda k: ktkernels.PixelGlobalTransferLoss(global_mode="cosine", keep=k)([s], [t]).total, np.int64(2), 2),
        (lambda temperature: SOFT(z_s, z_t, temperature), np.float32(3), 3.0),
        (lambda temperature: ktkernels.SoftTargetLoss(temperature)(z_s, z_t).total, np.int64(3), 3.0),
        (lambda p: AT(s, t, p=p), np.float32(3), 3.0),
        (lambda p: ktkernels.DCTAttentionLoss(p=p)([s], [t]).total, np.int64(3), 3.0),
    ]
    for index, (loss, numpy_value, value) in enumerate(cases):
        torch.testing.assert_close(loss(numpy_value), loss(value), msg=lambda m, i=index: f"case {i}: {m}")


def test_named_triton_backend_refuses_float64():
    if not ktkernels.backend.has_triton():
        pytest.skip("triton is not installed")
    with ktkernels.use_backend("triton"), pytest.raises(RuntimeError, match="fp64"):
        ktkernels.soft_target_loss(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
