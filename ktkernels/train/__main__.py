"""``python -m ktkernels.train`` (also ``ktk-train``): knowledge-transferred fine-tuning from the command line.

Commands:

* ``--demo`` (or ``demo``): the KTFT miniature on scikit-learn's digits (:mod:`ktkernels.train.demo`);
* ``prepare ROOT --out DIR --per-class K``: decode + resize a K-per-class subset of an ImageFolder once into a
  uint8 cache (:func:`ktkernels.train.data.prepare_cache`);
* ``train --data ROOT|CACHE|digits ...``: fine-tune ``antialias(deepcopy(teacher))`` against the frozen teacher
  (:func:`ktkernels.train.run.train`); the same command runs under ``torchrun --nproc-per-node N``.

Bad input gets one line on stderr and exit status 2, never a traceback. Ctrl-C during ``train`` finishes the
current step, writes a checkpoint and exits with 130; ``--resume`` continues the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from ..losses.reference import GLOBAL_MODES
from .data import DataError
from .demo import DemoSettings, run_demo
from .engine import ANNEALABLE, KTFTConfig
from .models import ModelError

PROG = "ktk-train"
_SUPPRESS = argparse.SUPPRESS


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (the usage text is what --help is for)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------------


def demo_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} --demo", description="The KTFT miniature on scikit-learn's digits.")
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    defaults = DemoSettings()
    p.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs)
    p.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    p.add_argument("--per-class", type=int, default=defaults.per_class, help="K images per class")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--save-teacher", metavar="PATH", help="also save the trained digits teacher (for train --arch demo)"
    )
    return p


def demo_main(argv: list[str]) -> int:
    args = demo_parser().parse_args(argv)
    for name in ("teacher_epochs", "finetune_steps", "per_class"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _fail(f"--device {args.device} but no CUDA GPU is available")
    settings = DemoSettings(
        teacher_epochs=args.teacher_epochs,
        finetune_steps=args.finetune_steps,
        per_class=args.per_class,
        seed=args.seed,
        device=args.device,
        save_teacher=args.save_teacher,
    )
    run_demo(settings)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------


def prepare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} prepare", description="Decode and resize a K-per-class ImageFolder subset once.")
    p.add_argument("root", help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--per-class", type=int, default=None, help="K images per class (default: every image)")
    p.add_argument("--seed", type=int, default=0, help="subset selection seed")
    p.add_argument("--size", type=int, default=256, help="side of the stored (resized, center-cropped) images")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: CPU count)")
    p.add_argument("--min-policy", choices=("error", "warn"), default="error", help="classes with fewer than K")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def prepare_main(argv: list[str]) -> int:
    import os

    from .data import prepare_cache, select_subset

    args = prepare_parser().parse_args(argv)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    start = time.perf_counter()
    subset = select_subset(args.root, args.per_class, args.seed, args.min_policy)
    info = prepare_cache(
        subset, args.out, args.size, workers, overwrite=args.overwrite, progress=not args.no_progress
    )  # fmt: skip
    seconds = time.perf_counter() - start
    print(
        f"prepared {info.num_images} images of {len(info.classes)} classes at {args.size}x{args.size} into "
        f"{args.out} in {seconds:.1f} s ({info.num_images / max(seconds, 1e-9):.0f} img/s)"
    )
    for s in info.skipped:
        print(f"skipped unreadable {s['path']}: {s['error']}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

#: CLI flags that set KTFTConfig fields (the rest set RunConfig fields).
_KTFT_FIELDS = {f.name for f in dataclasses.fields(KTFTConfig)}


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'min,max', got {text!r}") from None
    return lo, hi


def _anneal(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or name.strip() not in ANNEALABLE:
            raise argparse.ArgumentTypeError(f"expected name=end with names in {', '.join(ANNEALABLE)}, got {item!r}")
    return out


def _stages(text: str) -> list[str] | str:
    if text in ("auto", "none"):
        return text
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:  # an empty list would quietly mean plain fine-tuning, which is spelled "none"
        raise argparse.ArgumentTypeError(f"expected module names, auto or none, got {text!r}")
    return names


def train_parser() -> argparse.ArgumentParser:
    """Every option defaults to "not given" (SUPPRESS): RunConfig / KTFTConfig hold the defaults, and a resumed
    run takes its saved values for whatever is not given."""
    p = _Parser(
        prog=f"{PROG} train",
        description="Fine-tune antialias(deepcopy(teacher)) against the frozen teacher (KTFT).",
        argument_default=_SUPPRESS,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits' (embedded, default), an ImageFolder root, or a prepared cache")
    g.add_argument("--val", help="validation ImageFolder root or cache (the digits use their test split)")
    g.add_argument("--per-class", type=int, help="K training images per class (default 25)")
    g.add_argument("--val-per-class", type=int, help="validation images per class (default: all)")
    g.add_argument("--subset-seed", type=int, help="which K images per class (the validation images stay the same)")
    g.add_argument("--min-policy", choices=("error", "warn"), help="a class with fewer than K images")
    g.add_argument(
        "--loader", choices=("cache", "torchvision"), help="uint8 cache + GPU augmentation (default), or PIL"
    )
    g.add_argument("--cache-size", type=int, help="stored image side (default 256; digits 40)")
    g.add_argument("--image-size", type=int, help="training crop side (default 224; digits 36)")
    g.add_argument("--crop-scale", type=_pair, help="RandomResizedCrop area range 'min,max' (default 0.08,1)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--workers", type=int, help="decode processes / DataLoader workers (default: CPU count)")
    g.add_argument("--batch-size", type=int, help="per process (default 64)")
    g.add_argument("--eval-batch-size", type=int)
    m = p.add_argument_group("models")
    m.add_argument("--arch", help="torchvision name, timm:<name> or demo (default resnet50; digits: demo)")
    m.add_argument("--teacher-weights", metavar="PATH", help="the teacher's weights (a local state dict)")
    m.add_argument("--tv-weights", metavar="NAME", help="torchvision weight enum, e.g. IMAGENET1K_V1 (may download)")
    m.add_argument("--new-head", action="store_true", help="fresh student classifier for the data's classes")
    m.add_argument("--stages", type=_stages, help="module names to tap, comma separated; auto (default) or none")
    m.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    o = p.add_argument_group("optimisation (KTFT)")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="default 10")
    length.add_argument("--steps", type=int, help="total optimizer steps (instead of --epochs)")
    o.add_argument("--lr", type=float)
    o.add_argument("--optimizer", choices=("sgd", "adamw"))
    o.add_argument("--momentum", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--schedule", choices=("cosine", "step", "constant"))
    o.add_argument("--step-every", type=int, help="the step schedule's period in steps")
    o.add_argument("--gamma", type=float, help="the step schedule's factor")
    o.add_argument("--warmup-steps", type=int)
    for name in ("w-ce", "w-pixel", "w-global", "w-dct", "w-soft", "temperature"):
        o.add_argument(f"--{name}", type=float)
    o.add_argument("--global-mode", choices=GLOBAL_MODES)
    o.add_argument(
        "--anneal", type=_anneal, metavar="NAME=END,...", help="anneal loss weights linearly to END, e.g. soft=0"
    )
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA (default on)")
    o.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default on")
    o.add_argument("--compile", action="store_true", help="torch.compile the student")
    o.add_argument("--reference", action="store_true", help="every ktkernels op on its pure-PyTorch reference")
    o.add_argument("--seed", type=int)
    r = p.add_argument_group("run")
    r.add_argument("--run-dir", help="where checkpoints, metrics and plots go (default runs/ktft)")
    r.add_argument("--resume", action="store_true", default=False, help="continue the run in --run-dir")
    r.add_argument("--device", help="cuda or cpu (default: cuda if available); torchrun picks cuda:LOCAL_RANK")
    r.add_argument("--checkpoint-every", type=int, help="steps (default 500)")
    r.add_argument("--eval-every", type=int, help="epochs (default 1)")
    r.add_argument("--log-every", type=int, help="steps per metrics row (default 10)")
    r.add_argument("--metrics", choices=("jsonl", "csv"))
    r.add_argument("--tensorboard", action="store_true")
    r.add_argument("--no-plots", dest="plots", action="store_false")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--stop-after", type=int, help="stop with a checkpoint after this step (resume later)")
    return p


def train_overrides(args: argparse.Namespace) -> dict:
    """The options given on the command line, as RunConfig keyword arguments (KTFT ones under ``"ktft"``)."""
    given = {k: v for k, v in vars(args).items() if k != "resume"}
    ktft = {k: given.pop(k) for k in list(given) if k in _KTFT_FIELDS and k != "stages"}
    return {**given, "ktft": ktft} if ktft else given


def train_main(argv: list[str]) -> int:
    from .run import RunConfig, resume_config, train

    args = train_parser().parse_args(argv)
    overrides = train_overrides(args)
    if args.resume:
        run_dir = overrides.get("run_dir", RunConfig.run_dir)
        config = resume_config(run_dir, {**overrides, "run_dir": run_dir})
    else:
        steps = getattr(args, "steps", None)  # absent when not given (the parser suppresses defaults)
        if steps is not None and steps < 1:  # 0 is KTFTConfig's "not given": refuse it here
            raise ValueError(f"--steps must be an integer >= 1, got {steps}")
        ktft = KTFTConfig(**{"steps": 0, **overrides.pop("ktft", {})})
        config = RunConfig(**overrides, ktft=ktft)
    result = train(config, resume=args.resume)
    return 130 if result.status == "interrupted" else 0


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": demo_main, "prepare": prepare_main, "train": train_main}
    if argv and argv[0] in commands:
        command, rest = commands[argv[0]], argv[1:]
    elif "--demo" in argv:
        command, rest = demo_main, argv
    elif argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    else:
        return _fail("give a command: --demo, prepare or train (see python -m ktkernels.train --help)")
    try:
        return command(rest)
    except (DataError, ModelError, ValueError) as e:
        return _fail(str(e))
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:  # a path's bad
        return _fail(f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
