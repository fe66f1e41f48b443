"""Pure-PyTorch transfer losses: the spec every backend is tested against, and the ``torch`` backend.

Everything is computed in float64 for float64 inputs and in float32 otherwise (bf16/fp16 features are
up-cast element by element, as the kernels do). Two layers:

- the *loss* functions (``pixel_global_terms``, ``attention_map_distance``, ``soft_target_rows``) written as
  the papers and the authors' code write them (``../shared/reference/methods.md``), differentiable by autograd;
- the *kernel contract* functions (``transfer_stats``, ``transfer_grad``, ``global_term``) that the fused
  kernels implement: what each pass reads and writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dct.basis import matrix
from .basis import projection_basis

GLOBAL_MODES = ("gap", "dct_lowpass", "cosine", "none")

# The clamp of every normalising denominator (F.normalize's eps; the DCT-KD code has none and gives NaN for a
# constant map) and of the cosine's norms (F.cosine_similarity's eps).
NORM_EPS = 1e-12
COSINE_EPS = 1e-8


def work_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------
# Pixel / global (KTFT) transfer loss


def global_term(mode: str, proj_s: Tensor, proj_t: Tensor) -> Tensor:
    """The unweighted global term from the pooled (N, C, J) projections of student and teacher.

    'gap' / 'dct_lowpass': ``sum_{n,c,j} (P_s - P_t)^2 / (N C)``; 'cosine': ``mean_n (1 - cos(P_s[n], P_t[n]))``
    over the channel vector of GAPs, with each norm clamped at 1e-8; 'none': 0.
    """
    n, c = proj_s.shape[:2]
    if mode == "none" or n * c == 0:
        return proj_s.new_zeros(())
    if mode == "cosine":
        a, b = proj_s[..., 0], proj_t[..., 0]
        norms = a.norm(dim=1).clamp_min(COSINE_EPS) * b.norm(dim=1).clamp_min(COSINE_EPS)
        return (1 - (a * b).sum(dim=1) / norms).mean()
    return (proj_s - proj_t).pow(2).sum() / (n * c)


def pixel_global_terms(student: Tensor, teacher: Tensor, mode: str, keep: int) -> Tensor:
    """``[pixel, global]`` (unweighted) for (N, C, H, W) features: pixel = mean of (s - t)^2 over all elements;
    global = :func:`global_term` of the :func:`projection_basis` projections."""
    work = work_dtype(student, teacher)
    s, t = student.to(work), teacher.to(work)
    n, c, h, w = s.shape
    pixel = (s - t).pow(2).sum() / max(s.numel(), 1)
    if s.numel() == 0:
        return torch.stack([pixel, pixel])
    basis = projection_basis(mode, keep, h, w, work, s.device)
    proj_s = torch.einsum("nck,jk->ncj", s.reshape(n, c, h * w), basis)
    proj_t = torch.einsum("nck,jk->ncj", t.reshape(n, c, h * w), basis)
    return torch.stack([pixel, global_term(mode, proj_s, proj_t)])


def transfer_stats(student: Tensor, teacher: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Kernel contract of the forward pass: ``sq[n, c] = sum_hw (s - t)^2`` and
    ``proj[0|1, n, c, j] = sum_hw basis[j, hw] s|t[n, c, hw]``, in the basis dtype."""
    n, c, h, w = student.shape
    work = basis.dtype
    s, t = student.to(work).reshape(n, c, h * w), teacher.to(work).reshape(n, c, h * w)
    sq = (s - t).pow(2).sum(dim=2)
    proj = torch.stack([torch.einsum("nck,jk->ncj", s, basis), torch.einsum("nck,jk->ncj", t, basis)])
    return sq, proj


def transfer_grad(student: Tensor, teacher: Tensor, basis: Tensor, pixel_coef: Tensor, coef: Tensor) -> Tensor:
    """Kernel contract of the backward pass, in the student's dtype:
    ``grad[n, c, hw] = pixel_coef * (s - t) + sum_j coef[n, c, j] basis[j, hw]``."""
    n, c, h, w = student.shape
    work = basis.dtype
    d = (student.to(work) - teacher.to(work)).reshape(n, c, h * w)
    grad = pixel_coef.to(work) * d + torch.einsum("ncj,jk->nck", coef.to(work), basis)
    return grad.reshape(n, c, h, w).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# Attention-map distances: attention transfer (Zagoruyko & Komodakis) and DCT-KD (Lopez-Cifuentes et al.)


def _normalise_minmax(x: Tensor, divide_by_max: bool) -> Tensor:
    """Per sample, over the flattened map: (x - min) / max (DCT-KD variant A) or (x - min) / (max - min)
    (variant B), the denominator clamped at 1e-12. min/max(dim) route the gradient to one index each."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi if divide_by_max else hi - lo).clamp_min(NORM_EPS)


def dct_kd_coefficients(maps: Tensor, kind: str) -> Tensor:
    """(N, H, W) attention maps -> (N, H*W) normalised coefficients D of the DCT-KD pipeline (methods.md §5):
    min-max normalise, subtract the mean, transform, (variant A: abs), min-max normalise.

    'dct_a': |Re FFT2| with the (x - min)/max normalisations (``DFTOurs.py`` at "Code for submission");
    'dct_b': Re FFT2 with (x - min)/(max - min) (main HEAD, ``DFTOurs_newer.py``); 'dct': variant B's
    pipeline with the orthonormal DCT-II in place of Re FFT2."""
    n, h, w = maps.shape
    divide_by_max = kind == "dct_a"
    a = _normalise_minmax(maps.reshape(n, h * w), divide_by_max)
    z = (a - a.mean(dim=1, keepdim=True)).reshape(n, h, w)
    if kind == "dct":
        dh = torch.from_numpy(matrix("dct", h, "ortho")).to(z)
        dw = torch.from_numpy(matrix("dct", w, "ortho")).to(z)
        r = dh @ z @ dw.T
    else:
        # The authors' computation, literally: an FFT along H then along W, real part.
        r = torch.fft.fft(torch.fft.fft(z, dim=1), dim=2).real
        if kind == "dct_a":
            r = r.abs()
    return _normalise_minmax(r.reshape(n, h * w), divide_by_max)


def attention_map_distance(map_s: Tensor, map_t: Tensor, kind: str) -> Tensor:
    """Per-sample distance (N,) between (N, H, W) attention maps (``mean_c |F|^p``).

    - 'at_code':  ``sum_hw (q_s - q_t)^2`` with ``q = F.normalize(map.flatten(1))`` (the AT authors' code; the
      loss averages it over N and HW);
    - 'at_paper': ``||q_s - q_t||_2`` (the AT paper and torchdistill's mode='paper'; the loss averages over N);
    - 'dct_a' / 'dct_b' / 'dct': ``||D_s - D_t||_2`` of :func:`dct_kd_coefficients`.
    """
    n = map_s.shape[0]
    if kind in ("at_code", "at_paper"):
        q_s = torch.nn.functional.normalize(map_s.reshape(n, -1), dim=1, eps=NORM_EPS)
        q_t = torch.nn.functional.normalize(map_t.reshape(n, -1), dim=1, eps=NORM_EPS)
        sq = (q_s - q_t).pow(2).sum(dim=1)
        return sq if kind == "at_code" else _safe_sqrt(sq)
    diff = dct_kd_coefficients(map_s, kind) - dct_kd_coefficients(map_t, kind)
    return _safe_sqrt(diff.pow(2).sum(dim=1))


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0: identical maps give a zero gradient, as the kernels do. NaN stays
    NaN (clamp_min keeps it): a NaN feature must show in the loss, as it does in ``F.normalize`` or ``torch.norm``."""
    return torch.where(x <= 0, x.new_zeros(()), x.clamp_min(torch.finfo(x.dtype).tiny).sqrt())


# ----------------------------------------------------------------------------------------------
# Soft targets (Hinton et al.; RepDistiller's DistillKL)


def soft_target_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """(N, K) logits -> (N,) ``KL(softmax(t/T) || softmax(s/T))`` per row (unscaled), stable in log space.
    Classes with p_t = 0 (a -inf teacher logit) add 0 (0 log 0 = 0, as kl_div with a probability target); a NaN
    p_t (a NaN or +inf logit in the row) makes the row NaN, as in kl_div."""
    work = work_dtype(student_logits, teacher_logits)
    log_p_s = torch.log_softmax(student_logits.to(work) / temperature, dim=1)
    log_p_t = torch.log_softmax(teacher_logits.to(work) / temperature, dim=1)
    p_t = log_p_t.exp()
    return torch.where(p_t == 0, 0.0, p_t * (log_p_t - log_p_s)).sum(dim=1)


def soft_target_stats(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Kernel contract of the forward pass: (N, 3) ``[kl, logsumexp(s/T), logsumexp(t/T)]`` per row."""
    work = work_dtype(student_logits, teacher_logits)
    lse_s = torch.logsumexp(student_logits.to(work) / temperature, dim=1)
    lse_t = torch.logsumexp(teacher_logits.to(work) / temperature, dim=1)
    return torch.stack([soft_target_rows(student_logits, teacher_logits, temperature), lse_s, lse_t], dim=1)


def soft_target_grads(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, rows: Tensor, grad_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Kernel contract of the backward pass, from the saved rows: with g = grad_rows[:, None],
    ``grad_s = g/T (p_s - p_t)`` and ``grad_t = g/T p_t (log p_t - log p_s - kl)``, in the logits' dtype."""
    work = rows.dtype
    log_p_s = student_logits.to(work) / temperature - rows[:, 1:2]
    log_p_t = teacher_logits.to(work) / temperature - rows[:, 2:3]
    p_t = log_p_t.exp()
    g = grad_rows.to(work)[:, None] / temperature
    grad_s = g * (log_p_s.exp() - p_t)
    grad_t = torch.where(p_t == 0, 0.0, g * p_t * (log_p_t - log_p_s - rows[:, 0:1]))
    return grad_s.to(student_logits.dtype), grad_t.to(teacher_logits.dtype)
