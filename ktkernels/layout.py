"""Memory-format helpers shared by every op family: outputs keep the input's layout.

Ops allocate their outputs through :func:`alloc` (looked up on this module at call time, so the test
suite can poison every output with NaN before a kernel writes it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def channels_inner(x: Tensor) -> bool:
    """True for channels_last-like tensors (channels the innermost axis), e.g. NHWC or (N, L, C)^T."""
    return x.dim() >= 3 and x.size(1) > 1 and x.stride(1) == 1 and not x.is_contiguous()


def alloc(like: Tensor, shape: tuple, channels_last: bool, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised (N, C, ...) tensor, channels innermost when ``channels_last`` (3-D or 4-D)."""
    dtype = like.dtype if dtype is None else dtype
    if not channels_last:
        return like.new_empty(shape, dtype=dtype)
    if len(shape) == 4:
        return torch.empty(shape, dtype=dtype, device=like.device, memory_format=torch.channels_last)
    n, c, length = shape
    return like.new_empty((n, length, c), dtype=dtype).transpose(1, 2)
