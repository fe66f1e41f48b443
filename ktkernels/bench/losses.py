"""Transfer-loss benchmark: the ktkernels losses vs the unfused PyTorch recipes and torch.compile.

``python -m ktkernels.bench losses`` times, on ResNet-50's four stage outputs (layer1 256x56², layer2 512x28²,
layer3 1024x14², layer4 2048x7²) at batch 128 (GPU; 4 on CPU), fp32 and bf16, channels_last (``--layouts``),
forward and forward+backward, one training step's loss summed over the four stages:

- ``pixel+global``: ``ktk-<backend>`` = ``PixelGlobalTransferLoss()`` (w_pixel = w_global = 1, 'gap') on dicts
  of the four stages; ``pytorch`` = ``sum_l mse(s_l, t_l) + mse(s_l.mean((2, 3)), t_l.mean((2, 3)))``,
  computed in the features' dtype as a user writes it (bf16 features: bf16 loss); ``pytorch+compile`` its
  ``torch.compile``;
- ``dct-kd``: ``DCTAttentionLoss(variant='a')`` (no sample weights) against ``official``, the DCT-KD authors'
  variant-A pipeline written from methods.md §5 (per stage and sample: ``A = mean_c F^2``, ``(A - min) / max``,
  minus the mean, ``R = |Re fft(fft(Z, dim=H), dim=W)|``, ``(R - min) / max``, ``d = ||D_s - D_t||_2``; mean
  over samples, sum over stages); the map steps run in the features' dtype, the FFT in fp32 for bf16 (torch.fft
  has no bf16 kernels; under autocast it runs in fp32 too), and ``official+compile``;
- ``at``: ``attention_transfer_loss(s, t, 2, 'code')`` summed over stages against ``pytorch``,
  ``(normalize(s.pow(2).mean(1).flatten(1)) - normalize(t.pow(2).mean(1).flatten(1))).pow(2).mean()`` summed,
  and ``pytorch+compile``;
- ``soft-target``: (4096, 1000) logits ((256, 1000) on CPU), T = 4: ``soft_target_loss`` against ``pytorch``,
  ``kl_div(log_softmax(s / T), softmax(t / T), reduction='batchmean') * T²``, and ``pytorch+compile``.

``fwd`` runs the loss on inputs that need no gradient; ``f+b`` gives the student features (logits) a gradient
and takes the loss's gradient w.r.t. them; the teacher's never needs one. Every implementation of one (case,
dtype, layout) runs in the same process on the same inputs, rotated when they fit in L2. A ktkernels backend is
timed only if a tiny forward+backward probe of that case succeeds; otherwise the report says why it is left out.

Bytes (the floor that the GB/s and "% of copy" columns use): fwd = s read + t read; f+b = s read + t read +
grad_s written (the issue's floor: "read s and t, write grad s"). A fused design that reads s and t again in
its backward moves more than this floor, so it cannot reach 100% of copy on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import ktkernels

from .. import backend
from . import harness
from .harness import Row, rotating

# ResNet-50's stage outputs at 224 px: (name, channels, size).
RESNET50_STAGES = [("layer1", 256, 56), ("layer2", 512, 28), ("layer3", 1024, 14), ("layer4", 2048, 7)]
CASES = ("pixel+global", "dct-kd", "at", "soft-target")
QUICK_CASES = ("pixel+global", "soft-target")
LOGITS = {"cuda": (4096, 1000), "cpu": (256, 1000)}
LOGITS_LAYOUT = "rows"  # the layout column of the soft-target rows: (N, K) logits, row-major
TEMPERATURE = 4.0
# The recipe columns of each case (the eager recipe first: it is the speed-up baseline).
RECIPES = {
    "pixel+global": ("pytorch", "pytorch+compile"),
    "dct-kd": ("official", "official+compile"),
    "at": ("pytorch", "pytorch+compile"),
    "soft-target": ("pytorch", "pytorch+compile"),
}
TITLES = {
    "pixel+global": "pixel+global: PixelGlobalTransferLoss() vs sum_l mse(s, t) + mse(GAP(s), GAP(t))",
    "dct-kd": "dct-kd: DCTAttentionLoss(variant='a') vs the DCT-KD authors' variant-A pipeline",
    "at": "at: attention_transfer_loss(s, t, 2, 'code') vs (normalize(mean_c s²) - normalize(mean_c t²))².mean()",
    "soft-target": f"soft-target: soft_target_loss(s, t, {TEMPERATURE:g}) vs kl_div(log_softmax, softmax) * T², "
    "batchmean",
}

Features = list[torch.Tensor]
LossFn = Callable[[Features, Features], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# The recipes: each takes lists of student and teacher tensors (one per stage; one logits pair for soft-target)


def pixel_global_recipe(students: Features, teachers: Features) -> torch.Tensor:
    """KTFT's pixel + global (GAP) loss, unfused, as a user writes it: in the features' dtype, summed over stages.

    >>> s = [torch.ones(2, 3, 4, 4)]
    >>> float(pixel_global_recipe(s, [torch.zeros(2, 3, 4, 4)]))
    2.0
    """
    total = None
    for s, t in zip(students, teachers, strict=True):
        loss = F.mse_loss(s, t) + F.mse_loss(s.mean((2, 3)), t.mean((2, 3)))
        total = loss if total is None else total + loss
    return total


def _dct_kd_coefficients(features: torch.Tensor) -> torch.Tensor:
    """DCT-KD variant A, per sample: (N, C, H, W) features -> (N, H*W) normalised |Re DFT2| coefficients.

    ``A = mean_c F^2``; ``(A - min) / max``; ``Z = A - mean(A)``; ``R = |Re fft(fft(Z, dim=H), dim=W)|``;
    ``(R - min) / max`` (no clamps: the authors' pipeline gives NaN for a constant map). The FFT runs in fp32
    for fp16/bf16 maps (torch.fft has no bf16 kernels; autocast runs it in fp32 as well).
    """
    n, _, h, w = features.shape
    a = features.pow(2).mean(1).flatten(1)
    a = (a - a.min(1, keepdim=True).values) / a.max(1, keepdim=True).values
    z = (a - a.mean(1, keepdim=True)).view(n, h, w)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    r = torch.fft.fft(torch.fft.fft(z, dim=1), dim=2).real.abs().flatten(1)
    return (r - r.min(1, keepdim=True).values) / r.max(1, keepdim=True).values


def dct_kd_recipe(students: Features, teachers: Features) -> torch.Tensor:
    """The DCT-KD authors' loss (variant A, no teacher-correct mask): ``sum_l mean_n ||D_s - D_t||_2``."""
    total = None
    for s, t in zip(students, teachers, strict=True):
        loss = (_dct_kd_coefficients(s) - _dct_kd_coefficients(t)).pow(2).sum(1).sqrt().mean()
        total = loss if total is None else total + loss
    return total


def at_recipe(students: Features, teachers: Features) -> torch.Tensor:
    """Attention transfer, the authors' code: ``sum_l mean (normalize(mean_c s²) - normalize(mean_c t²))²``."""
    total = None
    for s, t in zip(students, teachers, strict=True):
        q_s = F.normalize(s.pow(2).mean(1).flatten(1))
        q_t = F.normalize(t.pow(2).mean(1).flatten(1))
        loss = (q_s - q_t).pow(2).mean()
        total = loss if total is None else total + loss
    return total


def soft_target_recipe(students: Features, teachers: Features) -> torch.Tensor:
    """Hinton's soft targets as written in most codebases: ``kl_div(..., reduction='batchmean') * T²``."""
    (s,), (t,) = students, teachers
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.softmax(t / TEMPERATURE, 1), reduction="batchmean")
    return kl * (TEMPERATURE * TEMPERATURE)


RECIPE_FNS: dict[str, LossFn] = {
    "pixel+global": pixel_global_recipe,
    "dct-kd": dct_kd_recipe,
    "at": at_recipe,
    "soft-target": soft_target_recipe,
}


# ----------------------------------------------------------------------------------------------------------------
# ktkernels


class Impl(NamedTuple):
    """A loss to time, and the ktkernels backend (None for a recipe) selected around its forward and backward.

    The backend must cover the backward too: the losses' backward ops resolve their backend when they run.
    """

    fn: LossFn
    backend: str | None = None


def ours(case: str) -> LossFn:
    """The ktkernels loss of ``case`` on lists of stage features (or one logits pair), under the current backend."""
    if case == "pixel+global":
        module = ktkernels.PixelGlobalTransferLoss()
        return lambda ss, ts: module(_stages(ss), _stages(ts)).total
    if case == "dct-kd":
        module = ktkernels.DCTAttentionLoss(variant="a")
        return lambda ss, ts: module(_stages(ss), _stages(ts)).total
    if case == "at":
        return lambda ss, ts: sum(
            ktkernels.attention_transfer_loss(s, t, 2, "code") for s, t in zip(ss, ts, strict=True)
        )
    if case == "soft-target":
        return lambda ss, ts: ktkernels.soft_target_loss(ss[0], ts[0], TEMPERATURE)
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def _stages(features: Features) -> dict[str, torch.Tensor]:
    return {f"layer{k + 1}": f for k, f in enumerate(features)}


def loss_step(mode: str, impl: Impl, inputs: Callable[[], tuple[Features, Features]]) -> Callable[[], object]:
    """The timed call: the loss on the next inputs ("fwd"), or the loss and its gradient w.r.t. the student ("f+b")."""

    def scope():
        return backend.use_backend(impl.backend) if impl.backend else contextlib.nullcontext()

    if mode == "fwd":

        def forward() -> object:
            with scope():
                return impl.fn(*inputs())

        return forward

    def forward_backward() -> object:
        students, teachers = inputs()
        students = [s.detach().requires_grad_() for s in students]
        with scope():
            return torch.autograd.grad(impl.fn(students, teachers), students)

    return forward_backward


def _probe_inputs(case: str, device: torch.device) -> tuple[Features, Features]:
    if case == "soft-target":
        return [torch.randn(3, 10, device=device)], [torch.randn(3, 10, device=device)]
    shapes = [(2, 4, 7, 7), (2, 8, 4, 4)]
    make = [lambda s=s: torch.rand(s, device=device).to(memory_format=torch.channels_last) for s in shapes]
    return [m() for m in make], [m() for m in make]


def default_candidates(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cuda") if device.type == "cuda" else ("cpu",)


@functools.cache
def available_backends(
    device: torch.device, case: str, candidates: tuple[str, ...] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(backends that run ``case`` on ``device``, why each other candidate was left out).

    Each candidate runs the case's loss forward and backward once on tiny inputs: the backend check
    (``backend.resolve``) only knows whether a backend exists, not whether its loss kernels were built.
    """
    names, skipped = [], []
    for name in candidates or default_candidates(device):
        try:
            loss_step("f+b", Impl(ours(case), name), lambda: _probe_inputs(case, device))()
        except Exception as exc:  # whatever stops a backend (missing kernels, missing op) leaves it out
            skipped.append(f"ktk-{name} ({case}): {type(exc).__name__}: {str(exc).splitlines()[0][:240]}")
            continue
        names.append(name)
    return tuple(names), tuple(skipped)


def implementations(
    case: str, device: torch.device, compile_recipe: bool, candidates: tuple[str, ...] | None = None
) -> dict[str, Impl]:
    """Our backends that can run ``case`` on ``device``, then the recipe (and its compiled form)."""
    impls = {f"ktk-{name}": Impl(ours(case), name) for name in available_backends(device, case, candidates)[0]}
    eager, compiled = RECIPES[case]
    impls[eager] = Impl(RECIPE_FNS[case])
    if compile_recipe:
        # A fresh Dynamo cache per (case, dtype, layout): past the recompile limit (8) Dynamo would silently run
        # the recipe eagerly under the "+compile" name.
        torch._dynamo.reset()
        impls[compiled] = Impl(torch.compile(RECIPE_FNS[case], dynamic=False))
    return impls


# ----------------------------------------------------------------------------------------------------------------
# Timing


def _features(shapes: Sequence[tuple], dtype: torch.dtype, device: torch.device, layout: str) -> Callable:
    """Student and teacher features: post-ReLU (non-negative) like the stage outputs; logits: standard normal."""
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format

    def one(shape: tuple) -> torch.Tensor:
        if len(shape) == 2:
            return torch.randn(shape, dtype=dtype, device=device)
        return torch.randn(shape, dtype=dtype, device=device).relu_().to(memory_format=fmt)

    return lambda: ([one(s) for s in shapes], [one(s) for s in shapes])


def _time_case(
    case: str,
    shape: tuple,
    shapes: Sequence[tuple],
    dtype: torch.dtype,
    layout: str,
    impls: dict[str, Impl],
    device: torch.device,
    reps: int,
    graphs: bool,
) -> list[Row]:
    """Every implementation of one (case, dtype, layout), forward then forward+backward, on shared inputs."""
    es = torch.tensor([], dtype=dtype).element_size()
    n = sum(math.prod(s) for s in shapes)
    inputs = rotating(_features(shapes, dtype, device, layout), 2 * n * es, device)
    bytes_by_mode = {"fwd": 2 * n * es, "f+b": 3 * n * es}
    dtype_name = str(dtype).replace("torch.", "")
    rows = []
    features = inputs()  # one input for the agreement check: every implementation computes the same
    for mode in ("fwd", "f+b"):
        differs = harness.agreement(
            {name: loss_step(mode, impl, lambda: features) for name, impl in impls.items()}, dtype
        )
        for name, impl in impls.items():
            step = loss_step(mode, impl, inputs)
            row = Row("losses", case, shape, dtype_name, layout, mode, name, None, bytes_by_mode[mode])
            row.mismatch = differs.get(name)
            harness.time_row(row, step, device, reps, graphs, warmup=2)
            rows.append(row)
            print(f"losses {case} {dtype_name} {layout} {mode} {name}: {row.ms or row.error}", flush=True)
    return rows


def run(
    device: torch.device,
    batch: int,
    dtypes: Sequence[torch.dtype],
    layouts: Sequence[str],
    compile_recipe: bool,
    cases: Sequence[str] = CASES,
    stages: Sequence[tuple] = RESNET50_STAGES,
    logits: tuple[int, int] | None = None,
    reps: int = 20,
    graphs: bool = True,
    candidates: tuple[str, ...] | None = None,
) -> list[Row]:
    """Rows of every (case, dtype, layout, mode, implementation). ``logits``: the soft-target (N, K), default
    (4096, 1000) on GPU, (256, 1000) on CPU; ``candidates``: the ktkernels backends to try (default triton and
    cuda on GPU, cpu on CPU)."""
    rows: list[Row] = []
    logits = logits or LOGITS["cuda" if device.type == "cuda" else "cpu"]
    for case in cases:
        if case == "soft-target":
            shapes, shape = [tuple(logits)], tuple(logits)
        else:
            shapes = [(batch, c, h, h) for _, c, h in stages]
            shape = (batch, *((c, h, h) for _, c, h in stages))
        for dtype in dtypes:
            for layout in [LOGITS_LAYOUT] if case == "soft-target" else layouts:
                impls = implementations(case, device, compile_recipe, candidates)
                rows += _time_case(case, shape, shapes, dtype, layout, impls, device, reps, graphs)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report


def target(case: str, dtype: str, mode: str) -> tuple[float | None, dict[str, float]] | None:
    """The H100 target of a row: (% of copy or None, {recipe: min speed-up}), None where the issue sets none.

    pixel+global and dct-kd f+b >= 75% of copy; their bf16 f+b >= 8x the eager recipe; soft-target f+b >= 3x.

    >>> target("dct-kd", "bfloat16", "f+b")
    (75.0, {'official': 8.0})
    """
    if mode != "f+b":
        return None
    pct = 75.0 if case in ("pixel+global", "dct-kd") else None
    wanted = {}
    if case in ("pixel+global", "dct-kd") and dtype == "bfloat16":
        wanted[RECIPES[case][0]] = 8.0
    if case == "soft-target":
        wanted["pytorch"] = 3.0
    return (pct, wanted) if pct is not None or wanted else None


def shape_text(shape: Sequence) -> str:
    """``128x{256x56²,512x28²,...}`` for stage cases, ``4096x1000`` for logits."""
    if all(isinstance(d, int) for d in shape):
        return "x".join(map(str, shape))
    stages = ",".join(f"{c}x{h}²" if h == w else f"{c}x{h}x{w}" for c, h, w in shape[1:])
    return f"{shape[0]}x{{{stages}}}"


def _table(rows: Sequence[Row], recipes: Sequence[str], targets: bool, errors: list[str]) -> list[str]:
    impls = list(dict.fromkeys(r.impl for r in rows))
    base = [i for i in recipes if i in impls]
    cols = ["shape", "dtype", "layout", "mode", *impls, "best ktk GB/s", "% of copy"]
    cols += [f"vs {b}" for b in base]
    cols += ["H100 target", "met"] if targets else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.case, shape_text(r.shape), r.dtype, r.layout, r.mode), {})[r.impl] = r
    for key, by_impl in groups.items():
        compared, best, speedups = harness.comparison_cells(by_impl, impls, base, errors)
        cells = [*key[1:], *compared]
        if targets:
            goal = target(key[0], key[2], key[4])
            if goal is None:
                cells += ["", ""]
            else:
                pct, wanted = goal
                text = ([f">= {pct:.0f}% copy"] if pct is not None else []) + [
                    f">= {v:.0f}x {k}" for k, v in wanted.items()
                ]
                ok = best is not None and (pct is None or best.pct_copy >= pct)
                ok = ok and all(speedups.get(k) is not None and speedups[k] >= v for k, v in wanted.items())
                cells += [", ".join(text), "yes" if ok else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: Sequence[Row], env: dict, copy_gbps: float) -> str:
    """One table per case: ms per implementation, our best's bandwidth, speed-up per recipe; on GPU the H100
    targets and whether this run met them. Failing implementations show ``error [k]``, listed under the tables."""
    gpu = env.get("device_type") == "cuda"
    errors: list[str] = []
    out = [
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
        f"{env['date']}",
        "",
        f"Measured copy bandwidth: {copy_gbps:.0f} GB/s (read + write). Times are medians in ms "
        f"({env.get('timing', 'wall clock')}). Each stage case sums the loss over the four ResNet-50 stage "
        "outputs in one step. GB/s and % of copy count s read + t read (fwd) and + grad_s written (f+b); "
        "the teacher needs no gradient.",
    ]
    for note in env.get("notes", []):
        out.append(f"\nNote: {note}")
    for case in list(dict.fromkeys(r.case for r in rows)):
        out += ["", f"### {TITLES.get(case, case)}", ""]
        out += _table([r for r in rows if r.case == case], RECIPES.get(case, ()), targets=gpu, errors=errors)
    if errors:
        out += ["", "Errors and mismatches:", ""] + [f"{k + 1}. `{e}`" for k, e in enumerate(errors)]
    return "\n".join(out) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """:func:`harness.plot` with the soft-target bars (logits have no layout) drawn in every layout's panels."""
    layouts = [x for x in dict.fromkeys(r.layout for r in rows) if x != LOGITS_LAYOUT] or [LOGITS_LAYOUT]
    shown = [r for r in rows if r.layout != LOGITS_LAYOUT]
    shown += [dataclasses.replace(r, layout=x) for r in rows if r.layout == LOGITS_LAYOUT for x in layouts]
    harness.plot(shown, path, title)


def write(rows: Sequence[Row], env: dict, copy_gbps: float, out_dir: Path, stem: str) -> str:
    table = markdown(rows, env, copy_gbps)
    payload = {"env": env, "copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows]}
    harness.save(out_dir, stem, payload, table, lambda path: plot(rows, path, f"{stem} on {env['device']}"))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ktkernels.bench losses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 4 on CPU")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list")
    parser.add_argument("--layouts", default="NHWC", help="comma list of NCHW, NHWC (soft-target: row-major logits)")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma list of ktkernels backends to try; default triton,cuda (GPU), cpu (CPU); 'torch' adds the "
        "reference implementation",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile of the recipes; default on (GPU), off (CPU: a cold inductor compile per case)",
    )
    parser.add_argument("--eager", action="store_true", help="time eager calls (host overhead included), not graphs")
    parser.add_argument("--quick", action="store_true", help="pixel+global and soft-target only, fewer reps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 4)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    compile_recipe = gpu if args.compile is None else args.compile
    candidates = tuple(args.backends.split(",")) if args.backends else default_candidates(device)
    cases = QUICK_CASES if args.quick else CASES
    env = harness.environment(device)
    env["device_type"] = device.type
    env["timing"] = harness.timing_note(device, args.eager)
    env["notes"] = [note for case in cases for note in available_backends(device, case, candidates)[1]]
    if not compile_recipe:
        env["notes"].append("the +compile recipes not run (--no-compile, the CPU default)")
    copy_gbps = harness.copy_bandwidth_gbps(device)
    reps = 5 if args.quick else (20 if gpu else 7)
    rows = run(
        device,
        batch,
        dtypes,
        args.layouts.split(","),
        compile_recipe,
        cases,
        reps=reps,
        graphs=not args.eager,
        candidates=candidates,
    )
    harness.finish(rows, copy_gbps)
    tag = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_") if gpu else "cpu"
    print(write(rows, env, copy_gbps, args.out, f"losses_{tag}{'_eager' if args.eager and gpu else ''}"))
