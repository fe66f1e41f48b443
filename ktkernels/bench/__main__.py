"""``python -m ktkernels.bench [blurpool|dct|losses|model|train] [flags]``: benchmark tables on the device present.

- ``blurpool`` (the default): the BlurPool ops on ResNet-50's blur shapes against the PyTorch recipes;
- ``dct``: ``dct2d`` and ``dct_attention_map`` on ResNet-50's stage outputs against the matmul and FFT
  (torch-dct) recipes and the compiled matmul recipe (``python -m ktkernels.bench dct --help``);
- ``losses``: the transfer losses (pixel+global, DCT-KD, attention transfer, soft targets) summed over
  ResNet-50's four stage outputs against the unfused PyTorch recipes and their compiled forms
  (``python -m ktkernels.bench losses --help``);
- ``model``: a ResNet training step, plain / anti-aliased (recipe, ktkernels eager and compiled) / floor
  (``python -m ktkernels.bench model --help``);
- ``train``: the KTFT training step (frozen teacher + anti-aliased student + CE + pixel/global transfer loss),
  ktkernels vs the pure-PyTorch recipe, eager and compiled, and the cached data loader's throughput
  (``python -m ktkernels.bench train --help``);
- ``codegen``: no timing, no GPU needed: every Triton kernel compiled for sm_90 at the benchmark shapes, with
  its registers, occupancy and load/store widths read from the SASS (``python -m ktkernels.bench codegen --help``).

Each writes JSON, markdown and a PNG to --out (default benchmarks/results/) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from . import blurpool, harness

FAMILIES = ("blurpool", "dct", "losses", "model", "train", "codegen")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Each family has its own flags, so dispatch on the first word; no family given means blurpool.
    family = argv.pop(0) if argv and argv[0] in FAMILIES else "blurpool"
    if family == "model":
        from . import model  # imports torchvision: only when asked for

        return model.main(argv)
    if family == "dct":
        from . import dct  # imports the DCT ops: only when asked for

        return dct.main(argv)
    if family == "losses":
        from . import losses  # imports the loss ops: only when asked for

        return losses.main(argv)
    if family == "codegen":
        from . import codegen  # compiles for sm_90 without a GPU: only when asked for

        return codegen.main(argv)
    if family == "train":
        from . import train  # imports torchvision and the training module: only when asked for

        return train.main(argv)
    return blurpool_main(argv)


LOG_ENV_KEYS = ("device", "torch", "triton", "commit", "date", "timing")


def _device_tag(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def _tune_of(args: argparse.Namespace) -> str | None:
    """The tune table the flags ask for: "max-blur", "blur" or None (the benchmark table)."""
    return "max-blur" if args.tune_max_blur else "blur" if args.tune_blur else None


def _blurpool_stem(tag: str, tune: str | None, eager: bool = False) -> str:
    """The results' file stem: ``blurpool_<device tag>``, ``blurpool_tune_max_blur_<tag>``, ``..._eager``."""
    tune_part = [f"tune_{tune.replace('-', '_')}"] if tune else []
    return "_".join(["blurpool", *tune_part, tag, *(["eager"] if eager else [])])


def blurpool_table_from_log(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--from-log``: JSON, markdown and plot of the rows a cut-off GPU run printed (its environment and copy
    bandwidth given on the command line, since the log does not hold them)."""
    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    missing = [key for key in LOG_ENV_KEYS if key not in env]
    if missing or args.copy_gbps is None:
        parser.error(f"--from-log needs --copy-gbps and --env for {', '.join(missing) or 'nothing else'}")
    rows = blurpool.rows_from_log(args.from_log.read_text())
    if not rows:
        parser.error(f"no benchmark rows in {args.from_log}")
    harness.finish(rows, args.copy_gbps)
    tune = _tune_of(args)
    notes = blurpool.tune_choices(rows, tune) if tune else ()
    stem = _blurpool_stem(_device_tag(env["device"]), tune, args.eager)
    print(harness.write(rows, env, args.copy_gbps, args.out, stem, "pytorch", notes))


def blurpool_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ktkernels.bench [blurpool]", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 16 on CPU")
    parser.add_argument("--dtypes", default=None, help="comma list; default bfloat16,float32 (GPU), float32 (CPU)")
    parser.add_argument("--layouts", default="NCHW,NHWC")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the recipe")
    parser.add_argument("--eager", action="store_true", help="time eager calls (host overhead included), not graphs")
    parser.add_argument("--quick", action="store_true", help="one case per kind, fewer repetitions")
    parser.add_argument(
        "--tune-max-blur",
        action="store_true",
        help="only the max-blur stem on Triton, once per per-thread shape of its kernels (blurpool.MAX_BLUR_TUNE)",
    )
    parser.add_argument(
        "--tune-blur",
        action="store_true",
        help="only the blur cases on Triton, once per rows-ahead value of its kernels (blurpool.BLUR_TUNE)",
    )
    parser.add_argument(
        "--jit-workers",
        type=int,
        default=0,
        help="compile the Triton kernels in this many processes before timing (blurpool.warm_triton_cache)",
    )
    parser.add_argument(
        "--cases", default=None, help="comma list of case names (blurpool.RESNET50_CASES) to run; default: all"
    )
    parser.add_argument(
        "--launch-once",
        action="store_true",
        help="no timing: launch each Triton step of the table once, forward and backward (a profiler's workload; "
        "with --jit-workers, in that many processes)",
    )
    parser.add_argument(
        "--from-log",
        type=Path,
        default=None,
        help="no timing: the table of a run cut off before it wrote one, from the rows its log printed (a tune "
        "run's log with its --tune-max-blur or --tune-blur flag)",
    )
    parser.add_argument("--copy-gbps", type=float, default=None, help="with --from-log: the copy bandwidth to use")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"with --from-log: the run's {', '.join(LOG_ENV_KEYS)} (repeat the flag)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.tune_max_blur and args.tune_blur:
        parser.error("--tune-max-blur and --tune-blur are separate tables: pick one")
    if args.from_log is not None:
        return blurpool_table_from_log(parser, args)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 16)
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16,float32" if gpu else "float32")).split(",")]
    cases = blurpool.RESNET50_CASES
    if not gpu:  # the CPU job: the maxblur stem and the L2 downsampling blur (the CPU target shape)
        cases = [c for c in cases if c[0] in ("maxblur k4 stem", "adobe k4 L2 down")]
    if args.quick:
        cases = [c for c in cases if c[0] in ("maxblur k4 stem", "adobe k4 L2 down")]
    if args.cases:
        names = args.cases.split(",")
        unknown = sorted(set(names) - {c[0] for c in blurpool.RESNET50_CASES})
        if unknown:
            parser.error(f"unknown --cases {unknown}; expected names from {[c[0] for c in blurpool.RESNET50_CASES]}")
        cases = [c for c in blurpool.RESNET50_CASES if c[0] in names]
    tune = _tune_of(args)
    if tune:  # each tune table's settings are one kernel family's
        cases = [c for c in cases if c[3] == ("maxblur" if args.tune_max_blur else "blur")]
        cases = cases[:1] if args.tune_max_blur else cases
        if not cases:
            parser.error(f"--tune-{tune} needs a {tune} case in --cases")
    if args.launch_once:
        jobs = blurpool.triton_warm_jobs(dtypes, args.layouts.split(","), cases, tune=tune)
        blurpool.warm_triton_cache(device, batch, jobs, args.jit_workers if gpu else 1)
        return print(f"launched {len(jobs)} Triton steps once each")
    compile_cases = set() if args.no_compile else blurpool.COMPILE_CASES
    env = harness.environment(device)
    env["timing"] = harness.timing_note(device, args.eager)
    copy_gbps = harness.copy_bandwidth_gbps(device)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)", flush=True)  # for --from-log if the run is cut
    reps, graphs, layouts = 5 if args.quick else 20, not args.eager, args.layouts.split(",")
    if args.jit_workers and gpu:
        jobs = blurpool.triton_warm_jobs(dtypes, layouts, cases, tune=tune)
        blurpool.warm_triton_cache(device, batch, jobs, args.jit_workers)
    if args.tune_max_blur:
        rows = blurpool.tune_max_blur(device, batch, dtypes, layouts, cases[0], reps=reps, graphs=graphs)
    elif args.tune_blur:
        rows = blurpool.tune_blur(device, batch, dtypes, layouts, cases, reps=reps, graphs=graphs)
    else:
        rows = blurpool.run(device, batch, dtypes, layouts, compile_cases, cases, reps=reps, graphs=graphs)
    harness.finish(rows, copy_gbps)
    stem = _blurpool_stem(_device_tag(env["device"]) if gpu else "cpu", tune, args.eager and gpu)
    notes = blurpool.tune_choices(rows, tune) if tune else ()
    print(harness.write(rows, env, copy_gbps, args.out, stem, baseline="pytorch", notes=notes))


if __name__ == "__main__":
    main()
