"""BlurPool family benchmark: ktkernels vs the anchors' PyTorch recipes and torch.compile.

Shapes are ResNet-50's blur layers (baselines.md): the max-blur stem and the blurs of layers 2-4.
Each case has a geometry (adobe k=4, or timm k=3) and is timed against that anchor's recipe
(``pytorch``: pad + depthwise conv) in the same run.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from .. import backend
from ..blurpool import geometry, op
from .harness import Row, agreement, on_backend, rotating, step_for, time_row

# (case, channels, size, kind, filt_size, pads (l, r, t, b))
RESNET50_CASES = [
    ("maxblur k4 stem", 64, 112, "maxblur", 4, (1, 2, 1, 2)),
    ("adobe k4 L2 blur", 128, 56, "blur", 4, (1, 2, 1, 2)),
    ("timm k3 L2 blur", 128, 56, "blur", 3, (1, 1, 1, 1)),
    ("adobe k4 L2 down", 256, 56, "blur", 4, (1, 2, 1, 2)),
    ("timm k3 L2 down", 256, 56, "blur", 3, (1, 1, 1, 1)),
    ("adobe k4 L3 down", 512, 28, "blur", 4, (1, 2, 1, 2)),
    ("timm k3 L3 down", 512, 28, "blur", 3, (1, 1, 1, 1)),
    ("adobe k4 L4 down", 1024, 14, "blur", 4, (1, 2, 1, 2)),
    ("timm k3 L4 down", 1024, 14, "blur", 3, (1, 1, 1, 1)),
]
# torch.compile costs tens of seconds per graph on the GPU box: compile the adobe recipe on the two
# combinations that baselines.md measured.
COMPILE_CASES = {("adobe k4 L2 down", torch.bfloat16, "NHWC"), ("adobe k4 L2 down", torch.float32, "NCHW")}


def recipe(kind: str, filt_size: int, pads: tuple):
    """The anchors' pure-PyTorch recipe: [max_pool2d(2, 1)] + reflect pad + depthwise conv at stride 2.

    The filter is built once per (channels, dtype, device), as the anchors' layers keep it in a buffer.
    """
    filters: dict[tuple, torch.Tensor] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        if kind == "maxblur":
            x = F.max_pool2d(x, 2, stride=1)
        c = x.shape[1]
        key = (c, x.dtype, x.device)
        if key not in filters:
            filt = geometry.binomial_filter2d(filt_size, x.dtype).to(x.device)
            filters[key] = filt.expand(c, 1, filt_size, filt_size).contiguous()
        return F.conv2d(F.pad(x, pads, mode="reflect"), filters[key], stride=2, groups=c)

    return run


def ours(kind: str, filt_size: int, pads: tuple, name: str):
    """ktkernels with a named backend, same geometry as the recipe. Max-blur goes through the layers' entry point,
    which forms argmax codes only when a backward can come (the "fwd" rows run without them)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if kind == "maxblur":
            return op.max_blur(x, 2, 0, filt_size, 2, list(pads), "reflect")
        return op.blur_pool2d(x, filt_size, 2, list(pads), "reflect")

    return on_backend(name, run)


def implementations(device: torch.device, compile_recipe: bool, kind: str, filt_size: int, pads: tuple) -> dict:
    """Our backends that can run on ``device``, the recipe, and optionally the compiled recipe."""
    impls = {}
    for name in ("triton", "cuda") if device.type == "cuda" else ("cpu",):
        try:
            with backend.use_backend(name):
                backend.resolve("blurpool", device)
        except RuntimeError:
            continue
        impls[f"ktk-{name}"] = ours(kind, filt_size, pads, name)
    impls["pytorch"] = recipe(kind, filt_size, pads)
    if compile_recipe:
        # A fresh Dynamo cache per case: every recipe shares one code object, each case compiles it about four
        # times (its filter cache fills on the first call; forward and f+b), and past the recompile limit (8)
        # Dynamo would silently run the recipe eagerly under the "+compile" name.
        torch._dynamo.reset()
        impls["pytorch+compile"] = torch.compile(recipe(kind, filt_size, pads), dynamic=False)
    return impls


def _out_size(kind: str, size: int) -> int:
    m = size - 1 if kind == "maxblur" else size  # the blur runs on the (H-1) max map for maxblur
    return (m + 1) // 2


def case_bytes(shape: tuple, kind: str, element_size: int, mode: str) -> int:
    """The bytes one call must move at least: input read and output written (forward), plus the output gradient
    read and the input gradient written (f+b). Max-blur's f+b adds its uint8 argmax codes, written once and read
    once; its forward alone needs none (no backward to come), and forms none."""
    batch, channels, size, _ = shape
    m = size - 1 if kind == "maxblur" else size
    tensors = (batch * channels * size * size + batch * channels * _out_size(kind, size) ** 2) * element_size
    if mode != "f+b":
        return tensors
    return 2 * (tensors + (batch * channels * m * m if kind == "maxblur" else 0))


def _time_case(
    device, batch, case, channels, size, kind, filt_size, pads, dtype, layout, compiled, reps, graphs, impls=None
):
    """All implementations of one (case, dtype, layout), forward and forward+backward, on shared inputs
    (``impls``: these instead of ``implementations``)."""
    shape = (batch, channels, size, size)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    es = torch.tensor([], dtype=dtype).element_size()
    out_size = _out_size(kind, size)
    n_in, n_out = batch * channels * size * size, batch * channels * out_size**2
    bytes_by_mode = {mode: case_bytes(shape, kind, es, mode) for mode in ("fwd", "f+b")}
    inputs = rotating(lambda: torch.randn(shape, dtype=dtype, device=device).to(memory_format=fmt), n_in * es, device)
    out_shape = (batch, channels, out_size, out_size)
    grads = rotating(
        lambda: torch.randn(out_shape, dtype=dtype, device=device).to(memory_format=fmt), n_out * es, device
    )
    rows = []
    x0, g0 = inputs(), grads()  # one input for the agreement check: every implementation computes the same
    for mode in ("fwd", "f+b"):
        chosen = impls if impls is not None else implementations(device, compiled, kind, filt_size, pads)
        fixed = {impl: step_for(mode, fn, lambda: x0, lambda: g0) for impl, fn in chosen.items()}
        differs = agreement(fixed, dtype)
        for impl, fn in chosen.items():
            step = step_for(mode, fn, inputs, grads)
            dtype_name = str(dtype).replace("torch.", "")
            row = Row("blurpool", case, shape, dtype_name, layout, mode, impl, None, bytes_by_mode[mode])
            row.mismatch = differs.get(impl)
            time_row(row, step, device, reps, graphs, warmup=3)
            rows.append(row)
            differ = f" ≠ {row.mismatch}" if row.mismatch else ""  # rows_from_log reads it back
            print(f"{case} {shape} {dtype_name} {layout} {mode} {impl}: {row.ms or row.error}{differ}", flush=True)
    return rows


def run(device, batch, dtypes, layouts, compile_cases, cases=RESNET50_CASES, reps=20, graphs=True) -> list[Row]:
    rows: list[Row] = []
    for case, channels, size, kind, filt_size, pads in cases:
        for dtype in dtypes:
            for layout in layouts:
                compiled = (case, dtype, layout) in compile_cases
                rows += _time_case(
                    device, batch, case, channels, size, kind, filt_size, pads, dtype, layout, compiled, reps, graphs
                )
    return rows


# Per-thread shapes (outputs of a row T, channels, rows loaded ahead) of the Triton max-blur forward that
# --tune-max-blur times against each other, per layout (the entry of triton.MAX_BLUR_SHAPE it replaces). More
# outputs per thread issue fewer instructions (they share their windows' columns) and loading rows ahead hides
# more latency, but both hold more registers, so fewer warps are resident: the codegen view cannot say which wins
# (benchmarks/NOTES.md, "columns" and "third H100 run"). The default shape comes first: the table checks every
# setting's results against the first one's (harness.agreement).
MAX_BLUR_TUNE = {
    "NCHW": [(2, 1, 0), (1, 2, 0), (4, 1, 0), (2, 1, 1), (1, 2, 1), (2, 1, 2)],
    "NHWC": [(1, 2, 0), (2, 2, 0), (2, 1, 0), (1, 2, 1), (2, 1, 1), (1, 2, 2)],
}


# PREFETCH values of the Triton blur kernels (triton.BLUR_PREFETCH) that --tune-blur times against each other.
BLUR_TUNE = (0, 1, 2)


def tune_name(shape: tuple[int, int, int]) -> str:
    """The table's name for a ``MAX_BLUR_TUNE`` shape: ``ktk-triton T2xC1`` (+ ``P1`` when rows are loaded ahead)."""
    t, c, prefetch = shape
    return f"ktk-triton T{t}xC{c}" + (f"P{prefetch}" if prefetch else "")


@contextlib.contextmanager
def _entry(table: dict, layout: str, value):
    saved = dict(table)
    table[layout == "NHWC"] = value
    try:
        yield
    finally:
        table.update(saved)


def max_blur_shape(layout: str, shape: tuple[int, int, int]):
    """A context in which the Triton max-blur kernels take ``shape`` for ``layout`` (triton.MAX_BLUR_SHAPE)."""
    from ..blurpool import triton as kernels

    return _entry(kernels.MAX_BLUR_SHAPE, layout, shape)


def blur_prefetch(layout: str, prefetch: int):
    """A context in which the Triton blur kernels load ``prefetch`` rows ahead for ``layout`` (triton.BLUR_PREFETCH)."""
    from ..blurpool import triton as kernels

    return _entry(kernels.BLUR_PREFETCH, layout, prefetch)


# A tuned setting, (kind, value), as the context that applies it for a layout.
SETTINGS = {"maxblur": max_blur_shape, "blur": blur_prefetch}


def with_setting(fn, layout: str, setting: tuple):
    """``fn`` (an ``ours`` step) under the ``SETTINGS`` context of ``setting``; its ``setting`` attribute makes
    ``harness.step_for`` hold it over the backward too (and while a CUDA graph captures the step)."""
    kind, value = setting

    def context():
        return SETTINGS[kind](layout, value)

    def run(x):
        with context():
            return fn(x)

    run.backend = fn.backend
    run.setting = context
    return run


def _tune_case(device, batch, dtypes, layouts, case, named_settings, reps, graphs) -> list[Row]:
    """``case`` on the Triton backend once per (name, setting) of ``named_settings(layout)``, and the recipe."""
    name, channels, size, kind, filt_size, pads = case
    rows: list[Row] = []
    for dtype in dtypes:
        for layout in layouts:
            impls = {
                impl: with_setting(ours(kind, filt_size, pads, "triton"), layout, setting)
                for impl, setting in named_settings(layout)
            }
            impls["pytorch"] = recipe(kind, filt_size, pads)
            rows += _time_case(
                device, batch, name, channels, size, kind, filt_size, pads, dtype, layout, False, reps, graphs, impls
            )
    return rows


def tune_max_blur(device, batch, dtypes, layouts, case=RESNET50_CASES[0], reps=20, graphs=True) -> list[Row]:
    """The max-blur ``case`` (default: the ResNet-50 stem) on the Triton backend once per ``MAX_BLUR_TUNE`` shape
    of its layout, and the PyTorch recipe, forward and forward+backward, from one run."""
    return _tune_case(device, batch, dtypes, layouts, case, _max_blur_settings, reps, graphs)


def tune_blur(device, batch, dtypes, layouts, cases, reps=20, graphs=True) -> list[Row]:
    """Each blur case on the Triton backend once per ``BLUR_TUNE`` prefetch, and its recipe, forward and
    forward+backward, from one run."""
    return [
        row for case in cases for row in _tune_case(device, batch, dtypes, layouts, case, _blur_settings, reps, graphs)
    ]


def _max_blur_settings(layout: str) -> list[tuple[str, tuple]]:
    return [(tune_name(shape), ("maxblur", shape)) for shape in MAX_BLUR_TUNE[layout]]


def _blur_settings(layout: str) -> list[tuple[str, tuple]]:
    return [(f"ktk-triton P{p}", ("blur", p)) for p in BLUR_TUNE]


# Per tune table: the ``triton`` module's table its settings replace (an entry per channels_last), and the settings.
TUNED_TABLES = {"max-blur": ("MAX_BLUR_SHAPE", _max_blur_settings), "blur": ("BLUR_PREFETCH", _blur_settings)}


def tune_choices(rows: list[Row], tune: str) -> list[str]:
    """Per layout of a ``tune`` ("max-blur" or "blur") table, the setting with the least geometric mean of its
    forward+backward times over the table's (case, dtype) groups, against the current default: one line each.

    Only settings timed in every group compete (a cut-off run may lack some); one entry per layout serves every
    case and dtype, so the mean weighs each group alike.
    """
    from ..blurpool import triton as kernels

    table, named = TUNED_TABLES[tune]
    lines = []
    for layout in dict.fromkeys(r.layout for r in rows):
        settings = dict(named(layout))
        times: dict[str, dict[tuple, float]] = {}
        for r in rows:
            if r.layout == layout and r.mode == "f+b" and r.impl in settings and r.ms:
                times.setdefault(r.impl, {})[(r.case, r.dtype)] = r.ms
        groups = {group for by_group in times.values() for group in by_group}
        scores = {
            impl: math.exp(sum(math.log(ms) for ms in by_group.values()) / len(by_group))
            for impl, by_group in times.items()
            if len(by_group) == len(groups)
        }
        if not scores:
            lines.append(f"{layout}: no setting was timed in every (case, dtype) group")
            continue
        best = min(scores, key=scores.get)
        value = settings[best][1]
        current = getattr(kernels, table)[layout == "NHWC"]
        default = next((impl for impl, (_, v) in settings.items() if v == current), None)
        against = (
            f"the default {default}: {scores[default]:.3f} ms, {scores[default] / scores[best]:.2f}x"
            if default in scores
            else f"the default {current!r} was not timed in every group"
        )
        lines.append(
            f"{layout}: {best}, f+b geometric mean {scores[best]:.3f} ms over {len(groups)} (case, dtype) groups "
            f"({against}; untimed: {sorted(set(settings) - set(scores)) or 'none'}) -> "
            f"triton.{table}[{layout == 'NHWC'}] = {value!r}"
        )
    return lines


def triton_warm_jobs(dtypes, layouts, cases=RESNET50_CASES, tune=None) -> list[tuple]:
    """Every Triton step a table times, as ``(case, dtype name, layout, setting or None)``: all ``cases``; with
    ``tune="max-blur"``, the first case once per ``MAX_BLUR_TUNE`` shape; with ``tune="blur"``, every case once
    per ``BLUR_TUNE`` prefetch."""
    settings = TUNED_TABLES[tune][1] if tune else lambda layout: [(None, None)]
    jobs = []
    for case in cases[:1] if tune == "max-blur" else cases:
        for dtype in dtypes:
            for layout in layouts:
                jobs += [(case, str(dtype).replace("torch.", ""), layout, s) for _, s in settings(layout)]
    return jobs


def _random(shape: tuple, dtype: torch.dtype, device: str, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device).to(memory_format=memory_format)


def _warm_job(device: str, batch: int, case: tuple, dtype_name: str, layout: str, setting, make=_random) -> None:
    """One Triton step at the table's shape, its forward and its backward launched once each: Triton compiles
    their kernels into the on-disk cache (``~/.triton/cache``), where the timing process finds them. ``make(shape,
    dtype, device, memory_format)`` creates the input and the gradient (``torch.empty`` where launches are only
    recorded: nothing is read, and untouched memory is never committed)."""
    _, channels, size, kind, filt_size, pads = case
    fn = ours(kind, filt_size, pads, "triton")
    if setting is not None:
        fn = with_setting(fn, layout, setting)
    fmt, dtype, out = (
        torch.channels_last if layout == "NHWC" else torch.contiguous_format,
        getattr(torch, dtype_name),
        _out_size(kind, size),
    )
    x = make((batch, channels, size, size), dtype, device, fmt)
    grad = make((batch, channels, out, out), dtype, device, fmt)
    step_for("f+b", fn, lambda: x, lambda: grad)()  # forward and backward on Triton, with fn's setting
    if kind == "maxblur":
        step_for("fwd", fn, lambda: x, lambda: grad)()  # the forward without codes is a kernel of its own
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def warm_triton_cache(device: torch.device, batch: int, jobs: list[tuple], workers: int) -> None:
    """Run ``jobs`` (:func:`triton_warm_jobs`) in ``workers`` processes before timing.

    Triton compiles one kernel at a time per process, and a max-blur kernel takes up to a minute of ptxas; the
    timing loop would pay every compile serially (most of a lease). ``workers`` <= 1 runs them here.
    A job that fails is reported and skipped: its rows fail again when timed, and say so, while the table's other rows
    (most of a lease's results) are kept.
    """
    if workers <= 1:
        for job in jobs:
            try:
                _warm_job(str(device), batch, *job)
            except Exception as error:  # noqa: BLE001 (reported; the timing reports it again per row)
                _report_warm_failure(job, error)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(job, pool.submit(_warm_job, str(device), batch, *job)) for job in jobs]
        for job, done in futures:
            try:
                done.result()
            except Exception as error:  # noqa: BLE001 (a worker that died breaks the pool: each job says so)
                _report_warm_failure(job, error)


def _report_warm_failure(job: tuple, error: Exception) -> None:
    case, dtype_name, layout, setting = job
    setting = "" if setting is None else f" {setting}"
    print(f"warm-up failed: {case[0]} {dtype_name} {layout}{setting}: {type(error).__name__}: {error}", flush=True)


_LOG_LINE = re.compile(
    r"^(?P<case>.+?) \((?P<shape>[\d, ]+)\) (?P<dtype>\w+) (?P<layout>NCHW|NHWC) (?P<mode>fwd|f\+b) "
    r"(?P<impl>[^:]+?): (?P<ms>[\d.eE+-]+)(?: ≠ (?P<mismatch>.+))?$"  # tune names hold a space: "ktk-triton T2xC1"
)


def rows_from_log(text: str) -> list[Row]:
    """The rows a ``python -m ktkernels.bench blurpool`` log printed as it went (``case (shape) dtype layout mode
    impl: ms``), for a run cut off before it wrote its table; error lines are skipped."""
    kinds = {case[0]: case[3] for case in RESNET50_CASES}
    rows = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line.strip())
        if match is None or match["case"] not in kinds:
            continue
        shape = tuple(int(v) for v in match["shape"].split(","))
        es = torch.tensor([], dtype=getattr(torch, match["dtype"])).element_size()
        nbytes = case_bytes(shape, kinds[match["case"]], es, match["mode"])
        rows.append(
            Row(
                "blurpool",
                match["case"],
                shape,
                match["dtype"],
                match["layout"],
                match["mode"],
                match["impl"],
                float(match["ms"]),
                nbytes,
                mismatch=match["mismatch"],
            )
        )
    return rows
