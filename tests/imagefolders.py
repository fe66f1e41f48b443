"""Real image files for the training-data tests: small ImageFolder trees of JPEG/PNG/BMP images plus corrupt files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def random_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode in ("L", "P"):
        im = Image.fromarray(arr[..., 0], "L")
        return im if mode == "L" else im.convert("P")
    return Image.fromarray(arr, mode)


def jpeg_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    random_image("RGB", w, h, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_image_folder(root, bad_class: bool = False) -> None:
    """3 classes x 4 real images (JPEG/PNG, RGB/RGBA/L/P, portrait and landscape, smaller and larger than the
    cache size) and 3 corrupt files in class "a"; ``bad_class`` adds a class of corrupt files only."""
    specs = {
        "a": [("RGB", 23, 37, "jpg"), ("RGBA", 30, 20, "png"), ("L", 12, 9, "png"), ("P", 40, 40, "png")],
        "b": [("RGB", 50, 16, "jpeg"), ("RGB", 16, 16, "png"), ("L", 27, 33, "JPG"), ("RGBA", 8, 19, "png")],
        "c": [("P", 21, 13, "png"), ("RGB", 64, 48, "jpg"), ("RGB", 17, 70, "png"), ("L", 35, 18, "bmp")],
    }
    for ci, (cls, items) in enumerate(specs.items()):
        (root / cls).mkdir(parents=True)
        for i, (mode, w, h, ext) in enumerate(items):
            im = random_image(mode, w, h, seed=10 * ci + i)
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "JPG": "JPEG", "png": "PNG", "bmp": "BMP"}[ext]
            im.save(root / cls / f"img{i}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    (root / "a" / "truncated.jpg").write_bytes(jpeg_bytes(40, 30, 99)[:200])
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("this is not an image\n")
    if bad_class:
        (root / "d").mkdir()
        (root / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (root / "d" / "empty.jpg").write_bytes(b"")
