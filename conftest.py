"""Test set-up: the Triton interpreter on CPU-only machines, seeding, poisoned op outputs, and the per-session
directories and background work that keep the suite's time on 2 cores down."""

import os
import shutil
import tempfile
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the suite runs one pytest-xdist worker per core, and each torch's
# intra-op threads spinning after every parallel region took cores from the other worker (149 -> 121 s for the
# torch-heavy test files on 2 cores; benchmarks/NOTES.md, "CI time"). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

_made_here: list[Path] = []  # removed when this process's session ends (pytest_unconfigure)


def _session_dir(variable: str, prefix: str) -> Path:
    """A fresh directory for this test session, in ``variable``: the pytest-xdist workers inherit the controller's."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        _made_here.append(Path(os.environ[variable]))
    return Path(os.environ[variable])


# A private Inductor cache per run: the on-disk cache does not key on custom-op schemas, so graphs compiled
# against an older schema of our ops would be replayed (seen when an argument changed from int to int[]).
_session_dir("TORCHINDUCTOR_CACHE_DIR", "ktk-inductor-")
# Files shared by the processes of one test session (tests/test_codegen.py's background compiles).
RUN_DIR = _session_dir("KTK_TEST_RUN_DIR", "ktk-tests-")

# Must happen before anything imports ktkernels' Triton kernels (@triton.jit reads it at decoration).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Record every interpreted Triton launch for `bench codegen --fill-cache --test-launches` (benchmarks/NOTES.md,
# "Precompiled Triton cache"): the GPU tests run the same bodies at the same shapes.
if os.environ.get("KTK_RECORD_TRITON_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    from ktkernels.bench import codegen as _codegen

    _codegen.record_interpreted_launches(os.environ["KTK_RECORD_TRITON_LAUNCHES"])


def _skip_repeated_lang_patching() -> None:
    """Under the interpreter, skip re-patching triton.language on each @triton.jit helper call when it is patched.

    Every helper call inside a kernel re-runs the interpreter's ``_patch_lang``: an ``inspect.getmembers`` scan of
    triton.language that finds each builtin patched already (by the launch, or for ``triton.language.core`` by an
    earlier helper call, whose patch is never undone). That is ~0.2 ms a call, and the interpreter-heavy test files
    took 13% less time without it (benchmarks/NOTES.md, "CI time"). A helper whose language modules are not all
    patched yet (``load`` still a builtin) goes the interpreter's own way, and so does every call on a triton other
    than the one this was checked with.
    """
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    function = getattr(interpreter, "InterpretedFunction", None)
    if not triton.__version__.startswith("3.8.") or not hasattr(function, "rewrite"):
        return
    shipped_call, languages = function.__call__, {}

    def call(self, *args, **kwargs):
        seen = languages.get(self.fn)
        if seen is None:
            seen = languages[self.fn] = [v for v in self.fn.__globals__.values() if v is tl or v is tl.core]
        if not seen or any(tl.core.is_builtin(getattr(language, "load", None)) for language in seen):
            return shipped_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:  # as the interpreter's own call reports it
            raise interpreter.InterpreterError(repr(e)) from e

    function.__call__ = call


def _skip_discarded_overflow_checks() -> None:
    """Under the interpreter, skip the integer overflow checks whose result nothing reads.

    The interpreter's options ask for them (``sanitize_overflow``), but with ``debug`` off Triton's ``device_assert``
    returns before it looks at the check. Until then every int32 add, sub and mul of a kernel is computed again in
    int64 and compared with the int32 range: ~40% of a max-blur launch's interpreter time (benchmarks/NOTES.md,
    "CI time"). A GPU compile drops them the same way. With ``debug`` on they stay.
    """
    import dataclasses

    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and getattr(options, "sanitize_overflow", False) and not options.debug:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _skip_repeated_lang_patching()
    _skip_discarded_overflow_checks()

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


@pytest.fixture(scope="session")
def codegen_run_dir() -> Path:
    return RUN_DIR


def pytest_collection_finish(session):
    """A test module with a ``start_runs(run_dir, items)`` (tests/test_codegen.py: minutes of compiles on a cold
    Triton cache) starts what its selected tests need in the background as soon as they are collected."""
    selected: dict = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_runs"):
            selected.setdefault(module, []).append(item)
    for module, items in selected.items():
        module.start_runs(RUN_DIR, items)


def pytest_unconfigure(config):
    for path in _made_here:  # the controller's (or a plain run's): the xdist workers have finished by now
        shutil.rmtree(path, ignore_errors=True)
