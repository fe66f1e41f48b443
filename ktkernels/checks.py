"""Argument checks shared by every op family: integers and real numbers in any form a user may pass them.

Python, numpy and SymInt/SymFloat scalars are taken (``nn.Conv2d`` takes numpy integers, and dynamo passes symbolic
sizes into a frame resumed after a graph break); bools are refused (``True`` is no size), as is everything else.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``low..high``: TypeError for a non-integer (bools included), ValueError out of range."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (numpy's and symbolic ones included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (numbers.Integral, torch.SymInt))


def int_pair(value: object) -> tuple[int, int] | None:
    """``value`` -- an int, or a sequence of two ints (not a string) -- as two ints; None for any other form. Callers
    raise their own error for None, naming the argument."""
    if is_int(value):
        return int(value), int(value)
    pair = value if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(pair) != 2 or not all(is_int(v) for v in pair):
        return None
    return int(pair[0]), int(pair[1])


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (numpy's and symbolic ones included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
