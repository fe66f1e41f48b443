"""What conftest changes in the Triton interpreter to save CI time must change no result (CPU machines only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter's set-up")


@triton.jit
def _scale_add(x_ptr, y_ptr, K: tl.constexpr):
    offsets = tl.arange(0, 4)
    x = tl.load(x_ptr + offsets)
    tl.store(y_ptr + offsets, x * K + x)


def overflow_run() -> dict:
    """x * 3 + x on int32, overflowing in two lanes, and the interpreter options it ran under."""
    from triton.runtime import interpreter

    x = torch.tensor([2**30, 3, -(2**30), 7], dtype=torch.int32)
    y = torch.full_like(x, -1)
    _scale_add[(1,)](x, y, K=3)
    options = interpreter.interpreter_builder.options
    return {"sanitize_overflow": options.sanitize_overflow, "debug": options.debug, "y": y.tolist()}


WRAPPED = [0, 12, 0, 28]  # 4 * 2**30 = 2**32 wraps to 0 in int32


def test_skipped_overflow_checks_were_never_asserted():
    """conftest turns the interpreter's ``sanitize_overflow`` off. That is exact only while the interpreter runs with
    ``debug`` off, where an int32 overflow raises nothing and wraps: checked here on the interpreter's own options
    in a fresh process without conftest (a Triton that starts asserting them without ``debug`` fails this test),
    then with conftest's."""
    script = "import json, test_interpreter as t; print(json.dumps(t.overflow_run()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    fresh = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    unpatched = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert unpatched == {"sanitize_overflow": True, "debug": False, "y": WRAPPED}
    assert overflow_run() == {"sanitize_overflow": False, "debug": False, "y": WRAPPED}
