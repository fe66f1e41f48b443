"""Data layer of the reference fine-tuning module: datasets, a decoded uint8 cache, a fast loader, GPU augmentation.

Sections, in order:

1. ``digits_dataset`` -- scikit-learn's bundled 8x8 digits as a tiny RGB image set (no download; tests, demos).
2. ``scan_image_folder`` / ``select_subset`` -- K images per class of an ImageFolder tree, picked deterministically.
3. ``prepare_cache`` / ``open_cache`` -- decode + resize + center-crop once into a uint8 ``(N, S, S, 3)`` memmap.
4. ``CachedLoader`` -- shuffled, rank-sharded, resumable batches gathered from that memmap (into pinned memory
   on CUDA) by a prefetch thread.
5. ``train_transform`` / ``eval_transform`` -- batched RandomResizedCrop + flip + normalise on the batch's device.
6. ``folder_dataset`` -- the plain torchvision (``transforms.v2``) path over the same subset.

Every user-facing data problem (missing root, empty class, corrupt cache, ...) raises :class:`DataError`, a
``ValueError`` with a one-line message that names the path or class.

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

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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
    "prepare_cache",
    "sample_crop_boxes",
    "scan_image_folder",
    "select_subset",
    "train_transform",
]

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


# ---------------------------------------------------------------------------------------------------------------
# 1. Embedded default data: scikit-learn digits
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# 2. ImageFolder subset
# ---------------------------------------------------------------------------------------------------------------


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
    per_class: int,
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
        per_class: K >= 1.
        seed: selection seed.
        min_policy: what a class with fewer than K images does: ``"error"`` raises, ``"warn"`` warns and keeps
            all its images. A class with no image is always an error.
        classes: restrict to these class folders (labels follow this order); default all, sorted.

    Raises:
        DataError: missing root, no class folders, unknown class, empty class, too few images (policy "error").
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
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
        if len(available) < per_class:
            msg = f"class {cls!r} has {len(available)} images, fewer than per_class={per_class} ({Path(root) / cls})"
            if min_policy == "error":
                raise DataError(msg)
            warnings.warn(msg + "; using all of them", stacklevel=2)
        order = list(available)
        random.Random(f"{seed}:{cls}").shuffle(order)
        samples.extend((p, label) for p in sorted(order[:per_class]))
    return Subset(os.path.abspath(root), list(chosen_classes), samples, per_class, int(seed))


# ---------------------------------------------------------------------------------------------------------------
# 3. prepare: decoded, resized uint8 cache
# ---------------------------------------------------------------------------------------------------------------

CACHE_FORMAT = "ktkernels.train.cache"
CACHE_VERSION = 1


def _decode_resize(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    """Decode one file to RGB, resize its shorter side to ``size`` (bilinear, PIL's antialiasing), center-crop.

    Sizes follow torchvision's ``Resize(size)`` + ``CenterCrop(size)``: the long side becomes
    ``int(size * long / short)`` and the crop offset ``int(round((side - size) / 2))``.

    Returns ``(uint8 (size, size, 3), None)`` or ``(None, "ErrorType: message")`` for an unreadable file.
    """
    from PIL import Image

    path, size = job
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the full decode: truncated or bad data raises here
        w, h = im.size
        if w <= h:
            new_w, new_h = size, max(size, int(size * h / w))
        else:
            new_w, new_h = max(size, int(size * w / h)), size
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BILINEAR)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
        if arr.shape != (size, size, 3):
            return None, f"decoded to unexpected shape {arr.shape}"
        return np.ascontiguousarray(arr), None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported and skipped, never fatal
        return None, " ".join(f"{type(e).__name__}: {e}".split())


@dataclass
class CacheInfo:
    """Summary of a cache written by :func:`prepare_cache`."""

    path: Path
    num_images: int
    size: int
    classes: list[str]
    skipped: list[dict[str, Any]]
    images_sha256: str
    labels_sha256: str


def _labels_sha256(labels: np.ndarray) -> str:
    """sha256 of the labels as little-endian int64 bytes (independent of the .npy header)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_cache(
    subset: Subset,
    out_dir: PathLike,
    size: int = 256,
    workers: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = False,
    mp_context: str | None = None,
) -> CacheInfo:
    """Decode every image of ``subset`` once, resize + center-crop to ``size``, and store a uint8 cache.

    ``out_dir`` receives:

    * ``images.u8``: raw uint8 bytes of an ``(N, size, size, 3)`` array (read it with ``np.memmap``);
    * ``labels.npy``: int64 ``(N,)``;
    * ``index.json``: format/version, ``size``, ``n``, ``classes``, ``paths`` and ``labels`` in cache order, the
      subset's ``root``/``seed``/``per_class``, ``images_sha256`` (of ``images.u8``), ``labels_sha256`` (of the
      little-endian int64 label bytes) and ``skipped`` (``[{"path", "label", "error"}]``).

    Unreadable images (truncated, not an image, empty file, ...) are skipped with one summary warning and listed
    in ``skipped``. The cache is built in a temp folder next to ``out_dir`` and renamed into place at the end
    (``index.json`` is written last), so an interrupted prepare never leaves a cache that :func:`open_cache`
    accepts.

    Args:
        subset: what to cache (order and labels are kept, minus skipped files).
        out_dir: cache folder.
        size: side of the stored square images.
        workers: decode processes (``multiprocessing.Pool.imap``, order preserved); 0 decodes in this process.
        overwrite: replace an existing non-empty ``out_dir`` (otherwise that is a DataError).
        progress: show a tqdm progress bar (if tqdm is installed).
        mp_context: multiprocessing start method for ``workers > 0`` (default: the platform default, like
            ``torch.utils.data.DataLoader``).

    Raises:
        DataError: ``out_dir`` exists (without ``overwrite``), or skipping corrupt files empties a class.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if len(subset) == 0:
        raise DataError("the subset has no samples")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"cache folder already exists: {out_dir} (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        jobs = [(subset.path(i), size) for i in range(len(subset))]
        pool = None
        if workers > 0:
            import multiprocessing

            ctx = multiprocessing.get_context(mp_context)
            pool = ctx.Pool(workers)
            chunksize = max(1, min(64, len(jobs) // (workers * 8)))
            results = pool.imap(_decode_resize, jobs, chunksize=chunksize)
        else:
            results = map(_decode_resize, jobs)
        if progress:
            try:
                from tqdm import tqdm

                results = tqdm(results, total=len(jobs), desc=f"prepare {out_dir.name}", unit="img")
            except ImportError:
                pass
        paths: list[str] = []
        labels: list[int] = []
        skipped: list[dict[str, Any]] = []
        hasher = hashlib.sha256()
        try:
            with open(tmp / "images.u8", "wb") as f:
                for (rel, label), (arr, err) in zip(subset.samples, results, strict=True):
                    if arr is None:
                        skipped.append({"path": rel, "label": label, "error": err})
                        continue
                    data = arr.tobytes()
                    f.write(data)
                    hasher.update(data)
                    paths.append(rel)
                    labels.append(label)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if skipped:
            shown = ", ".join(s["path"] for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            warnings.warn(
                f"prepare_cache skipped {len(skipped)} unreadable image(s): {shown}{more} "
                f"(errors in {out_dir / 'index.json'} 'skipped'); first error: {skipped[0]['error']}",
                stacklevel=2,
            )
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(subset.classes))
        in_subset = set(subset.labels)
        emptied = [subset.classes[c] for c in sorted(in_subset) if counts[c] == 0]
        if emptied:
            raise DataError(
                f"class {emptied[0]!r} has no readable images after skipping corrupt files "
                f"({Path(subset.root) / emptied[0]})"
            )
        labels_np = np.asarray(labels, dtype=np.int64)
        np.save(tmp / "labels.npy", labels_np)
        info = CacheInfo(
            path=out_dir,
            num_images=len(labels),
            size=size,
            classes=list(subset.classes),
            skipped=skipped,
            images_sha256=hasher.hexdigest(),
            labels_sha256=_labels_sha256(labels_np),
        )
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "dtype": "uint8",
            "layout": "NHWC",
            "size": size,
            "n": info.num_images,
            "classes": info.classes,
            "root": subset.root,
            "seed": subset.seed,
            "per_class": subset.per_class,
            "images_sha256": info.images_sha256,
            "labels_sha256": info.labels_sha256,
            "paths": paths,
            "labels": labels,
            "skipped": skipped,
        }
        with open(tmp / "index.json", "w") as f:  # written last: its presence marks a complete cache
            json.dump(index, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Cache:
    """An opened cache (see :func:`prepare_cache`).

    Attributes:
        path: the cache folder.
        images: uint8 ``(N, S, S, 3)``, a read-only ``np.memmap`` (or an in-memory array with ``in_memory=True``).
        labels: int64 ``(N,)``.
        classes: class names.
        paths: image paths relative to the subset root, in cache order.
        size: S.
        index: the full ``index.json``.
    """

    path: Path
    images: np.ndarray
    labels: Tensor
    classes: list[str]
    paths: list[str]
    size: int
    index: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self.index.get("skipped", []))

    def loader(self, batch_size: int, **kwargs: Any) -> CachedLoader:
        """A :class:`CachedLoader` over this cache (keyword arguments as there)."""
        return CachedLoader(self.images, self.labels, batch_size, **kwargs)


def open_cache(out_dir: PathLike, verify: bool = False, *, in_memory: bool = False) -> Cache:
    """Open a cache written by :func:`prepare_cache`.

    Args:
        out_dir: the cache folder.
        verify: recompute the sha256 of ``images.u8`` and of the labels and compare with ``index.json``.
        in_memory: read the images into RAM instead of memory-mapping them.

    Raises:
        DataError: missing folder or files, other format/version, size mismatch, checksum mismatch.
    """
    out_dir = Path(out_dir)
    index_path, images_path, labels_path = out_dir / "index.json", out_dir / "images.u8", out_dir / "labels.npy"
    if not out_dir.is_dir():
        raise DataError(f"no cache folder at {out_dir} (run prepare first)")
    if not index_path.is_file():
        raise DataError(f"no cache at {out_dir}: index.json is missing (incomplete or not a cache; run prepare)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {index_path} ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataError(f"{index_path} is not a ktkernels cache index")
    if index.get("version") != CACHE_VERSION:
        raise DataError(
            f"incompatible cache {out_dir}: version {index.get('version')!r}, expected {CACHE_VERSION} (re-run prepare)"
        )
    try:
        n, size = int(index["n"]), int(index["size"])
        classes, paths = [str(c) for c in index["classes"]], [str(p) for p in index["paths"]]
        index_labels = [int(v) for v in index["labels"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"malformed cache index {index_path} ({type(e).__name__}: {e})") from None
    if n < 1 or len(paths) != n or len(index_labels) != n:
        raise DataError(f"malformed cache index {index_path}: n={n} but {len(paths)} paths, {len(index_labels)} labels")
    if not images_path.is_file() or not labels_path.is_file():
        missing = images_path if not images_path.is_file() else labels_path
        raise DataError(f"incomplete cache {out_dir}: {missing.name} is missing (re-run prepare)")
    frame = size * size * 3
    actual = images_path.stat().st_size
    if actual != n * frame:
        raise DataError(
            f"cache images {images_path} have {actual} bytes, expected {n * frame} ({n}x{size}x{size}x3); "
            "re-run prepare"
        )
    try:
        labels_np = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {labels_path} ({type(e).__name__}: {e})") from None
    if labels_np.shape != (n,) or labels_np.dtype != np.int64 or labels_np.tolist() != index_labels:
        raise DataError(f"cache labels {labels_path} do not match {index_path} (re-run prepare)")
    if verify:
        if _labels_sha256(labels_np) != index.get("labels_sha256"):
            raise DataError(f"checksum mismatch for {labels_path}: the cache is corrupt (re-run prepare)")
        if _file_sha256(images_path) != index.get("images_sha256"):
            raise DataError(f"checksum mismatch for {images_path}: the cache is corrupt (re-run prepare)")
    if in_memory:
        images = np.fromfile(images_path, dtype=np.uint8).reshape(n, size, size, 3)
    else:
        images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
    return Cache(out_dir, images, torch.from_numpy(labels_np), classes, paths, size, index)


# ---------------------------------------------------------------------------------------------------------------
# 4. Cached loader
# ---------------------------------------------------------------------------------------------------------------


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(fetch: Callable[[int], Any], batches: range, q: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body. Holds no reference to the consumer-side iterator, so that one can be collected."""
    try:
        for b in batches:
            if stop.is_set() or not _put(q, fetch(b), stop):
                return
        _put(q, _End(), stop)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(q, _Failure(e), stop)


def _shutdown(stop: threading.Event, thread: threading.Thread, q: queue.Queue) -> None:
    """Stop the prefetch thread (called by ``close()``, by garbage collection, or at interpreter exit)."""
    stop.set()
    while True:  # unblock a producer waiting on a full queue and drop the prefetched batches
        try:
            q.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread() and thread.is_alive():
        thread.join(timeout=10.0)


class _BatchFetcher:
    """Gathers batch ``b`` of an epoch: one fancy-index from the source into a (pinned) buffer, then the copy."""

    def __init__(self, loader: CachedLoader, order: Tensor) -> None:
        self.loader = loader
        self.order = order.numpy()
        dev, bs = loader.device, loader.batch_size
        self.cuda_ring = loader._np_images is not None and dev.type == "cuda" and loader.pin_memory
        if self.cuda_ring:
            # Two pinned staging slots: slot k is refilled only after its previous H2D copy finished (event).
            h, w = loader._np_images.shape[1:3]
            self.slots = [
                (
                    torch.empty((bs, h, w, 3), dtype=torch.uint8, pin_memory=True),
                    torch.empty((bs,), dtype=torch.int64, pin_memory=True),
                )
                for _ in range(2)
            ]
            self.events: list[Any] = [None, None]
            self.stream = torch.cuda.Stream(dev)

    def __call__(self, b: int) -> tuple[Tensor, Tensor, Any]:
        ld = self.loader
        idx = self.order[b * ld.batch_size : min((b + 1) * ld.batch_size, self.order.shape[0])]
        n = idx.shape[0]
        if ld._np_images is None:  # source tensor already on the device
            i = torch.from_numpy(idx).to(ld._images.device)
            x, y = ld._images.index_select(0, i), ld._labels_dev.index_select(0, i)
            return x.to(ld.device), y.to(ld.device), None
        if not self.cuda_ring:
            x = torch.empty((n, *ld._np_images.shape[1:]), dtype=torch.uint8, pin_memory=ld.pin_memory)
            np.take(ld._np_images, idx, axis=0, out=x.numpy(), mode="clip")  # idx is in range; clip = unbuffered
            y = ld._labels[torch.from_numpy(idx)]
            if ld.pin_memory:
                y = y.pin_memory()
            if ld.device.type != "cpu":
                x, y = x.to(ld.device, non_blocking=ld.pin_memory), y.to(ld.device, non_blocking=ld.pin_memory)
            return x, y, None
        k = b % 2
        xs, ys = self.slots[k]
        if self.events[k] is not None:
            self.events[k].synchronize()
        np.take(ld._np_images, idx, axis=0, out=xs.numpy()[:n], mode="clip")
        torch.index_select(ld._labels, 0, torch.from_numpy(idx), out=ys[:n])
        with torch.cuda.stream(self.stream):
            x = xs[:n].to(ld.device, non_blocking=True)
            y = ys[:n].to(ld.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[k] = ev
        return x, y, ev


class _LoaderIterator:
    """One pass over batches ``start_batch .. len(loader) - 1`` of an epoch (see :meth:`CachedLoader.iter_from`)."""

    def __init__(self, loader: CachedLoader, epoch: int, start_batch: int) -> None:
        self._loader = loader
        self.epoch = epoch
        self.batch = start_batch  # index of the next batch this iterator yields
        self._end = len(loader)
        self._fetch = _BatchFetcher(loader, loader.indices(epoch))
        self._thread = None
        self._finalizer = None
        loader._progress = (epoch, start_batch)
        if loader.prefetch > 0 and loader._np_images is not None and start_batch < self._end:
            self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce,
                args=(self._fetch, range(start_batch, self._end), self._queue, self._stop),
                name="ktkernels-CachedLoader",
                daemon=True,
            )
            self._thread.start()
            self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._thread, self._queue)

    def __iter__(self) -> _LoaderIterator:
        return self

    def __len__(self) -> int:
        return self._end - self.batch

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.batch >= self._end:
            self.close()
            raise StopIteration
        if self._thread is None:
            x, y, ev = self._fetch(self.batch)
        else:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        self.close()
                        raise RuntimeError("CachedLoader prefetch thread stopped unexpectedly") from None
            if isinstance(item, _Failure):
                self.batch = self._end
                self.close()
                raise item.exc
            if isinstance(item, _End):  # cannot happen before _end, kept for safety
                self.batch = self._end
                self.close()
                raise StopIteration
            x, y, ev = item
        if ev is not None:  # copied on the loader's side stream: order the consumer's stream after it
            cur = torch.cuda.current_stream(x.device)
            cur.wait_event(ev)
            x.record_stream(cur)
            y.record_stream(cur)
        self.batch += 1
        self._loader._progress = (self.epoch, self.batch)
        return x, y

    def close(self) -> None:
        """Stop the prefetch thread now (also happens automatically when the iterator is garbage collected)."""
        if self._finalizer is not None:
            self._finalizer()


class CachedLoader:
    """Batches of a uint8 ``(N, H, W, 3)`` array (a cache memmap, an ndarray or a tensor), sharded over ranks.

    Epoch ``e`` (set with :meth:`set_epoch`, like ``DistributedSampler``) uses ``torch.randperm(N)`` drawn from
    ``torch.Generator().manual_seed(seed + e)`` (or ``arange`` without shuffle), padded by wrapping around to a
    multiple of ``world_size``; rank ``r`` takes ``perm[r::world_size]``, so every rank has the same number of
    samples and batches, and the ranks together see every index (a few twice when padding). Batch ``b`` of this
    rank is ``indices(e)[b * batch_size : (b + 1) * batch_size]``; with ``drop_last`` the incomplete tail is
    dropped.

    A batch is gathered with one fancy-index (``np.take``) from the source straight into a fresh tensor, or, on
    CUDA with pinning, into one of two reused pinned staging buffers that are copied to the device with
    ``non_blocking=True`` on a side stream (the consumer's stream waits on it). A daemon thread keeps
    ``prefetch`` batches ready; it stops when the iterator is exhausted, closed or garbage collected, and an
    exception raised in it is re-raised by ``next()``. A source tensor that already lives on the device is
    indexed there synchronously (no thread).

    Yields ``(images uint8 (B, H, W, 3), labels int64 (B,))`` on ``device``.

    Resume: ``state_dict()`` is ``{"epoch": e, "start_batch": k, ...}`` where ``k`` batches of epoch ``e`` have
    been yielded (``k == len(loader)`` means the epoch is complete); ``load_state_dict`` / ``set_epoch(e, k)`` /
    ``iter_from(e, k)`` continue with batch ``k`` -- index arithmetic only, nothing is read for skipped batches.

    Args:
        images: uint8 ``(N, H, W, 3)``.
        labels: int ``(N,)``.
        batch_size: samples per batch (per rank).
        shuffle: permute each epoch (else dataset order).
        drop_last: drop this rank's incomplete last batch.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process's shard.
        device: where batches are delivered.
        pin_memory: stage in pinned memory (default: ``device`` is CUDA).
        prefetch: batches prepared ahead by the background thread (0: synchronous, no thread).
    """

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor | Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        prefetch: int = 2,
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3), got shape {tuple(images.shape)}")
        if isinstance(images, Tensor):
            if images.dtype != torch.uint8:
                raise ValueError(f"images must be uint8, got {images.dtype}")
        elif not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 numpy array or tensor, got {type(images).__name__}")
        labels_t = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
        labels_t = labels_t.to("cpu", torch.int64).contiguous()
        if labels_t.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels_t.shape)}")
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("prefetch", prefetch, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if images.shape[0] == 0:
            raise DataError("CachedLoader got an empty dataset")
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pass pin_memory=False or a CUDA device)")
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.seed, self.rank, self.world_size, self.prefetch = int(seed), rank, world_size, prefetch
        self.num_samples_total = int(images.shape[0])
        self._labels = labels_t
        self._images = images
        if isinstance(images, Tensor) and images.device.type != "cpu":
            self._np_images = None  # already on a device: index it there
            self._labels_dev = labels_t.to(images.device)
        else:
            self._np_images = images.numpy() if isinstance(images, Tensor) else images
        if len(self) == 0:
            raise DataError(
                f"batch_size={batch_size} is larger than the {self.num_samples} samples per rank with "
                "drop_last=True: no batches (lower batch_size or pass drop_last=False)"
            )
        self.epoch, self.start_batch = 0, 0
        self._progress = (0, 0)

    @property
    def num_samples(self) -> int:
        """Samples per rank and epoch (after padding to a multiple of ``world_size``)."""
        return -(-self.num_samples_total // self.world_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        m, bs = self.num_samples, self.batch_size
        return m // bs if self.drop_last else -(-m // bs)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample order for ``epoch``: int64 ``(num_samples,)`` (batches are consecutive slices)."""
        n = self.num_samples_total
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + int(epoch)))
        else:
            perm = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around (several times if world_size > n)
            perm = perm.repeat(-(-total // n))[:total]
        return perm[self.rank :: self.world_size].clone()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its permutation) and the first batch the next ``iter(loader)`` yields."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self._progress = (self.epoch, self.start_batch)

    def iter_from(self, epoch: int, start_batch: int = 0) -> _LoaderIterator:
        """Iterate batches ``start_batch .. len(self) - 1`` of ``epoch`` (a resumed epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        return _LoaderIterator(self, int(epoch), int(start_batch))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(self.epoch, self.start_batch)

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: ``epoch`` and ``start_batch`` (batches of it yielded so far), plus the settings
        that must match for a resume (``seed``, ``world_size``, ``batch_size``, ``num_samples_total``,
        ``shuffle``, ``drop_last``). The same on every rank."""
        epoch, batch = self._progress
        return {
            "epoch": epoch,
            "start_batch": batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples_total": self.num_samples_total,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s epoch and batch (checks that the sharding settings are the same)."""
        for key in ("seed", "world_size", "batch_size", "num_samples_total", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume: loader {key}={getattr(self, key)!r} but the saved state has {state[key]!r}"
                )
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))


# ---------------------------------------------------------------------------------------------------------------
# 5. Augmentation on the device
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# 6. Plain torchvision path
# ---------------------------------------------------------------------------------------------------------------


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
) -> torch.utils.data.Dataset:
    """The subset as a map-style dataset of CPU tensors via torchvision ``transforms.v2`` (for a DataLoader).

    Train: ``RandomResizedCrop(size)`` (antialiased) + ``RandomHorizontalFlip()`` + normalise; eval:
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
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(size)]
    return _FolderDataset(subset, v2.Compose(geometry + tail))
