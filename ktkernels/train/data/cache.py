"""``prepare``: decode + resize + center-crop a subset once into a uint8 memory-mapped cache; ``open_cache``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import DataError, PathLike
from .folder import Subset
from .loader import CachedLoader

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
        raise DataError(f"cache folder already exists: {out_dir} (overwrite=True, or prepare --overwrite, replaces it)")
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

    def subset(self) -> Subset:
        """The subset this cache holds (files skipped at prepare time left out), as recorded in ``index.json``."""
        labels = self.labels.tolist()
        per_class, seed = int(self.index.get("per_class", 0)), int(self.index.get("seed", 0))
        return Subset(
            str(self.index.get("root", "")),
            list(self.classes),
            list(zip(self.paths, labels, strict=True)),
            per_class,
            seed,
        )

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
