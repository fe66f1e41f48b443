"""Export helpers: ONNX through the pad + grouped-conv decomposition of every ktkernels blur layer.

``torch.export`` and ``torch.compile`` keep the ktkernels custom ops (fake impls, dynamic shapes) and need
nothing from here. ONNX runtimes do not know those ops, so under ``torch.onnx.export`` (either exporter) the layers
and the functional API emit the decomposition, which ONNX spells ``Pad`` + ``Conv(group=C)`` (+ ``MaxPool`` for
max-blur layers). :func:`export_onnx` adds a dynamic batch and the ``zero_pad`` choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blurpool.modules import decomposed

__all__ = ["decomposed", "export_onnx"]


def export_onnx(
    model: nn.Module,
    args: Sequence[Any] | torch.Tensor,
    f: str | os.PathLike,
    *,
    zero_pad: bool = False,
    dynamic_batch: bool = True,
    **kwargs: Any,
) -> Any:
    """``torch.onnx.export`` (the torch.export-based exporter) with every ktkernels layer decomposed.

    Args:
        model: any module containing ktkernels layers.
        args: example positional inputs (or one tensor); the first is (N, C, H, W).
        f: output path.
        zero_pad: export zero padding instead of reflect/replicate, for runtimes without them
            (older TensorRT). This changes the border values: check they are acceptable.
        dynamic_batch: make dim 0 of every tensor input dynamic.
        kwargs: passed to ``torch.onnx.export``.

    Returns what ``torch.onnx.export`` returns (an ``ONNXProgram``).
    """
    if isinstance(args, torch.Tensor):  # one input, as torch.onnx.export accepts (tuple() would split its batch)
        args = (args,)
    if dynamic_batch and "dynamic_shapes" not in kwargs:
        batch = torch.export.Dim("batch")
        kwargs["dynamic_shapes"] = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    with decomposed(zero_pad=zero_pad):
        return torch.onnx.export(model, tuple(args), f, dynamo=True, **kwargs)
