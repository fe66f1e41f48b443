"""Builds ktkernels._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

KTK_BUILD_CUDA=auto (default) builds CUDA when torch is a CUDA build and nvcc exists;
KTK_BUILD_CUDA=1 insists (and fails loudly otherwise); KTK_BUILD_CUDA=0 skips it.
KTK_DEBUG_INFO=1 keeps host debug info (-g); by default it is off (-g0).
KTK_SANITIZE=1 builds the host code with AddressSanitizer and UBSan (-O1 -g, signed overflow checked): load it with
LD_PRELOAD of gcc's libasan and libubsan (benchmarks/NOTES.md, "Sanitizers"). For checking only: never ship it.
No -std= flag is passed: torch picks C++17 (2.11) or C++20 (2.14) itself.
"""

import glob
import os

from setuptools import setup

# torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin here, a wrapper); point it at the toolkit
# before cpp_extension reads it at import time.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    flag = os.environ.get("KTK_BUILD_CUDA", "auto").strip().lower()
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    possible = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    why_not = f"torch.version.cuda={torch.version.cuda!r}, nvcc={nvcc!r}"
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not possible:
            raise RuntimeError(f"KTK_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        return True
    if flag != "auto":
        raise ValueError(f"KTK_BUILD_CUDA must be auto, 0 or 1, not {flag!r}")
    if not possible:
        print(f"ktkernels: building without CUDA kernels ({why_not})")
    return possible


def _torch_libstdcxx() -> list[str]:
    """The libstdc++ shared library this process (i.e. torch) loaded, to link ktkernels._C against.

    The driver appends ``-lstdc++`` itself, but a compiler whose own libstdc++ is static-only (the H100 box's
    /opt/gcc) then copies libstdc++ into ktkernels._C, and python's ``-Bsymbolic-functions`` binds our calls to
    that private copy, whose locale facets are never set up: the first TORCH_CHECK message that formats a
    number segfaults. Naming torch's library first resolves those symbols there. Linux only; elsewhere, nothing.
    """
    try:
        with open("/proc/self/maps") as maps:
            found = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(found)[:1]


with_cuda = _build_cuda()
link_args = ["-fopenmp", *_torch_libstdcxx()]
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # With no GPU to detect (CI), torch's arch detection fails; Ampere + Hopper cover our targets, and Ampere's PTX
    # lets the driver compile the kernels for newer GPUs (Blackwell) instead of failing with "no kernel image".
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0+PTX;9.0a"

sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
# Python's own CFLAGS bring -g (debug info), which took a third of the host compile time and made _C 61 MB;
# -g0 comes after them and wins. KTK_DEBUG_INFO=1 keeps it, for a debugger.
debug_info = os.environ.get("KTK_DEBUG_INFO", "0").strip().lower() in ("1", "on", "true", "yes")
cxx_flags = ["-O3", "-fopenmp", "-g" if debug_info else "-g0"]
if os.environ.get("KTK_SANITIZE", "0").strip().lower() in ("1", "on", "true", "yes"):
    # -fno-wrapv undoes Python's -fwrapv, under which UBSan drops its signed-overflow checks; the vptr check is off
    # (it needs every polymorphic class instrumented, and torch's are not).
    sanitize = ["-fsanitize=address,undefined", "-fsanitize=float-cast-overflow", "-fno-sanitize=vptr"]
    cxx_flags = ["-O1", "-fopenmp", "-g", "-fno-omit-frame-pointer", "-fno-wrapv", *sanitize]
    link_args.append("-fsanitize=address,undefined")
if with_cuda:
    sources += sorted(glob.glob("csrc/*/*_cuda.cu")) + sorted(glob.glob("csrc/*/*_cuda.cpp"))
    extension = CUDAExtension(
        "ktkernels._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DKTK_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_args,
    )
else:
    extension = CppExtension("ktkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
