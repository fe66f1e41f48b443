"""Input and output tensors in every memory layout the kernels must handle, shared by the kernel-level tests.

Inputs: nchw | channels_last | strided_c (x[:, ::2] of a channels_last tensor) | strided_w (x[..., ::2]) |
transposed (H and W swapped in memory) | permuted (memory order H, N, W, C). Outputs are NaN-filled views of a
backing buffer: nchw | channels_last | strided (every other W) | strided_c (every other channel of a
channels_last buffer), so a kernel that skips an element or writes outside its view is caught by
:func:`check_untouched`.
"""

from __future__ import annotations

import torch


def make_input(values: torch.Tensor, dtype, device, layout: str) -> torch.Tensor:
    """``values`` (N, C, H, W) copied into a fresh tensor of ``dtype`` on ``device`` in ``layout``."""
    n, c, h, w = values.shape
    kw = {"dtype": dtype, "device": device}
    if layout == "nchw":
        x = torch.empty(n, c, h, w, **kw)
    elif layout == "channels_last":
        x = torch.empty(n, c, h, w, memory_format=torch.channels_last, **kw)
    elif layout == "strided_c":
        x = torch.empty(n, 2 * c, h, w, memory_format=torch.channels_last, **kw)[:, ::2]
    elif layout == "strided_w":
        x = torch.empty(n, c, h, 2 * w, **kw)[..., ::2]
    elif layout == "transposed":
        x = torch.empty(n, c, w, h, **kw).transpose(2, 3)
    elif layout == "permuted":
        x = torch.empty(h, n, w, c, **kw).permute(1, 3, 0, 2)
    else:
        raise ValueError(layout)
    x.copy_(values)
    return x


def make_output(shape, dtype, device, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled output (view, backing buffer) in a layout: nchw | channels_last | strided (every other W) |
    strided_c (every other channel of a channels_last buffer: the channel stride is 2)."""
    n, c, h, w = shape
    if layout == "strided":
        buf = torch.full((n, c, h, 2 * w + 1), float("nan"), dtype=dtype, device=device)
        return buf[..., 1::2], buf
    if layout == "strided_c":
        buf = torch.full((n, 2 * c, h, w), float("nan"), dtype=dtype, device=device)
        buf = buf.to(memory_format=torch.channels_last)
        return buf[:, 1::2], buf
    buf = torch.full((n, c, h, w), float("nan"), dtype=dtype, device=device)
    if layout == "channels_last":
        buf = buf.to(memory_format=torch.channels_last)
    return buf, buf


def check_untouched(view: torch.Tensor, buf: torch.Tensor) -> None:
    """Elements of buf outside view must still be NaN."""
    if view.data_ptr() == buf.data_ptr() and view.shape == buf.shape:
        return
    # A mask with buf's strides; the view's elements sit at the same offsets in it.
    outside = torch.ones_like(buf, dtype=torch.bool)
    offset = (view.data_ptr() - buf.data_ptr()) // buf.element_size()
    outside.as_strided(view.shape, view.stride(), outside.storage_offset() + offset).fill_(False)
    assert torch.isnan(buf[outside].float()).all(), "kernel wrote outside its output view"
