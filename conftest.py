"""Test set-up: the Triton interpreter on CPU-only machines, seeding, and poisoned op outputs."""

import os
import tempfile

import torch

# A private Inductor cache per run: the on-disk cache does not key on custom-op schemas, so graphs compiled
# against an older schema of our ops would be replayed (seen when an argument changed from int to int[]).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ktk-inductor-"))

# Must happen before anything imports ktkernels' Triton kernels (@triton.jit reads it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ktkernels import layout  # noqa: E402

_real_alloc = layout.alloc


def _poisoned_alloc(like, shape, channels_last, dtype=None):
    """Every output starts as NaN (or 0xFF for codes), so an element a kernel forgets shows up."""
    out = _real_alloc(like, shape, channels_last, dtype)
    if not isinstance(out, torch._subclasses.FakeTensor):
        out.fill_(float("nan") if out.is_floating_point() else 255)
    return out


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(layout, "alloc", _poisoned_alloc)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Whole-model tests on tiny inputs gain nothing from intra-op threads, and on a shared CPU the thread
    pool's spinning makes them several times slower; the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
