"""``python -m ktkernels.train --demo``: the KTFT miniature on scikit-learn's digits (see :mod:`ktkernels.train.demo`).

Bad input gets one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .data import DataError
from .demo import DemoSettings, run_demo
from .models import ModelError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ktkernels.train", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="run the digits miniature of the KTFT experiment")
    defaults = DemoSettings()
    parser.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs)
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    parser.add_argument("--per-class", type=int, default=defaults.per_class, help="K images per class")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.demo:
        print(
            "ktk-train: error: only --demo is available in this release (ImageFolder training is on its way)",
            file=sys.stderr,
        )
        return 2
    for name in ("teacher_epochs", "finetune_steps", "per_class"):
        if getattr(args, name) < 1:
            print(f"ktk-train: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"ktk-train: error: --device {args.device} but no CUDA GPU is available", file=sys.stderr)
        return 2
    settings = DemoSettings(
        teacher_epochs=args.teacher_epochs,
        finetune_steps=args.finetune_steps,
        per_class=args.per_class,
        seed=args.seed,
        device=args.device,
    )
    try:
        run_demo(settings)
    except (DataError, ModelError) as e:
        print(f"ktk-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktk-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
