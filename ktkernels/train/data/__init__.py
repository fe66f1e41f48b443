"""Data layer of the reference fine-tuning module: datasets, a decoded uint8 cache, a fast loader, GPU augmentation.

Modules, in the order data flows through them:

* ``digits`` -- ``digits_dataset``: scikit-learn's bundled 8x8 digits as a tiny RGB image set (no download).
* ``folder`` -- ``scan_image_folder`` / ``select_subset``: K images per class of an ImageFolder tree, picked
  deterministically; ``folder_dataset``: the plain torchvision (``transforms.v2``) path over the same subset.
* ``cache`` -- ``prepare_cache`` / ``open_cache``: decode + resize + center-crop once into a uint8
  ``(N, S, S, 3)`` memmap.
* ``loader`` -- ``CachedLoader``: shuffled, rank-sharded, resumable batches gathered from that memmap (into
  pinned memory on CUDA) by a prefetch thread.
* ``augment`` -- ``train_transform`` / ``eval_transform``: batched RandomResizedCrop + flip + normalise on the
  batch's device.

Every user-facing data problem (missing root, empty class, corrupt cache, ...) raises :class:`DataError`, a
``ValueError`` with a one-line message that names the path or class.

>>> import torch
>>> images, labels, classes = digits_dataset("train", size=16)
>>> images.shape, images.dtype, labels.dtype, classes[:3]
(torch.Size([1347, 16, 16, 3]), torch.uint8, torch.int64, ['0', '1', '2'])
>>> loader = CachedLoader(images, labels, batch_size=64, seed=0)
>>> x, y = next(iter(loader))
>>> x.shape, y.shape, len(loader)
(torch.Size([64, 16, 16, 3]), torch.Size([64]), 21)
>>> train_transform(x, 12, torch.Generator().manual_seed(0)).shape
torch.Size([64, 3, 12, 12])
"""

from .augment import eval_transform, sample_crop_boxes, train_transform
from .cache import Cache, CacheInfo, open_cache, prepare_cache
from .common import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, DataError
from .digits import digits_dataset, per_class_indices
from .folder import Subset, folder_dataset, scan_image_folder, select_subset
from .loader import CachedLoader, shard_indices

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "Cache",
    "CacheInfo",
    "CachedLoader",
    "DataError",
    "Subset",
    "digits_dataset",
    "eval_transform",
    "folder_dataset",
    "open_cache",
    "per_class_indices",
    "prepare_cache",
    "sample_crop_boxes",
    "scan_image_folder",
    "select_subset",
    "shard_indices",
    "train_transform",
]
