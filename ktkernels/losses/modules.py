"""The transfer-loss API: functions for one feature pair, and multi-stage modules.

Functions (each a fused forward and a fused backward, on every backend):

- :func:`pixel_global_transfer_loss`: KTFT's pixel-level + global-level loss (Suzuki et al.);
- :func:`dct_attention_loss`: DCT-driven attention distillation (Lopez-Cifuentes et al.);
- :func:`attention_transfer_loss`: attention transfer (Zagoruyko & Komodakis), paper or code convention;
- :func:`soft_target_loss`: Hinton's soft targets, KL at temperature T scaled by T^2;
- :func:`mentee_rmse_loss`: the mentee networks' probe loss (Venkatesan & Li).

Modules (:class:`PixelGlobalTransferLoss`, :class:`DCTAttentionLoss`, :class:`AttentionTransferLoss`,
:class:`SoftTargetLoss`) take dicts (or lists) of stage features and return a :class:`LossOutput`: the total,
and each term detached for logging. Losses are fp32 scalars for fp32/fp16/bf16 features (fp64 for fp64).

>>> import torch, ktkernels
>>> s, t = torch.randn(2, 8, 7, 7), torch.randn(2, 8, 7, 7)
>>> loss = ktkernels.pixel_global_transfer_loss(s, t)
>>> out = ktkernels.PixelGlobalTransferLoss()({"layer4": s}, {"layer4": t})
>>> sorted(out.terms), bool(torch.isclose(out.total, loss))
(['layer4.global', 'layer4.pixel'], True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..autograd import apply
from ..dct import op as dct_op
from . import op
from .reference import GLOBAL_MODES

DCT_VARIANTS = {"a": "dct_a", "b": "dct_b", "dct": "dct"}
AT_MODES = ("code", "paper")


def _common_dtype(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Student and teacher in one floating dtype (the wider of the two): the kernels read one dtype."""
    for role, x in (("student", s), ("teacher", t)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{role} must be a Tensor, got {type(x).__name__}")
    if s.dtype == t.dtype:
        return s, t
    if not (s.is_floating_point() and t.is_floating_point()):
        raise TypeError(f"features must be floating point, got {s.dtype} and {t.dtype}")
    common = torch.promote_types(s.dtype, t.dtype)
    return s.to(common), t.to(common)


def pixel_global_transfer_loss(
    student: Tensor,
    teacher: Tensor,
    w_pixel: float | Tensor = 1.0,
    w_global: float | Tensor = 1.0,
    global_mode: str = "gap",
    keep: int = 2,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """KTFT's pixel-level + global-level transfer loss between (N, C, H, W) student and teacher features.

    ``w_pixel * mean_{n,c,h,w} (s - t)^2 + w_global * G``, where the global term G is (``global_mode``):

    - ``'gap'`` (default; the reading of methods.md §1): ``mean_{n,c} (GAP(s) - GAP(t))^2``. It re-weights the
      lowest-frequency ("coarse") component that the pixel term also contains (Parseval);
    - ``'dct_lowpass'``: ``mean_{n,c} sum_{u<k,v<k} ((S - T)[u, v] / sqrt(HW))^2`` over the ``keep`` x ``keep``
      lowest orthonormal DCT-II coefficients per channel; keep=1 equals 'gap', a full block the pixel term;
    - ``'cosine'``: ``mean_n (1 - cos(GAP(s)[n], GAP(t)[n]))`` over the channel vector (alternative (b));
    - ``'none'``: 0 (the pixel term alone).

    The KTFT paper does not publish its formula; these are labelled readings. One fused pass reads each tensor
    once; the backward writes grad_student once (and grad_teacher only if the teacher requires grad). Features
    of different dtypes are promoted to the wider one; the loss is fp32 (fp64 for fp64 features). Returns the
    scalar loss, or ``(loss, terms)`` with the unweighted ``[pixel, global]`` when ``return_terms``. A Python
    ``w_global == 0`` skips the global reduction (its term is reported as 0).

    >>> s = torch.randn(2, 4, 5, 5)
    >>> float(pixel_global_transfer_loss(s, s))
    0.0
    """
    student, teacher = _common_dtype(student, teacher)
    if global_mode not in GLOBAL_MODES:
        raise ValueError(f"global_mode must be one of {GLOBAL_MODES}, got {global_mode!r}")
    keep = op.check_keep(keep)  # before the op's schema, which would take True for 1 and refuse 2.0 with a RuntimeError
    mode = "none" if isinstance(w_global, (int, float)) and w_global == 0 else global_mode
    terms, _ = apply(op.pixel_global_terms, student, teacher, mode, keep)
    loss = w_pixel * terms[0] + w_global * terms[1]
    return (loss, terms) if return_terms else loss


def mentee_rmse_loss(student: Tensor, mentor: Tensor) -> Tensor:
    """The mentee probe loss (Venkatesan & Li 2016): ``sqrt(mean over all elements of (s - m)^2)``, one scalar
    per batch; its gradient is 0 (not NaN) when the tensors are equal. Any shape (N, ...), equal for both.

    >>> float(mentee_rmse_loss(torch.zeros(2, 3), torch.ones(2, 3)))
    1.0
    """
    student, mentor = _common_dtype(student, mentor)
    if student.shape != mentor.shape:
        raise ValueError(f"mentee_rmse_loss: student {tuple(student.shape)} and mentor {tuple(mentor.shape)} differ")
    if student.dim() != 4:  # the pixel term is a mean over all elements: any (N, ...) shape is (N, D, 1, 1)
        # explicit sizes: reshape cannot infer a -1 when N is 0
        rows, features = (student.shape[0], math.prod(student.shape[1:])) if student.dim() else (1, 1)
        student, mentor = (x.reshape(rows, features, 1, 1) for x in (student, mentor))
    mse = apply(op.pixel_global_terms, student, mentor, "none", 1)[0][0]
    return torch.where(mse > 0, mse.clamp_min(torch.finfo(mse.dtype).tiny).sqrt(), mse * 0)


def _check_attention_pair(s: Tensor, t: Tensor, name: str) -> None:
    for role, x in (("student", s), ("teacher", t)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} expects (N, C, H, W) {role} features, got {got}")
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must agree in N, H and W "
            "(channels may differ); pool the larger map first if the resolutions differ"
        )
    if min(s.shape[2:]) < 1:
        raise ValueError(f"{name}: attention maps need H, W >= 1, got features {tuple(s.shape)}")


def dct_attention_loss(
    student: Tensor, teacher: Tensor, variant: str = "b", p: float = 2.0, sample_weights: Tensor | None = None
) -> Tensor:
    """DCT-driven attention distillation (Lopez-Cifuentes et al. 2022) for one scale.

    Per sample: ``A = mean_c |F|^p`` (p = 2 in the paper), min-max normalise, subtract the mean, transform,
    min-max normalise, and take ``d_n = ||D_s - D_t||_2``; the loss is ``sum_n w_n d_n / N``.
    ``variant``: ``'a'`` = |Re FFT2| with (x - min)/max normalisations (the authors' ``DFTOurs.py`` at
    submission); ``'b'`` (default) = Re FFT2 with (x - min)/(max - min) (their final version); ``'dct'`` =
    variant b's pipeline with a true orthonormal DCT-II. Channel counts may differ; N, H, W must agree.
    ``sample_weights`` (N,) (e.g. :func:`teacher_correct_mask`) weight each sample; the divisor stays N.

    >>> f = torch.rand(2, 8, 7, 7)
    >>> float(dct_attention_loss(f, f))
    0.0
    """
    if variant not in DCT_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(DCT_VARIANTS)}, got {variant!r}")
    return _map_loss(student, teacher, DCT_VARIANTS[variant], p, sample_weights, "dct_attention_loss", False)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0, mode: str = "code") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) for one layer pair, ``q = normalize(mean_c |F|^p)``.

    ``mode='code'`` (the authors' code, torchdistill mode='code'): ``mean_{n,hw} (q_s - q_t)^2``;
    ``mode='paper'``: ``mean_n ||q_s - q_t||_2`` (the non-squared norm). Multiply by beta (1000 in both
    codebases) yourself. The paper sums |F|^p over channels where the code averages; after the L2
    normalisation the two agree (up to F.normalize's 1e-12 clamp on near-zero maps).

    >>> f = torch.rand(2, 8, 7, 7)
    >>> float(attention_transfer_loss(f, f))
    0.0
    """
    if mode not in AT_MODES:
        raise ValueError(f"mode must be one of {AT_MODES}, got {mode!r}")
    kind = "at_code" if mode == "code" else "at_paper"
    return _map_loss(student, teacher, kind, p, None, "attention_transfer_loss", mode == "code")


def _map_loss(s, t, kind, p, sample_weights, name, per_position) -> Tensor:
    _check_attention_pair(s, t, name)
    dct_op.check_power(s, p, name)
    dct_op.check_power(t, p, name)
    map_s = apply(dct_op.channel_power_mean, s, float(p))
    map_t = apply(dct_op.channel_power_mean, t, float(p))
    if map_s.dtype != map_t.dtype:
        map_s, map_t = _common_dtype(map_s, map_t)
    dist = apply(op.attention_map_distance, map_s, map_t, kind)
    n = s.shape[0]
    if sample_weights is not None:
        if not isinstance(sample_weights, Tensor) or sample_weights.shape != (n,):
            got = tuple(sample_weights.shape) if isinstance(sample_weights, Tensor) else type(sample_weights).__name__
            raise ValueError(f"{name}: sample_weights must be a ({n},) tensor, got {got}")
        dist = dist * sample_weights.to(dist)
    scale = n * (s.shape[2] * s.shape[3] if per_position else 1)
    return dist.sum() / max(scale, 1)


def teacher_correct_mask(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """(N,) float mask, 1 where the teacher's argmax equals the label (DCT-KD's ``PRED_GUIDE``), from (N, K)
    logits (K >= 1) and (N,) integer labels."""
    for name, x in (("teacher_logits", teacher_logits), ("labels", labels)):
        if not isinstance(x, Tensor):
            raise TypeError(f"teacher_correct_mask: {name} must be a Tensor, got {type(x).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"teacher_correct_mask: labels must be integers, got {labels.dtype}")
    if teacher_logits.dim() != 2 or teacher_logits.shape[1] < 1 or labels.shape != teacher_logits.shape[:1]:
        raise ValueError(
            f"teacher_correct_mask expects (N, K) logits with K >= 1 and (N,) labels, got {tuple(teacher_logits.shape)}"
            f" and {tuple(labels.shape)}"
        )
    return (teacher_logits.argmax(dim=1) == labels).to(torch.float32)


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft targets (Hinton et al. 2015): ``T^2 / N * sum_n KL(softmax(t_n / T) || softmax(s_n / T))``.

    Equal to RepDistiller's ``DistillKL`` (``F.kl_div(log_softmax(s/T), softmax(t/T), reduction='sum') T^2 / N``),
    computed in one fused pass per row with a stable log-sum-exp (no NaN or inf for huge logits), fp32
    accumulation for fp16/bf16. (N, K) logits of any K. A -inf teacher logit (a masked class, p_t = 0) adds 0
    to the KL and gets a zero gradient. ``temperature``: finite and > 0 (ValueError otherwise).

    >>> z = torch.randn(4, 10)
    >>> float(soft_target_loss(z, z))
    0.0
    """
    temperature = op.check_temperature(temperature, "soft_target_loss")  # a float; True is no temperature
    student_logits, teacher_logits = _common_dtype(student_logits, teacher_logits)
    kl, _ = apply(op.soft_target_kl, student_logits, teacher_logits, temperature)
    return kl.sum() * (temperature * temperature / max(student_logits.shape[0], 1))


# ----------------------------------------------------------------------------------------------
# Multi-stage modules


class LossOutput(NamedTuple):
    """``total``: the differentiable loss; ``terms``: each weighted-in term, detached, keyed ``<stage>.<term>``."""

    total: Tensor
    terms: dict[str, Tensor]


Features = Mapping[str, Tensor] | Sequence[Tensor]


class _StageLoss(nn.Module):
    """Pairs student and teacher stage features by name (dicts) or position (lists) and sums weighted terms."""

    def __init__(self, stages: Sequence[str] | None, weights: Mapping[str, float] | Sequence[float] | None) -> None:
        super().__init__()
        self.stages = list(stages) if stages is not None else None
        if isinstance(weights, Mapping):
            self.weights = dict(weights)
        elif weights is not None:
            weights = list(weights)
            if self.stages is None or len(weights) != len(self.stages):
                raise ValueError("weights given as a list need `stages` of the same length")
            self.weights = dict(zip(self.stages, weights, strict=True))
        else:
            self.weights = {}

    def _pairs(self, student: Features, teacher: Features) -> list[tuple[str, Tensor, Tensor, float]]:
        s_map, t_map = _as_mapping(student, "student"), _as_mapping(teacher, "teacher")
        names = self.stages if self.stages is not None else list(s_map)
        for role, features in (("student", s_map), ("teacher", t_map)):
            missing = [name for name in names if name not in features]
            if missing:
                raise KeyError(f"{type(self).__name__}: {role} features lack stage(s) {missing}; have {list(features)}")
        if self.stages is None and set(s_map) != set(t_map):
            raise KeyError(f"{type(self).__name__}: student stages {list(s_map)} != teacher stages {list(t_map)}")
        unknown = [name for name in self.weights if name not in names]
        if unknown:
            raise KeyError(f"{type(self).__name__}: weights for unknown stage(s) {unknown}; stages are {names}")
        return [(name, s_map[name], t_map[name], self.weights.get(name, 1.0)) for name in names]

    def extra_repr(self) -> str:
        return f"stages={self.stages}, weights={self.weights or None}"


def _as_mapping(features: Features, role: str) -> Mapping[str, Tensor]:
    if isinstance(features, Mapping):
        return features
    if isinstance(features, (list, tuple)):
        return {str(i): f for i, f in enumerate(features)}
    raise TypeError(f"{role} features must be a dict or a list of tensors, got {type(features).__name__}")


class PixelGlobalTransferLoss(_StageLoss):
    """KTFT's pixel + global loss summed over stages: ``sum_l weight_l (w_pixel P_l + w_global G_l)``.

    ``stages``: the stage names (dict keys) to use, default all; for list inputs the positions are named
    "0", "1", ... . ``weights``: per stage, a dict or a list aligned with ``stages``. Other arguments as in
    :func:`pixel_global_transfer_loss`. ``forward(student, teacher) -> LossOutput`` with terms
    ``<stage>.pixel`` and ``<stage>.global`` (unweighted).
    """

    def __init__(
        self,
        stages: Sequence[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        w_pixel: float = 1.0,
        w_global: float = 1.0,
        global_mode: str = "gap",
        keep: int = 2,
    ) -> None:
        super().__init__(stages, weights)
        if global_mode not in GLOBAL_MODES:
            raise ValueError(f"global_mode must be one of {GLOBAL_MODES}, got {global_mode!r}")
        keep = op.check_keep(keep)
        self.w_pixel, self.w_global, self.global_mode, self.keep = w_pixel, w_global, global_mode, keep

    def forward(self, student: Features, teacher: Features) -> LossOutput:
        total, terms = None, {}
        for name, s, t, weight in self._pairs(student, teacher):
            if not isinstance(s, Tensor) or s.dim() != 4 or not isinstance(t, Tensor) or s.shape != t.shape:
                raise ValueError(
                    f"stage {name!r}: student {_shape(s)} and teacher {_shape(t)} must be equal (N, C, H, W)"
                )
            loss, parts = pixel_global_transfer_loss(
                s, t, self.w_pixel, self.w_global, self.global_mode, self.keep, return_terms=True
            )
            total = weight * loss if total is None else total + weight * loss
            terms[f"{name}.pixel"], terms[f"{name}.global"] = parts[0].detach(), parts[1].detach()
        return LossOutput(_nonempty(total), terms)


class DCTAttentionLoss(_StageLoss):
    """DCT-driven attention distillation over stages: ``sum_l weight_l dct_attention_loss(s_l, t_l)``.

    ``forward(student, teacher, sample_weights=None) -> LossOutput`` with terms ``<stage>.dct``. The authors use
    the four ResNet stage outputs, weight 1 each, and ``sample_weights`` = :func:`teacher_correct_mask`.
    """

    def __init__(
        self,
        stages: Sequence[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        variant: str = "b",
        p: float = 2.0,
    ) -> None:
        super().__init__(stages, weights)
        if variant not in DCT_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(DCT_VARIANTS)}, got {variant!r}")
        self.variant, self.p = variant, dct_op.check_p(p, type(self).__name__)

    def forward(self, student: Features, teacher: Features, sample_weights: Tensor | None = None) -> LossOutput:
        total, terms = None, {}
        for name, s, t, weight in self._pairs(student, teacher):
            loss = _staged(name, dct_attention_loss, s, t, self.variant, self.p, sample_weights)
            total = weight * loss if total is None else total + weight * loss
            terms[f"{name}.dct"] = loss.detach()
        return LossOutput(_nonempty(total), terms)


class AttentionTransferLoss(_StageLoss):
    """Attention transfer over stages: ``sum_l weight_l attention_transfer_loss(s_l, t_l, p, mode)``; terms
    ``<stage>.at``. Multiply by beta (1000 in the authors' code) through ``weights`` or outside."""

    def __init__(
        self,
        stages: Sequence[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        p: float = 2.0,
        mode: str = "code",
    ) -> None:
        super().__init__(stages, weights)
        if mode not in AT_MODES:
            raise ValueError(f"mode must be one of {AT_MODES}, got {mode!r}")
        self.p, self.mode = dct_op.check_p(p, type(self).__name__), mode

    def forward(self, student: Features, teacher: Features) -> LossOutput:
        total, terms = None, {}
        for name, s, t, weight in self._pairs(student, teacher):
            loss = _staged(name, attention_transfer_loss, s, t, self.p, self.mode)
            total = weight * loss if total is None else total + weight * loss
            terms[f"{name}.at"] = loss.detach()
        return LossOutput(_nonempty(total), terms)


class SoftTargetLoss(nn.Module):
    """``weight * soft_target_loss(student_logits, teacher_logits, temperature)``; term ``soft_target``."""

    def __init__(self, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.weight = op.check_temperature(temperature, "SoftTargetLoss"), weight

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> LossOutput:
        loss = soft_target_loss(student_logits, teacher_logits, self.temperature)
        return LossOutput(self.weight * loss, {"soft_target": loss.detach()})

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}"


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _staged(name: str, fn, *args) -> Tensor:
    """Runs a one-stage loss, naming the stage in its input errors."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"stage {name!r}: {exc}") from None


def _nonempty(total: Tensor | None) -> Tensor:
    if total is not None:
        return total
    raise ValueError("no stages to compare: the feature containers are empty")
