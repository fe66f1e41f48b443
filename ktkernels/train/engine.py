"""The KTFT training engine: one step = frozen teacher forward + student forward/backward + CE + transfer losses.

Knowledge-transferred fine-tuning (Suzuki et al. 2021/2022, ``../shared/reference/methods.md`` §1): the student is
the anti-aliased copy of a pre-trained teacher; it is fine-tuned on few images with

    loss = w_ce CE(student(x), y) + sum over stages of [w_pixel pixel(s, t) + w_global global(s, t)]
           (+ w_dct DCT attention + w_soft soft targets)

where s and t are the student's and the frozen teacher's features at the tapped stages (forward hooks, the models'
code unchanged). Every loss runs on the ktkernels ops; ``reference=True`` runs them on the pure-PyTorch backend.

Determinism: the augmentation of step k draws from a generator seeded by ``(seed, k)``, and the data order is a
function of ``(seed, epoch)``, so a run resumed from a checkpoint at step k continues exactly as the uninterrupted
run would.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from ..losses import PixelGlobalTransferLoss, dct_attention_loss, soft_target_loss
from ..transfer import AnnealedWeight, FeatureTap

#: Loss weights that KTFTConfig.anneal can schedule.
ANNEALABLE = ("ce", "pixel", "global", "dct", "soft")

__all__ = [
    "KTFTConfig",
    "KTFTStep",
    "atomic_save",
    "evaluate",
    "evaluate_counts",
    "make_optimizer",
    "make_schedule",
    "percentages",
    "shift_consistency",
    "step_seed",
]


@dataclass
class KTFTConfig:
    """The knobs of a fine-tuning run (also what a checkpoint records)."""

    steps: int = 100
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    step_every: int = 30  # the step schedule's period, in steps
    gamma: float = 0.1
    warmup_steps: int = 0
    stages: list[str] = field(default_factory=list)  # empty: CE only (plain fine-tuning)
    w_ce: float = 1.0
    w_pixel: float = 1.0
    w_global: float = 1.0
    global_mode: str = "gap"
    w_dct: float = 0.0
    w_soft: float = 0.0
    temperature: float = 4.0
    # Linear annealing of loss weights over the run: {"ce"|"pixel"|"global"|"dct"|"soft": weight at the last
    # step}; each goes from its w_* value at step 0 (AnnealedWeight over the steps, methods.md §3).
    anneal: dict[str, float] = field(default_factory=dict)
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (tests use "aot_eager")
    reference: bool = False  # every ktkernels op on the pure-PyTorch backend
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The augmentation seed of one step on one rank, independent of the device: distinct per (seed, step, rank)
    for seeds below 7e7, runs below 1,000,003 steps and fewer than 65,537 ranks.

    Rank 0 keeps the single-process seeds ``seed * 1_000_003 + step``. The other ranks take the upper half of the
    range, ``2**62 + ...``, which no rank-0 seed reaches: a plain ``base * 65_537 + rank`` gave rank r's first
    step the seed of rank 0's step r (seed 0), and so the same crops, flips and dropout masks."""
    base = seed * 1_000_003 + step
    if rank == 0:
        return base % (2**63 - 1)
    return 2**62 + (base * 65_537 + rank) % 2**62


def make_optimizer(params: Iterable[nn.Parameter], cfg: KTFTConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def make_schedule(optimizer: torch.optim.Optimizer, cfg: KTFTConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to 0 over the remaining steps, a step decay, or a constant rate."""
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {cfg.schedule!r}")
    warmup, total = cfg.warmup_steps, max(cfg.steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
        if cfg.schedule == "step":
            return cfg.gamma ** ((step - warmup) // max(cfg.step_every, 1))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class KTFTStep:
    """One training step of the student against the frozen teacher, with hooks on the configured stages.

    ``step(images, labels)`` runs the teacher (no grad, eval mode) and the student (train mode), the losses, the
    backward and the optimizer step; it returns the detached loss terms as 0-d tensors on the device (reading
    them is a host sync: log every few steps, not every step). With no stages (and no soft targets) the teacher
    is not run at all: plain fine-tuning.

    ``student`` may be wrapped in ``DistributedDataParallel``: the stages are then tapped on ``student.module``
    and the forward goes through the wrapper (its bucketed gradient all-reduce overlaps the backward).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        cfg: KTFTConfig,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.optimizer, self.schedule = optimizer, schedule
        self.use_dct = bool(cfg.stages) and (cfg.w_dct > 0 or cfg.anneal.get("dct", 0) > 0)
        self.use_soft = cfg.w_soft > 0 or cfg.anneal.get("soft", 0) > 0
        needs_teacher = bool(cfg.stages) or self.use_soft
        if needs_teacher and teacher is None:
            raise ValueError("transfer losses need a teacher")
        self.teacher_used = needs_teacher
        core = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
        self.student_tap = FeatureTap(core, cfg.stages, role="student") if cfg.stages else None
        self.teacher_tap = FeatureTap(teacher, cfg.stages, detach=True, role="teacher") if cfg.stages else None
        self.transfer = (
            PixelGlobalTransferLoss(cfg.stages, w_pixel=cfg.w_pixel, w_global=cfg.w_global, global_mode=cfg.global_mode)
            if cfg.stages
            else None
        )
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        unknown = set(cfg.anneal) - set(ANNEALABLE)
        if unknown:
            raise ValueError(f"anneal: unknown loss weight(s) {sorted(unknown)}; choose from {', '.join(ANNEALABLE)}")
        self._anneal = {
            k: AnnealedWeight(getattr(cfg, f"w_{k}"), v, max(cfg.steps - 1, 0)) for k, v in cfg.anneal.items()
        }
        self.steps_done = 0  # the annealing clock (a resumed run sets it to the checkpoint's step)
        self._student_forward = torch.compile(student, backend=cfg.compile_backend) if cfg.compile else student

    def weight(self, name: str) -> float:
        """The current weight of loss term ``name`` (``ce``, ``pixel``, ``global``, ``dct``, ``soft``)."""
        schedule = self._anneal.get(name)
        return schedule(self.steps_done) if schedule is not None else getattr(self.cfg, f"w_{name}")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.cfg.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss terms of one batch (student in its current mode); ``"total"`` is their weighted sum."""
        cfg = self.cfg
        with self._backend(), self.autocast(images.device):
            teacher_logits = None
            if self.teacher_used:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
            logits = self._student_forward(images)
            terms = {"ce": F.cross_entropy(logits.float(), labels)}
            total = self.weight("ce") * terms["ce"]
            if self.transfer is not None:
                self.transfer.w_pixel, self.transfer.w_global = self.weight("pixel"), self.weight("global")
                student_feats, teacher_feats = self.student_tap.features(), self.teacher_tap.features()
                out = self.transfer(student_feats, teacher_feats)
                total = total + out.total
                terms.update({f"transfer.{k}": v for k, v in out.terms.items()})
                if self.use_dct:
                    dct = sum(dct_attention_loss(student_feats[s], teacher_feats[s]) for s in cfg.stages)
                    terms["dct"] = dct.detach()
                    total = total + self.weight("dct") * dct
                self.student_tap.clear()
                self.teacher_tap.clear()
            if self.use_soft:
                soft = soft_target_loss(logits.float(), teacher_logits.float(), cfg.temperature)
                terms["soft"] = soft.detach()
                total = total + self.weight("soft") * soft
        terms["total"] = total
        return terms

    def step(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        self.student.train()
        with self._backend():  # the backward ops pick their backend when they run, too
            terms = self.losses(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        self.steps_done += 1
        return {k: v.detach() for k, v in terms.items()}

    def _backend(self) -> contextlib.AbstractContextManager:
        return backend.use_backend("torch") if self.cfg.reference else contextlib.nullcontext()

    def close(self) -> None:
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.remove()


def evaluate(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
    *,
    max_shift: int,
    seed: int = 0,
    channels_last: bool = True,
) -> dict[str, float]:
    """Top-1, top-5 and shift consistency of ``model`` (eval mode; the training flag is restored).

    Args:
        model: the classifier.
        batches: a callable returning an iterator of ``(images (B, 3, H, W) float, normalised; labels (B,))``.
        max_shift: the largest shift in pixels. Accuracy uses the centre ``(H - max_shift) x (W - max_shift)`` crop;
            consistency compares the predictions on two crops of that size at random offsets in
            ``[0, max_shift]`` (one pair of offsets per batch, as in Zhang 2019's evaluation).
        seed: the offsets' generator seed.

    Returns:
        ``{"top1", "top5", "consistency"}`` in percent.
    """
    return percentages(evaluate_counts(model, batches, max_shift=max_shift, seed=seed, channels_last=channels_last))


def percentages(counts: dict[str, int]) -> dict[str, float]:
    """:func:`evaluate_counts`' sums (possibly added up over ranks) as ``{"top1", "top5", "consistency"}`` %."""
    if counts["count"] == 0:
        raise ValueError("evaluate: no images")
    return {k: 100 * counts[k] / counts["count"] for k in ("top1", "top5", "consistency")}


@torch.no_grad()
def evaluate_counts(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
    *,
    max_shift: int,
    seed: int = 0,
    channels_last: bool = True,
) -> dict[str, float]:
    """:func:`evaluate` as counts: ``{"top1", "top5", "consistency", "count"}`` (correct / agreeing images), which
    ranks can sum before :func:`percentages`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct1 = correct5 = agree = count = 0
    try:
        for images, labels in batches():
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            h, w = images.shape[-2] - max_shift, images.shape[-1] - max_shift
            centre = max_shift // 2
            logits = model(images[..., centre : centre + h, centre : centre + w]).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(dim=1).sum())
            agree += int(shift_consistency(model, images, max_shift, generator).sum())
            count += labels.numel()
    finally:
        model.train(was_training)
    return {"top1": correct1, "top5": correct5, "consistency": agree, "count": count}


def shift_consistency(model: nn.Module, images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """(B,) bool: whether ``model`` predicts the same class for two crops of ``images`` (B, C, H, W) of size
    ``(H - max_shift, W - max_shift)`` at two random offsets (the same two offsets for the whole batch)."""
    h, w = images.shape[-2] - max_shift, images.shape[-1] - max_shift
    offsets = torch.randint(0, max_shift + 1, (2, 2), generator=generator).tolist()
    predictions = [model(images[..., dy : dy + h, dx : dx + w]).argmax(dim=1) for dy, dx in offsets]
    return predictions[0] == predictions[1]


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
