"""``CachedLoader``: shuffled, rank-sharded, resumable batches from a uint8 array, prefetched by a thread."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import DataError


def shard_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> Tensor:
    """Rank ``rank``'s sample order for ``epoch`` over a dataset of ``n``: int64 ``(ceil(n / world_size),)``.

    ``torch.randperm(n)`` from ``torch.Generator().manual_seed(seed + epoch)`` (``arange`` without shuffle),
    padded by wrapping around to a multiple of ``world_size``, then every ``world_size``-th entry from ``rank``
    (the :class:`CachedLoader` order; the torchvision DataLoader path of ``ktkernels.train`` batches it too).
    """
    if shuffle:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + int(epoch)))
    else:
        perm = torch.arange(n)
    total = -(-n // world_size) * world_size
    if total > n:  # wrap around (several times if world_size > n)
        perm = perm.repeat(-(-total // n))[:total]
    return perm[rank::world_size].clone()


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
        return shard_indices(self.num_samples_total, epoch, self.seed, self.rank, self.world_size, self.shuffle)

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
