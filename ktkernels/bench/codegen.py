"""``python -m ktkernels.bench codegen``: what the Triton kernels compile to on sm_90, without a GPU.

Each case calls a public op on small CPU tensors with the ``triton`` backend while the Triton launcher is
replaced by a recorder, so every launch a real call would make is captured with its real arguments: the
tiles, the constexprs, the strides and the grid that the launcher derives from the ResNet-50 benchmark shapes
at batch 128 (uninitialised tensors: nothing runs, so nothing is read). Each recorded launch is then compiled
for an H100 (``GPUTarget("cuda", 90, 32)``) through Triton's own argument binder, so the integer
specialisation (``== 1`` becomes a constant, ``% 16 == 0`` a divisibility hint) is the one a GPU launch
would get, and ``cuobjdump`` from Triton's bundled CUDA tools disassembles the cubin.

The table reports per kernel: registers per thread, resident warps per SM that the registers allow,
stack (spill) bytes per thread, SASS instruction count, the issue time, and the loads/stores by width
(``LDG.E`` is a 32-bit global load, ``LDG.E.128`` a 16-byte vector, ``.U16`` a 2-byte scalar; LDS/STS are
shared memory, LDL/STL spills). The issue time is the launch's warp instructions (SASS count x warps x
programs) over what an H100 SXM can issue: 132 SMs x 4 schedulers x 1 instruction per cycle at its 1.98 GHz
boost clock. The count is static, exact for the loop-free blur-pool kernels and low for kernels with loops, so
it is a floor: a memory-bound kernel whose issue time is not well under its bytes / copy bandwidth cannot
reach that bandwidth. It is a static view, not a timing: it shows whether a load was vectorised or a kernel is
register- or issue-bound, which is what the memory-bound kernels of this library live or die by, and it runs
on any machine with ``triton`` installed (tested with triton 3.6 and 3.8; it uses Triton's argument binder, an
internal API).

``--fill-cache DIR`` analyses nothing: it compiles every kernel of the GPU run's blurpool tables (and, with
``--test-launches``, of a test run recorded under the interpreter) into the Triton cache DIR under the keys a launch
on an sm_90 GPU looks up, so that a GPU box with the same Triton build compiles none of them (:func:`fill_cache`,
``benchmarks/triton_cache_sm90.sh``).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

from .. import backend
from . import harness

H100 = ("cuda", 90, 32)
H100_SMS = 132
H100_ISSUE_PER_US = H100_SMS * 4 * 1.98e3  # warp instructions per microsecond: 4 schedulers per SM, 1.98 GHz
BATCH = 128  # the benchmark's batch: the recorded grids are the real ones
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


@dataclasses.dataclass
class Launch:
    case: str
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    programs: int | None  # the launch grid's size (None: a recorded callable grid)


@dataclasses.dataclass
class Recorder:
    case: str = ""  # the label given to the launches recorded from now on
    launches: list[Launch] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KernelCode:
    case: str
    kernel: str
    constexprs: str
    num_warps: int
    registers: int
    warps_per_sm: int
    spill_bytes: int  # stack (local memory) per thread: register spills
    instructions: int  # static SASS count: the dynamic count per thread when the kernel has no loops
    programs: int
    issue_us: float  # instructions x warps x programs / H100_ISSUE_PER_US
    memory: dict  # SASS memory opcode (LDG.E.128, STG.E, ...) -> count


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Capture every Triton launch (``kernel[grid](...)``) instead of running it; CPU tensors are accepted."""
    from triton.runtime.jit import JITFunction

    recorder = Recorder()

    def record(kernel, *args, grid, warmup, **kwargs):
        grid = grid(kwargs) if callable(grid) else grid
        recorder.launches.append(Launch(recorder.case, kernel, args, kwargs, math.prod(grid)))

    with (
        mock.patch.object(JITFunction, "run", record),
        mock.patch.object(backend, "triton_interpreter", lambda: True),
        backend.use_backend("triton"),
    ):
        yield recorder


def _blurpool_cases(dtype: torch.dtype, layout: str) -> dict[str, Callable[[], object]]:
    from ..blurpool import op

    def blur(channels: int, size: int, filt_size: int, pads: list[int]) -> Callable[[], object]:
        def run():
            x = _input((BATCH, channels, size, size), dtype, layout)
            y = op.blur_pool2d(x, filt_size, 2, pads, "reflect")
            y.backward(torch.empty_like(y))  # keeps y's layout (sum()'s gradient would be an expanded tensor)

        return run

    def max_blur():
        x = _input((BATCH, 64, 112, 112), dtype, layout)
        y = op.max_blur_pool2d(x, 2, 0, 4, 2, [1, 2, 1, 2], "reflect")[0]
        y.backward(torch.empty_like(y))

    def max_blur_inference():  # no backward to come: no argmax codes
        op.max_blur_pool2d_inference(_input((BATCH, 64, 112, 112), dtype, layout), 2, 0, 4, 2, [1, 2, 1, 2], "reflect")

    return {
        "adobe k4 L2 down": blur(256, 56, 4, [1, 2, 1, 2]),
        "timm k3 L2 down": blur(256, 56, 3, [1, 1, 1, 1]),
        "maxblur k4 stem": max_blur,
        "maxblur k4 stem inference": max_blur_inference,
    }


# (max_kernel, max_padding, filt_size, stride, mode): the max-blur geometries of tests/test_blurpool.py.
MAX_GEOMETRIES = [(2, 0, 4, 2, "reflect"), (3, 1, 4, 2, "reflect"), (2, 0, 3, 2, "zero"), (2, 0, 5, 3, "replicate")]
MAX_GEOMETRIES += [(3, 1, 2, 1, "zero"), (3, 0, 7, 4, "zero")]


def _blurpool_geometry_cases(dtype: torch.dtype, layout: str) -> dict[str, Callable[[], object]]:
    """The smallest, a middle and the largest filter at strides 1, 2 and 4 (2-D and 1-D), and the tested max-blur
    geometries, on odd small shapes.

    Not a performance view: it proves that every kernel variant the tests run under the interpreter also
    compiles for the GPU (the compiler is stricter than the interpreter, e.g. on compile-time constants).
    """
    from ..blurpool import geometry, op

    def blur(filt_size: int, stride: int) -> Callable[[], object]:
        def run():
            pads = list(geometry.adobe_pads(filt_size)) * 2
            y = op.blur_pool2d(_input((2, 3, 13, 10), dtype, layout), filt_size, stride, pads, "reflect")
            y.backward(torch.empty_like(y))
            z = op.blur_pool1d(_input((2, 3, 13, 10), dtype, layout)[:, :, 0], filt_size, stride, pads[:2], "zero")
            z.backward(torch.zeros_like(z))

        return run

    def max_blur(kmax: int, pmax: int, filt_size: int, stride: int, mode: str) -> Callable[[], object]:
        def run():
            pads = list(geometry.adobe_pads(filt_size)) * 2
            y = op.max_blur_pool2d(_input((2, 3, 13, 10), dtype, layout), kmax, pmax, filt_size, stride, pads, mode)[0]
            y.backward(torch.empty_like(y))

        return run

    def wide_windows():  # pads far from the anchors': the windows outgrow the rolling kernels, the fallbacks run
        y = op.blur_pool2d(_input((2, 3, 12, 12), dtype, layout), 4, 2, [5, 5, 5, 5], "reflect")
        y.backward(torch.empty_like(y))
        y = op.max_blur_pool2d(_input((2, 3, 12, 12), dtype, layout), 2, 0, 4, 2, [5, 5, 5, 5], "reflect")[0]
        y.backward(torch.empty_like(y))

    cases = {f"blur k{k} s{s}": blur(k, s) for k in (1, 4, 7) for s in (1, 2, 4)}
    cases["wide windows"] = wide_windows
    cases.update({f"maxblur {g}": max_blur(*g) for g in MAX_GEOMETRIES})
    return cases


def _dct_cases(dtype: torch.dtype, layout: str) -> dict[str, Callable[[], object]]:
    import ktkernels

    def run(op: str) -> Callable[[], object]:
        def call():
            y = getattr(ktkernels, op)(_input((BATCH, 256, 56, 56), dtype, layout))
            y.backward(torch.empty_like(y))

        return call

    return {"dct2d layer1": run("dct2d"), "dct attention map layer1": run("dct_attention_map")}


def _losses_cases(dtype: torch.dtype, layout: str) -> dict[str, Callable[[], object]]:
    import ktkernels

    def pixel_global(channels: int, size: int) -> Callable[[], object]:
        def call():
            s, t = (
                _input((BATCH, channels, size, size), dtype, layout),
                _input((BATCH, channels, size, size), dtype, layout),
            )
            ktkernels.PixelGlobalTransferLoss()({"layer": s}, {"layer": t.detach()}).total.backward()

        return call

    def attention_transfer():
        s, t = _input((BATCH, 256, 56, 56), dtype, layout), _input((BATCH, 256, 56, 56), dtype, layout)
        ktkernels.attention_transfer_loss(s, t.detach(), 2, "code").backward()

    def soft_target():
        s, t = torch.empty(BATCH, 1000, dtype=dtype, requires_grad=True), torch.empty(BATCH, 1000, dtype=dtype)
        ktkernels.soft_target_loss(s, t, 4.0).backward()

    return {
        "pixel+global layer1": pixel_global(256, 56),
        "pixel+global layer4": pixel_global(2048, 7),
        "attention transfer layer1": attention_transfer,
        "soft target (128, 1000)": soft_target,
    }


def _uninitialised(shape: tuple, dtype: torch.dtype, device: str, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _input(shape: tuple, dtype: torch.dtype, layout: str) -> torch.Tensor:
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    return _uninitialised(shape, dtype, "cpu", fmt).requires_grad_()  # never read: launches are recorded


FAMILIES = {
    "blurpool": _blurpool_cases,
    "dct": _dct_cases,
    "losses": _losses_cases,
    "blurpool-geometries": _blurpool_geometry_cases,
}
DEFAULT_FAMILIES = ("blurpool", "dct", "losses")


def cases(
    families: tuple[str, ...], dtypes: tuple[torch.dtype, ...], layouts: tuple[str, ...]
) -> dict[str, Callable[[], object]]:
    """Case label -> a call of the public ops whose launches are recorded."""
    out = {}
    for family in families:
        for dtype in dtypes:
            for layout in layouts:
                tag = f"{str(dtype).removeprefix('torch.')} {layout}"
                out.update({f"{name}, {tag}": fn for name, fn in FAMILIES[family](dtype, layout).items()})
    return out


def record(calls: dict[str, Callable[[], object]]) -> list[Launch]:
    with recording() as recorder:
        for recorder.case, call in calls.items():
            call()
    return recorder.launches


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (neither bundled with triton nor on PATH)")
    return found


def compile_for(launch: Launch, target: tuple = H100):
    """Compile one recorded launch for ``target`` as ``JITFunction.run`` would on that GPU: the same options
    (``debug`` and ``instrumentation_mode`` from Triton's knobs), binder, specialisation and ``triton.compile``
    call, so the kernel lands in Triton's on-disk cache under the key a real launch looks up.

    Returns the compiled kernel and its constexprs ({(argument index,): value}).
    """
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    fn, gpu, codegen, kwargs, (bound, specialization, options) = _bind(launch, target)
    options, signature, constexprs, attrs = fn._pack_args(codegen, kwargs, bound, specialization, options)
    compiled = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    return compiled, constexprs


def _bind(launch: Launch, target: tuple) -> tuple:
    """``JITFunction.run``'s first steps for ``launch`` on ``target``: its options from Triton's knobs, then the
    binder. Returns the kernel, the target, its backend, the options and the binder's (arguments, specialisation,
    options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, gpu = launch.kernel, GPUTarget(*target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    codegen = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, codegen)
    return fn, gpu, codegen, kwargs, binder(*launch.args, **kwargs)


def compile_launch(launch: Launch, target: tuple = H100) -> KernelCode:
    """Compile one recorded launch for ``target`` exactly as the JIT would specialise it, and read its SASS."""
    fn, (compiled, constexprs) = launch.kernel, compile_for(launch, target)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T] )?([A-Z][A-Z0-9_.]*)", sass)
    memory = collections.Counter(o for o in opcodes if o.split(".")[0] in ("LDG", "STG", "LDS", "STS", "LDL", "STL"))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    warps = compiled.metadata.num_warps
    blocks = REGISTERS_PER_SM // (max(8, -(-registers // 8) * 8) * 32 * warps)
    names = [p.name for p in fn.params]
    shown = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return KernelCode(
        case=launch.case,
        kernel=fn.__name__,
        constexprs=" ".join(f"{k}={_short(v)}" for k, v in shown.items() if k.isupper()),
        num_warps=warps,
        registers=registers,
        warps_per_sm=min(MAX_WARPS_PER_SM, blocks * warps),
        spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
        instructions=len(opcodes),
        programs=launch.programs,
        issue_us=round(len(opcodes) * warps * launch.programs / H100_ISSUE_PER_US, 1),
        memory=dict(sorted(memory.items())),
    )


def gpu_run_launches(dtypes: tuple[torch.dtype, ...], layouts: tuple[str, ...]) -> list[Launch]:
    """The Triton launches of the GPU run's blurpool tables (``bench blurpool``, ``--tune-max-blur``,
    ``--tune-blur``): every step ``bench.blurpool.triton_warm_jobs`` lists, at batch ``BATCH``, recorded."""
    from . import blurpool

    jobs = [job for tune in (None, "max-blur", "blur") for job in blurpool.triton_warm_jobs(dtypes, layouts, tune=tune)]
    with recording() as recorder:
        for job in jobs:
            recorder.case = " ".join(map(str, (job[0][0], *job[1:])))
            blurpool._warm_job("cpu", BATCH, *job, make=_uninitialised)
    return recorder.launches


def _describe(value: object) -> object:
    """A launch argument as JSON: tensors by what Triton specialises on (dtype, strides, 16-byte alignment)."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
            "stride": list(value.stride()),
            "offset": value.storage_offset(),
            "align16": value.data_ptr() % 16 == 0,
        }
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def _rebuild(value: object) -> object:
    """The inverse of :func:`_describe`: a CPU tensor of the same dtype, strides and alignment (never read)."""
    import triton.language as tl

    if isinstance(value, dict) and "tl" in value:
        return tl.dtype(value["tl"])
    if isinstance(value, dict):
        dtype = getattr(torch, value["dtype"])
        reach = sum((n - 1) * abs(s) for n, s in zip(value["shape"], value["stride"], strict=True) if n)
        extent = value["offset"] + reach + 1
        tensor = torch.empty(extent, dtype=dtype).as_strided(value["shape"], value["stride"], value["offset"])
        assert (tensor.data_ptr() % 16 == 0) == value["align16"], value  # allocations are 64-byte aligned
        return tensor
    return value


def record_interpreted_launches(path: str) -> Callable[[], None]:
    """Append every launch of a Triton kernel under the interpreter (``TRITON_INTERPRET=1``) to the JSON-lines file
    ``path`` (one per process: ``path.<pid>``), then run it as usual; returns the function that stops recording.
    conftest calls this when ``KTK_RECORD_TRITON_LAUNCHES`` names a path, so that ``--fill-cache --test-launches``
    can compile the kernels a test run launches for the GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted_run = InterpretedFunction.run
    out = f"{path}.{os.getpid()}"

    def run(self, *args, grid, warmup, **kwargs):
        programs = None if callable(grid) else math.prod(grid)  # ktkernels' launchers pass tuples
        record = {"kernel": f"{self.fn.__module__}:{self.fn.__name__}", "args": [_describe(a) for a in args],
                  "kwargs": {k: _describe(v) for k, v in kwargs.items()}, "programs": programs}  # fmt: skip
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    return lambda: setattr(InterpretedFunction, "run", interpreted_run)


def recorded_launches(path: str) -> list[Launch]:
    """The launches :func:`record_interpreted_launches` wrote to ``path.*``, as launches of the compiled kernels."""
    import importlib

    launches = []
    for part in sorted(Path(path).parent.glob(f"{Path(path).name}.*")):
        for line in part.read_text().splitlines():
            record = json.loads(line)
            module, name = record["kernel"].split(":")
            kernel = getattr(importlib.import_module(module), name)
            args = tuple(_rebuild(a) for a in record["args"])
            kwargs = {k: _rebuild(v) for k, v in record["kwargs"].items()}
            launches.append(Launch(f"recorded {name}", kernel, args, kwargs, record["programs"]))
    return launches


def _specialisation(launch: Launch, target: tuple = H100) -> str:
    """What Triton compiles a launch by: the kernel, its argument specialisation and its options."""
    fn, *_, (_, specialization, options) = _bind(launch, target)
    return f"{fn.__module__}.{fn.__name__} {specialization} {sorted(options.items())}"


def _fill_cache_part(part: int, parts: int, dtypes: tuple, layouts: tuple, test_launches: str | None) -> int:
    """Compile launch ``part`` of every ``parts`` distinct ones (a worker process's share); returns how many."""
    launches = gpu_run_launches(dtypes, layouts) + (recorded_launches(test_launches) if test_launches else [])
    distinct = list({_specialisation(launch): launch for launch in launches}.values())
    for launch in distinct[part::parts]:
        compile_for(launch)
    return len(distinct[part::parts])


def fill_cache(dtypes: tuple, layouts: tuple, workers: int, test_launches: str | None = None) -> int:
    """Compile every kernel the GPU run's blurpool tables launch into Triton's on-disk cache (``TRITON_CACHE_DIR``),
    in ``workers`` processes; returns the number of distinct kernels. ``test_launches``: also the launches a test
    run recorded there (:func:`record_interpreted_launches`).

    The keys are those of a launch on an sm_90 GPU (``compile_for``), so a GPU box whose Triton is the same build
    (same version and Python: Triton's key hashes its own files) finds them and compiles nothing: carry the folder
    there and point ``TRITON_CACHE_DIR`` at it (``benchmarks/triton_cache_sm90.sh`` packs it into
    ``build/triton-cache-sm90.tgz``, which ``benchmarks/run_gpu.sh`` unpacks when a lease carries it).
    """
    if workers <= 1:
        return _fill_cache_part(0, 1, dtypes, layouts, test_launches)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        done = [pool.submit(_fill_cache_part, part, workers, dtypes, layouts, test_launches) for part in range(workers)]
        return sum(future.result() for future in done)


CACHED_KERNEL_MODULES = ("ktkernels.blurpool.triton",)  # the kernels that fill_cache compiles


def kernel_fingerprint(modules: tuple[str, ...] = CACHED_KERNEL_MODULES) -> str:
    """16 hex digits of a hash over the Triton cache key of every kernel defined in ``modules``.

    Triton's key of a compiled kernel starts from ``JITFunction.cache_key``: the kernel's source, its callees' keys,
    the constexpr globals it reads, and the line it starts on. So a cache that :func:`fill_cache` made misses every
    kernel whose key changed since, and one more import line above the kernels moves, and so misses, all of them.
    ``benchmarks/triton_cache_sm90.sh`` stores the fingerprint in the packed cache; ``--check`` there and
    ``benchmarks/run_gpu.sh`` compare it with the tree's. Run it with the Triton of the box (3.6): the key's
    recipe may differ between Triton versions, and the interpreter (``TRITON_INTERPRET=1``) has no keys.
    """
    import hashlib
    import importlib

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernel_fingerprint needs the compiled JIT kernels: unset TRITON_INTERPRET")
    keys = []
    for name in modules:
        for attr, value in sorted(vars(importlib.import_module(name)).items()):
            if isinstance(value, triton.runtime.JITFunction):
                keys.append(f"{name}.{attr} {value.cache_key}")
    if not keys:
        raise ValueError(f"no Triton kernels in {modules}")
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def triton_build() -> str:
    """``version key ptxas P`` of this Triton: its ``triton_key()`` and the sm_90 backend's ptxas, hashed (16 and 8
    hex digits). Both enter the cache key of every kernel Triton compiles here, so a carried cache serves a box
    only where both agree; ``benchmarks/triton_cache_sm90.sh`` stores the line and ``run_gpu.sh`` prints the box's."""
    import hashlib

    import triton
    from triton.runtime.cache import triton_key

    key = hashlib.sha256(triton_key().encode()).hexdigest()[:16]
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        ptxas = hashlib.sha256(get_ptxas_version(90).encode()).hexdigest()[:8]
    except Exception as error:  # noqa: BLE001 (a Triton without it, or no ptxas: say so, the line still helps)
        ptxas = f"unknown ({type(error).__name__})"
    return f"{triton.__version__} {key} ptxas {ptxas}"


def _short(value: object) -> str:
    return str(value).removeprefix("fp").replace("triton.language.", "")


def analyse(calls: dict[str, Callable[[], object]]) -> list[KernelCode]:
    """Compile every distinct launch of ``calls`` (same kernel, constexprs and case: compiled once)."""
    out, seen = [], set()
    for launch in record(calls):
        key = (launch.case, launch.kernel.__name__, repr(sorted(launch.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(compile_launch(launch))
    return out


def markdown(codes: list[KernelCode], env: dict) -> str:
    lines = [
        "# Triton kernels compiled for sm_90 (static, no GPU)",
        "",
        f"triton {env['triton']} | torch {env['torch']} | commit {env['commit']} | {env['date']}",
        "",
        "Warps/SM: resident warps that the registers allow (64 max). Memory: SASS global/shared/local "
        "load and store instructions by width (LDG.E = 32 bit, .128 = 16-byte vector, .U16 = 2-byte). Issue: the "
        f"least time an H100 needs to issue the launch at batch {BATCH} (warp instructions / (132 SMs x 4 x "
        "1.98 GHz)); static counts, so low for kernels with loops.",
        "",
        "| case | kernel | constexprs | warps | regs | warps/SM | spills | SASS instrs | issue us "
        "| memory instructions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in codes:
        memory = ", ".join(f"{k} {v}" for k, v in c.memory.items())
        lines.append(
            f"| {c.case} | {c.kernel} | {c.constexprs} | {c.num_warps} | {c.registers} | {c.warps_per_sm} "
            f"| {c.spill_bytes} | {c.instructions} | {c.issue_us} | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ktkernels.bench codegen", description=__doc__)
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default="NCHW,NHWC")
    parser.add_argument("--out", default="benchmarks/results", help="directory for codegen_sm90.{json,md}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown; write nothing")
    parser.add_argument(
        "--fill-cache",
        metavar="DIR",
        help="no analysis: compile every kernel of the GPU run's blurpool tables (bench blurpool, --tune-max-blur, "
        "--tune-blur) for sm_90 into the Triton cache DIR, for a GPU box with the same Triton build",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="with --fill-cache: processes")
    parser.add_argument(
        "--test-launches",
        metavar="PATH",
        help="with --fill-cache: also the launches a test run recorded under the interpreter with "
        "KTK_RECORD_TRITON_LAUNCHES=PATH (conftest)",
    )
    parser.add_argument(
        "--fingerprint",
        nargs="*",
        metavar="MODULE",
        help="no analysis: print the hash of the Triton cache keys of the kernels in MODULE (default: "
        f"{', '.join(CACHED_KERNEL_MODULES)}), which a carried cache must match (kernel_fingerprint)",
    )
    parser.add_argument(
        "--triton-build",
        action="store_true",
        help="no analysis: print this Triton's version, cache key and ptxas hash (triton_build)",
    )
    args = parser.parse_args(argv)
    if args.triton_build:
        return print(triton_build())
    if args.fingerprint is not None:
        return print(kernel_fingerprint(tuple(args.fingerprint) or CACHED_KERNEL_MODULES))
    dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    layouts = tuple(args.layouts.split(","))
    if set(layouts) - {"NCHW", "NHWC"}:
        parser.error(f"--layouts takes NCHW and/or NHWC, got {args.layouts!r}")
    if args.fill_cache:
        import triton

        # Triton reads it at each cache use, and spawned workers inherit it.
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.fill_cache).resolve())
        count = fill_cache(dtypes, layouts, args.jobs, args.test_launches)
        return print(f"{count} kernels compiled for sm_90 into {args.fill_cache} (triton {triton.__version__})")
    codes = analyse(cases(tuple(args.families.split(",")), dtypes, layouts))
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in codes]))
        return
    env = harness.environment(torch.device("cpu"))
    text = markdown(codes, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codegen_sm90.md").write_text(text)
    (out / "codegen_sm90.json").write_text(json.dumps([dataclasses.asdict(c) for c in codes], indent=1))
    print(text)
