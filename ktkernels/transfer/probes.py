"""Mentor -> mentee layer supervision by module names (Venkatesan & Li 2016, "Diving deeper into mentee networks").

A frozen mentor network supervises a smaller mentee through *probes*: pairs (mentor layer, mentee layer) whose outputs
must match. The authors' objective per epoch e, with annealed weights (:class:`ktkernels.AnnealedWeight`), is

    L(e) = beta(e) sum_pairs rmse(phi_mentor, phi_mentee) + gamma(e) rmse(p_mentee, p_mentor) + alpha(e) CE

with ``rmse(a, b) = sqrt(mean over all elements of the batch of (a - b)^2)`` and p the softmax at T = 1. Probe pairs
must have identical shapes: the method has no adapter layers, and neither does this helper.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..losses.modules import mentee_rmse_loss

__all__ = ["PROBE_ERRORS", "FeatureTap", "ProbePairs"]

PROBE_ERRORS = ("rmse", "l2", "l1")


class FeatureTap:
    """Keep the latest output of named modules of a network, through forward hooks (the model's code is unchanged).

    Args:
        model: the network.
        names: module names as in ``named_modules()`` (``""`` is the whole network). Unknown names raise
            ``ValueError`` with close matches.
        detach: store detached outputs (for a frozen teacher or mentor).
        role: how errors name the network (``"teacher"``, ``"mentee"``, ...).

    ``tap[name]`` is the latest output; :meth:`clear` forgets them all, :meth:`remove` also removes the hooks.
    The output is kept by reference, not copied: reading one that an in-place op later in the forward changed
    (``out += identity``, ``ReLU(inplace=True)`` after the tapped module) raises ``RuntimeError`` instead of
    returning the changed values; tap the enclosing block instead. A copy of the model (``copy.deepcopy``, or
    ``torch.save`` of the whole module and loading it) is not tapped: its hooks do nothing, so a teacher made by
    copying a tapped student cannot overwrite the student's features.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with FeatureTap(net, ["0"]) as tap:
    ...     _ = net(torch.randn(2, 4))
    ...     tap["0"].shape
    torch.Size([2, 3])
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, detach: bool = False, role: str = "model") -> None:
        modules = _resolve(model, role, list(names))
        self.names = list(modules)
        self.role = role
        self._detach = detach
        # name -> (output, its version counter at capture): an in-place change since then raises on reading
        self._outputs: dict[str, tuple[Tensor, int | None]] = {}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(_TapHook(self, n)) for n, m in modules.items()]
        self._removed = False  # a flag, not the handle list: torch.compile cannot trace RemovableHandle objects

    def _capture(self, name: str, output: object) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self.role} module {name!r} returned {type(output).__name__}: a tap needs a tensor output"
            )
        self._outputs[name] = (output.detach() if self._detach else output, _version(output))

    def __getitem__(self, name: str) -> Tensor:
        if self._removed:
            raise RuntimeError(f"the {self.role} tap was removed")
        try:
            output, version = self._outputs[name]
        except KeyError:
            raise RuntimeError(
                f"no output captured from {self.role} module {name or '<output>'!r}: run the {self.role} forward "
                "(again) first"
            ) from None
        current = _version(output)  # None inside torch.compile, whatever the version at an eager capture
        if version is not None and current is not None and current != version:
            raise RuntimeError(
                f"the output of {self.role} module {name or '<output>'!r} was modified in place after it was "
                "captured (e.g. `out += identity` or ReLU(inplace=True) later in the forward): tap the enclosing "
                "block, whose output is final"
            )
        return output

    def features(self) -> dict[str, Tensor]:
        """``{name: latest output}`` in the order of ``names``; raises if one is missing."""
        return {name: self[name] for name in self.names}

    def clear(self) -> None:
        """Forget the captured outputs (the hooks stay)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks and forget the captured outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._removed = True
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ProbePairs:
    """Capture mentor and mentee layer outputs by module name and turn them into the probe loss.

    Forward hooks on the named modules keep each one's latest output (mentor outputs are detached: the mentor is
    frozen). :meth:`loss` sums the error over the pairs and then forgets the captured outputs, so that a loss is
    never computed from an earlier step's features; run both forwards again before the next call.

    Args:
        mentor: the frozen, pre-trained network.
        mentee: the network being trained.
        pairs: ``[(mentor_module_name, mentee_module_name), ...]`` or a ``{mentor_name: mentee_name}`` mapping;
            names as in ``named_modules()`` (``""`` is the whole network, i.e. its output).
        error: ``"rmse"`` (the authors' choice: ``sqrt(mean((a - b)^2))`` over the whole batch tensor, the fused
            :func:`ktkernels.mentee_rmse_loss`), ``"l2"`` (``sqrt(sum((a - b)^2))``) or ``"l1"`` (``sum |a - b|``).

    Example (the authors' supervised schedule for the probe term):

    >>> mentor = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    >>> mentee = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    >>> probes = ProbePairs(mentor, mentee, [("1", "0"), ("", "")])
    >>> from ktkernels import AnnealedWeight
    >>> beta = AnnealedWeight(2.0, 0.1, 135)
    >>> x = torch.randn(8, 1, 8, 8)
    >>> with torch.no_grad():
    ...     _ = mentor(x)
    >>> _ = mentee(x)
    >>> loss = beta(1) * probes.loss()
    >>> loss.backward()
    >>> probes.remove()
    """

    def __init__(
        self,
        mentor: nn.Module,
        mentee: nn.Module,
        pairs: Sequence[tuple[str, str]] | Mapping[str, str],
        error: str = "rmse",
    ) -> None:
        if error not in PROBE_ERRORS:
            raise ValueError(f"error must be one of {PROBE_ERRORS}, got {error!r}")
        pair_list = list(pairs.items()) if isinstance(pairs, Mapping) else [tuple(p) for p in pairs]
        if not pair_list:
            raise ValueError("pairs is empty: give at least one (mentor_module_name, mentee_module_name) pair")
        for pair in pair_list:
            if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
                raise ValueError(f"each pair must be (mentor_module_name, mentee_module_name) strings, got {pair!r}")
        repeated = sorted({pair for pair in pair_list if pair_list.count(pair) > 1})
        if repeated:
            raise ValueError(f"pairs are repeated: {repeated}; weight a pair by scaling its loss instead")
        self.pairs: list[tuple[str, str]] = pair_list
        self.error = error
        mentor_tap = FeatureTap(mentor, list(dict.fromkeys(m for m, _ in pair_list)), detach=True, role="mentor")
        try:
            mentee_tap = FeatureTap(mentee, list(dict.fromkeys(s for _, s in pair_list)), role="mentee")
        except Exception:
            mentor_tap.remove()
            raise
        self._mentor, self._mentee = mentor_tap, mentee_tap

    def terms(self) -> dict[str, Tensor]:
        """The error of each pair, keyed ``"<mentor_name> -> <mentee_name>"``, from the latest forwards.

        Raises if a forward is missing or a pair's shapes differ. Does not forget the captured outputs.
        """
        terms = {}
        for mentor_name, mentee_name in self.pairs:
            label = f"{mentor_name or '<output>'} -> {mentee_name or '<output>'}"
            mentor_out = self._mentor[mentor_name]
            mentee_out = self._mentee[mentee_name]
            if mentor_out.shape != mentee_out.shape:
                raise ValueError(
                    f"probe pair {label}: mentor output {tuple(mentor_out.shape)} and mentee output "
                    f"{tuple(mentee_out.shape)} differ; mentee supervision has no adapter layers, so pair layers "
                    "whose outputs have the same shape"
                )
            terms[label] = _error(self.error, mentee_out, mentor_out)
        return terms

    def loss(self) -> Tensor:
        """The sum over pairs of the probe error (a 0-dim tensor), after which the captured outputs are forgotten."""
        try:
            terms = list(self.terms().values())
            dtype = torch.float32
            for term in terms:  # fp32 at least, fp64 for fp64 features
                dtype = torch.promote_types(dtype, term.dtype)
            return torch.stack([term.to(dtype) for term in terms]).sum()
        finally:
            self._mentor.clear()
            self._mentee.clear()

    def remove(self) -> None:
        """Remove the hooks from both networks and forget the captured outputs."""
        self._mentor.remove()
        self._mentee.remove()

    def __enter__(self) -> ProbePairs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ProbePairs(pairs={self.pairs!r}, error={self.error!r})"


class _TapHook:
    """A tap's forward hook on one module. Hooks travel with the module they are on, so its copies are
    :class:`_InertHook`: a closure would be copied by reference (a deepcopied teacher would write into the
    student's tap) and could not be pickled."""

    def __init__(self, tap: FeatureTap, name: str) -> None:
        self.tap, self.name = tap, name

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.tap._capture(self.name, output)

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class _InertHook:
    """The hook a copied model keeps in place of a :class:`_TapHook`: it does nothing."""

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        return None


def _resolve(model: nn.Module, role: str, names: list[str]) -> dict[str, nn.Module]:
    available = dict(model.named_modules())
    unknown = [name for name in names if name not in available]
    if unknown:
        hints = {name: difflib.get_close_matches(name, available, n=3) for name in unknown}
        detail = "; ".join(f"{name!r} (close: {', '.join(hints[name]) or 'none'})" for name in unknown)
        raise ValueError(f"unknown {role} module names: {detail}")
    return {name: available[name] for name in names}


def _version(t: Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which keep none, and inside
    torch.compile, whose graph would break on it (the check then only runs in eager mode)."""
    return None if torch.compiler.is_compiling() or t.is_inference() else t._version


def _error(kind: str, student: Tensor, mentor: Tensor) -> Tensor:
    if kind == "rmse":
        return mentee_rmse_loss(student, mentor)
    work = torch.promote_types(torch.promote_types(student.dtype, mentor.dtype), torch.float32)  # fp64 stays fp64
    diff = student.to(work) - mentor.to(work)
    return diff.abs().sum() if kind == "l1" else torch.linalg.vector_norm(diff)
