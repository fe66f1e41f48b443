"""The embedded default data: scikit-learn's bundled 8x8 digits as a tiny RGB image set (no download)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import DataError


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as float64 ``(N, 8, 8)`` in [0, 16] and int64 labels ``(N,)`` (loaded once)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    images = np.ascontiguousarray(d.images, dtype=np.float64)
    images.setflags(write=False)
    labels = np.ascontiguousarray(d.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def _digits_upsampled(size: int) -> Tensor:
    """All digits as uint8 ``(N, size, size, 3)``: scaled to [0, 255], bilinear (no antialias), rounded."""
    images, _ = _digits_raw()
    x = torch.from_numpy(images * (255.0 / 16.0)).to(torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)  # round half to even, like numpy
    return x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


@functools.lru_cache(maxsize=8)
def _digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a seeded permutation of its (sorted) indices; the first round(n * f) are test."""
    _, labels = _digits_raw()
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([int(seed), int(c)]).permutation(idx)  # local generator: no global state
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    train_idx.setflags(write=False)
    test_idx.setflags(write=False)
    return train_idx, test_idx


def digits_dataset(
    split: str = "train", size: int = 32, test_fraction: float = 0.25, seed: int = 0
) -> tuple[Tensor, Tensor, list[str]]:
    """scikit-learn's bundled 8x8 digits as an RGB image classification set (no download).

    The 8x8 images (values in [0, 16]) are scaled to [0, 255], upsampled bilinearly to ``size x size``
    (``align_corners=False``, no antialias), rounded, and replicated to 3 channels. The split is stratified and
    deterministic: per class, a permutation seeded by ``(seed, class)`` puts ``round(n_c * test_fraction)``
    (at least 1, at most ``n_c - 1``) images in "test" and the rest in "train"; both keep the dataset's order.

    Args:
        split: ``"train"`` or ``"test"``.
        size: output side in pixels (>= 1).
        test_fraction: fraction of each class held out, in (0, 1).
        seed: split seed.

    Returns:
        ``(images, labels, classes)``: uint8 ``(N, size, size, 3)`` (NHWC), int64 ``(N,)``, ``["0", ..., "9"]``.
        The tensors are fresh copies (the loaded arrays are cached, so repeated calls are cheap).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    train_idx, test_idx = _digits_split(float(test_fraction), int(seed))
    idx = torch.from_numpy((train_idx if split == "train" else test_idx).copy())
    _, labels = _digits_raw()
    images = _digits_upsampled(size).index_select(0, idx)
    return images, torch.from_numpy(labels.copy()).index_select(0, idx), [str(c) for c in range(10)]


def per_class_indices(labels: Tensor, per_class: int, seed: int, min_policy: str = "error") -> Tensor:
    """Sorted indices of ``per_class`` seeded picks per class of ``labels``.

    Class by class in label order, ``torch.randperm`` from one ``torch.Generator().manual_seed(seed)``. A class
    with fewer images raises :class:`DataError` (``min_policy='error'``) or warns and gives all of them
    (``'warn'``), as :func:`select_subset` does for image folders.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    if min_policy not in ("error", "warn"):
        raise ValueError(f"min_policy must be 'error' or 'warn', got {min_policy!r}")
    generator = torch.Generator().manual_seed(seed)
    picks, short = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            short.append(f"{c} ({len(idx)})")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    if short:
        msg = f"classes with fewer than per_class={per_class} images: {', '.join(short)}"
        if min_policy == "error":
            raise DataError(msg + " (--min-policy warn keeps what there is)")
        warnings.warn(msg + "; using all of them", stacklevel=2)
    return torch.cat(picks).sort().values
