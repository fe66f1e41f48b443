"""Timing, bandwidth accounting and report writing shared by every benchmark family.

Rules (design.md): all compared implementations run in one process, one after the other, on the same
inputs; GPU times are medians of CUDA-event timings after warm-up, with inputs rotated when they fit
in L2; achieved bandwidth is reported against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import backend


@dataclasses.dataclass
class Row:
    family: str
    case: str  # e.g. "adobe k4 L2 down"
    shape: tuple
    dtype: str
    layout: str  # NCHW | NHWC
    mode: str  # fwd | f+b
    impl: str  # ktk-triton | ktk-cuda | ktk-cpu | adobe | timm | adobe+compile | ...
    ms: float | None
    bytes: int
    gbps: float | None = None
    pct_copy: float | None = None
    error: str | None = None
    mismatch: str | None = None  # how its result differs from the group's first implementation (see agreement)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    return statistics.median(sample_ms(fn, device, reps))


def sample_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """``reps`` timings of ``fn`` in ms, no warm-up: CUDA events on GPU (synchronised per call), else perf_counter.

    Split out of :func:`median_ms` so that callers that interleave implementations in rounds can pool samples.
    """
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def graph_median_ms(fn: Callable[[], object], calls: int = 10, reps: int = 10) -> float:
    """Device time of ``fn`` on CUDA: ``calls`` invocations captured in one CUDA graph, replayed.

    Replaying removes host (Python, dispatcher, launcher) time between kernels, which would otherwise
    dominate sub-0.2 ms ops; every implementation in a table is timed the same way.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compiles, caches, allocator pools
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def time_row(row: Row, step: Callable[[], object], device: torch.device, reps: int, graphs: bool, warmup: int) -> None:
    """Set ``row.ms``: :func:`graph_median_ms` on CUDA with ``graphs``, else :func:`median_ms`. A step that raises
    sets ``row.error`` instead: a failing implementation is a result too (recorded, not fatal)."""
    try:
        if device.type == "cuda" and graphs:
            row.ms = graph_median_ms(step)
        else:
            row.ms = median_ms(step, device, warmup=warmup, reps=reps)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def timing_note(device: torch.device, eager: bool) -> str:
    """How a kernel table's times were taken (its header line): :func:`graph_median_ms` or :func:`median_ms`."""
    if device.type != "cuda":
        return "wall clock (perf_counter), median"
    if eager:
        return "CUDA events around eager calls, host overhead included"
    return "device time: 10 calls captured in a CUDA graph, median of 10 replays"


def median_and_deciles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of step times; one sample is all three."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, median, median
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return median, deciles[0], deciles[-1]


def step_for(
    mode: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: Callable[[], torch.Tensor],
    grads: Callable[[], torch.Tensor],
) -> Callable[[], object]:
    """The timed call: ``fn`` on the next input ("fwd"), or ``fn`` then its vjp w.r.t. that input ("f+b").

    A ``fn`` with a ``backend`` attribute (see :func:`on_backend`) runs its forward *and* backward on that
    ktkernels backend: the backward ops pick their backend when autograd calls them, outside ``fn``. Likewise
    a ``setting`` attribute (a context manager factory) holds over the whole step.
    """
    name, setting = getattr(fn, "backend", None), getattr(fn, "setting", None)
    if mode == "fwd":
        step = lambda: fn(inputs())  # noqa: E731
    else:

        def step() -> object:
            x = inputs().detach().requires_grad_()
            return torch.autograd.grad(fn(x), x, grads())

    if name is None and setting is None:
        return step

    def within() -> object:
        with (
            backend.use_backend(name) if name else contextlib.nullcontext(),
            setting() if setting else contextlib.nullcontext(),
        ):
            return step()

    return within


# Largest |result - first implementation's result| / max |first|, by dtype, above which a row is flagged. fp32 allows
# for TF32 convolutions and matmuls (torch's default for cuDNN convolutions), the 16-bit types for a rounding or two.
AGREEMENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 3e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for part in result for t in _tensors(part)]
    return []


def agreement(steps: dict[str, Callable[[], object]], dtype: torch.dtype) -> dict[str, str]:
    """Run each step once and compare its tensors (output, or input gradients) with the first step's.

    The steps must see the same inputs (a fixed input, not :func:`rotating`). Returns ``{impl: what differs}``
    for the implementations whose results differ by more than ``AGREEMENT_TOLERANCE`` (relative to the first
    one's largest magnitude), or fail to run, so that a table never compares different work unnoticed. The first
    step is the reference: if it is the one that is wrong, every other row is flagged.
    """
    results: dict[str, list[torch.Tensor] | str] = {}
    for impl, step in steps.items():
        try:
            results[impl] = [t.detach().double() for t in _tensors(step())]
        except Exception as exc:  # timing records the error itself
            results[impl] = f"{type(exc).__name__}"
    names = list(results)
    if not names or isinstance(results[names[0]], str):
        return {}
    first, tol = results[names[0]], AGREEMENT_TOLERANCE.get(dtype, 1e-2)
    found = {}
    for impl in names[1:]:
        got = results[impl]
        if isinstance(got, str):
            continue
        if [t.shape for t in got] != [t.shape for t in first]:
            found[impl] = f"shapes {[tuple(t.shape) for t in got]} vs {[tuple(t.shape) for t in first]} of {names[0]}"
            continue
        ratios = []
        for a, b in zip(got, first, strict=True):
            scale = b.abs().max().item() if b.numel() else 0.0
            err = (a - b).abs().max().item() if b.numel() else 0.0
            ratios.append(err / scale if scale > 0 else err)
        worst = math.nan if any(math.isnan(r) for r in ratios) else max(ratios, default=0.0)  # max() drops NaN
        if not worst <= tol:
            found[impl] = f"differs from {names[0]} by {worst:.1e} of its largest value (tolerance {tol:.0e})"
    return found


def ms_cell(row: Row, notes: list[str]) -> str:
    """A time cell: ms, or ``error [k]``; a mismatch appends ``≠ [k]``. ``notes`` collects the texts (k is 1-based)."""

    def ref(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    if not row.ms:
        return f"error {ref(row.error or 'not run')}"
    return f"{row.ms:.3f}" + (f" ≠ {ref(f'{row.impl}: {row.mismatch}')}" if row.mismatch else "")


def on_backend(name: str, fn: Callable) -> Callable:
    """``fn`` run under the ktkernels backend ``name``, tagged so that :func:`step_for` runs its backward there too."""

    def run(*args, **kwargs):
        with backend.use_backend(name):
            return fn(*args, **kwargs)

    run.backend = name
    return run


def fixed_step(mode: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    """:func:`step_for` on one input (and one random output gradient), for pytest-benchmark cases."""
    grad = torch.randn_like(fn(x))
    return step_for(mode, fn, lambda: x, lambda: grad)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Device copy bandwidth, counting bytes read plus bytes written."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, reps=20 if device.type == "cuda" else 7)
    return 2 * nbytes / ms / 1e6


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache (Linux sysfs; 32 MiB where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


MAX_INPUT_COPIES = 64


def rotating(make: Callable[[], object], nbytes: int, device: torch.device) -> Callable[[], object]:
    """Copies of the inputs, cycled, enough to fill three times the last-level cache (the GPU's L2, the CPU's
    L3), so that a small working set is read from memory, as the copy bandwidth it is compared with is; at most
    ``MAX_INPUT_COPIES`` (inputs of a few kB, as in the tests, are not worth 10^4 copies)."""
    cache = last_level_cache_bytes(device)
    copies = [make() for _ in range(min(MAX_INPUT_COPIES, max(1, math.ceil(3 * cache / max(nbytes, 1)))))]
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_inputs


def source_commit() -> str:
    """``KTK_COMMIT`` when set (a copy of the tree without its ``.git``, as on a lent GPU box), else the commit of
    the checkout this package runs from, ``-dirty`` when its files differ from it; "unknown" without git."""
    if os.environ.get("KTK_COMMIT"):
        return os.environ["KTK_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": source_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def finish(rows: Sequence[Row], copy_gbps: float) -> None:
    for row in rows:
        if row.ms:
            row.gbps = row.bytes / row.ms / 1e6
            row.pct_copy = 100 * row.gbps / copy_gbps


def comparison_cells(
    by_impl: dict[str, Row], impls: Sequence[str], recipes: Sequence[str], errors: list[str]
) -> tuple[list[str], Row | None, dict[str, float | None]]:
    """One table row's cells for a group of implementations of one case: each implementation's ms (or
    ``error [k]``, its text appended to ``errors``), the best ktk row's GB/s and % of copy, and the speed-up of
    that row over each recipe. Returns (cells, best ktk row, {recipe: speed-up or None})."""
    cells = []
    for impl in impls:
        r = by_impl.get(impl)
        cells.append("" if r is None else ms_cell(r, errors))
    timed = [r for i, r in by_impl.items() if i.startswith("ktk") and r.ms]
    best = min(timed, key=lambda r: r.ms) if timed else None
    cells += [f"{best.gbps:.0f} ({best.impl})" if best else "", f"{best.pct_copy:.0f}%" if best else ""]
    speedups = {}
    for recipe in recipes:
        r = by_impl.get(recipe)
        speedups[recipe] = r.ms / best.ms if best and r and r.ms else None
        cells.append(f"{speedups[recipe]:.1f}x" if speedups[recipe] else "")
    return cells, best, speedups


def markdown(rows: Sequence[Row], env: dict, copy_gbps: float, baseline: str) -> str:
    """One line per (case, shape, dtype, layout, mode); ms per implementation, then our best vs baseline."""
    impls = list(dict.fromkeys(r.impl for r in rows))
    ours = [i for i in impls if i.startswith("ktk")]
    head = (
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
        f"{env['date']}\n\nMeasured copy bandwidth: {copy_gbps:.0f} GB/s (read + write). Times are medians in ms"
        f" ({env.get('timing', 'wall clock')}).\n\n"
    )
    cols = ["case", "shape", "dtype", "layout", "mode", *impls, "best ktk GB/s", "% of copy", f"speed-up vs {baseline}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    notes: list[str] = []  # errors and mismatches, listed under the table
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.case, r.shape, r.dtype, r.layout, r.mode), {})[r.impl] = r
    for key, by_impl in groups.items():
        cells = [key[0], "x".join(map(str, key[1])), key[2], key[3], key[4]]
        for impl in impls:
            r = by_impl.get(impl)
            cells.append("" if r is None else ms_cell(r, notes))
        timed = [by_impl[i] for i in ours if i in by_impl and by_impl[i].ms]
        best = min(timed, key=lambda r: r.ms) if timed else None
        base = by_impl.get(baseline)
        cells += [
            f"{best.gbps:.0f} ({best.impl})" if best else "",
            f"{best.pct_copy:.0f}%" if best else "",
            f"{base.ms / best.ms:.1f}x" if best and base and base.ms else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    listed = "".join(f"- [{k}] {text}\n" for k, text in enumerate(notes, 1))  # after a blank line: not a table row
    return head + "\n".join(lines) + "\n" + ("\n" + listed if notes else "")


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """% of copy bandwidth per case and implementation; one panel per (dtype, layout, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r.impl for r in rows))
    panels = list(dict.fromkeys((r.dtype, r.layout, r.mode) for r in rows))
    cases = list(dict.fromkeys(r.case for r in rows))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.2 * nrows), squeeze=False, sharey=True)
    width = 0.8 / max(len(impls), 1)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for k, impl in enumerate(impls):
            values = []
            for case in cases:
                match = [r for r in rows if (r.dtype, r.layout, r.mode) == panel and r.case == case and r.impl == impl]
                values.append((match[0].pct_copy or 0) if match else 0)
            ax.bar([i + k * width for i in range(len(cases))], values, width, label=impl)
        ax.set_title(" ".join(panel), fontsize=9)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.axhline(80, color="grey", lw=0.6, ls="--")
        ax.set_ylabel("% of copy bandwidth", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(json_path: Path) -> None:
    """Redraw a committed result's PNG from its JSON (no device needed)."""
    payload = json.loads(Path(json_path).read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in payload["rows"]]
    plot(rows, Path(json_path).with_suffix(".png"), f"{Path(json_path).stem} on {payload['env']['device']}")


def save(out_dir: Path, stem: str, payload: dict, table: str, plot_fn: Callable[[Path], None]) -> None:
    """Write ``stem``.json / .md and, when matplotlib is there, the plot ``plot_fn(path)`` draws."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{stem}.md").write_text(table)
    try:
        plot_fn(out_dir / f"{stem}.png")
    except ImportError:
        pass


def write(
    rows: Sequence[Row], env: dict, copy_gbps: float, out_dir: Path, stem: str, baseline: str, notes: Sequence[str] = ()
) -> str:
    """Save the rows (JSON, markdown, plot) under ``out_dir``/``stem``; ``notes`` follow the table as a list."""
    table = markdown(rows, env, copy_gbps, baseline)
    if notes:
        table += "\n" + "".join(f"- {note}\n" for note in notes)
    payload = {"env": env, "copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows]}
    save(out_dir, stem, payload, table, lambda path: plot(rows, path, f"{stem} on {env['device']}"))
    return table
