"""DCT family benchmark: ``ktkernels.dct2d`` and ``dct_attention_map`` vs the PyTorch recipes and torch.compile.

``python -m ktkernels.bench dct`` times, on ResNet-50's stage outputs at batch 128 (224 px training: 56, 28, 14,
7; FFCV's 192 px: 48, 24, 12, 6), fp32 and bf16, NCHW and channels_last, forward and forward+backward:

- ``ktk-<backend>``: ``ktkernels.dct2d(x)`` with each backend that can run on the device (triton, cuda; cpu);
- ``matmul``: ``D_h @ X @ D_w.T`` with the orthonormal DCT-II basis in x's dtype (baselines.md's recipe);
- ``matmul+compile``: ``torch.compile`` of that recipe;
- ``fft``: torch-dct's FFT recipe (Makhoul 1980), written here from the math; torch's FFT rejects bf16,
  so in bf16 its row records the error.

and, on the four 224 px stage shapes, ``ktkernels.dct_attention_map(x)`` (DCT-II of the channel mean of x**2,
(N, C, H, W) -> (N, H, W) fp32) against the recipe ``mean_C(x**2)`` then the fp32 matmul DCT (``matmul``) and
its compiled form. Every implementation of one (case, dtype, layout) runs in the same process on the same inputs.

Bytes (the floor that the GB/s and "% of copy" columns use): dct2d forward = input read + output written,
forward+backward adds the output gradient read + the input gradient written (the DCT is linear: its backward
is an inverse DCT that needs no saved activation). The attention map's backward, ``2 x idct(g) / C``, must read
x again, so its forward+backward counts x twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import ktkernels

from .. import backend
from . import harness
from .harness import Row, rotating

# (case, channels, size): ResNet-50 stage outputs at 224 px, then at FFCV's 192 px training resolution.
RESNET50_CASES = [
    ("layer1 224px", 256, 56),
    ("layer2 224px", 512, 28),
    ("layer3 224px", 1024, 14),
    ("layer4 224px", 2048, 7),
    ("layer1 ffcv", 256, 48),
    ("layer2 ffcv", 512, 24),
    ("layer3 ffcv", 1024, 12),
    ("layer4 ffcv", 2048, 6),
]
# Named apart from the dct2d cases: the shared plot keys its bars on the case name.
ATTENTION_CASES = [(f"attn {case}", channels, size) for case, channels, size in RESNET50_CASES[:4]]
QUICK_CASES = ("layer1 224px", "layer4 224px", "attn layer1 224px", "attn layer4 224px")
RECIPES = ("matmul", "matmul+compile", "fft")


# ----------------------------------------------------------------------------------------------------------------
# The recipes


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II basis ``D`` (n, n): ``D[k, i] = s_k cos(pi (2i + 1) k / (2n))``.

    ``s_0 = sqrt(1/n)``, ``s_k = sqrt(2/n)``, so ``D @ D.T = I`` and ``D @ x`` is ``scipy.fft.dct(x, norm='ortho')``.
    Built in float64 and rounded once to ``dtype``.

    >>> d = dct_matrix(8)
    >>> torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64))
    True
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def matmul_recipe(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> D_h @ x @ D_w.T``: 2-D orthonormal DCT-II over the last two dims, in ``dtype``.

    The bases are built once per case, as a user of the recipe keeps them in buffers (and so that
    torch.compile sees constants, not a cos() in every call).
    """
    d_h, d_w_t = dct_matrix(h, dtype, device), dct_matrix(w, dtype, device).T

    def run(x: torch.Tensor) -> torch.Tensor:
        return d_h @ x @ d_w_t

    return run


def dct2d_matmul(x: torch.Tensor) -> torch.Tensor:
    """The matmul recipe for one call: ``(..., H, W) -> (..., H, W)`` orthonormal 2-D DCT-II.

    >>> x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    >>> torch.allclose(dct2d_matmul(x), dct2d_fft(x))
    True
    """
    return matmul_recipe(x.shape[-2], x.shape[-1], x.dtype, x.device)(x)


def _dct1d_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim by Makhoul's algorithm, as torch-dct computes it.

    ``v = (x_0, x_2, ..., x_3, x_1)`` (even samples, then the odd ones reversed), ``V = FFT(v)``,
    ``X_k = Re(V_k exp(-i pi k / (2N)))``, then ortho scaling ``sqrt(1/N)`` for k = 0 and ``sqrt(2/N)`` otherwise.
    The twiddles and scales are rebuilt in x's dtype on every call, as torch-dct does.
    """
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(v, dim=-1)
    angle = torch.arange(n, dtype=x.dtype, device=x.device) * (-math.pi / (2 * n))
    real = spectrum.real * torch.cos(angle) - spectrum.imag * torch.sin(angle)
    scale = torch.full((n,), math.sqrt(2 / n), dtype=x.dtype, device=x.device)
    scale[0] = math.sqrt(1 / n)
    return real * scale


def dct2d_fft(x: torch.Tensor) -> torch.Tensor:
    """torch-dct's ``dct_2d(x, norm='ortho')`` recipe: the 1-D FFT DCT along W, then along H (via a transpose).

    Raises for bf16 inputs: ``torch.fft`` has no bf16 kernels (the benchmark records that error).
    """
    return _dct1d_fft(_dct1d_fft(x).transpose(-1, -2)).transpose(-1, -2)


def attention_recipe(h: int, w: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """DCT-KD's attention map, p = 2: ``mean_C(x**2)`` accumulated in fp32, then the fp32 matmul DCT.

    ``(N, C, H, W) -> (N, H, W)`` float32, what ``ktkernels.dct_attention_map(x)`` returns.
    """
    dct = matmul_recipe(h, w, torch.float32, device)

    def run(x: torch.Tensor) -> torch.Tensor:
        return dct(x.pow(2).mean(1, dtype=torch.float32))

    return run


# ----------------------------------------------------------------------------------------------------------------
# ktkernels


def has_api() -> bool:
    """Whether this ktkernels build has the DCT ops (``dct2d`` and ``dct_attention_map``)."""
    return hasattr(ktkernels, "dct2d") and hasattr(ktkernels, "dct_attention_map")


def ours(op: str, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ktkernels.<op>`` (``dct2d`` or ``dct_attention_map``) on a named backend."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return getattr(ktkernels, op)(x)

    return harness.on_backend(name, run)


@functools.cache
def available_backends(device: torch.device) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(backends that run the DCT ops on ``device``, why each other candidate was left out).

    Each candidate runs both ops once on a tiny input: the backend check (``backend.resolve``) only knows
    whether a backend exists, not whether its DCT kernels were built.
    """
    if not has_api():
        return (), ("ktkernels has no dct2d / dct_attention_map in this build",)
    names, skipped = [], []
    probe = torch.randn(2, 4, 7, 7, device=device)
    for name in ("triton", "cuda") if device.type == "cuda" else ("cpu",):
        try:
            with backend.use_backend(name):
                backend.resolve("dct", device)
            ours("dct2d", name)(probe)
            ours("dct_attention_map", name)(probe)
        except Exception as exc:  # whatever stops a backend (missing kernels, missing op) leaves it out
            skipped.append(f"ktk-{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:240]}")
            continue
        names.append(name)
    return tuple(names), tuple(skipped)


def implementations(op: str, device: torch.device, h: int, w: int, dtype: torch.dtype, compile_recipe: bool) -> dict:
    """Our backends that can run on ``device``, then the recipes (and the compiled matmul recipe) for ``op``."""
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        f"ktk-{name}": ours(op, name) for name in available_backends(device)[0]
    }
    recipe = matmul_recipe(h, w, dtype, device) if op == "dct2d" else attention_recipe(h, w, device)
    impls["matmul"] = recipe
    if compile_recipe:
        # A fresh Dynamo cache per case: every case shares the closure's code object, and past the recompile
        # limit (8) Dynamo would silently run the recipe eagerly under the "+compile" name.
        torch._dynamo.reset()
        impls["matmul+compile"] = torch.compile(recipe, dynamic=False)
    if op == "dct2d":
        impls["fft"] = dct2d_fft
    return impls


# ----------------------------------------------------------------------------------------------------------------
# Timing


def _time_impls(
    family: str,
    case: str,
    shape: tuple,
    dtype: torch.dtype,
    layout: str,
    impls: dict,
    inputs: Callable[[], torch.Tensor],
    grads: Callable[[], torch.Tensor],
    bytes_by_mode: dict[str, int],
    device: torch.device,
    reps: int,
    graphs: bool,
) -> list[Row]:
    """Every implementation of one (case, dtype, layout), forward then forward+backward, on shared inputs."""
    rows = []
    dtype_name = str(dtype).replace("torch.", "")
    x0, g0 = inputs(), grads()  # one input for the agreement check: every implementation computes the same
    for mode in ("fwd", "f+b"):
        fixed = {impl: harness.step_for(mode, fn, lambda: x0, lambda: g0) for impl, fn in impls.items()}
        differs = harness.agreement(fixed, dtype)
        for impl, fn in impls.items():
            step = harness.step_for(mode, fn, inputs, grads)
            row = Row(family, case, shape, dtype_name, layout, mode, impl, None, bytes_by_mode[mode])
            row.mismatch = differs.get(impl)
            harness.time_row(row, step, device, reps, graphs, warmup=2)
            rows.append(row)
            print(f"{family} {case} {shape} {dtype_name} {layout} {mode} {impl}: {row.ms or row.error}", flush=True)
    return rows


def _layout_tensor(shape: tuple, dtype: torch.dtype, device: torch.device, layout: str) -> Callable[[], torch.Tensor]:
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    return lambda: torch.randn(shape, dtype=dtype, device=device).to(memory_format=fmt)


def run(
    device: torch.device,
    batch: int,
    dtypes: Sequence[torch.dtype],
    layouts: Sequence[str],
    compile_recipe: bool,
    cases: Sequence[tuple] = RESNET50_CASES,
    attention_cases: Sequence[tuple] = ATTENTION_CASES,
    reps: int = 20,
    graphs: bool = True,
) -> list[Row]:
    """dct2d rows (family ``dct``) on ``cases``, then dct_attention_map rows (``dct_attention``)."""
    rows: list[Row] = []
    for family, op, op_cases in (("dct", "dct2d", cases), ("dct_attention", "dct_attention_map", attention_cases)):
        for case, channels, size in op_cases:
            shape = (batch, channels, size, size)
            n = math.prod(shape)
            for dtype in dtypes:
                es = torch.tensor([], dtype=dtype).element_size()
                for layout in layouts:
                    inputs = rotating(_layout_tensor(shape, dtype, device, layout), n * es, device)
                    if op == "dct2d":
                        grads = rotating(_layout_tensor(shape, dtype, device, layout), n * es, device)
                        bytes_by_mode = {"fwd": 2 * n * es, "f+b": 4 * n * es}
                    else:
                        n_map = batch * size * size  # the fp32 (N, H, W) map
                        map_shape = (batch, size, size)
                        grads = rotating(lambda s=map_shape: torch.randn(s, device=device), 4 * n_map, device)
                        fwd = n * es + 4 * n_map
                        bytes_by_mode = {"fwd": fwd, "f+b": fwd + 4 * n_map + 2 * n * es}
                    impls = implementations(op, device, size, size, dtype, compile_recipe)
                    rows += _time_impls(
                        family, case, shape, dtype, layout, impls, inputs, grads, bytes_by_mode, device, reps, graphs
                    )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report


def target(row_key: tuple) -> tuple[float, dict[str, float]] | None:
    """The H100 target of a dct2d (case, shape, dtype, layout, mode) row: (% of copy, {recipe: min speed-up}).

    >= 80% of copy bandwidth for maps of 14 and up, >= 60% below (7x7, and FFCV's 12x12 and 6x6);
    >= 10x the FFT recipe in fp32; >= 3x the matmul recipe at 7x7 (and 6x6).
    """
    _, shape, dtype, _, _ = row_key
    size = shape[-1]
    speedups = {"fft": 10.0} if dtype == "float32" else {}
    if size <= 7:
        speedups["matmul"] = 3.0
    return (80.0 if size >= 14 else 60.0), speedups


def _table(rows: Sequence[Row], recipes: Sequence[str], targets: bool, met: bool, errors: list[str]) -> list[str]:
    impls = list(dict.fromkeys(r.impl for r in rows))
    base = [i for i in recipes if i in impls]
    cols = ["case", "shape", "dtype", "layout", "mode", *impls, "best ktk GB/s", "% of copy"]
    cols += [f"vs {b}" for b in base]
    cols += (["H100 target"] + (["met"] if met else [])) if targets else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.case, tuple(r.shape), r.dtype, r.layout, r.mode), {})[r.impl] = r
    for key, by_impl in groups.items():
        compared, best, speedups = harness.comparison_cells(by_impl, impls, base, errors)
        cells = [key[0], "x".join(map(str, key[1])), key[2], key[3], key[4], *compared]
        if targets:
            pct, wanted = target(key)
            cells.append(", ".join([f">= {pct:.0f}% copy"] + [f">= {v:.0f}x {k}" for k, v in wanted.items()]))
            if met:
                ok = best is not None and best.pct_copy >= pct
                ok = ok and all(speedups.get(k) is not None and speedups[k] >= v for k, v in wanted.items())
                cells.append("yes" if ok else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: Sequence[Row], env: dict, copy_gbps: float) -> str:
    """Two tables (dct2d; dct_attention_map), ms per implementation, our best's bandwidth, speed-ups per recipe.

    Failing implementations show ``error [k]``; the error texts are listed under the tables.
    """
    gpu = env.get("device_type") == "cuda"
    errors: list[str] = []
    out = [
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
        f"{env['date']}",
        "",
        f"Measured copy bandwidth: {copy_gbps:.0f} GB/s (read + write). Times are medians in ms "
        f"({env.get('timing', 'wall clock')}). GB/s and % of copy count input read + output written "
        "(f+b adds grad read + grad_input written; the attention map's f+b also re-reads x).",
    ]
    for note in env.get("notes", []):
        out.append(f"\nNote: {note}")
    dct_rows = [r for r in rows if r.family == "dct"]
    if dct_rows:
        out += ["", "### dct2d(x), orthonormal DCT-II over (H, W)", ""]
        out += _table(dct_rows, RECIPES, targets=True, met=gpu, errors=errors)
    attn_rows = [r for r in rows if r.family == "dct_attention"]
    if attn_rows:
        out += [
            "",
            "### dct_attention_map(x, p=2) -> (N, H, W) fp32; matmul = mean_C(x**2) in fp32, then D_h A D_w^T",
            "",
        ]
        out += _table(attn_rows, RECIPES, targets=False, met=False, errors=errors)
    if errors:
        out += ["", "Errors and mismatches:", ""] + [f"{k + 1}. `{e}`" for k, e in enumerate(errors)]
    return "\n".join(out) + "\n"


def write(rows: Sequence[Row], env: dict, copy_gbps: float, out_dir: Path, stem: str) -> str:
    table = markdown(rows, env, copy_gbps)
    payload = {"env": env, "copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows]}
    harness.save(out_dir, stem, payload, table, lambda path: harness.plot(rows, path, f"{stem} on {env['device']}"))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ktkernels.bench dct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 8 on CPU")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list")
    parser.add_argument("--layouts", default="NCHW,NHWC")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile of the matmul recipe; default on (GPU), off (CPU: a cold inductor compile per case)",
    )
    parser.add_argument("--eager", action="store_true", help="time eager calls (host overhead included), not graphs")
    parser.add_argument("--quick", action="store_true", help="layer1 and layer4 at 224 px only, fewer reps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 8)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    compile_recipe = gpu if args.compile is None else args.compile
    cases, attention_cases = RESNET50_CASES, ATTENTION_CASES
    if args.quick:
        cases = [c for c in cases if c[0] in QUICK_CASES]
        attention_cases = [c for c in attention_cases if c[0] in QUICK_CASES]
    env = harness.environment(device)
    env["device_type"] = device.type
    env["timing"] = harness.timing_note(device, args.eager)
    env["notes"] = list(available_backends(device)[1])
    if not compile_recipe:
        env["notes"].append("matmul+compile not run (--no-compile, the CPU default)")
    copy_gbps = harness.copy_bandwidth_gbps(device)
    reps = 5 if args.quick else (20 if gpu else 7)
    rows = run(
        device, batch, dtypes, args.layouts.split(","), compile_recipe, cases, attention_cases, reps, not args.eager
    )
    harness.finish(rows, copy_gbps)
    tag = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_") if gpu else "cpu"
    print(write(rows, env, copy_gbps, args.out, f"dct_{tag}{'_eager' if args.eager and gpu else ''}"))
