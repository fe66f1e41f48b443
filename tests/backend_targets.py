"""The (backend, device) targets every op family's tests run on. CUDA targets carry the gpu marker; the
Triton-on-CPU target needs the interpreter (set by the root conftest on CPU-only machines)."""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TARGETS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(
        ("triton", "cpu"),
        id="triton-interp",
        marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1 (CPU machines)"),
    ),
    pytest.param(("cuda", "cuda"), id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]),
    pytest.param(
        ("triton", "cuda"), id="triton-gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]
    ),
]

# Devices of the kernel-level tests (the ktkernels_C ops, called directly).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]),
]
