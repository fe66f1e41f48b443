"""End-to-end benchmark: one ResNet training step, anti-aliased with ktkernels vs the PyTorch recipe vs the floor.

``python -m ktkernels.bench model`` times forward + cross-entropy + backward + SGD(momentum) step on synthetic
data (fixed random batch, 1000 classes), channels_last, in these variants, all in one process and one run:

- ``plain``: torchvision ResNet, no anti-aliasing (what anti-aliasing costs on top of);
- ``aa-recipe``: the adobe placement with antialiased-cnns' own recipe (reflect pad, then a depthwise conv with
  the fixed binomial filter; the stem's ``MaxPool2d(2, 1)`` and its blur unfused);
- ``aa-ktk``: the same model as built by :func:`ktkernels.compat.antialias.antialias`, eager (fused ops);
- ``aa-ktk+compile``: ``torch.compile(model)`` of that model (forward and backward graphs through AOTAutograd;
  the loss, ``backward()`` call and the optimizer step stay eager around it);
- ``aa-recipe+compile``: the recipe model under ``torch.compile(model)``, the thing to beat under compile;
- ``aa-floor``: the same placement with every blur replaced by free subsampling ``x[..., ::s, ::s]`` (same output
  shapes; the stem max pool stays). No blur implementation can beat it: the stride-1 convolutions the
  placement moves the stride out of are what it costs over ``plain``.

Variants 2 and 5 are derived from the ktkernels model by :func:`swap_blur_layers`, so all anti-aliased variants
share one placement. Timing: every variant is warmed up (compiles happen there), then the variants are timed
in interleaved rounds (so that clock, thermal and neighbour drift hit them alike) and each variant's per-step
samples are pooled: CUDA events around each synchronised step on GPU, ``perf_counter`` on CPU; medians reported.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blurpool import BlurLayer, MaxThenBlur
from ..blurpool.geometry import binomial_filter2d, binomial_taps, output_size
from . import harness

VARIANTS: dict[str, str] = {
    "plain": "torchvision model, no anti-aliasing",
    "aa-recipe": "antialiased-cnns recipe: reflect pad + depthwise conv; stem MaxPool2d(2,1) + blur unfused",
    "aa-ktk": "ktkernels layers, eager (stem max-blur fused)",
    "aa-ktk+compile": "ktkernels layers, torch.compile(model)",
    "aa-recipe+compile": "recipe layers, torch.compile(model)",
    "aa-floor": "every blur replaced by x[..., ::s, ::s] (stem max pool kept): the placement's floor",
}
COMPILED = ("aa-ktk+compile", "aa-recipe+compile")


# ----------------------------------------------------------------------------------------------------------------
# Layer swaps: the recipe and the floor, derived from the ktkernels anti-aliased model


class RecipeBlur(nn.Module):
    """antialiased-cnns' ``BlurPool`` forward: ``F.pad`` then a depthwise conv with a (C, 1, k, k) filter buffer.

    The filter is materialised per channel, as antialiased-cnns keeps it (so the recipe pays what it pays:
    under autocast the fp32 buffer is cast to bf16 on every call). With ``channels=None`` it is expanded from
    one copy at call time.
    """

    def __init__(
        self, channels: int | None, filt_size: int, stride: int, padding: list[int], pad_mode: str, spatial_dims: int
    ) -> None:
        super().__init__()
        if spatial_dims == 2:
            filt = binomial_filter2d(filt_size)[None, None]
        else:
            filt = torch.tensor(binomial_taps(filt_size), dtype=torch.float32)[None, None]
        self.register_buffer("filt", filt.repeat(channels or 1, *([1] * (filt.dim() - 1))))
        self.stride = stride
        self.padding = list(padding)
        self.mode = "constant" if pad_mode == "zero" else pad_mode
        self.spatial_dims = spatial_dims

    @classmethod
    def from_layer(cls, layer: BlurLayer) -> RecipeBlur:
        """The recipe with ``layer``'s blur geometry (its max pool, if fused, is the caller's business)."""
        return cls(
            _channels(layer), layer._filt_size, layer._stride, layer._padding, layer._pad_mode, layer._spatial_dims
        )

    def forward(self, x: Tensor) -> Tensor:
        filt = self.filt
        if filt.shape[0] != x.shape[1]:
            filt = filt[:1].expand(x.shape[1], *filt.shape[1:])
        conv = F.conv2d if self.spatial_dims == 2 else F.conv1d
        return conv(F.pad(x, self.padding, mode=self.mode), filt, stride=self.stride, groups=x.shape[1])

    def extra_repr(self) -> str:
        return f"channels={self.filt.shape[0]}, stride={self.stride}, padding={self.padding}, mode={self.mode!r}"


class _Subsample(torch.autograd.Function):
    """``x[(..., *index)]`` whose backward scatters into a gradient laid out like ``x``.

    Autograd's own slice backward allocates a contiguous (NCHW) zero gradient, so in a channels_last network
    every layer upstream of a slice would back-propagate a mixed layout and pay conversions; a floor must not
    pay costs the blur layers do not.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: tuple) -> Tensor:  # type: ignore[override]
        ctx.index = index
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
        ctx.x_meta = (x.shape, x.dtype, x.device, fmt)
        return x[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        shape, dtype, device, fmt = ctx.x_meta
        grad_x = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_()  # the input's layout
        grad_x[ctx.index] = grad
        return grad_x, None


class Subsample(nn.Module):
    """``x[..., ::s, ::s]`` cropped to the blur's output size: the blur layer's shapes at zero cost (a view).

    ``format_preserving=False`` uses autograd's slice backward (contiguous gradient), for comparison.
    """

    def __init__(
        self, filt_size: int, stride: int, padding: list[int], spatial_dims: int, format_preserving: bool = True
    ) -> None:
        super().__init__()
        self.filt_size = filt_size
        self.stride = stride
        self.padding = list(padding)  # F.pad order: last axis first
        self.spatial_dims = spatial_dims
        self.format_preserving = format_preserving

    @classmethod
    def from_layer(cls, layer: BlurLayer) -> Subsample:
        return cls(layer._filt_size, layer._stride, layer._padding, layer._spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        index: list[slice] = []
        for d in range(self.spatial_dims):  # d counts from the last axis, as the pads do
            size = x.shape[-1 - d]
            before, after = self.padding[2 * d], self.padding[2 * d + 1]
            out = output_size(size, self.filt_size, self.stride, before, after)
            if (size + self.stride - 1) // self.stride < out:
                raise ValueError(f"subsampling {size} by {self.stride} gives fewer than the blur's {out} outputs")
            index.insert(0, slice(0, out * self.stride, self.stride))
        if self.format_preserving and x.requires_grad:
            return _Subsample.apply(x, (..., *index))
        return x[(..., *index)]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, format_preserving={self.format_preserving}"


def _channels(layer: BlurLayer) -> int | None:
    """The channel count a blur layer was built for: its check attribute, else its anchor's filter buffer."""
    expected = getattr(layer, "_expected_channels", 0)
    if expected:
        return int(expected)
    filt = getattr(layer, "filt", None)
    return int(filt.shape[0]) if isinstance(filt, Tensor) and filt.dim() >= 3 and filt.shape[0] > 1 else None


def swap_blur_layers(model: nn.Module, make: Callable[[BlurLayer], nn.Module]) -> nn.Module:
    """Replace, in place, every ktkernels blur layer in ``model`` by ``make(layer)`` and return the model.

    Generic over module trees: any :class:`~ktkernels.blurpool.BlurLayer` (compat flavours included) becomes
    ``make(layer)``; a fused max-blur layer (``_max_kernel > 1``) becomes ``Sequential(MaxPool2d(k, 1, p),
    make(layer))`` and a :class:`~ktkernels.blurpool.MaxThenBlur` a plain ``Sequential`` of its max pool and
    ``make(blur)``, i.e. the unfused antialiased-cnns stem. ``make`` sees only the blur geometry
    (``_filt_size``, ``_stride``, ``_padding``, ``_pad_mode``, ``_spatial_dims``).
    """

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, MaxThenBlur):
            return nn.Sequential(*(convert(child) for child in module))
        if isinstance(module, BlurLayer):
            replacement = make(module)
            if module._max_kernel > 1:
                return nn.Sequential(nn.MaxPool2d(module._max_kernel, 1, module._max_padding), replacement)
            return replacement
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = convert(child)  # keeps the child's position (Sequential order)
        return module

    return convert(model)


def to_recipe(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ktkernels blur layer replaced by antialiased-cnns' recipe."""
    return swap_blur_layers(copy.deepcopy(model), RecipeBlur.from_layer)


def to_floor(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every blur replaced by free subsampling (fused stems keep their max pool)."""
    return swap_blur_layers(copy.deepcopy(model), Subsample.from_layer)


def count_blur_layers(model: nn.Module) -> int:
    return sum(isinstance(m, BlurLayer) for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Models and the training step


def build_models(arch: str, variants: list[str], filt_size: int = 4, num_classes: int = 1000) -> dict[str, nn.Module]:
    """The requested variants on CPU, each its own copy (own parameters and optimizer state)."""
    import torchvision

    from ..compat.antialias import antialias

    torch.manual_seed(0)
    factory = getattr(torchvision.models, arch)
    aa = antialias(factory(weights=None, num_classes=num_classes), placement="adobe", filt_size=filt_size)
    if count_blur_layers(aa) == 0:
        raise RuntimeError("antialias() returned a model without ktkernels blur layers")
    models: dict[str, nn.Module] = {}
    for name in variants:
        if name == "plain":
            models[name] = factory(weights=None, num_classes=num_classes)
        elif name in ("aa-ktk", "aa-ktk+compile"):
            models[name] = copy.deepcopy(aa)
        elif name in ("aa-recipe", "aa-recipe+compile"):
            models[name] = to_recipe(aa)
        elif name == "aa-floor":
            models[name] = to_floor(aa)
        else:
            raise ValueError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    return models


@dataclasses.dataclass
class Trainer:
    """One variant's model, optimizer and step closure on a shared synthetic batch."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    state_bytes: int  # parameters + momentum: what the variant holds between steps


def make_trainer(
    name: str, model: nn.Module, x: Tensor, y: Tensor, amp: torch.dtype | None, compile_model: bool
) -> Trainer:
    model = model.to(device=x.device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # small lr: random data must not diverge
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Trainer(name, model, step, 2 * params)  # SGD momentum keeps one buffer per parameter


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Result:
    variant: str
    description: str
    ms: float | None = None  # median step time
    p10_ms: float | None = None
    p90_ms: float | None = None
    samples: int = 0
    img_s: float | None = None
    x_floor: float | None = None  # ms / floor ms
    vs_recipe: float | None = None  # recipe (eager) ms / ms
    vs_recipe_compiled: float | None = None  # recipe+compile ms / ms
    peak_gib: float | None = None
    first_step_s: float | None = None  # wall time of the first step: compile time for compiled variants
    error: str | None = None


@dataclasses.dataclass
class Config:
    device: str
    arch: str
    batch: int
    image_size: int
    amp: str  # bf16 | none
    steps: int
    rounds: int
    warmup: int
    variants: list[str]
    filt_size: int = 4


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def run(cfg: Config) -> list[Result]:
    """Warm up every variant, then time them in interleaved rounds; returns one Result per variant."""
    device = torch.device(cfg.device)
    gpu = device.type == "cuda"
    amp = torch.bfloat16 if cfg.amp == "bf16" else None
    results = {name: Result(name, VARIANTS[name]) for name in cfg.variants}
    t0 = time.perf_counter()
    models = build_models(cfg.arch, cfg.variants, cfg.filt_size)
    print(f"built {len(models)} models in {time.perf_counter() - t0:.1f} s", flush=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (cfg.batch,), generator=gen).to(device)
    batch_bytes = x.numel() * x.element_size() + y.numel() * y.element_size()

    trainers: dict[str, Trainer] = {}
    for name, model in models.items():
        res = results[name]
        try:
            trainer = make_trainer(name, model, x, y, amp, name in COMPILED)
            for i in range(max(cfg.warmup, 2)):  # >= 2: momentum buffers exist before memory is measured
                if gpu and i == max(cfg.warmup, 2) - 1:
                    # The last warm-up step measures peak memory. Other variants' weights are resident too, so
                    # count only what this step adds (activations, grads, workspace) plus this variant's state.
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                trainer.step()
                if gpu:
                    torch.cuda.synchronize()
                if i == 0:
                    res.first_step_s = time.perf_counter() - t
                    print(f"  {name}: first step {res.first_step_s:.1f} s", flush=True)
            if gpu:
                added = torch.cuda.max_memory_allocated(device) - before
                res.peak_gib = (added + trainer.state_bytes + batch_bytes) / 2**30
            trainers[name] = trainer
        except Exception as exc:  # a failing variant is a result too (recorded, not fatal)
            res.error = _error(exc)
            print(f"  {name}: {res.error}", flush=True)

    samples: dict[str, list[float]] = {name: [] for name in trainers}
    per_round = max(1, math.ceil(cfg.steps / cfg.rounds))
    for r in range(cfg.rounds):
        for name, trainer in trainers.items():
            if results[name].error:
                continue
            try:
                samples[name] += harness.sample_ms(trainer.step, device, per_round)
            except Exception as exc:
                results[name].error = _error(exc)
        done = {n: f"{statistics.median(s):.1f}" for n, s in samples.items() if s}
        print(f"round {r + 1}/{cfg.rounds}: median ms so far {done}", flush=True)

    for name, times in samples.items():
        res = results[name]
        if times and not res.error:
            res.samples = len(times)
            res.ms, res.p10_ms, res.p90_ms = harness.median_and_deciles(times)
            res.img_s = cfg.batch / res.ms * 1e3
    ref = {name: results[name].ms for name in ("aa-floor", "aa-recipe", "aa-recipe+compile") if name in results}
    for res in results.values():
        if res.ms:
            res.x_floor = res.ms / ref["aa-floor"] if ref.get("aa-floor") else None
            res.vs_recipe = ref["aa-recipe"] / res.ms if ref.get("aa-recipe") else None
            res.vs_recipe_compiled = ref["aa-recipe+compile"] / res.ms if ref.get("aa-recipe+compile") else None
    return list(results.values())


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


# The setup the targets were set for (design.md); other setups get no verdicts.
TARGET_SETUP = {"arch": "resnet50", "batch": 128, "image_size": 224, "amp": "bf16"}


def at_target_setup(cfg: Config) -> bool:
    return cfg.device.startswith("cuda") and all(getattr(cfg, k) == v for k, v in TARGET_SETUP.items())


def targets(results: list[Result]) -> list[str]:
    """The GPU targets (design: ktk AA step within 5% of the floor, >= 1.7x the recipe, beats it under compile)."""
    by = {r.variant: r for r in results}
    ktk, comp = by.get("aa-ktk"), by.get("aa-ktk+compile")
    lines = []
    if ktk and ktk.ms and ktk.x_floor:
        ok = "met" if ktk.x_floor <= 1.05 else "not met"
        lines.append(f"- aa-ktk vs floor: {100 * (ktk.x_floor - 1):+.1f}% (target <= +5%: {ok})")
    if ktk and ktk.ms and ktk.vs_recipe:
        ok = "met" if ktk.vs_recipe >= 1.7 else "not met"
        lines.append(f"- aa-ktk speed-up over the eager recipe: {ktk.vs_recipe:.2f}x (target >= 1.7x: {ok})")
    if comp and comp.ms and comp.vs_recipe_compiled:
        ok = "met" if comp.vs_recipe_compiled > 1 else "not met"
        lines.append(f"- aa-ktk+compile vs aa-recipe+compile: {comp.vs_recipe_compiled:.2f}x (target > 1x: {ok})")
    return lines


def markdown(results: list[Result], env: dict, cfg: Config) -> str:
    gpu = cfg.device.startswith("cuda")
    head = (
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
        f"{env['date']}\n\n"
        f"{cfg.arch} training step (forward + cross-entropy + backward + SGD momentum step), batch {cfg.batch}, "
        f"{cfg.image_size}x{cfg.image_size}, 1000 classes, channels_last, "
        f"{'bf16 autocast' if cfg.amp == 'bf16' else 'fp32 (no autocast)'}, synthetic data. Anti-aliasing: "
        f"adobe placement, filt_size={cfg.filt_size}, reflect. Times: {env['timing']}; median of "
        f"{max((r.samples for r in results), default=0)} steps per variant over {cfg.rounds} interleaved rounds, "
        f"after {max(cfg.warmup, 2)} warm-up steps{' (cudnn.benchmark on)' if gpu else ''}. "
        "`x floor` = ms / aa-floor ms; `vs recipe` / `vs recipe+compile` = that variant's ms / ms; "
        "`first step s`: wall time of the first step, torch.compile included (inductor's on-disk cache makes "
        f"reruns fast){'; `peak GiB`: this variant alone (weights, momentum, grads, step peak)' if gpu else ''}."
        "\n\n"
    )
    cols = ["variant", "ms/step", "p10-p90 ms", "img/s", "x floor", "vs recipe", "vs recipe+compile"]
    cols += ["peak GiB"] if gpu else []
    cols += ["first step s", "what"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if r.error:
            cells = [r.variant, f"error: {r.error}", *[""] * (len(cols) - 3), r.description]
        else:
            cells = [
                r.variant,
                _fmt(r.ms, ".1f"),
                f"{r.p10_ms:.1f}-{r.p90_ms:.1f}" if r.p10_ms is not None else "",
                _fmt(r.img_s, ".0f"),
                _fmt(r.x_floor, ".3f"),
                _fmt(r.vs_recipe, ".2f", "x"),
                _fmt(r.vs_recipe_compiled, ".2f", "x"),
                *([_fmt(r.peak_gib, ".2f")] if gpu else []),
                _fmt(r.first_step_s, ".1f"),
                r.description,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    checks = targets(results) if at_target_setup(cfg) else []
    tail = ("\n\nTargets (set for the H100, resnet50 at batch 128 in bf16):\n" + "\n".join(checks)) if checks else ""
    return head + "\n".join(lines) + tail + "\n"


def plot(results: list[Result], path: Path, title: str) -> None:
    """ms/step per variant, with the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.ms]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(timed) + 1.2))
    ax.barh([r.variant for r in timed], [r.ms for r in timed], color="tab:blue")
    for i, r in enumerate(timed):
        ax.text(r.ms, i, f" {r.ms:.1f}", va="center", fontsize=8)
    floor = next((r.ms for r in timed if r.variant == "aa-floor"), None)
    if floor:
        ax.axvline(floor, color="grey", ls="--", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[Result], env: dict, cfg: Config, out_dir: Path, stem: str) -> str:
    table = markdown(results, env, cfg)
    payload = {"env": env, "config": dataclasses.asdict(cfg), "results": [dataclasses.asdict(r) for r in results]}
    title = f"{cfg.arch} batch {cfg.batch} train step on {env['device']}"
    harness.save(out_dir, stem, payload, table, lambda path: plot(results, path, title))
    return table


# ----------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ktkernels.bench model",
        description="ResNet training step: plain, anti-aliased (recipe, ktkernels eager/compiled) and the floor.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="torchvision ResNet name; default resnet50 (GPU), resnet18 (CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (GPU), 8 (CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (GPU), 128 (CPU)")
    parser.add_argument("--amp", choices=["bf16", "none"], default=None, help="autocast dtype; default bf16 (GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 30 (GPU), 12 (CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds the steps are split into")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (compiles happen here)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the torch.compile variants; default: on for GPU or an explicit --variants list, else off",
    )
    parser.add_argument("--no-compile-recipe", action="store_true", help="skip only aa-recipe+compile")
    parser.add_argument("--variants", default=None, help=f"comma list out of {','.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default=None, help="result file name stem; default model_<device>")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    # An explicit --variants list is taken as asked; otherwise compile by default only on GPU (cold inductor
    # compiles of a training step take over a minute per model on the 2-core CPU machine).
    if not (args.compile if args.compile is not None else gpu or args.variants is not None):
        variants = [v for v in variants if v not in COMPILED]
    if args.no_compile_recipe:
        variants = [v for v in variants if v != "aa-recipe+compile"]
    if not variants:
        parser.error("no variant left to run")
    steps = args.steps or ((10 if args.quick else 30) if gpu else (4 if args.quick else 12))
    cfg = Config(
        device=str(device),
        arch=args.arch or ("resnet50" if gpu else "resnet18"),
        batch=args.batch or (128 if gpu else 8),
        image_size=args.image_size or (224 if gpu else 128),
        amp=args.amp or ("bf16" if gpu else "none"),
        steps=steps,
        rounds=min(steps, args.rounds or (2 if args.quick else (6 if gpu else 4))),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 2),
        variants=variants,
    )
    if gpu:
        torch.backends.cudnn.benchmark = True  # as real training runs: pick the fastest conv algorithms per shape
    env = harness.environment(device)
    env["timing"] = (
        "CUDA events around each synchronised step"
        if gpu
        else f"wall clock (perf_counter), {env['cpu_threads']} threads"
    )
    env["cudnn_benchmark"] = bool(gpu)
    print(f"config: {dataclasses.asdict(cfg)}", flush=True)
    t0 = time.perf_counter()
    results = run(cfg)
    env["total_s"] = round(time.perf_counter() - t0, 1)
    tag = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_") if gpu else "cpu"
    print(write(results, env, cfg, args.out, args.stem or f"model_{tag}"))
    print(f"total {env['total_s']} s", flush=True)


if __name__ == "__main__":
    main()
