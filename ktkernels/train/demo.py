"""A miniature of the KTFT experiment on scikit-learn's digits (no download; about a minute on 2 CPU cores).

1. Train a small plain ResNet teacher on the digits' training split (random shifts as augmentation).
2. Make its anti-aliased student: ``antialias(deepcopy(teacher))``.
3. Fine-tune the student on K images per class, plainly (CE) and with KTFT (CE + pixel/global at the four stages).
4. Print top-1 accuracy and shift consistency for the teacher, the student before fine-tuning, plain fine-tuning
   and KTFT, on the test split.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import digits_dataset, eval_transform
from .data.digits import per_class_indices
from .engine import KTFTConfig, KTFTStep, atomic_save, evaluate, make_optimizer, make_schedule, step_seed
from .models import default_stages, demo_teacher, make_student

__all__ = ["DemoSettings", "run_demo"]

_MEAN, _STD = 0.5, 0.5  # the digits are grey: one mean/std for the three replicated channels


@dataclass
class DemoSettings:
    size: int = 40  # the digits are upsampled from 8x8 to size x size
    max_shift: int = 4  # training crops and evaluation shifts: (size - max_shift) squared
    teacher_epochs: int = 8
    teacher_batch: int = 64
    teacher_lr: float = 0.05
    per_class: int = 5
    finetune_steps: int = 60
    finetune_lr: float = 0.01
    w_pixel: float = 1.0
    w_global: float = 1.0
    seed: int = 0
    device: str = "cpu"
    save_teacher: str | None = None  # also write the trained teacher's state dict here


def normalise(images_u8: Tensor) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, channels_last memory, ``(x/255 - 0.5) / 0.5``."""
    return eval_transform(images_u8, images_u8.shape[1], mean=(_MEAN,) * 3, std=(_STD,) * 3)


def random_shift_crops(images_u8: Tensor, crop: int, generator: torch.Generator) -> Tensor:
    """(N, H, W, C) -> (N, crop, crop, C): each image cropped at its own random offset (a random shift)."""
    n, h, w, _ = images_u8.shape
    dy = torch.randint(0, h - crop + 1, (n,), generator=generator)
    dx = torch.randint(0, w - crop + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(crop))[:, :, None].to(images_u8.device)
    cols = (dx[:, None] + torch.arange(crop))[:, None, :].to(images_u8.device)
    return images_u8[torch.arange(n, device=images_u8.device)[:, None, None], rows, cols]


def _batches(images: Tensor, labels: Tensor, batch: int) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    return lambda: ((normalise(images[i : i + batch]), labels[i : i + batch]) for i in range(0, len(labels), batch))


def train_teacher(images: Tensor, labels: Tensor, s: DemoSettings, log: Callable[[str], None]) -> nn.Module:
    torch.manual_seed(s.seed)
    teacher = demo_teacher(int(labels.max()) + 1).to(s.device, memory_format=torch.channels_last)
    steps_per_epoch = len(labels) // s.teacher_batch
    cfg = KTFTConfig(steps=s.teacher_epochs * steps_per_epoch, lr=s.teacher_lr, weight_decay=5e-4, seed=s.seed)
    optimizer = make_optimizer(teacher.parameters(), cfg)
    trainer = KTFTStep(teacher, None, cfg, optimizer, make_schedule(optimizer, cfg))
    crop = s.size - s.max_shift
    step = 0
    for epoch in range(s.teacher_epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s.seed + epoch))
        for b in range(steps_per_epoch):
            idx = order[b * s.teacher_batch : (b + 1) * s.teacher_batch]
            generator = torch.Generator().manual_seed(step_seed(s.seed, step))
            x = normalise(random_shift_crops(images[idx], crop, generator)).to(s.device)
            terms = trainer.step(x, labels[idx].to(s.device))
            step += 1
        log(f"  teacher epoch {epoch + 1}/{s.teacher_epochs}: ce {float(terms['ce']):.3f}")
    trainer.close()
    return teacher.eval()


def finetune(
    student: nn.Module, teacher: nn.Module, images: Tensor, labels: Tensor, s: DemoSettings, stages: list[str]
) -> nn.Module:
    """Full-batch fine-tuning on the K-per-class subset: CE only when ``stages`` is empty, else KTFT."""
    cfg = KTFTConfig(
        steps=s.finetune_steps, lr=s.finetune_lr, stages=stages, w_pixel=s.w_pixel, w_global=s.w_global, seed=s.seed
    )
    optimizer = make_optimizer(student.parameters(), cfg)
    trainer = KTFTStep(student, teacher, cfg, optimizer, make_schedule(optimizer, cfg))
    crop = s.size - s.max_shift
    for step in range(cfg.steps):
        generator = torch.Generator().manual_seed(step_seed(s.seed, step))
        trainer.step(normalise(random_shift_crops(images, crop, generator)).to(s.device), labels.to(s.device))
    trainer.close()
    return student.eval()


def run_demo(settings: DemoSettings | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Run the miniature experiment; returns ``{row: {"top1", "top5", "consistency"}}`` and logs a table."""
    s = settings or DemoSettings()
    start = time.perf_counter()
    train_x, train_y, _ = digits_dataset("train", size=s.size, seed=s.seed)
    test_x, test_y, _ = digits_dataset("test", size=s.size, seed=s.seed)
    test_y = test_y.to(s.device)
    test_batches = _batches(test_x.to(s.device), test_y, 256)
    log(f"digits: {len(train_y)} train / {len(test_y)} test images at {s.size}x{s.size}, device {s.device}")

    teacher = train_teacher(train_x, train_y, s, log)
    if s.save_teacher:
        atomic_save(teacher.state_dict(), s.save_teacher)
        log(f"teacher saved to {s.save_teacher} (use: train --data digits --arch demo --teacher-weights PATH)")
    student = make_student(teacher).to(s.device)
    stages = default_stages(teacher)
    subset = per_class_indices(train_y, s.per_class, s.seed)
    few_x, few_y = train_x[subset], train_y[subset]
    log(f"fine-tuning on {len(subset)} images ({s.per_class} per class), {s.finetune_steps} steps; stages {stages}")
    plain = finetune(copy.deepcopy(student), teacher, few_x, few_y, s, stages=[])
    ktft = finetune(copy.deepcopy(student), teacher, few_x, few_y, s, stages=stages)

    rows = {}
    for name, model in (
        ("teacher (plain ResNet)", teacher),
        ("student, no fine-tuning", student),
        ("student, plain fine-tuning", plain),
        ("student, KTFT", ktft),
    ):
        rows[name] = evaluate(model, test_batches, max_shift=s.max_shift, seed=s.seed)
    log(format_table(rows))
    log(f"({time.perf_counter() - start:.0f} s)")
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(r) for r in rows)
    lines = [f"{'model':<{width}}  top-1 %  shift consistency %", f"{'-' * width}  -------  -------------------"]
    lines += [f"{name:<{width}}  {m['top1']:7.2f}  {m['consistency']:19.2f}" for name, m in rows.items()]
    return "\n".join(lines)
