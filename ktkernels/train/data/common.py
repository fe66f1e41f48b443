"""What every part of the data layer shares: the error type, path type, image extensions, ImageNet statistics."""

from __future__ import annotations

import os

PathLike = str | os.PathLike

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File extensions treated as images (compared case-insensitively), the same set as torchvision's ImageFolder.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data problem the user must fix (missing/empty folder, too few images, bad or stale cache).

    The message is a single line naming the offending path or class, so a CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
