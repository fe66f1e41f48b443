"""The blur-pool family's public API around the ops: forward-mode AD, autocast, the backend choice under
torch.compile, a live ``stride`` attribute, and the argument types a drop-in must take or refuse."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from backend_targets import TARGETS

import ktkernels
from ktkernels import backend
from ktkernels.blurpool import reference as ref
from ktkernels.compat import kornia, timm

# fp64 everywhere but the CUDA C++ kernels (fp32/fp16/bf16 only).
FP64_TARGETS = [t for t in TARGETS if t.values[0][0] != "cuda"]


def _reference_layers():
    """(ktkernels callable, float64 reference of the same maths) pairs over the three ops."""
    return [
        (ktkernels.BlurPool2d(3), lambda t: ref.blur_pool2d_reference(t, 4, 2, (1, 2, 1, 2), "reflect")),
        (
            lambda t: ktkernels.blur_pool2d(t, 3, 1, (0, 2, 1, 1), "zero"),
            lambda t: ref.blur_pool2d_reference(t, 3, 1, (0, 2, 1, 1), "zero"),
        ),
        (ktkernels.BlurPool1d(3, pad_type="repl"), lambda t: ref.blur_pool1d_reference(t, 3, 2, (1, 1), "replicate")),
        (
            ktkernels.MaxBlurPool2d(3),
            lambda t: ref.blur_pool2d_reference(F.max_pool2d(t, 2, 1), 4, 2, (1, 2, 1, 2), "reflect"),
        ),
        (
            lambda t: ktkernels.max_blur_pool2d(t, 3, 2, None, "zero", max_kernel=3, max_padding=1),
            lambda t: ref.blur_pool2d_reference(F.max_pool2d(t, 3, 1, 1), 3, 2, (1, 1, 1, 1), "zero"),
        ),
    ]


def _input(layer_index: int, device: str) -> torch.Tensor:
    shape = (2, 3, 11) if layer_index == 2 else (2, 3, 9, 8)
    return torch.randn(shape, dtype=torch.float64, device=device)


@pytest.mark.parametrize("target", FP64_TARGETS)
def test_forward_mode_ad_matches_the_reference(target):
    """torch.func.jvp and torch.autograd.forward_ad carry tangents through every op (custom ops alone drop them,
    silently: the tangent would be zero), and reverse mode still works under a dual level."""
    name, device = target
    for index, (layer, reference) in enumerate(_reference_layers()):
        x, v = _input(index, device), _input(index, device)
        expected_y, expected_jvp = torch.func.jvp(reference, (x.cpu(),), (v.cpu(),))
        assert expected_jvp.abs().max() > 0.1
        for grad_mode in (True, False):  # no_grad must not take the max-blur without codes
            with ktkernels.use_backend(name), torch.set_grad_enabled(grad_mode):
                y, jvp = torch.func.jvp(layer, (x,), (v,))
            torch.testing.assert_close(y.cpu(), expected_y)
            torch.testing.assert_close(jvp.cpu(), expected_jvp)

        leaf = x.clone().requires_grad_()
        with ktkernels.use_backend(name), fwAD.dual_level():
            out = layer(fwAD.make_dual(leaf, v))
            tangent = fwAD.unpack_dual(out).tangent
            out.sin().sum().backward()
        torch.testing.assert_close(tangent.cpu(), expected_jvp)
        x64 = x.cpu().requires_grad_()
        reference(x64).sin().sum().backward()
        torch.testing.assert_close(leaf.grad.cpu(), x64.grad)


@pytest.mark.parametrize("target", FP64_TARGETS)
def test_torch_func_derivatives_match_the_reference(target):
    """torch.func's reverse mode (grad, per-sample grads as vmap over grad, grad of grad) and the hessian (forward
    over reverse) through every op. The custom ops' own autograd fails under torch.func (pytorch/pytorch#170834), so
    the entry points take autograd.Functions there; their vmap folds into the batch (no per-element loop)."""
    name, device = target
    func = torch.func
    transforms = {
        "grad": lambda f: func.grad(lambda t: f(t).sin().sum()),
        "per-sample grad": lambda f: func.vmap(func.grad(lambda t: f(t[None]).sin().sum())),
        "grad of grad": lambda f: func.grad(lambda t: func.grad(lambda u: f(u).sin().sum())(t).square().sum()),
        "hessian": lambda f: lambda t: func.hessian(lambda u: f(u).sin().sum())(t[:1, ..., :5]),
    }
    if name == "triton":
        # The same autograd.Functions on every backend, and the first-order transforms already run the Triton kernels
        # through them. The hessian's 135-wide batches would take a minute of the interpreter here, and on a GPU
        # compile kernels that the precompiled sm_90 cache (recorded from the interpreter's launches) lacks.
        del transforms["hessian"]
    for index, (layer, reference) in enumerate(_reference_layers()):
        x = _input(index, device)
        for what, transform in transforms.items():
            with ktkernels.use_backend(name), warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*batching rule.*")
                got = transform(layer)(x)
            expected = transform(reference)(x.cpu())
            torch.testing.assert_close(got.cpu(), expected, msg=lambda m, w=what, i=index: f"{w}, layer {i}: {m}")
            assert expected.abs().max() > 0.01, (what, index)


def test_torch_compile_of_torch_func_grad():
    """torch.compile over torch.func.grad runs and matches eager. Inside dynamo the ops' own autograd meets
    pytorch/pytorch#170834 and breaks the graph; the resumed frames pass the layers' ints as SymInts, which the
    ops' validation must take. (fullgraph=True cannot work until torch fixes that issue.)"""
    x = torch.randn(2, 3, 9, 8)
    for layer in (ktkernels.BlurPool2d(3), ktkernels.MaxBlurPool2d(3)):
        torch._dynamo.reset()
        grad = torch.func.grad(lambda t, f=layer: f(t).sin().sum())
        with ktkernels.use_backend("cpu"):
            torch.testing.assert_close(torch.compile(grad, backend="aot_eager")(x), grad(x), rtol=0, atol=0)


def test_forward_mode_ad_validates_as_the_fused_op_does():
    """With a tangent, max-blur runs max_pool2d and the blur unfused. It must refuse what the fused op refuses, in
    its name: max_pool2d alone takes a 3-D input as one unbatched image, and the blur would name itself."""
    x, v = torch.randn(2, 9, 9, dtype=torch.float64), torch.randn(2, 9, 9, dtype=torch.float64)
    small, tangent = x[None, :, :3, :3], v[None, :, :3, :3]  # 2x2 max map: reflect pads of 2 (filt_size 5) are too wide
    cases = [
        (ktkernels.max_blur_pool2d, x, v, "max_blur_pool2d expects a 4-D input"),
        (ktkernels.MaxBlurPool2d(2, filt_size=5), small, tangent, "max_blur_pool2d: reflect padding needs each pad"),
    ]
    for call, primal, direction, message in cases:
        with pytest.raises(ValueError, match=message):
            call(primal)
        with pytest.raises(ValueError, match=message):
            torch.func.jvp(call, (primal,), (direction,))


@pytest.mark.parametrize("target", FP64_TARGETS)
def test_forward_over_reverse_hessian_vector_product(target):
    """The backward formulas carry the incoming gradient's tangent too (they are linear in it)."""
    name, device = target
    for index, (layer, reference) in enumerate(_reference_layers()):
        x, v = _input(index, device), _input(index, device)
        leaf = x.clone().requires_grad_()
        with ktkernels.use_backend(name), fwAD.dual_level():
            dual = fwAD.make_dual(leaf, v)
            (grad,) = torch.autograd.grad(layer(dual).sin().sum(), dual, create_graph=True)
            hvp = fwAD.unpack_dual(grad).tangent
        _, expected = torch.autograd.functional.hvp(lambda t, f=reference: f(t).sin().sum(), x.cpu(), v.cpu())
        torch.testing.assert_close(hvp.cpu(), expected)


def test_jacfwd_is_the_dense_operator():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    layer = ktkernels.BlurPool2d(2, filt_size=3)
    expected = torch.func.jacrev(lambda t: ref.blur_pool2d_reference(t, 3, 2, (1, 1, 1, 1), "reflect"))(x)
    torch.testing.assert_close(torch.func.jacfwd(layer)(x), expected)


@pytest.mark.parametrize("device_type", ["cpu"])
def test_autocast_runs_the_blur_in_the_autocast_dtype_as_conv2d_does(device_type):
    """Every anchor's blur is a conv, which autocast runs in its dtype: the layers return that dtype, with the
    values of the blur of the cast input (max-blur: the cast commutes with the max)."""
    x = torch.randn(2, 3, 10, 9)
    cases = [
        (ktkernels.BlurPool2d(3), lambda t: ref.blur_pool2d_reference(t, 4, 2, (1, 2, 1, 2), "reflect")),
        (
            ktkernels.MaxBlurPool2d(3),
            lambda t: ref.blur_pool2d_reference(F.max_pool2d(t, 2, 1), 4, 2, (1, 2, 1, 2), "reflect"),
        ),
        (timm.BlurPool2d(3), lambda t: ref.blur_pool2d_reference(t, 3, 2, (1, 1, 1, 1), "reflect")),
    ]
    for dtype in (torch.bfloat16, torch.float16):
        for layer, reference in cases:
            with torch.autocast(device_type, dtype=dtype):
                y = layer(x)
                conv = F.conv2d(x, torch.ones(3, 1, 1, 1), groups=3)
            assert y.dtype == conv.dtype == dtype
            expected = reference(x.to(dtype).double())
            torch.testing.assert_close(y.double(), expected, atol=1e-2, rtol=1e-2)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        assert ktkernels.blur_pool2d(x.double()).dtype == torch.float64  # fp64 is not cast (as in conv2d)
    assert ktkernels.blur_pool2d(x).dtype == torch.float32  # outside autocast nothing is cast


def _spy_resolve(monkeypatch) -> list[str]:
    seen: list[str] = []
    resolve = backend.resolve

    def spy(*args, **kwargs):
        seen.append(resolve(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(backend, "resolve", spy)
    return seen


def test_use_backend_inside_a_compiled_function_takes_effect_or_raises(monkeypatch):
    """Dynamo would replay the context manager's writes after the graph, so the op inside would run on the previous
    choice. The choice breaks the graph instead: it takes effect, and fullgraph=True refuses it."""
    torch._dynamo.reset()
    seen = _spy_resolve(monkeypatch)

    def f(x):
        with ktkernels.use_backend("torch"):
            y = ktkernels.blur_pool2d(x)
        return y * 2

    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(torch.compile(f)(x), f(x))
    assert seen and set(seen) == {"torch"}
    assert backend.get_backend() == "auto"
    torch._dynamo.reset()
    with pytest.raises(Exception, match="set the ktkernels backend outside the compiled function"):
        torch.compile(f, fullgraph=True)(x)
    assert backend.get_backend() == "auto"

    def g(x):
        with ktkernels.use_backend("cuda"):  # cannot run CPU tensors: must raise, compiled or not
            return ktkernels.blur_pool2d(x)

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="cannot run blurpool"):
        torch.compile(g)(x)
    assert backend.get_backend() == "auto"


def test_empty_backend_variable_means_auto():
    code = "import ktkernels; print(ktkernels.get_backend())"
    env = {**os.environ, "KTK_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "auto"


def test_decomposed_parameters_still_refuse_a_backend_that_cannot_run():
    """Stride 5 runs pad + conv, but under a named backend that cannot run the input's device it raises as the
    fused strides do."""
    x = torch.randn(1, 2, 12, 12)
    with ktkernels.use_backend("cuda"):
        for layer in (ktkernels.BlurPool2d(2, stride=5), ktkernels.BlurPool2d(2, stride=2)):
            with pytest.raises(RuntimeError, match="cannot run blurpool"):
                layer(x)


@pytest.mark.parametrize(
    "make,anchor_pads",
    [
        (lambda: ktkernels.BlurPool2d(3), (1, 2, 1, 2)),
        (lambda: ktkernels.BlurPool2d(3, filt_size=3, stride=3), (1, 1, 1, 1)),
        (lambda: timm.BlurPool2d(3, filt_size=3, stride=2), (1, 1, 1, 1)),
        (lambda: kornia.BlurPool2D(4, stride=2), (1, 2, 1, 2)),
    ],
)
def test_stride_attribute_is_live_and_keeps_the_pads(make, anchor_pads):
    """The anchors read ``self.stride`` in forward (their pads and filters are fixed at construction): model surgery
    that sets ``stride = 1`` must change the output here too. A bad stride raises and changes nothing."""
    layer = make()
    k = layer._filt_size
    x = torch.randn(2, 3, 13, 11)
    for stride in (1, 2, 5):
        layer.stride = stride
        assert layer.stride == stride
        expected = ref.blur_pool2d_reference(x.double(), k, stride, anchor_pads, layer._pad_mode)
        torch.testing.assert_close(layer(x).double(), expected, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="stride"):
        layer.stride = 0
    assert (
        layer.stride == 5
        and layer(x).shape == ref.blur_pool2d_reference(x.double(), k, 5, anchor_pads, layer._pad_mode).shape
    )


def test_numpy_integers_are_taken_and_other_types_named():
    """nn.Conv2d and antialiased-cnns take numpy integers (channel counts from arrays); bools, floats and strings
    raise TypeError naming the value."""
    x = torch.randn(2, 3, 9, 8)
    layer = ktkernels.BlurPool2d(np.int64(3), filt_size=np.int64(3), stride=np.int32(2), pad_off=np.int8(0))
    assert (layer.channels, layer.filt_size, layer.stride) == (3, 3, 2)
    assert all(type(v) is int for v in (layer.channels, layer.filt_size, layer.stride, layer.pad_off))
    torch.testing.assert_close(layer(x), ktkernels.BlurPool2d(3, filt_size=3)(x))
    y = ktkernels.blur_pool2d(x, np.int64(3), np.int32(2), np.int64(1), "zero")
    torch.testing.assert_close(y, ktkernels.blur_pool2d(x, 3, 2, 1, "zero"))
    y = ktkernels.max_blur_pool2d(x, max_kernel=np.int64(3), max_padding=np.int64(1))
    torch.testing.assert_close(y, ktkernels.max_blur_pool2d(x, max_kernel=3, max_padding=1))
    for padding in (1.0, True, "ab", {1: 2}):
        with pytest.raises(TypeError, match=f"padding must be None, an int or 4 ints, got {padding!r}"):
            ktkernels.blur_pool2d(x, 3, 2, padding)
    with pytest.raises(TypeError, match="channels|filt_size"):
        ktkernels.BlurPool2d(3, filt_size=np.float64(3))


def test_a_missing_batch_dim_is_a_rank_error_not_a_channel_mismatch():
    for layer, x, rank in [
        (ktkernels.BlurPool2d(3), torch.randn(3, 8, 8), "4-D"),
        (ktkernels.MaxBlurPool2d(3), torch.randn(3, 8, 8), "4-D"),
        (ktkernels.BlurPool1d(3), torch.randn(3, 8), "3-D"),
        (ktkernels.BlurPool2d(3, stride=5), torch.randn(3, 8, 8), "4-D"),
    ]:
        with pytest.raises(ValueError, match=rf"expects a {rank} input .* got shape"):
            layer(x)


def test_max_blur_forms_codes_only_when_a_backward_can_come(monkeypatch):
    """The layers and the functional form call the op with codes only when the input requires grad with grad mode
    on; otherwise the one that neither forms nor stores them (no_grad, inference_mode, evaluation)."""
    from ktkernels.blurpool import op

    calls = []

    def spy(name):
        run = getattr(op, name)
        return lambda *args: calls.append(name) or run(*args)

    for name in ("max_blur_pool2d", "max_blur_pool2d_inference"):
        monkeypatch.setattr(op, name, spy(name))
    x = torch.randn(2, 3, 10, 9)
    layer = ktkernels.MaxBlurPool2d(3)
    expected = layer(x.requires_grad_()).detach()
    assert calls == ["max_blur_pool2d"]
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            calls.clear()
            assert torch.equal(layer(x), expected) and torch.equal(ktkernels.max_blur_pool2d(x), expected)
            assert calls == ["max_blur_pool2d_inference"] * 2
    calls.clear()
    assert torch.equal(layer(x.detach()), expected)
    assert calls == ["max_blur_pool2d_inference"]


@pytest.mark.parametrize("target", FP64_TARGETS)
def test_vmap_folds_into_the_batch_and_keeps_gradients(target):
    """torch.vmap runs each op once on the folded batch (no per-element fallback loop, which torch warns about),
    with the values and input gradients of a loop over the vmapped dimension, for either vmapped dim."""
    name, device = target
    calls = [
        (ktkernels.blur_pool2d, (2, 3, 9, 8)),
        (ktkernels.max_blur_pool2d, (2, 3, 9, 8)),
        (lambda t: ktkernels.blur_pool1d(t, 4, 1, (2, 1), "zero"), (2, 3, 11)),
    ]
    for fn, shape in calls:
        for in_dim in (0, 1):
            stacked = torch.randn(3, *shape, dtype=torch.float64, device=device).movedim(0, in_dim)
            batched, looped = stacked.clone().requires_grad_(), stacked.clone().requires_grad_()
            with ktkernels.use_backend(name), warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*batching rule.*")
                y = torch.vmap(fn, in_dims=in_dim)(batched)
                expected = torch.stack([fn(t) for t in looped.unbind(in_dim)])
                y.sin().sum().backward()
                expected.sin().sum().backward()
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
            torch.testing.assert_close(batched.grad, looped.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not backend.has_triton(), reason="needs triton")
def test_triton_refuses_images_past_its_32_bit_offsets():
    """An image spanning 2^31 elements or more raises before any Triton kernel runs (they would read wrapped
    addresses). The storage is 4 GiB of untouched virtual memory: no kernel reads it."""

    storage = torch.empty(2**31 + 2, dtype=torch.float16)
    fits = storage.as_strided((1, 1, 2, 2), (0, 0, 2**31 - 2, 1))  # last element at offset 2^31 - 1
    backend.check_triton_span("blur_pool", fits)
    too_far = storage.as_strided((1, 1, 2, 2), (0, 0, 2**31 - 1, 1))
    with pytest.raises(ValueError, match=r"spans 2147483649 elements.*backend 'cuda' or 'torch'"):
        backend.check_triton_span("blur_pool", too_far)
    if backend.triton_interpreter():  # through the ops (CPU tensors run Triton only under the interpreter)
        with ktkernels.use_backend("triton"):
            for fn in (ktkernels.blur_pool2d, ktkernels.max_blur_pool2d):
                with pytest.raises(ValueError, match="32-bit offsets"):
                    fn(too_far, filt_size=1, stride=1, padding=0)
