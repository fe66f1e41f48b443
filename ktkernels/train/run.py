"""The KTFT training job behind ``python -m ktkernels.train train``: data, models, loop, checkpoints, metrics.

One :class:`RunConfig` describes a run; :func:`train` executes it in a run directory:

* ``config.json`` -- the resolved configuration; ``subset.json`` -- exactly which images were used;
* ``cache/train``, ``cache/val`` -- prepared uint8 caches (``loader="cache"`` with an ImageFolder root);
* ``checkpoint.pt`` -- written atomically every ``checkpoint_every`` steps, on Ctrl-C / SIGTERM, at
  ``stop_after`` and at the end; ``student.pt`` -- the final student weights (a plain state dict);
* ``metrics.jsonl`` (or ``steps.csv`` + ``epochs.csv``), ``plots/loss.png``, ``plots/accuracy.png``,
  optionally ``tensorboard/``.

Determinism: epoch ``e``'s order is a function of ``(seed, e)`` (:func:`~ktkernels.train.data.shard_indices`), the
augmentation of step ``k`` on rank ``r`` draws from :func:`~ktkernels.train.engine.step_seed` ``(seed, k, r)``, and
the global RNG (dropout) is reseeded the same way each step, so a run resumed from its checkpoint continues
exactly as the uninterrupted run (same device and world size; on the CPU the weights come out bit-identical).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same loop on its shard; the student is
wrapped in ``DistributedDataParallel`` (bucketed gradient all-reduce overlapping the backward), NCCL on CUDA and
gloo on the CPU. Only rank 0 prepares caches and writes files; the others wait at a barrier.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses.op import check_temperature
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CachedLoader,
    DataError,
    digits_dataset,
    eval_transform,
    folder_dataset,
    open_cache,
    per_class_indices,
    prepare_cache,
    select_subset,
    shard_indices,
    train_transform,
)
from .engine import (
    KTFTConfig,
    KTFTStep,
    atomic_save,
    evaluate_counts,
    make_optimizer,
    make_schedule,
    percentages,
    step_seed,
)
from .models import (
    ModelError,
    build_teacher,
    check_stages,
    classifier_outputs,
    default_stages,
    make_student,
    replace_classifier,
)

__all__ = ["RunConfig", "RunResult", "train", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "ktkernels.train.checkpoint"
CHECKPOINT_VERSION = 1

#: RunConfig fields that may change when a run is resumed: they do not affect the trained weights.
OPERATIONAL = frozenset(
    {"run_dir", "device", "workers", "checkpoint_every", "log_every", "eval_every", "tensorboard", "plots"}
    | {"progress", "stop_after", "val", "val_per_class", "eval_batch_size"}
)


@dataclass
class RunConfig:
    """Everything a training run depends on (``config.json`` in the run directory).

    Data: ``data`` is ``"digits"`` (the embedded scikit-learn digits), an ImageFolder root, or a cache folder
    written by ``prepare``. ``None`` fields get per-source defaults in :meth:`resolved` (ImageNet-style for
    folders: 256 px cache, 224 px crops, scale (0.08, 1), flips, ImageNet statistics; for the digits: 40 px,
    36 px crops, scale (0.5, 1), no flips, mean = std = 0.5).
    """

    data: str = "digits"
    val: str | None = None  # ImageFolder root or cache; the digits use their test split
    per_class: int = 25  # K images per class
    val_per_class: int | None = None  # None: every validation image
    subset_seed: int = 0
    min_policy: str = "error"  # a class with fewer than K images: "error" or "warn"
    loader: str = "cache"  # "cache" (uint8 cache + on-device augmentation) or "torchvision" (DataLoader + PIL)
    cache_size: int | None = None
    image_size: int | None = None
    crop_scale: tuple[float, float] | None = None
    flip: bool | None = None
    workers: int | None = None  # decode processes (prepare) / DataLoader workers; default: CPU count
    batch_size: int = 64  # per rank
    eval_batch_size: int = 128
    epochs: int | None = None  # the number of steps comes from epochs unless ktft.steps is set explicitly
    arch: str | None = None  # torchvision name, timm:<name> or demo; default resnet50 (demo for the digits)
    teacher_weights: str | None = None
    tv_weights: str | None = None
    new_head: bool = False  # fresh student classifier for the data's classes (the teacher keeps its own)
    stages: list[str] | str = "auto"  # module names, "auto" (the architecture's default) or "none"
    sync_bn: bool = False
    run_dir: str = "runs/ktft"
    device: str | None = None
    checkpoint_every: int = 500
    eval_every: int = 1  # epochs
    log_every: int = 10  # steps
    metrics: str = "jsonl"  # "jsonl" or "csv"
    tensorboard: bool = False
    plots: bool = True
    progress: bool = True
    stop_after: int | None = None  # stop (with a checkpoint) after this global step, e.g. for a time-limited job
    ktft: KTFTConfig = field(default_factory=lambda: KTFTConfig(steps=0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        ktft = KTFTConfig(**d.pop("ktft", {}))
        if d.get("crop_scale") is not None:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d, ktft=ktft)

    @property
    def is_digits(self) -> bool:
        return self.data == "digits"

    def resolved(self) -> RunConfig:
        """A copy with the per-source defaults filled in and the values checked (ValueError / DataError)."""
        c = dataclasses.replace(self, ktft=dataclasses.replace(self.ktft))
        digits = c.is_digits
        c.cache_size = c.cache_size or (40 if digits else 256)
        c.image_size = c.image_size or (36 if digits else 224)
        c.crop_scale = tuple(c.crop_scale) if c.crop_scale else ((0.5, 1.0) if digits else (0.08, 1.0))
        c.flip = (not digits) if c.flip is None else c.flip
        c.arch = c.arch or ("demo" if digits else "resnet50")
        c.workers = (os.cpu_count() or 1) if c.workers is None else c.workers
        checks = [
            ("per_class", c.per_class, 1),
            ("batch_size", c.batch_size, 1),
            ("eval_batch_size", c.eval_batch_size, 1),
            ("checkpoint_every", c.checkpoint_every, 1),
            ("eval_every", c.eval_every, 1),
            ("log_every", c.log_every, 1),
            ("workers", c.workers, 0),
            ("cache_size", c.cache_size, 1),
            ("image_size", c.image_size, 1),
            ("steps", c.ktft.steps, 0),  # 0: not given (the run counts epochs); the CLI refuses --steps 0 itself
            ("warmup_steps", c.ktft.warmup_steps, 0),
            ("step_every", c.ktft.step_every, 1),
        ]
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ("epochs", "val_per_class", "stop_after"):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if digits and c.val is not None:
            raise ValueError("--val is for image folders and caches: the digits validate on their own test split")
        if c.image_size > c.cache_size and not _is_cache(c.data):  # a prepared cache: checked once opened
            raise ValueError(f"--image-size {c.image_size} is larger than the cache size {c.cache_size}")
        if not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
            raise ValueError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {c.crop_scale}")
        choices = {"loader": ("cache", "torchvision"), "metrics": ("jsonl", "csv"), "min_policy": ("error", "warn")}
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        _check_ktft(c.ktft)
        if c.epochs is None and c.ktft.steps < 1:
            c.epochs = 10
        make_optimizer([nn.Parameter(torch.zeros(1))], c.ktft)  # validates the optimizer name
        make_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), c.ktft)  # ... and the schedule
        return c


def _check_ktft(k: KTFTConfig) -> None:
    """The optimisation weights and rates, named by their flags, before the run directory is written."""
    for name in ("lr", "momentum", "weight_decay", "gamma", "w_ce", "w_pixel", "w_global", "w_dct", "w_soft"):
        value = getattr(k, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
    check_temperature(k.temperature, "--temperature")


@dataclass
class RunResult:
    """What :func:`train` did: ``status`` is ``"done"``, ``"stopped"`` (``stop_after``) or ``"interrupted"``."""

    status: str
    step: int
    steps: int
    run_dir: Path
    final_eval: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Distributed context
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, t: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective; it also serves as a barrier)."""
        if not self.active:
            return ok
        return bool(self.sum_(torch.tensor([0.0 if ok else 1.0], device=self.device)).item() == 0)

    def per_rank(self, t: Tensor | None) -> Tensor | None:
        """Every rank's ``t`` stacked on the CPU, ``(world_size, *t.shape)`` (a collective: all ranks call it)."""
        if t is None:
            return None
        if not self.active:
            return t[None].cpu()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts).cpu()


def _setup_distributed(device: str | None) -> _Dist:
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA GPU is available")
    if world <= 1:
        return _Dist(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        visible = torch.cuda.device_count()
        if local >= visible:  # torch's own error would be a bare "invalid device ordinal"
            raise ValueError(
                f"LOCAL_RANK {local} needs cuda:{local}, but {visible} GPU(s) are visible: start torchrun with "
                f"--nproc-per-node {visible} or fewer"
            )
        torch.cuda.set_device(dev)
    here = not dist.is_initialized()
    if here:
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, here)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """Training batches (``batches(epoch, start)``, ``len`` per epoch), their augmentation, and validation."""

    num_batches: int
    batches: Callable[[int, int], Iterator[tuple[Tensor, Tensor]]]
    augment: Callable[[Tensor, int], Tensor]  # (batch, global step) -> normalised float (B, 3, s, s)
    val_batches: Callable[[], Iterator[tuple[Tensor, Tensor]]] | None
    classes: list[str]
    num_train: int
    record: dict[str, Any]  # what subset.json holds


# The validation images (and the digits' train/test split) do not follow --subset-seed: runs on different training
# subsets are compared on the same images.
VAL_SEED = 0


def _is_cache(path: str) -> bool:
    return (Path(path) / "index.json").is_file()


def _cached(
    c: RunConfig,
    d: _Dist,
    source: str,
    name: str,
    per_class: int | None,
    seed: int,
    policy: str,
    classes: list[str] | None,
):
    """Open ``source`` if it is a cache, else select the subset and prepare it under ``run_dir/cache/name`` (rank 0
    prepares, the others wait), reusing an existing cache of the same subset."""
    if _is_cache(source):
        return open_cache(source)
    target = Path(c.run_dir) / "cache" / name
    subset = select_subset(source, per_class, seed, policy, classes=classes)  # every rank: same errors
    failure: Exception | None = None
    if d.main:
        try:
            fresh = True
            if _is_cache(str(target)):
                old = open_cache(target)
                same = old.size == c.cache_size and old.index.get("root") == subset.root
                recorded = {p for p, _ in subset.samples}
                fresh = not (same and set(old.paths) | {s["path"] for s in old.skipped} == recorded)
            if fresh:
                prepare_cache(subset, target, c.cache_size, c.workers, overwrite=True, progress=c.progress)
        except (DataError, OSError) as e:
            failure = e
    if not d.all_ok(failure is None):  # the other ranks must not wait for a cache that will never come
        raise failure or DataError(f"rank 0 could not prepare the cache {target} (see its error)")
    return open_cache(target)


def _normaliser(c: RunConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return ((0.5,) * 3, (0.5,) * 3) if c.is_digits else (IMAGENET_MEAN, IMAGENET_STD)


def _array_eval_batches(images: np.ndarray | Tensor, labels: Tensor, c: RunConfig, d: _Dist):
    """Validation batches from a uint8 NHWC array: this rank's share ``rank::world`` (no padding, so the counts
    summed over ranks cover every image once), normalised at full size (shift consistency crops them)."""
    mine = np.arange(len(labels))[d.rank :: d.world_size]
    mean, std = _normaliser(c)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(mine), c.eval_batch_size):
            idx = mine[i : i + c.eval_batch_size]
            x = torch.as_tensor(np.take(images, idx, axis=0) if isinstance(images, np.ndarray) else images[idx])
            x = x.to(d.device, non_blocking=True)
            yield eval_transform(x, x.shape[1], mean, std, c.ktft.channels_last), labels[idx].to(d.device)

    return batches


def _check_batch(c: RunConfig, n: int, world_size: int) -> None:
    per_rank = -(-n // world_size)
    if c.batch_size > per_rank:
        where = f"{world_size} processes: {per_rank} each" if world_size > 1 else "one process"
        raise DataError(f"--batch-size {c.batch_size} is larger than the {n} training images ({where}); lower it")


def _build_data(c: RunConfig, d: _Dist) -> _Data:
    mean, std = _normaliser(c)
    world = d.world_size

    def augment(batch: Tensor, step: int) -> Tensor:
        generator = torch.Generator().manual_seed(step_seed(c.ktft.seed, step, d.rank))
        return train_transform(
            batch, c.image_size, generator, c.crop_scale, flip=c.flip, mean=mean, std=std,
            channels_last=c.ktft.channels_last,
        )  # fmt: skip

    if c.is_digits:
        train_x, train_y, classes = digits_dataset("train", size=c.cache_size, seed=VAL_SEED)
        picked = per_class_indices(train_y, c.per_class, c.subset_seed, c.min_policy)
        images, labels = train_x[picked], train_y[picked]
        record = {"source": "digits", "split": "train", "per_class": c.per_class, "seed": c.subset_seed}
        record["indices"] = picked.tolist()
        test_x, test_y, _ = digits_dataset("test", size=c.cache_size, seed=VAL_SEED)
        if c.val_per_class is not None:
            keep = per_class_indices(test_y, c.val_per_class, VAL_SEED, "warn")  # as for image folders
            test_x, test_y = test_x[keep], test_y[keep]
        val = _array_eval_batches(test_x, test_y, c, d)
    elif c.loader == "cache":
        cache = _cached(c, d, c.data, "train", c.per_class, c.subset_seed, c.min_policy, None)
        if cache.size != c.cache_size:  # a prepared cache decides the stored size
            c.cache_size = cache.size
            if c.image_size > c.cache_size:
                raise DataError(f"--image-size {c.image_size} is larger than the cache's {c.cache_size} px images")
        images, labels, classes = cache.images, cache.labels, cache.classes
        held = cache.subset()
        if _is_cache(c.data) and held.per_class:  # a prepared cache holds its own subset: record it, not the flags
            c.per_class, c.subset_seed = held.per_class, held.seed
        record = {"source": "cache", "cache": str(cache.path), **held.to_dict(), "skipped": cache.skipped}
        val = None
        if c.val is not None:
            vcache = _cached(c, d, c.val, "val", c.val_per_class, VAL_SEED, "warn", classes)
            if vcache.classes != classes:
                raise DataError(f"validation classes of {c.val} differ from the training classes")
            if vcache.size != c.cache_size:
                raise DataError(f"validation cache {c.val} holds {vcache.size} px images, training {c.cache_size} px")
            val = _array_eval_batches(vcache.images, vcache.labels, c, d)
    else:
        return _torchvision_data(c, d, mean, std)

    _check_batch(c, len(labels), world)
    loader = CachedLoader(
        images, labels, c.batch_size, seed=c.ktft.seed, rank=d.rank, world_size=world, device=d.device, prefetch=4
    )
    return _Data(
        len(loader), loader.iter_from, augment, val, list(classes), int(len(labels)), record
    )  # fmt: skip


def _torchvision_data(c: RunConfig, d: _Dist, mean, std) -> _Data:
    """The plain path: PIL decoding + torchvision transforms in DataLoader workers, batches in the same
    deterministic order as the cache path (augmentation draws come from the workers' RNG: not reproduced on
    resume)."""
    if _is_cache(c.data):
        raise DataError(f"--loader torchvision needs an ImageFolder root, and {c.data} is a prepared cache")
    subset = select_subset(c.data, c.per_class, c.subset_seed, c.min_policy)
    dataset = folder_dataset(subset, c.image_size, True, mean=mean, std=std, scale=c.crop_scale, flip=c.flip)
    n, bs = len(subset), c.batch_size
    _check_batch(c, n, d.world_size)
    num_batches = -(-n // d.world_size) // bs
    loader_kwargs = {"num_workers": c.workers, "pin_memory": d.device.type == "cuda"}
    if c.workers > 0:
        loader_kwargs["prefetch_factor"] = 4

    def batches(epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = shard_indices(n, epoch, c.ktft.seed, d.rank, d.world_size).tolist()
        plan = [order[b * bs : (b + 1) * bs] for b in range(start, num_batches)]
        for x, y in torch.utils.data.DataLoader(dataset, batch_sampler=plan, **loader_kwargs):
            yield x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)

    def augment(batch: Tensor, step: int) -> Tensor:
        fmt = torch.channels_last if c.ktft.channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=fmt)

    val = None
    if c.val is not None:
        vsubset = select_subset(c.val, c.val_per_class, VAL_SEED, "warn", classes=subset.classes)
        vdata = folder_dataset(vsubset, c.cache_size, False, mean=mean, std=std, resize_size=c.cache_size)
        mine = list(range(d.rank, len(vsubset), d.world_size))
        plan = [mine[i : i + c.eval_batch_size] for i in range(0, len(mine), c.eval_batch_size)]

        def val() -> Iterator[tuple[Tensor, Tensor]]:
            for x, y in torch.utils.data.DataLoader(vdata, batch_sampler=plan, **loader_kwargs):
                yield x.to(d.device), y.to(d.device)

    record = {"source": "folder", **subset.to_dict()}
    return _Data(num_batches, batches, augment, val, list(subset.classes), n, record)


# ---------------------------------------------------------------------------------------------------------------
# Metrics, plots, signals
# ---------------------------------------------------------------------------------------------------------------


class _Metrics:
    """Rank 0's metric rows: ``kind`` "step" (window means every ``log_every`` steps) and "epoch" (epoch means,
    validation); JSON lines or two CSV files. On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, fmt: str, resume_step: int | None, tensorboard: bool) -> None:
        self.run_dir, self.fmt = run_dir, fmt
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None:
            self.rows = [r for r in self._read() if r["step"] <= resume_step]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
            # Events after the checkpoint's step go (a resumed run logs them again); those at it stay, as its rows do.
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def _paths(self) -> dict[str, Path]:
        if self.fmt == "jsonl":
            return {"all": self.run_dir / "metrics.jsonl"}
        return {"step": self.run_dir / "steps.csv", "epoch": self.run_dir / "epochs.csv"}

    def _read(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for kind, path in self._paths().items():
            if not path.is_file():
                continue
            if self.fmt == "jsonl":
                rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                with open(path, newline="") as f:
                    for r in csv.DictReader(f):
                        rows.append({"kind": kind, **{k: _number(v) for k, v in r.items() if k != "kind"}})
        return sorted(rows, key=lambda r: (r["step"], r["kind"] == "epoch"))

    def _rewrite(self) -> None:
        for path in self._paths().values():
            path.unlink(missing_ok=True)
        for row in self.rows:
            self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            with open(self._paths()["all"], "a") as f:
                f.write(json.dumps(row) + "\n")
            return
        path = self._paths()[row["kind"]]
        fields = [k for k in row if k != "kind"]
        if path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != fields:  # a new column (e.g. the first validation): rewrite this file with it
                old = [r for r in self.rows if r["kind"] == row["kind"] and r is not row]
                fields = list(dict.fromkeys([*header, *fields]))
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fields, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old)
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{row['kind']}/{k}", v, row["step"])
            self.writer.flush()

    def plot(self) -> None:
        _plot_curves(self.rows, self.run_dir / "plots")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _number(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v if v != "" else None


def _plot_curves(rows: list[dict[str, Any]], out: Path) -> None:
    """``loss.png`` (logged loss terms against the step) and ``accuracy.png`` (validation per epoch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    steps = [r for r in rows if r["kind"] == "step"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    terms = [k for k in (steps[0] if steps else {}) if k.startswith("loss/")]
    for k in terms:
        ax.plot([r["step"] for r in steps], [r[k] for r in steps], label=k.removeprefix("loss/"))
    ax.set(xlabel="step", ylabel="loss (window mean)", yscale="log" if terms else "linear", title="training loss")
    if terms:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)

    evals = [r for r in rows if r["kind"] == "epoch" and r.get("val_top1") is not None]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k in ("val_top1", "val_top5", "val_consistency"):
        ax.plot([r["epoch"] for r in evals], [r[k] for r in evals], marker="o", label=k.removeprefix("val_"))
    ax.set(xlabel="epoch", ylabel="%", title="validation accuracy and shift consistency")
    if evals:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)


class _StopRequest:
    """SIGINT / SIGTERM set a flag that the loop reads between steps (a checkpoint is written, then the run
    ends); a second SIGINT interrupts at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nktk-train: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def load_checkpoint(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt`` (one-line :class:`ValueError` if missing or not a ktkernels checkpoint)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"nothing to resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a ktkernels training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    return ckpt


def resume_config(run_dir: str | os.PathLike[str], overrides: dict[str, Any]) -> RunConfig:
    """The saved configuration of ``run_dir`` with ``overrides`` applied; overriding a value that changes the
    result (anything outside :data:`OPERATIONAL`) with a different value is a ValueError."""
    saved = RunConfig.from_dict(load_checkpoint(run_dir)["config"])
    ktft = overrides.pop("ktft", {})
    conflicts = [
        f"--{k.replace('_', '-')} {v!r} (the run has {getattr(saved, k)!r})"
        for k, v in overrides.items()
        if k not in OPERATIONAL and _differs(getattr(saved, k), v)
    ]
    conflicts += [
        f"--{k.replace('_', '-')} {v!r} (the run has {getattr(saved.ktft, k)!r})"
        for k, v in ktft.items()
        if _differs(getattr(saved.ktft, k), v)
    ]
    if conflicts:
        raise ValueError(f"cannot resume with different settings: {'; '.join(conflicts)}; start a new --run-dir")
    given = {k: v for k, v in overrides.items() if k in OPERATIONAL}
    return dataclasses.replace(saved, **{"stop_after": None, **given})  # a stop point is never inherited


def _differs(saved: Any, given: Any) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)):
        return list(saved) != list(given)
    return saved != given


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Run (or, with ``resume``, continue) the fine-tuning described by ``config`` in ``config.run_dir``.

    ``on_step(step)`` is called after every step (tests use it to deliver a signal mid-run). Raises
    :class:`DataError` / :class:`ModelError` / ``ValueError`` (one-line messages) for bad input, before training.
    """
    d = _setup_distributed(config.device)
    try:
        return _train(config, d, resume, log if d.main else (lambda _: None), on_step)
    finally:
        if d.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: RunConfig, d: _Dist, resume: bool, log: Callable[[str], None], on_step: Callable[[int], None] | None
) -> RunResult:
    run_dir = Path(config.run_dir)
    ckpt = load_checkpoint(run_dir) if resume else None
    if ckpt is None and (run_dir / "checkpoint.pt").exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --run-dir")
    c = config.resolved()
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    d.barrier()

    # Models first: an unknown architecture or stage should fail before any data is prepared.
    torch.manual_seed(c.ktft.seed)  # a teacher without weights is random: the same one on every rank and resume
    teacher = build_teacher(c.arch, weights=c.teacher_weights, tv_weights=c.tv_weights)
    if c.teacher_weights is None and c.tv_weights is None:
        log("warning: the teacher has random weights (no --teacher-weights / --tv-weights)")
    stages = default_stages(teacher) if c.stages == "auto" else [] if c.stages == "none" else list(c.stages)
    c.ktft.stages = check_stages(teacher, stages) if stages else []

    data = _build_data(c, d)
    num_classes = len(data.classes)
    head = classifier_outputs(teacher)
    if head != num_classes and not c.new_head:
        raise ModelError(
            f"the data has {num_classes} classes but the teacher's classifier has {head} outputs: "
            "pass --new-head to give the student a fresh classifier"
        )
    if c.new_head and (c.ktft.w_soft > 0 or c.ktft.anneal.get("soft", 0) > 0) and head != num_classes:
        raise ModelError("--w-soft needs the teacher's classes: it cannot be combined with a new head")
    if ckpt is None and config.epochs is not None and config.ktft.steps >= 1:
        raise ValueError(
            f"epochs={config.epochs} and ktft.steps={config.ktft.steps} both set the run's length: give one "
            "(KTFTConfig's default is 100 steps; KTFTConfig(steps=0, ...) lets epochs decide)"
        )
    if c.epochs is not None and config.ktft.steps < 1:
        c.ktft.steps = c.epochs * data.num_batches
    total = c.ktft.steps
    teacher = teacher.to(d.device)
    student = make_student(teacher)
    if c.new_head and head != num_classes:
        replace_classifier(student, num_classes, seed=c.ktft.seed)
    if c.sync_bn:
        if d.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    fmt = torch.channels_last if c.ktft.channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=fmt)
    student = student.to(d.device, memory_format=fmt)
    core = student
    if d.active:
        student = nn.parallel.DistributedDataParallel(
            core, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    optimizer = make_optimizer(core.parameters(), c.ktft)
    schedule = make_schedule(optimizer, c.ktft)

    # Position and running sums; all of it goes into the checkpoint, so a resumed run logs the same rows.
    step, epoch, batch_in_epoch = 0, 0, 0
    window: Tensor | None = None  # loss-term sums since the last logged row
    epoch_sums: Tensor | None = None
    window_steps = 0
    if ckpt is not None:
        if ckpt["world_size"] != d.world_size:
            raise ValueError(f"the run used {ckpt['world_size']} processes; resume it with the same number")
        if ckpt["num_batches"] != data.num_batches:
            raise DataError("the training data changed since the checkpoint (a different number of batches)")
        core.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        window_steps = ckpt["window_steps"]
        # Each rank continues its own running sums (summing them first would change the rounding of the rows).
        window, epoch_sums = (
            None if t is None else t[d.rank].to(d.device) for t in (ckpt["window"], ckpt["epoch_sums"])
        )

    metrics = None
    if d.main:
        (run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=1) + "\n")
        (run_dir / "subset.json").write_text(json.dumps(data.record, indent=1) + "\n")
        metrics = _Metrics(run_dir, c.metrics, step if ckpt is not None else None, c.tensorboard)
    log(
        f"{c.arch}: {data.num_train} training images, {num_classes} classes, {data.num_batches} batches of "
        f"{c.batch_size} x {d.world_size} per epoch, {total} steps; stages {c.ktft.stages or '(none: plain)'}; "
        f"device {d.device}" + (f"; resuming at step {step}" if ckpt is not None else "")
    )

    trainer = KTFTStep(student, teacher, c.ktft, optimizer, schedule)
    trainer.steps_done = step
    term_names: list[str] | None = ckpt["term_names"] if ckpt is not None else None
    window_start = epoch_start = time.perf_counter()
    status, final_eval = "done", None

    def save(final: bool = False) -> None:
        window_per_rank, epoch_sums_per_rank = d.per_rank(window), d.per_rank(epoch_sums)  # collectives first
        if not d.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "num_batches": data.num_batches,
            "world_size": d.world_size,
            "window": window_per_rank,
            "window_steps": window_steps,
            "term_names": term_names,
            "epoch_sums": epoch_sums_per_rank,
            "student": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "config": c.to_dict(),
        }
        atomic_save(state, run_dir / "checkpoint.pt")
        if final:
            atomic_save(core.state_dict(), run_dir / "student.pt")

    def run_eval() -> dict[str, float] | None:
        if data.val_batches is None:
            return None
        if d.active:  # every rank evaluates rank 0's model, the one saved: DDP syncs BN statistics before forwards only
            for buffer in core.buffers():
                dist.broadcast(buffer, 0)
        counts = evaluate_counts(
            core, data.val_batches, max_shift=c.cache_size - c.image_size, seed=c.ktft.seed + d.rank,
            channels_last=c.ktft.channels_last,
        )  # fmt: skip
        keys = ("top1", "top5", "consistency", "count")
        summed = d.sum_(torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=d.device))
        return percentages(dict(zip(keys, summed.tolist(), strict=True)))

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (c.progress and d.main), dynamic_ncols=True, unit="step")
    stop = _StopRequest()
    try:
        with stop:
            while step < total and status == "done":
                for images, labels in data.batches(epoch, batch_in_epoch):
                    torch.manual_seed(step_seed(c.ktft.seed, step, d.rank))  # dropout & co.: resumable
                    lr = optimizer.param_groups[0]["lr"]  # what this step uses (logged with its row)
                    annealed = {f"w/{k}": trainer.weight(k) for k in c.ktft.anneal}
                    terms = trainer.step(data.augment(images, step), labels)
                    if term_names is None:  # a fixed order for the summed tensors, the rows and the checkpoint
                        term_names = [*sorted(k for k in terms if k != "total"), "total"]
                    values = torch.stack([terms[k].float() for k in term_names])
                    window = values if window is None else window + values
                    epoch_sums = values if epoch_sums is None else epoch_sums + values
                    step, batch_in_epoch, window_steps = step + 1, batch_in_epoch + 1, window_steps + 1
                    bar.update(1)
                    if on_step is not None:
                        on_step(step)
                    if window_steps == c.log_every or step == total:
                        # One host sync per logged row; the stop flag rides along so that all ranks agree on it.
                        flag = torch.tensor([float(stop.requested)], device=d.device)
                        reduced = d.sum_(torch.cat([window, flag]))
                        stopping = bool(reduced[-1] > 0)
                        means = (reduced[:-1] / (window_steps * d.world_size)).tolist()
                        seconds = time.perf_counter() - window_start
                        row = {"kind": "step", "step": step, "epoch": epoch + 1, "lr": lr}
                        row |= annealed
                        row |= {f"loss/{k}": v for k, v in zip(term_names, means, strict=True)}
                        row["img_per_s"] = window_steps * c.batch_size * d.world_size / max(seconds, 1e-9)
                        if metrics is not None:
                            metrics.add(row)
                        bar.set_postfix(loss=f"{means[-1]:.4f}", refresh=False)
                        window, window_steps, window_start = None, 0, time.perf_counter()
                    else:
                        stopping = stop.requested and not d.active  # several ranks wait for the next row
                    # At an epoch's end the periodic checkpoint follows the epoch row (below), so a resumed run
                    # never writes that row twice.
                    if step % c.checkpoint_every == 0 and step < total and batch_in_epoch < data.num_batches:
                        save()
                    if stopping:
                        status = "interrupted"
                    elif c.stop_after is not None and c.stop_after <= step < total:
                        status = "stopped"
                    if status != "done" or step >= total:
                        break
                if status != "done" or not (batch_in_epoch >= data.num_batches or step >= total):
                    continue  # stopping (the while condition ends it), or a stop mid-epoch
                # End of an epoch, or of the run mid-epoch: epoch means, validation, plots.
                sums = d.sum_(epoch_sums.clone())
                row = {"kind": "epoch", "step": step, "epoch": epoch + 1}
                row |= {
                    f"loss/{k}": v / (batch_in_epoch * d.world_size)
                    for k, v in zip(term_names, sums.tolist(), strict=True)
                }
                row["seconds"] = time.perf_counter() - epoch_start
                if (epoch + 1) % c.eval_every == 0 or step >= total:
                    ev = run_eval()
                    if ev is not None:
                        row |= {f"val_{k}": v for k, v in ev.items()}
                        final_eval = ev if step >= total else final_eval
                        log(
                            f"epoch {epoch + 1}: top-1 {ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%  "
                            f"shift consistency {ev['consistency']:.2f}%"
                        )
                if metrics is not None:
                    metrics.add(row)
                    if c.plots:
                        metrics.plot()
                epoch, batch_in_epoch, epoch_sums, epoch_start = epoch + 1, 0, None, time.perf_counter()
                if step % c.checkpoint_every == 0 and step < total:
                    save()
        save(final=status == "done")
    finally:
        bar.close()
        trainer.close()
        if metrics is not None:
            if c.plots and status != "done":
                metrics.plot()
            metrics.close()
    d.barrier()
    if status == "interrupted":
        log(f"interrupted at step {step}/{total}: checkpoint saved; continue with --resume --run-dir {run_dir}")
    elif status == "stopped":
        log(f"stopped after step {step}/{total} (--stop-after): continue with --resume --run-dir {run_dir}")
    else:
        log(f"done: {total} steps; student weights in {run_dir / 'student.pt'}")
    return RunResult(status, step, total, run_dir, final_eval)
