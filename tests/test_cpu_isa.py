"""The baseline build of the C++ CPU kernels, which an AVX2 machine never runs on its own.

Every C++ CPU kernel is compiled twice (csrc/common/cpu_isa.h): for the x86-64 baseline and as an AVX2+FMA clone
chosen at run time; the soft-target rows also have an AVX2 path of their own (Sleef's expf). CI's machine has
AVX2, so the rest of the suite tests only the clones. Here the CPU kernel tests run again in a process with
``ATEN_CPU_CAPABILITY=default``, which selects the baseline builds (it is read once per process, as ATen reads
its own, hence the subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktkernels import _C  # noqa: F401  (registers torch.ops.ktkernels_C)

ROOT = Path(__file__).resolve().parents[1]
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() != "DEFAULT"

# (test files, -k expression): the CPU backend's tests of every family with C++ CPU kernels
SUITES = {
    "blurpool": (["tests/test_blurpool.py"], "cpu and not triton"),
    "kernels": (
        [
            "tests/test_losses_kernels_internal.py",
            "tests/test_losses_map_kernels_internal.py",
            "tests/test_dct_kernels_internal.py",
        ],
        "cpu",
    ),
}


def baseline_env() -> dict:
    return {**os.environ, "ATEN_CPU_CAPABILITY": "default"}


def test_capability_matches_aten():
    """The kernels pick the clones exactly where ATen picks its AVX2 (or wider) kernels."""
    expected = "avx2" if HAS_AVX2 else "default"
    assert torch.ops.ktkernels_C.cpu_capability() == expected


def test_baseline_is_selected_by_the_variable():
    code = "import torch; from ktkernels import _C; print(torch.ops.ktkernels_C.cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=baseline_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "default"


@pytest.mark.skipif(not HAS_AVX2, reason="without AVX2 the whole suite already runs the baseline builds")
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_cpu_kernels_in_the_baseline_build(suite):
    files, expression = SUITES[suite]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *files]
    command += ["-k", expression]
    out = subprocess.run(command, cwd=ROOT, env=baseline_env(), capture_output=True, text=True)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
