"""Batched augmentation on the batch's device: RandomResizedCrop + flip + normalise, and the eval resize."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import IMAGENET_MEAN, IMAGENET_STD


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> Tensor:
    """RandomResizedCrop boxes for a batch, vectorised: int64 ``(B, 4)`` rows ``(top, left, height, width)``.

    torchvision's definition per sample: up to ``tries`` candidates with area ``U(scale) * H * W`` and aspect
    ratio ``exp(U(log ratio))``, ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first that
    fits is placed uniformly (integer offsets); if none fits, a center crop clamped to ``ratio``. All candidates
    and offsets are drawn at once (fixed draw count per call) from the CPU ``generator``, in float64, so the
    boxes depend only on the generator state, not on the device.
    """
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (boxes are drawn on the CPU)")
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    f64 = torch.float64
    area = float(height * width)
    u_area = torch.rand(batch_size, tries, generator=generator, dtype=f64)
    u_ratio = torch.rand(batch_size, tries, generator=generator, dtype=f64)
    u_pos = torch.rand(batch_size, 2, generator=generator, dtype=f64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.sqrt(target * aspect).round()  # round half to even, like Python's round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first candidate that fits
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(u_pos[:, 0] * (height - h + 1))
    left = torch.floor(u_pos[:, 1] * (width - w + 1))
    # Fallback: torchvision's central crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ft, fl = (height - fh) // 2, (width - fw) // 2
    boxes = torch.stack(
        [
            torch.where(found, top, float(ft)),
            torch.where(found, left, float(fl)),
            torch.where(found, h, float(fh)),
            torch.where(found, w, float(fw)),
        ],
        dim=1,
    )
    return boxes.to(torch.int64)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _resample(batch_u8: Tensor, boxes: Tensor, out_size: int, flips: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Bilinear crop + resize of every sample's box to ``out_size``, as float ``(B, 3, out, out)`` in [0, 255].

    Implementation: ``F.grid_sample`` over explicit per-sample separable grids. For output pixel ``o`` of a
    crop of extent ``n`` starting at ``s`` the source coordinate is ``s + clamp((o + 0.5) * n / out - 0.5,
    0, n - 1)``, which is exactly what ``torchvision.transforms.v2.functional.resized_crop(..., BILINEAR,
    antialias=False)`` samples (crop, then ``interpolate(align_corners=False)``, which clamps at the *crop*
    border). We chose grid_sample over ``torchvision.ops.roi_align(aligned=True)``: roi_align with
    ``sampling_ratio=1`` samples the same bin centres but cannot clamp to the crop, so near the crop border it
    blends in pixels just outside the box when upsampling, and ``sampling_ratio > 1`` averages several points
    (a box prefilter), both unlike the reference. An affine grid (``F.affine_grid``) has the same border issue,
    hence the explicit grid; it also folds the horizontal flip in for free (reversed x coordinates).
    """
    b, h_in, w_in, _ = batch_u8.shape
    dev = batch_u8.device
    x = batch_u8.permute(0, 3, 1, 2).to(dtype)  # NCHW view of NHWC data (channels_last strides)
    bx = _to_device(boxes.to(dtype), dev)
    top, left, bh, bw = bx.unbind(1)
    o = torch.arange(out_size, device=dev, dtype=dtype) + 0.5
    ys = torch.minimum((o * (bh / out_size)[:, None] - 0.5).clamp_(min=0), (bh - 1)[:, None]) + top[:, None]
    xs = torch.minimum((o * (bw / out_size)[:, None] - 0.5).clamp_(min=0), (bw - 1)[:, None]) + left[:, None]
    if flips is not None:
        xs = torch.where(_to_device(flips, dev)[:, None], xs.flip(1), xs)
    gy = (ys + 0.5) * (2.0 / h_in) - 1.0  # pixel -> grid_sample's align_corners=False coordinates
    gx = (xs + 0.5) * (2.0 / w_in) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, out, out, [x, y])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _check_batch(batch_u8: Tensor) -> None:
    if not isinstance(batch_u8, Tensor) or batch_u8.dtype != torch.uint8 or batch_u8.ndim != 4:
        raise ValueError("batch must be a uint8 tensor (B, H, W, 3)")
    if batch_u8.shape[-1] != 3:
        raise ValueError(f"batch must be (B, H, W, 3) (NHWC), got shape {tuple(batch_u8.shape)}")


def _finish(
    batch_u8: Tensor,
    boxes: Tensor,
    out_size: int,
    flips: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Resample (skipped when every box is the whole image at the output size), then normalise into the layout."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    b, h, w, _ = batch_u8.shape
    identity = (
        h == out_size
        and w == out_size
        and bool((boxes == torch.tensor([0, 0, h, w])).all())
        and (flips is None or not bool(flips.any()))
    )
    if identity:
        y = batch_u8.permute(0, 3, 1, 2)  # uint8; promoted to `compute` by the normalisation below
    else:
        y = _resample(batch_u8, boxes, out_size, flips, compute)
    dev = batch_u8.device
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(compute).view(1, 3, 1, 1).to(dev)
    bias = (-torch.tensor(mean, dtype=torch.float64) / std_t).to(compute).view(1, 3, 1, 1).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, 3, out_size, out_size), dtype=dtype, device=dev, memory_format=fmt)
    return torch.addcmul(bias, y, scale, out=out)  # one pass: (x / 255 - mean) / std, cast and written in `fmt`


def train_transform(
    batch_u8: Tensor,
    out_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """RandomResizedCrop + horizontal flip (p = 0.5) + normalise for a whole batch, on the batch's device.

    Boxes come from :func:`sample_crop_boxes` (then one flip draw per sample), all from the CPU ``generator``,
    so the result is the same on any device. Crop + resize is one batched bilinear ``grid_sample`` (no
    antialias), equal to torchvision's ``resized_crop(..., antialias=False)`` per sample (see ``_resample``).

    Args:
        batch_u8: uint8 ``(B, H, W, 3)`` (e.g. a :class:`CachedLoader` batch).
        out_size: output side.
        generator: CPU generator for the boxes and flips.
        scale, ratio: RandomResizedCrop's area fraction range and aspect ratio range.
        flip: random horizontal flips.
        mean, std: per-channel normalisation of values in [0, 1].
        channels_last: output in ``torch.channels_last`` memory format.
        dtype: output dtype (computed in float32, or float64 for float64).
        return_params: also return the boxes (int64 ``(B, 4)``: top, left, height, width) and flips (bool ``(B,)``).

    Returns:
        ``(B, 3, out_size, out_size)`` (and the parameters with ``return_params``).
    """
    _check_batch(batch_u8)
    b, h, w, _ = batch_u8.shape
    boxes = sample_crop_boxes(b, h, w, generator, scale, ratio)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    out = _finish(batch_u8, boxes, out_size, flips if flip else None, mean, std, channels_last, dtype)
    return (out, boxes, flips) if return_params else out


def eval_transform(
    batch_u8: Tensor,
    out_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    crop_fraction: float = 1.0,
) -> Tensor:
    """Resize the whole image (a cache is already center-cropped) to ``out_size`` and normalise.

    Same bilinear resampling (no antialias) as :func:`train_transform`; an image already at ``out_size`` is only
    normalised. ``crop_fraction < 1`` first takes the central ``round(crop_fraction * side)`` square (e.g. 0.875
    on a 256 cache = the usual Resize(256) + CenterCrop(224) evaluation).

    Returns:
        ``(B, 3, out_size, out_size)``.
    """
    _check_batch(batch_u8)
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    b, h, w, _ = batch_u8.shape
    ch, cw = max(1, int(round(h * crop_fraction))), max(1, int(round(w * crop_fraction)))
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    boxes = torch.tensor([[top, left, ch, cw]], dtype=torch.int64).expand(b, 4)
    return _finish(batch_u8, boxes, out_size, None, mean, std, channels_last, dtype)
