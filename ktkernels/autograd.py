"""torch.func and forward-mode AD for ktkernels' custom ops.

torch.func differentiates an autograd.Function only if it defines ``setup_context``, and the Function that
``register_autograd`` generates for a custom op does not (pytorch/pytorch#170834): ``torch.func.grad`` over a custom
op raises, and ``torch.func.jvp`` or ``torch.autograd.forward_ad`` drop its tangent without an error. So each family
registers each op's autograd through :func:`register`, which also builds an autograd.Function from the op's own
``setup_context`` and backward formula (the same kernels), a ``jvp`` (or an error naming the op) and a vmap rule.
The functional API and the backward formulas call ops through :func:`apply`, which takes the Function where a
torch.func transform differentiates or a forward-mode tangent is present, and the custom op everywhere else (plain
eager, vmap alone, torch.compile).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

_FUNCTIONS: dict = {}
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_DIFFERENTIATING_LEVELS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def fold_batch(call: Callable, size: int, in_dims: tuple, args: tuple) -> tuple:
    """``call`` on ``args`` with each tensor's vmapped dim (``in_dims``) folded into dim 0, the batch (broadcast
    where None), and the result unfolded: (output, out_dims) as a vmap rule returns them. For ops whose results
    along dim 0 do not depend on each other (the blur's (n, c) planes, a loss's per-sample rows)."""
    folded = [
        (a.movedim(d, 0) if d is not None else a.expand(size, *a.shape)).flatten(0, 1) if isinstance(a, Tensor) else a
        for a, d in zip(args, in_dims, strict=True)
    ]
    out = call(*folded)

    def unfold(t: Tensor) -> Tensor:
        return t.unflatten(0, (size, t.shape[0] // size if size else 0))

    if isinstance(out, tuple):
        return tuple(unfold(t) for t in out), (0,) * len(out)
    return unfold(out), 0


def fold_vmap(call: Callable, info, in_dims: tuple, *args) -> tuple:
    """The vmap rule of ops whose results along dim 0 do not depend on each other: :func:`fold_batch`."""
    return fold_batch(call, info.batch_size, in_dims, args)


def register_fold_vmap(*custom_ops) -> None:
    """torch.vmap over each op (outside torch.func's derivatives) as one call on the folded batch (:func:`fold_vmap`),
    not torch's loop over the vmapped dim."""
    for custom_op in custom_ops:
        torch.library.register_vmap(custom_op, lambda info, in_dims, *args, op=custom_op: fold_vmap(op, info, in_dims,
                                                                                                   *args))  # fmt: skip


def register(
    custom_op,
    name: str,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
    jvp: Callable | None = None,
    vmap: Callable | None = fold_vmap,
    forward_saves: Callable | None = None,
) -> None:
    """Register ``backward`` (with ``setup_context``) as ``custom_op``'s autograd, and the autograd.Function that
    :func:`apply` takes for it under torch.func and forward-mode AD.

    ``setup_context`` None: nothing to keep. ``backward`` None: the op has no derivative of its own (a backward op
    without a double backward); ``jvp`` None: no forward mode. Either raises NotImplementedError naming the op when
    asked for. ``vmap(call, info, in_dims,
    *args)`` is the rule, with ``call`` the Function itself (so that levels under the vmap still differentiate);
    None lets torch generate it from the op's calls (a loop over the vmapped dim where a custom op has no rule of
    its own, as for losses that reduce over the batch). ``forward_saves(inputs, output)``: the tensors the ``jvp``
    reads from ``ctx.saved_tensors``.
    """

    def forward(*args):
        return custom_op(*args)

    def setup(ctx, inputs, output):
        if setup_context is not None:
            setup_context(ctx, inputs, output)
        if forward_saves is not None:
            ctx.save_for_forward(*forward_saves(inputs, output))

    def unsupported(what: str) -> Callable:
        def raise_error(ctx, *_):
            raise NotImplementedError(f"ktkernels::{name}: {what} is not supported")

        return raise_error

    # Without a derivative the op still registers one that raises: torch's own error would name no ktkernels op
    # and be a RuntimeError, where torch.func gets this NotImplementedError.
    backward = backward or unsupported("differentiating its result again (double backward)")
    custom_op.register_autograd(backward, setup_context=setup_context)
    methods = dict(
        forward=forward,
        setup_context=setup,
        backward=backward,
        jvp=jvp or unsupported("forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad)"),
    )
    if vmap is not None:
        methods["vmap"] = lambda info, in_dims, *args: vmap(function.apply, info, in_dims, *args)
    attributes = {key: staticmethod(method) for key, method in methods.items()}
    attributes["generate_vmap_rule"] = vmap is None
    function = type(f"{name}_function", (torch.autograd.Function,), attributes)
    _FUNCTIONS[custom_op] = function


def _differentiating_level() -> bool:
    return any(level.key() in _DIFFERENTIATING_LEVELS for level in torch._C._functorch.get_interpreter_stack() or ())


def functorch_differentiates(x: Tensor) -> bool:
    """Whether ``x`` is a tensor of a torch.func transform with a grad or jvp level in it (vmap alone is not)."""
    if torch.compiler.is_compiling() or not _is_wrapped(x):
        return False
    return _differentiating_level()


def _needs_function(args: tuple) -> bool:
    if torch.compiler.is_compiling():  # dynamo traces the custom op itself
        return False
    if any(isinstance(a, Tensor) and _is_wrapped(a) for a in args) and _differentiating_level():
        return True
    # torch.autograd.forward_ad outside torch.func (its tensors are plain); outside a dual level this costs one check.
    return fwAD._current_level >= 0 and any(
        isinstance(a, Tensor) and not _is_wrapped(a) and fwAD.unpack_dual(a).tangent is not None for a in args
    )


def apply(custom_op, *args):
    """``custom_op(*args)``, through its registered autograd.Function where a torch.func transform differentiates it
    or an argument carries a forward-mode tangent."""
    if _needs_function(args):
        function = _FUNCTIONS.get(custom_op)
        if function is not None:
            return function.apply(*args)
    return custom_op(*args)
