"""Backend choice for every ktkernels op: ``auto`` | ``triton`` | ``cuda`` | ``cpu`` | ``torch``.

- ``torch``: the pure-PyTorch reference, on any device.
- ``cpu``: the C++ (OpenMP) kernels of ``ktkernels._C``, for CPU tensors.
- ``cuda``: the CUDA C++ kernels of ``ktkernels._C``, for CUDA tensors.
- ``triton``: the Triton kernels, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).
- ``auto``: per device and op family, the fastest available (``AUTO_CUDA_ORDER`` follows the committed
  benchmarks in ``benchmarks/results/``).

A backend named explicitly that cannot run raises ``RuntimeError`` naming what is missing: there is
no silent fallback. Choose with ``set_backend``, the ``use_backend`` context manager or the
``KTK_BACKEND`` environment variable (read at import; empty means ``auto``).

The choice is process-wide, like ``torch.backends.cudnn.flags``: the ops read it when they run, and the
autograd engine runs CUDA backwards on threads of its own, which a thread-local choice would not reach.
So ``use_backend`` blocks in concurrent threads see each other's choice; choose once, or from one thread.
Inside a ``torch.compile``d function, ``set_backend`` and ``use_backend`` break the graph (an error under
``fullgraph=True``): Dynamo would otherwise replay their writes after the graph, and the ops in it would
run on the previous choice. Set the backend around the compiled call.

Example::

    >>> import ktkernels
    >>> with ktkernels.use_backend("torch"):
    ...     y = ktkernels.blur_pool2d(torch.randn(2, 3, 8, 8))
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from .layout import channels_inner

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Order tried by ``auto`` on CUDA tensors, per (op family, channels_last), from the committed H100 results.
# BlurPool and max-blur: Triton was faster than CUDA in all 61 (case, dtype, layout, mode) groups of
# benchmarks/results/blurpool_h100.md (kernels of 775d3fa), by 1.2-5.7x on the blur and 2.7-6.2x on max-blur.
# DCT: both GPU backends passed their H100 accuracy tests (benchmarks/results/h100_test_gpu.txt); no GPU timings, so
# Triton stays first. Losses: CUDA first. Its kernels passed every H100 test, while the Triton pixel/global
# backward gave wrong gradients there (fixed since, not yet re-run on a GPU). The H100 timings
# (losses_h100_bf16.md, channels_last) split: Triton is faster for pixel/global, AT and the soft target,
# CUDA for DCT-KD. Put Triton back first once a GPU run passes the fixed kernels.
AUTO_CUDA_ORDER: dict[tuple[str, bool], tuple[str, ...]] = {
    ("blurpool", False): ("triton", "cuda"),
    ("blurpool", True): ("triton", "cuda"),
    ("maxblur", False): ("triton", "cuda"),
    ("maxblur", True): ("triton", "cuda"),
    ("dct", False): ("triton", "cuda"),
    ("dct", True): ("triton", "cuda"),
    ("losses", False): ("cuda", "triton"),
    ("losses", True): ("cuda", "triton"),
}

# One internal op per family whose registration tells whether ktkernels._C has that family's kernels
# (an extension built from an older checkout may lack a newer family).
_PROBE_OP = {
    "blurpool": "blur_gather_",
    "maxblur": "max_blur_forward_",
    "dct": "dct_basis2d_",
    "losses": "transfer_stats_",
}


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


_current = _validate(os.environ.get("KTK_BACKEND") or "auto")
_NOT_IN_GRAPHS = (
    "set the ktkernels backend outside the compiled function: the ops read it when they run, so a write traced "
    "into the graph would take effect only after it"
)


def get_backend() -> str:
    """The backend name currently selected (may be ``auto``)."""
    return _current


@torch.compiler.disable(reason=_NOT_IN_GRAPHS)
def _swap(name: str) -> str:
    """Select ``name`` (validated) and return the previous choice."""
    global _current
    previous, _current = _current, _validate(name)
    return previous


def set_backend(name: str) -> None:
    """Select the backend for all ops, process-wide: one of ``auto``, ``triton``, ``cuda``, ``cpu``, ``torch``."""
    _swap(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend (process-wide) and restores the previous choice on exit."""
    previous = _swap(name)
    try:
        yield
    finally:
        _swap(previous)


@functools.cache
def extension_error() -> str | None:
    """Why ``ktkernels._C`` cannot be loaded, or None when it loads."""
    try:
        import ktkernels._C  # noqa: F401
    except ImportError as exc:
        return f"the C++ extension ktkernels._C is not built ({exc}); run `pip install --no-build-isolation -e .`"
    return None


@functools.cache
def has_compiled_kernels(device_type: str, family: str = "blurpool") -> bool:
    """Whether ``ktkernels._C`` registered ``family``'s kernels for this device type (``cpu`` or ``cuda``)."""
    if extension_error() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    op = f"ktkernels_C::{_PROBE_OP.get(family, 'blur_gather_')}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key) if torch._C._dispatch_has_kernel(op) else False


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_unavailable(backend: str, device: torch.device, family: str) -> str | None:
    dev = device.type
    if backend == "torch":
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if dev == "cuda" or (dev == "cpu" and triton_interpreter()):
            return None
        return f"triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {dev} tensors"
    if backend in ("cpu", "cuda"):
        if dev != backend:
            return f"the {backend} backend runs {backend} tensors, not {dev} tensors"
        if extension_error() is not None:
            return extension_error()
        if not has_compiled_kernels(dev, family):
            return f"ktkernels._C was built without {backend.upper()} {family} kernels (rebuild it; KTK_BUILD_CUDA=1)"
        return None
    raise AssertionError(backend)


def resolve(family: str, device: torch.device, channels_last: bool = False) -> str:
    """The concrete backend that runs ``family`` on ``device`` (and layout) under the current choice."""
    chosen = _current
    if chosen != "auto":
        why = _why_unavailable(chosen, device, family)
        if why is not None:
            raise RuntimeError(f"ktkernels backend {chosen!r} cannot run {family} here: {why}")
        return chosen
    if device.type == "cuda":
        for candidate in AUTO_CUDA_ORDER.get((family, channels_last), ("cuda", "triton")):
            if _why_unavailable(candidate, device, family) is None:
                return candidate
        return "torch"
    if device.type == "cpu":
        why = _why_unavailable("cpu", device, family)
        if why is None:
            return "cpu"
        _warn_once(f"ktkernels: {why}; using the pure-PyTorch reference on CPU")
    return "torch"


def resolve_for(family: str, x: torch.Tensor, triton_fp64: bool = True) -> str:
    """:func:`resolve` for tensor ``x`` (its device, and its layout when 4-D). For a family whose Triton kernels
    run only fp32/fp16/bf16 (``triton_fp64=False``), fp64 goes to ``torch`` under ``auto`` and raises when
    ``triton`` was named."""
    name = resolve(family, x.device, channels_inner(x) if x.dim() == 4 else False)
    if name == "triton" and x.dtype == torch.float64 and not triton_fp64:
        if _current == "triton":
            raise RuntimeError(f"ktkernels backend 'triton' runs {family} in fp32/fp16/bf16; fp64 runs on cpu/torch")
        return "torch"
    return name


def triton_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a Triton launch for ``x`` runs in: ``x``'s CUDA device made current.

    Triton launches on the *current* CUDA device and its stream, not on its arguments' device (the C++ CUDA
    kernels take a ``CUDAGuard`` of their own), so a tensor on ``cuda:1`` while ``cuda:0`` is current would be
    read by a kernel on the wrong device. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# The Triton kernels of every family add one sample's (image's, row's) offsets in int32; the batch term is int64.
TRITON_MAX_SAMPLE_SPAN = 2**31 - 1


def check_triton_span(op: str, *tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` before a Triton launch if one sample (all but dim 0) of a tensor spans more elements
    than the Triton kernels' 32-bit offsets reach: they would read and write wrapped addresses. The C++ kernels
    index in int64."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span > TRITON_MAX_SAMPLE_SPAN:
            raise ValueError(
                f"{op}: one sample of the {tuple(t.shape)} tensor with strides {t.stride()} spans {span + 1} "
                f"elements, more than the Triton kernels' 32-bit offsets reach (2^31); use backend 'cuda' or 'torch'"
            )


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
