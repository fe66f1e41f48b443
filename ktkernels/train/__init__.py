"""Reference training module for knowledge-transferred fine-tuning (frozen teacher CNN + anti-aliased student).

* ``data``: embedded digits, K-per-class ImageFolder subsets, a decoded uint8 cache, a fast resumable loader and
  batched on-device augmentation;
* ``models``: teachers by name, ``student = antialias(deepcopy(teacher))``, default stages to tap;
* ``engine``: the KTFT step (CE + pixel/global transfer, optional DCT attention and soft targets), schedules,
  evaluation (top-1, top-5, shift consistency);
* ``run``: the training job (``python -m ktkernels.train train``): ImageFolder / cache / digits data, DDP under
  torchrun, atomic checkpoints with bit-identical resume, metrics (JSONL/CSV, TensorBoard) and plots;
* ``demo``: ``python -m ktkernels.train --demo``, the experiment in miniature on the digits.
"""

from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    Cache,
    CachedLoader,
    CacheInfo,
    DataError,
    Subset,
    digits_dataset,
    eval_transform,
    folder_dataset,
    open_cache,
    prepare_cache,
    sample_crop_boxes,
    scan_image_folder,
    select_subset,
    train_transform,
)
from .demo import DemoSettings, run_demo
from .engine import KTFTConfig, KTFTStep, evaluate, shift_consistency
from .models import ModelError, build_teacher, default_stages, make_student
from .run import RunConfig, RunResult, train

__all__ = [
    "DemoSettings",
    "KTFTConfig",
    "KTFTStep",
    "ModelError",
    "build_teacher",
    "default_stages",
    "evaluate",
    "make_student",
    "run_demo",
    "RunConfig",
    "RunResult",
    "train",
    "shift_consistency",
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
    "prepare_cache",
    "sample_crop_boxes",
    "scan_image_folder",
    "select_subset",
    "train_transform",
]
