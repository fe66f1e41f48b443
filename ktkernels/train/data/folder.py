"""ImageFolder trees: scan, a deterministic K-per-class :class:`Subset`, and the plain torchvision dataset."""

from __future__ import annotations

import json
import os
import random
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .common import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, DataError, PathLike


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """List an ImageFolder tree ``root/<class>/**/<image files>``.

    Class folders and files whose name starts with ``.`` are ignored, as are files without an image extension
    (:data:`IMG_EXTENSIONS`, case-insensitive). Sub-folders of a class folder are searched too (like torchvision).

    Returns:
        ``(classes, samples_per_class)``: the sorted class folder names, and per class the sorted paths of its
        images relative to ``root`` (``/``-separated). A class may have an empty list; :func:`select_subset`
        reports that.

    Raises:
        DataError: ``root`` is missing, not a directory, or has no class folders.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"image folder is not a directory: {root}")
    classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected root/<class>/<images>)")
    samples: dict[str, list[str]] = {}
    for cls in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root).as_posix()
            found.extend(f"{rel}/{f}" for f in filenames if not f.startswith(".") and _is_image(f))
        samples[cls] = sorted(found)
    return classes, samples


@dataclass
class Subset:
    """K images per class of an ImageFolder tree (the run directory records it as JSON).

    Attributes:
        root: the ImageFolder root (absolute).
        classes: class names; label ``i`` is ``classes[i]``.
        samples: ``(relative_path, label)`` per image, grouped by class in label order, sorted within a class.
        per_class: the requested K.
        seed: the selection seed.
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    per_class: int
    seed: int

    FORMAT = "ktkernels.train.subset"
    VERSION = 1

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def path(self, i: int) -> str:
        """Absolute path of sample ``i``."""
        return os.path.join(self.root, self.samples[i][0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "root": self.root,
            "classes": list(self.classes),
            "per_class": self.per_class,
            "seed": self.seed,
            "samples": [[p, label] for p, label in self.samples],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "subset") -> Subset:
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise DataError(f"{source} is not a ktkernels subset file")
        if d.get("version") != cls.VERSION:
            raise DataError(f"{source}: unsupported subset version {d.get('version')!r} (expected {cls.VERSION})")
        try:
            classes = [str(c) for c in d["classes"]]
            samples = [(str(p), int(label)) for p, label in d["samples"]]
            out = cls(str(d["root"]), classes, samples, int(d["per_class"]), int(d["seed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source}: malformed subset file ({type(e).__name__}: {e})") from None
        if any(not 0 <= label < len(classes) for _, label in samples):
            raise DataError(f"{source}: a sample label is outside 0..{len(classes) - 1}")
        return out

    def save(self, path: PathLike) -> None:
        """Write as JSON (atomically: a temp file next to ``path``, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: PathLike) -> Subset:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"subset file not found: {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read subset file {path} ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, source=str(path))


def select_subset(
    root: PathLike,
    per_class: int | None,
    seed: int,
    min_policy: str = "error",
    *,
    classes: Sequence[str] | None = None,
) -> Subset:
    """Pick ``per_class`` images per class of the ImageFolder at ``root``, deterministically.

    Per class, the sorted file list is shuffled by ``random.Random(f"{seed}:{class_name}")`` (seeded through
    SHA-512 of the string: identical on every machine and Python >= 3.2, independent of ``PYTHONHASHSEED``) and
    the first K files are kept (then sorted). Growing K therefore only adds files.

    Args:
        root: ImageFolder root.
        per_class: K >= 1, or ``None`` for every image (recorded as ``per_class == 0``; no minimum applies).
        seed: selection seed.
        min_policy: what a class with fewer than K images does: ``"error"`` raises, ``"warn"`` warns and keeps
            all its images. A class with no image is always an error.
        classes: restrict to these class folders (labels follow this order); default all, sorted.

    Raises:
        DataError: missing root, no class folders, unknown class, empty class, too few images (policy "error").
    """
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"per_class must be an int >= 1 or None, got {per_class!r}")
    if min_policy not in ("error", "warn"):
        raise ValueError(f"min_policy must be 'error' or 'warn', got {min_policy!r}")
    all_classes, files = scan_image_folder(root)
    if classes is None:
        chosen_classes = all_classes
    else:
        chosen_classes = [str(c) for c in classes]
        missing = [c for c in chosen_classes if c not in files]
        if missing:
            raise DataError(f"class folder(s) not found in {root}: {', '.join(missing[:5])}")
        if len(set(chosen_classes)) != len(chosen_classes):
            raise ValueError("classes contains duplicates")
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(chosen_classes):
        available = files[cls]
        if not available:
            raise DataError(f"class {cls!r} has no images ({Path(root) / cls})")
        if per_class is not None and len(available) < per_class:
            msg = f"class {cls!r} has {len(available)} images, fewer than per_class={per_class} ({Path(root) / cls})"
            if min_policy == "error":
                raise DataError(msg)
            warnings.warn(msg + "; using all of them", stacklevel=2)
        order = list(available)
        random.Random(f"{seed}:{cls}").shuffle(order)
        samples.extend((p, label) for p in sorted(order[:per_class]))
    return Subset(os.path.abspath(root), list(chosen_classes), samples, per_class or 0, int(seed))


class _FolderDataset(torch.utils.data.Dataset):
    """A :class:`Subset` decoded with PIL and transformed by torchvision ``transforms.v2`` on the CPU."""

    def __init__(self, subset: Subset, transform: Callable[[Any], Tensor]) -> None:
        self.subset = subset
        self.classes = list(subset.classes)
        self.targets = subset.labels
        self.transform = transform
        self._bad: set[int] = set()  # per process (each DataLoader worker has its own)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        n = len(self.subset)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                with Image.open(self.subset.path(j)) as im:
                    img = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - a corrupt file must not end a run
                self._bad.add(j)
                warnings.warn(
                    f"skipping unreadable image {self.subset.path(j)} ({type(e).__name__}: {e})", stacklevel=2
                )
                continue
            return self.transform(img), self.subset.samples[j][1]
        raise DataError(f"no readable image in the subset of {self.subset.root}")


def folder_dataset(
    subset: Subset,
    size: int,
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_size: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> torch.utils.data.Dataset:
    """The subset as a map-style dataset of CPU tensors via torchvision ``transforms.v2`` (for a DataLoader).

    Train: ``RandomResizedCrop(size, scale)`` (antialiased) + ``RandomHorizontalFlip()`` (if ``flip``) + normalise;
    eval:
    ``Resize(resize_size)`` + ``CenterCrop(size)`` + normalise, with ``resize_size`` defaulting to
    ``round(size / 0.875)`` (256 for 224). Items are ``(float32 (3, size, size), label)``; randomness comes from
    torch's global RNG (seeded per DataLoader worker).

    A file that cannot be decoded is skipped with a warning: the item is the next readable sample (wrapping
    around), and the file is not retried in that process. This keeps a long run alive; :func:`prepare_cache`
    reports such files up front.
    """
    from torchvision.transforms import v2

    resize_size = int(round(size / 0.875)) if resize_size is None else resize_size
    tail = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]
    if train:
        geometry = [v2.RandomResizedCrop(size, scale=scale, antialias=True)] + (
            [v2.RandomHorizontalFlip()] if flip else []
        )
    else:
        geometry = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(size)]
    return _FolderDataset(subset, v2.Compose(geometry + tail))
