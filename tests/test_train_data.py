"""ktkernels.train.data: digits, ImageFolder subsets, the prepare cache, CachedLoader and on-device augmentation.

Everything runs on the CPU with tiny images written by PIL into tmp_path.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from imagefolders import write_image_folder
from PIL import Image

from ktkernels.train import data
from ktkernels.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CachedLoader,
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add spinning on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------


def test_digits_shapes_dtype_range():
    x, y, classes = digits_dataset("train", size=16)
    xt, yt, _ = digits_dataset("test", size=16)
    assert classes == [str(i) for i in range(10)]
    assert x.shape == (len(y), 16, 16, 3) and xt.shape == (len(yt), 16, 16, 3)
    assert len(y) + len(yt) == 1797
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert torch.equal(x[..., 0], x[..., 1]) and torch.equal(x[..., 0], x[..., 2])
    assert 0.2 < len(yt) / 1797 < 0.3
    with pytest.raises(ValueError):
        digits_dataset("val")


def test_digits_split_deterministic_stratified_disjoint():
    a = digits_dataset("train", size=8, seed=3)
    b = digits_dataset("train", size=8, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a[0].zero_()  # callers get copies: the cached arrays stay intact
    assert torch.equal(digits_dataset("train", size=8, seed=3)[0], b[0])
    train_idx, test_idx = data.digits._digits_split(0.25, 3)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    _, labels = data.digits._digits_raw()
    for c in range(10):  # stratified: every class in both splits, in proportion
        n_c = int((labels == c).sum())
        n_test = int((labels[test_idx] == c).sum())
        assert n_test == round(n_c * 0.25) and (labels[train_idx] == c).sum() == n_c - n_test
    other, _ = data.digits._digits_split(0.25, 4)
    assert not np.array_equal(other, train_idx)
    y = digits_dataset("test", size=8, seed=3)[1]
    assert torch.equal(y, torch.from_numpy(labels[test_idx]))


def test_digits_size8_equals_scaled_original():
    from sklearn.datasets import load_digits

    x, y, _ = digits_dataset("train", size=8, seed=0)
    train_idx, _ = data.digits._digits_split(0.25, 0)
    expect = np.round(load_digits().images[train_idx] * 255 / 16).astype(np.uint8)
    assert np.array_equal(x[..., 0].numpy(), expect)
    # Upsampling is plain bilinear (align_corners=False, no antialias) of those values.
    x32, _, _ = digits_dataset("train", size=32, seed=0)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(load_digits().images[train_idx[:5]] * 255 / 16).float()[:, None], size=32, mode="bilinear"
    )
    assert torch.equal(x32[:5, :, :, 0], ref[:, 0].round().clamp(0, 255).to(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder subset
# ---------------------------------------------------------------------------------------------------------------


def _touch_tree(root, spec: dict[str, list[str]]):
    for cls, names in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (root / cls / name).write_bytes(b"")  # scanning and selection never open the files


def test_scan_image_folder_rules(tmp_path):
    _touch_tree(
        tmp_path,
        {
            "b": ["2.png", "1.JPG", "x.txt", ".hidden.png", "sub/3.webp", ".git/4.png"],
            "a": ["z.TIFF", "y.jpeg"],
            ".cache": ["q.png"],
        },
    )
    (tmp_path / "readme.png").write_bytes(b"")  # a file at the root is not a class
    outside = tmp_path.parent / f"{tmp_path.name}-linked"  # a symlinked sub-folder is followed (as torchvision)
    _touch_tree(outside, {"more": ["5.png"]})
    (tmp_path / "a" / "link").symlink_to(outside / "more", target_is_directory=True)
    classes, files = scan_image_folder(tmp_path)
    assert classes == ["a", "b"]
    assert files == {"a": ["a/link/5.png", "a/y.jpeg", "a/z.TIFF"], "b": ["b/1.JPG", "b/2.png", "b/sub/3.webp"]}


def test_select_subset_deterministic(tmp_path):
    _touch_tree(tmp_path, {"c": [f"f{i:02d}.png" for i in range(20)], "d": [f"g{i}.jpg" for i in range(5)]})
    s1 = select_subset(tmp_path, 3, seed=0)
    s2 = select_subset(tmp_path, 3, seed=0)
    assert s1 == s2
    assert s1.classes == ["c", "d"] and s1.per_class == 3 and s1.seed == 0 and len(s1) == 6
    assert [label for _, label in s1.samples] == [0, 0, 0, 1, 1, 1]
    # Pinned: random.Random(f"{seed}:{class}") is the same on every machine and Python version.
    assert [p for p, label in s1.samples if label == 0] == ["c/f05.png", "c/f08.png", "c/f12.png"]
    s3 = select_subset(tmp_path, 3, seed=1)
    assert [p for p, label in s3.samples if label == 0] == ["c/f01.png", "c/f09.png", "c/f16.png"]
    bigger = select_subset(tmp_path, 5, seed=0)  # growing K only adds files
    assert set(s1.samples) <= set(bigger.samples)
    only = select_subset(tmp_path, 2, seed=0, classes=["d"])
    assert only.classes == ["d"] and {label for _, label in only.samples} == {0}


def test_select_subset_errors(tmp_path):
    _touch_tree(tmp_path / "ok", {"a": ["1.png", "2.png"], "b": ["1.png"]})
    with pytest.raises(DataError, match="'b' has 1 images") as e:
        select_subset(tmp_path / "ok", 2, seed=0)
    assert "ok/b" in _one_line(e)
    with pytest.warns(UserWarning, match="'b' has 1 images"):
        s = select_subset(tmp_path / "ok", 2, seed=0, min_policy="warn")
    assert s.samples == [("a/1.png", 0), ("a/2.png", 0), ("b/1.png", 1)]

    _touch_tree(tmp_path / "empty", {"a": ["1.png"], "b": ["notes.txt"]})
    for policy in ("error", "warn"):
        with pytest.raises(DataError, match="'b' has no images") as e:
            select_subset(tmp_path / "empty", 1, seed=0, min_policy=policy)
        _one_line(e)
    with pytest.raises(DataError, match="not found") as e:
        select_subset(tmp_path / "missing", 1, seed=0)
    assert "missing" in _one_line(e)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        select_subset(tmp_path / "flat", 1, seed=0)
    with pytest.raises(DataError, match="not a directory"):
        select_subset(tmp_path / "flat" / "x.png", 1, seed=0)
    with pytest.raises(DataError, match="not found"):
        select_subset(tmp_path / "ok", 1, seed=0, classes=["a", "zzz"])
    with pytest.raises(ValueError, match="duplicates"):
        select_subset(tmp_path / "ok", 1, seed=0, classes=["a", "b", "a"])
    assert issubclass(DataError, ValueError)


def test_subset_json_round_trip(tmp_path):
    _touch_tree(tmp_path / "root", {"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    s = select_subset(tmp_path / "root", 1, seed=7)
    s.save(tmp_path / "subset.json")
    assert Subset.load(tmp_path / "subset.json") == s
    assert json.loads((tmp_path / "subset.json").read_text())["format"] == "ktkernels.train.subset"
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="bad.json"):
        Subset.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        Subset.load(tmp_path / "nope.json")
    # A label past the last class (2 classes: labels 0 and 1).
    d = s.to_dict()
    d["samples"][0][1] = 2
    with pytest.raises(DataError, match="outside 0..1"):
        Subset.from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# prepare cache
# ---------------------------------------------------------------------------------------------------------------


def _subset(root) -> Subset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes b and c have fewer than 7 files
        return select_subset(root, 7, seed=0, min_policy="warn")


def _reference_pixels(path, size: int) -> np.ndarray:
    """Independent reference: torchvision's Resize(size) + CenterCrop(size) on the PIL image."""
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as im:
        im = im.convert("RGB")
    return np.asarray(TF.center_crop(TF.resize(im, [size]), [size]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root)
    return root


@pytest.fixture(scope="module")
def cache_dir(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "c16"
    with pytest.warns(UserWarning, match="skipped 3 unreadable") as rec:
        info = prepare_cache(_subset(folder), out, size=16)
    text = str(rec[0].message)
    assert "a/truncated.jpg" in text and "a/zero.png" in text and "a/text.jpg" in text
    assert info.num_images == 12 and info.size == 16 and len(info.skipped) == 3
    return out


def test_prepare_round_trip(folder, cache_dir):
    subset = _subset(folder)
    cache = open_cache(cache_dir, verify=True)
    bad = {"a/truncated.jpg", "a/zero.png", "a/text.jpg"}
    kept = [(p, label) for p, label in subset.samples if p not in bad]
    assert cache.paths == [p for p, _ in kept]
    assert cache.labels.tolist() == [label for _, label in kept] and cache.labels.dtype == torch.int64
    assert cache.classes == ["a", "b", "c"] and cache.size == 16 and len(cache) == 12
    assert isinstance(cache.images, np.memmap) and cache.images.shape == (12, 16, 16, 3)
    assert not cache.images.flags.writeable
    for i, rel in enumerate(cache.paths):
        assert np.array_equal(cache.images[i], _reference_pixels(folder / rel, 16)), rel
    index = json.loads((cache_dir / "index.json").read_text())
    assert {s["path"] for s in index["skipped"]} == bad
    assert all(s["error"] and "\n" not in s["error"] for s in index["skipped"])
    assert index["seed"] == 0 and index["per_class"] == 7 and index["n"] == 12
    assert np.load(cache_dir / "labels.npy").tolist() == cache.labels.tolist()
    in_ram = open_cache(cache_dir, in_memory=True)
    assert np.array_equal(in_ram.images, cache.images) and in_ram.images.flags.writeable


def test_prepare_verify_detects_tampering(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    raw = bytearray((copy / "images.u8").read_bytes())
    raw[1234] ^= 0xFF
    (copy / "images.u8").write_bytes(bytes(raw))
    open_cache(copy)  # without verify the bytes are not read
    with pytest.raises(DataError, match="checksum mismatch.*images.u8") as e:
        open_cache(copy, verify=True)
    _one_line(e)
    for wrong in (bytes(raw[:-1]), bytes(raw) + b"\0"):  # one byte short, one byte over
        (copy / "images.u8").write_bytes(wrong)
        with pytest.raises(DataError, match="bytes, expected"):
            open_cache(copy)
    (copy / "images.u8").write_bytes(bytes(raw))
    # Labels: labels.npy against index.json's list, and (both changed alike) against the recorded checksum.
    labels = np.load(copy / "labels.npy")
    assert not np.array_equal(labels, labels[::-1])
    np.save(copy / "labels.npy", labels[::-1].copy())
    with pytest.raises(DataError, match="do not match"):
        open_cache(copy)
    index = json.loads((copy / "index.json").read_text())
    index["labels"] = labels[::-1].tolist()
    (copy / "index.json").write_text(json.dumps(index))
    open_cache(copy)
    with pytest.raises(DataError, match="checksum mismatch.*labels.npy"):
        open_cache(copy, verify=True)
    index = json.loads((copy / "index.json").read_text())
    index["version"] = 99
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="incompatible cache"):
        open_cache(copy)
    (copy / "index.json").unlink()
    with pytest.raises(DataError, match="index.json is missing"):
        open_cache(copy)
    with pytest.raises(DataError, match="no cache folder"):
        open_cache(tmp_path / "nothing")


def test_prepare_workers_identical(folder, cache_dir, tmp_path):
    with pytest.warns(UserWarning, match="skipped 3"):
        prepare_cache(_subset(folder), tmp_path / "w2", size=16, workers=2)
    for name in ("images.u8", "labels.npy", "index.json"):
        assert (tmp_path / "w2" / name).read_bytes() == (cache_dir / name).read_bytes(), name


def test_prepare_class_emptied_by_corruption(tmp_path):
    root = tmp_path / "root"
    write_image_folder(root, bad_class=True)
    with pytest.raises(DataError, match="class 'd' has no readable images") as e:
        with pytest.warns(UserWarning, match="skipped 5"):
            prepare_cache(_subset(root), tmp_path / "caches" / "out", size=8)
    _one_line(e)
    assert list((tmp_path / "caches").iterdir()) == []  # no cache, no temp folder left behind


def test_prepare_is_atomic_and_refuses_to_clobber(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = data.cache._decode_resize
    calls = []

    def dies_midway(job):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for a killed prepare
        return real(job)

    monkeypatch.setattr(data.cache, "_decode_resize", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(_subset(folder), out, size=8)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(data.cache, "_decode_resize", real)

    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(DataError, match="already exists"):
        prepare_cache(_subset(folder), out, size=8)
    with pytest.warns(UserWarning, match="skipped"):
        prepare_cache(_subset(folder), out, size=8, overwrite=True)
    assert not (out / "something").exists() and open_cache(out, verify=True).size == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# CachedLoader
# ---------------------------------------------------------------------------------------------------------------


def _indexed(n: int, hw: int = 2) -> tuple[np.ndarray, torch.Tensor]:
    """Images whose pixels all hold their row index (n <= 256) and labels = row index."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, hw, hw, 3)).copy()
    return images, torch.arange(n)


def _epoch(loader, epoch=None) -> list[torch.Tensor]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return [y.clone() for _, y in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_covers_every_index_across_ranks(world_size):
    n, bs = 10, 2
    images, labels = _indexed(n)
    padded = -(-n // world_size) * world_size
    seen = []
    lengths = set()
    for rank in range(world_size):
        ld = CachedLoader(images, labels, bs, drop_last=False, seed=5, rank=rank, world_size=world_size)
        batches = _epoch(ld, epoch=2)
        lengths.add(len(batches))
        assert len(batches) == len(ld)
        seen.append(torch.cat(batches))
    assert len(lengths) == 1  # every rank runs the same number of steps
    allseen = torch.cat(seen)
    assert len(allseen) == padded and set(allseen.tolist()) == set(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))  # seed + epoch
    assert sorted(allseen.tolist()) == sorted(torch.cat([perm, perm[: padded - n]]).tolist())
    for rank in range(world_size):  # the documented sharding: rank r takes perm[r::world_size]
        assert torch.equal(seen[rank], torch.cat([perm, perm[: padded - n]])[rank::world_size])


def test_loader_order_seed_epoch_shuffle():
    images, labels = _indexed(40)
    a = CachedLoader(images, labels, 8, seed=1)
    b = CachedLoader(images, labels, 8, seed=1)
    e0 = _epoch(a, 0)
    assert all(torch.equal(u, v) for u, v in zip(e0, _epoch(b, 0), strict=True))
    assert all(torch.equal(u, v) for u, v in zip(e0, _epoch(a, 0), strict=True))  # repeatable
    assert not torch.equal(torch.cat(e0), torch.cat(_epoch(a, 1)))
    assert not torch.equal(torch.cat(e0), torch.cat(_epoch(CachedLoader(images, labels, 8, seed=2), 0)))
    plain = CachedLoader(images, labels, 8, shuffle=False)
    assert torch.equal(torch.cat(_epoch(plain)), torch.arange(40))


def test_loader_batches_equal_memmap_rows(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=arr.shape)
    mm[:] = arr
    mm.flush()
    ro = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="r", shape=arr.shape)
    labels = rng.integers(0, 10, 23)
    ld = CachedLoader(ro, labels, 4, seed=3)
    order = ld.indices(0)
    for b, (x, y) in enumerate(ld):
        idx = order[b * 4 : (b + 1) * 4].numpy()
        assert x.dtype == torch.uint8 and x.shape == (4, 5, 4, 3) and y.dtype == torch.int64
        assert np.array_equal(x.numpy(), arr[idx]) and np.array_equal(y.numpy(), labels[idx])
    # A CPU tensor source and the synchronous path give the same batches.
    sync = CachedLoader(torch.from_numpy(arr), torch.from_numpy(labels), 4, seed=3, prefetch=0)
    for (x1, y1), (x2, y2) in zip(ld, sync, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_drop_last():
    images, labels = _indexed(10)
    assert len(CachedLoader(images, labels, 4)) == 2
    kept = CachedLoader(images, labels, 4, drop_last=False)
    sizes = [len(y) for _, y in kept]
    assert len(kept) == 3 and sizes == [4, 4, 2]
    assert len(CachedLoader(images, labels, 4, world_size=3, rank=2)) == 1  # 4 samples per rank
    with pytest.raises(DataError, match="no batches"):
        CachedLoader(images, labels, 11)
    assert len(CachedLoader(images, labels, 11, drop_last=False)) == 1
    assert len(CachedLoader(images, labels, 5, drop_last=False)) == 2  # no empty batch when bs divides the samples


def test_loader_more_ranks_than_samples():
    # 3 samples over 8 ranks: the permutation wraps around more than once, one sample per rank.
    images, labels = _indexed(3)
    seen = [torch.cat(_epoch(CachedLoader(images, labels, 1, seed=2, rank=r, world_size=8), 0)) for r in range(8)]
    assert all(len(s) == 1 for s in seen)
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(2))
    assert torch.cat(seen).tolist() == perm.repeat(3)[:8].tolist()


def test_loader_resume():
    images, labels = _indexed(30)
    ld = CachedLoader(images, labels, 4, seed=9)
    full = _epoch(ld, 3)
    assert len(full) == 7
    for k in (0, 1, 4, 7):
        rest = [y for _, y in ld.iter_from(3, k)]
        assert len(rest) == 7 - k and all(torch.equal(u, v) for u, v in zip(rest, full[k:], strict=True))
    # Interrupted run: 3 batches consumed, state saved, a fresh loader continues.
    it = iter(ld)
    for _ in range(3):
        next(it)
    state = ld.state_dict()
    assert state["epoch"] == 3 and state["start_batch"] == 3
    del it
    fresh = CachedLoader(images, labels, 4, seed=9)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # JSON-serialisable
    rest = [y for _, y in fresh]
    assert all(torch.equal(u, v) for u, v in zip(rest, full[3:], strict=True)) and len(rest) == 4
    assert fresh.state_dict()["start_batch"] == 7
    fresh.set_epoch(4)
    assert len(list(fresh)) == 7
    with pytest.raises(DataError, match="world_size"):
        CachedLoader(images, labels, 4, seed=9, world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        CachedLoader(images, labels, 4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="start_batch"):
        ld.set_epoch(0, start_batch=8)
    # A state saved at the end of an epoch resumes with nothing left of it.
    ld.set_epoch(5, start_batch=7)
    assert list(ld) == [] and ld.state_dict()["start_batch"] == 7
    # An iterator that has yielded nothing yet already marks where it starts.
    it = ld.iter_from(6, 2)
    assert (ld.state_dict()["epoch"], ld.state_dict()["start_batch"]) == (6, 2)
    it.close()


def _wait_for_threads(baseline: int) -> int:
    deadline = time.monotonic() + 5.0
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def test_loader_thread_stops_when_abandoned():
    images, labels = _indexed(64, hw=8)
    ld = CachedLoader(images, labels, 2, prefetch=2)
    baseline = threading.active_count()
    for _x, _y in ld:
        assert threading.active_count() == baseline + 1
        break
    assert _wait_for_threads(baseline) == baseline
    it = iter(ld)
    next(it)
    del it
    assert _wait_for_threads(baseline) == baseline
    it = iter(ld)
    next(it)
    it.close()
    assert _wait_for_threads(baseline) == baseline
    assert len(list(ld)) == len(ld)  # exhausted iterators end their thread too
    assert _wait_for_threads(baseline) == baseline


def test_loader_propagates_worker_exceptions(monkeypatch):
    images, labels = _indexed(16)
    real = data.loader._BatchFetcher.__call__

    def flaky(self, b):
        if b == 1:
            raise RuntimeError("boom in the prefetch thread")
        return real(self, b)

    monkeypatch.setattr(data.loader._BatchFetcher, "__call__", flaky)
    baseline = threading.active_count()
    it = iter(CachedLoader(images, labels, 4))
    next(it)
    with pytest.raises(RuntimeError, match="boom in the prefetch thread"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert _wait_for_threads(baseline) == baseline


def test_loader_rejects_bad_inputs():
    images, labels = _indexed(8)
    with pytest.raises(ValueError, match="uint8"):
        CachedLoader(images.astype(np.float32), labels, 2)
    with pytest.raises(ValueError, match="labels"):
        CachedLoader(images, labels[:5], 2)
    with pytest.raises(ValueError, match="rank"):
        CachedLoader(images, labels, 2, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------


def _batch(b=6, h=20, w=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_transform_shapes_dtypes_layouts():
    x = _batch()
    g = torch.Generator().manual_seed(0)
    out = train_transform(x, 12, g)
    assert out.shape == (6, 3, 12, 12) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = train_transform(x, 12, g, channels_last=False, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    ev = eval_transform(x, 16)
    assert ev.shape == (6, 3, 16, 16) and ev.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(x.float(), 16)
    with pytest.raises(ValueError, match="NHWC"):
        eval_transform(x.permute(0, 3, 1, 2).contiguous(), 16)


@pytest.mark.parametrize("out_size", [20, 13, 31])
def test_eval_of_constant_image_is_normalised_constant(out_size):
    x = torch.full((2, 20, 20, 3), 77, dtype=torch.uint8)
    expect = (77 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    out = eval_transform(x, out_size)
    torch.testing.assert_close(out, expect.view(1, 3, 1, 1).expand_as(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("out_size", [20, 13, 31])
def test_train_full_crop_equals_eval_and_its_flip(out_size):
    x = _batch()
    g = torch.Generator().manual_seed(1)
    out, boxes, _ = train_transform(x, out_size, g, scale=(1, 1), ratio=(1, 1), flip=False, return_params=True)
    assert boxes.tolist() == [[0, 0, 20, 20]] * 6
    plain = eval_transform(x, out_size)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    # With flips (at out_size 20 the boxes alone would make the resampling an identity): the flipped ones mirror.
    out, _, flips = train_transform(
        x, out_size, torch.Generator().manual_seed(1), scale=(1, 1), ratio=(1, 1), return_params=True
    )
    assert 0 < int(flips.sum()) < 6
    torch.testing.assert_close(out[flips], plain[flips].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~flips], plain[~flips], atol=1e-5, rtol=0)


def test_train_flip_matches_torch_flip():
    x = _batch(b=16)
    flipped, boxes, flips = train_transform(x, 14, torch.Generator().manual_seed(4), return_params=True)
    plain, boxes2, _ = train_transform(x, 14, torch.Generator().manual_seed(4), flip=False, return_params=True)
    assert torch.equal(boxes, boxes2)  # flips are drawn after the boxes
    assert 0 < int(flips.sum()) < 16
    torch.testing.assert_close(flipped[flips], torch.flip(plain[flips], dims=[-1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped[~flips], plain[~flips], atol=0, rtol=0)


def test_crop_boxes_inside_image_and_fallback():
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    for h, w in ((30, 50), (50, 30), (7, 7)):
        boxes = sample_crop_boxes(4000, h, w, g)
        top, left, bh, bw = boxes.unbind(1)
        assert (bh >= 1).all() and (bw >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + bh <= h).all() and (left + bw <= w).all()
        assert top.max() > 0 and left.max() > 0
    boxes = sample_crop_boxes(2000, 40, 40, g)
    area = (boxes[:, 2] * boxes[:, 3]).double() / 1600
    assert area.min() >= 0.05 and area.max() <= 1.0 and 0.4 < area.mean() < 0.65  # U(0.08, 1) -> 0.54
    aspect = boxes[:, 3].double() / boxes[:, 2].double()
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    # No candidate can fit -> torchvision's deterministic central-crop fallback.
    rrc = torchvision.transforms.RandomResizedCrop
    for h, w, ratio in ((40, 40, (3.0, 4.0)), (40, 40, (0.2, 0.25)), (30, 40, (4 / 3, 4 / 3))):
        ours = sample_crop_boxes(3, h, w, g, scale=(2.0, 3.0), ratio=ratio)
        ref = rrc.get_params(torch.zeros(3, h, w), [2.0, 3.0], list(ratio))
        assert ours.tolist() == [list(ref)] * 3


def _torchvision_boxes(u_area, u_ratio, u_pos, h, w, scale, ratio):
    """RandomResizedCrop.get_params, one sample at a time as torchvision writes it, on given uniforms."""
    boxes = []
    for n in range(u_area.shape[0]):
        for t in range(u_area.shape[1]):
            target = h * w * (scale[0] + (scale[1] - scale[0]) * u_area[n, t].item())
            aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio[n, t].item())
            bw, bh = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < bw <= w and 0 < bh <= h:  # randint(0, h - bh + 1) and randint(0, w - bw + 1) from the uniforms
                top, left = math.floor(u_pos[n, 0].item() * (h - bh + 1)), math.floor(u_pos[n, 1].item() * (w - bw + 1))
                boxes.append([top, left, bh, bw])
                break
        else:
            boxes.append(None)  # the central fallback, checked in test_crop_boxes_inside_image_and_fallback
    return boxes


@pytest.mark.parametrize(("h", "w", "scale"), [(7, 7, (0.08, 1.0)), (9, 13, (0.5, 1.0)), (40, 30, (0.08, 1.0))])
def test_crop_boxes_follow_torchvision_rule_per_sample(h, w, scale):
    # The vectorised draw against a per-sample loop on the same uniforms (a generator of the same seed): candidates
    # that fit exactly (h == H or w == W), the first fitting one of ten, round half to even, offsets in [0, H - h].
    ratio = (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(3000, h, w, torch.Generator().manual_seed(9), scale, ratio)
    g = torch.Generator().manual_seed(9)
    draws = [torch.rand(3000, *shape, generator=g, dtype=torch.float64) for shape in ((10,), (10,), (2,))]
    expected = _torchvision_boxes(*draws, h, w, scale, ratio)
    assert all(e is None or boxes[n].tolist() == e for n, e in enumerate(expected))
    assert any(e is not None and (e[2] == h or e[3] == w) for e in expected)  # boxes as tall or wide as the image
    assert any(e is not None and e[0] == h - e[2] for e in expected)  # and one touching the bottom edge


def test_train_transform_deterministic():
    x = _batch()
    a = train_transform(x, 12, torch.Generator().manual_seed(3))
    b = train_transform(x, 12, torch.Generator().manual_seed(3))
    c = train_transform(x, 12, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_resize_matches_torchvision_resized_crop_float64():
    """Per sample, train_transform == v2.functional.resized_crop(bilinear, antialias=False) (+ flip).

    Our grid samples crop pixel s + clamp((o + 0.5) * n / out - 0.5, 0, n - 1), the reference's crop-then-
    interpolate(align_corners=False) coordinates including the clamp at the crop border, so the two agree to
    float64 round-off (roi_align(aligned=True) would not: it blends pixels outside the box at upsampled borders).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = _batch(b=12, h=21, w=27, seed=5)
    out, boxes, flips = train_transform(
        x,
        24,
        torch.Generator().manual_seed(2),
        scale=(0.02, 1.0),
        mean=(0, 0, 0),
        std=(1, 1, 1),
        dtype=torch.float64,
        channels_last=False,
        return_params=True,
    )
    assert (boxes[:, 2] < 24).any() and (boxes[:, 2] > 24 * 0.8).any()  # up- and (near/)down-sampled crops
    for i in range(12):
        top, left, h, w = boxes[i].tolist()
        ref = TF.resized_crop(
            x[i].permute(2, 0, 1).double() / 255, top, left, h, w, [24, 24], InterpolationMode.BILINEAR, antialias=False
        )
        ref = ref.flip(-1) if flips[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)
        assert (out[i] - ref).abs().max() < 1e-10
    # 0.8: a 17 x 22 centre; 2/3: 14 x 18, whose top offset 3.5 rounds half to even (4), as center_crop does.
    for fraction, crop in [(0.8, [17, 22]), (2 / 3, [14, 18])]:
        ev = eval_transform(x, 9, mean=(0, 0, 0), std=(1, 1, 1), dtype=torch.float64, crop_fraction=fraction)
        ref = TF.resize(TF.center_crop(x.permute(0, 3, 1, 2).double() / 255, crop), [9, 9], antialias=False)
        torch.testing.assert_close(ev, ref, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# folder_dataset
# ---------------------------------------------------------------------------------------------------------------


def test_folder_dataset_shapes_and_corrupt_files(folder):
    subset = _subset(folder)
    bad = next(i for i, (p, _) in enumerate(subset.samples) if p == "a/text.jpg")
    train_ds = folder_dataset(subset, 12, train=True)
    eval_ds = folder_dataset(subset, 12, train=False)
    assert len(train_ds) == len(subset) == 15
    x, y = train_ds[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y == subset.samples[0][1]
    assert type(x) is torch.Tensor
    x, y = eval_ds[len(subset) - 1]
    assert x.shape == (3, 12, 12) and y == 2
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x, y = eval_ds[bad]  # text.jpg, then truncated.jpg and zero.png (the rest of class "a") are skipped
    skipped = [str(w.message) for w in rec]
    assert len(skipped) == 3 and all(m.startswith("skipping unreadable image") for m in skipped)
    assert [m.split()[3].rsplit("/", 1)[1] for m in skipped] == ["text.jpg", "truncated.jpg", "zero.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(eval_ds[bad][0], x)  # known-bad files are not retried (or re-warned) in this process
    nxt = bad + 1
    while subset.samples[nxt][0] in ("a/truncated.jpg", "a/zero.png"):
        nxt += 1
    x_ref, y_ref = eval_ds[nxt]
    assert torch.equal(x, x_ref) and y == y_ref
