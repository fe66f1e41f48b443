"""The KTFT engine, models and demo (``ktkernels.train``): losses against the reference backend, evaluation maths,
schedules, the demo end to end at tiny settings, and one-line CLI errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktkernels.train import __main__ as cli
from ktkernels.train.demo import DemoSettings, random_shift_crops, run_demo
from ktkernels.train.engine import (
    KTFTConfig,
    KTFTStep,
    evaluate,
    make_optimizer,
    make_schedule,
    shift_consistency,
    step_seed,
)
from ktkernels.train.models import ModelError, build_teacher, check_stages, default_stages, demo_teacher, make_student


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = demo_teacher(10).eval()
    return teacher, make_student(teacher)


def test_student_keeps_weights_and_stage_names(pair):
    teacher, student = pair
    assert default_stages(teacher) == default_stages(student) == ["layer1", "layer2", "layer3", "layer4"]
    # antialias moves a few keys (conv2 -> conv2.1 behind the blur) but keeps every weight value
    values = [torch.cat([p.detach().flatten() for p in m.parameters()]).sort().values for m in pair]
    assert torch.equal(values[0], values[1])


def test_reference_switch_gives_the_same_losses(pair):
    teacher, student = pair
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 36, 36), torch.randint(0, 10, (4,))
    results = []
    for reference in (False, True):
        cfg = KTFTConfig(stages=default_stages(teacher), w_dct=0.5, w_soft=0.5, reference=reference)
        model = copy.deepcopy(student).train()
        step = KTFTStep(model, teacher, cfg, make_optimizer(model.parameters(), cfg))
        terms = step.losses(x, y)
        terms["total"].backward()
        results.append(({k: float(v.detach()) for k, v in terms.items()}, model.conv1.weight.grad.clone()))
        step.close()
    (fused, grad_fused), (ref, grad_ref) = results
    assert set(fused) == set(ref) and {"ce", "dct", "soft", "transfer.layer4.pixel", "total"} <= set(fused)
    for key in fused:
        assert fused[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    # fp32 through 8 blocks, fused vs reference summation order: compare at the gradient's own scale
    torch.testing.assert_close(grad_fused, grad_ref, rtol=1e-3, atol=1e-3 * float(grad_ref.abs().max()))


def test_plain_finetuning_does_not_run_the_teacher(pair):
    teacher, student = pair
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    cfg = KTFTConfig(steps=1)
    model = copy.deepcopy(student)
    x, y = torch.randn(2, 3, 36, 36), torch.tensor([1, 2])
    expected_ce = F.cross_entropy(copy.deepcopy(model).train()(x), y)  # the plain CE of the student's logits
    step = KTFTStep(model, teacher, cfg, make_optimizer(model.parameters(), cfg))
    terms = step.step(x, y)
    handle.remove()
    assert calls == [] and set(terms) == {"ce", "total"} and terms["ce"] == terms["total"]
    torch.testing.assert_close(terms["ce"], expected_ce.detach())


def test_a_ktft_step_moves_only_the_student(pair):
    teacher, student = pair
    before = copy.deepcopy(teacher.state_dict())
    cfg = KTFTConfig(steps=1, stages=["layer2", "layer4"], lr=0.1)
    model = copy.deepcopy(student)
    w0 = model.fc.weight.detach().clone()
    step = KTFTStep(model, teacher, cfg, make_optimizer(model.parameters(), cfg))
    terms = step.step(torch.randn(2, 3, 36, 36), torch.tensor([1, 2]))
    for tap in (step.student_tap, step.teacher_tap):  # the step keeps no features (nor their memory) past itself
        with pytest.raises(RuntimeError, match="no output captured"):
            tap["layer2"]
    step.close()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(model.fc.weight, w0)
    assert math.isfinite(terms["total"]) and terms["transfer.layer2.pixel"] > 0
    assert not any(m._forward_hooks for m in [*model.modules(), *teacher.modules()])  # close() removed the taps


def test_schedules_and_optimizers():
    p = [nn.Parameter(torch.zeros(1))]
    cfg = KTFTConfig(steps=10, lr=1.0, warmup_steps=2)
    sched = make_schedule(make_optimizer(p, cfg), cfg)
    factors = [sched.lr_lambdas[0](k) for k in range(12)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0 and factors[6] == pytest.approx(0.5) and factors[10] == 0
    assert factors[11] == 0  # past the last step the cosine stays at 0
    cfg = KTFTConfig(steps=10, schedule="step", step_every=3, gamma=0.5)
    step = make_schedule(make_optimizer(p, cfg), cfg).lr_lambdas[0]
    assert [step(k) for k in (0, 2, 3, 6, 9)] == [1.0, 1.0, 0.5, 0.25, 0.125]
    cfg = KTFTConfig(steps=10, schedule="step", step_every=3, gamma=0.5, warmup_steps=2)
    step = make_schedule(make_optimizer(p, cfg), cfg).lr_lambdas[0]
    assert [step(k) for k in (0, 1, 2, 4, 5, 8)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.25]  # decay counted after warm-up
    assert isinstance(make_optimizer(p, KTFTConfig(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be"):
        make_optimizer(p, KTFTConfig(optimizer="lamb"))
    with pytest.raises(ValueError, match="schedule must be"):
        make_schedule(make_optimizer(p, cfg), KTFTConfig(schedule="poly"))


def test_step_seeds_are_distinct_per_seed_step_and_rank():
    # The augmentation of step k on rank r draws from step_seed(seed, k, r): no two (seed, step, rank) share one,
    # and rank 0 keeps the single-process seeds.
    seeds = {step_seed(s, k, r) for s in range(4) for k in range(300) for r in range(8)}
    assert len(seeds) == 4 * 300 * 8 and all(0 <= v < 2**63 for v in seeds)
    assert all(step_seed(s, k, 0) == step_seed(s, k) for s in range(4) for k in range(300))


class _Fixed(nn.Module):
    """Logits that depend on the top-left pixel of channel 0 only: shifts change them, labels are known."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([v, -v, torch.zeros_like(v), 0.5 * v, -0.5 * v, 0.1 * v], dim=1)


def test_evaluate_top1_top5_and_consistency():
    x = torch.zeros(6, 3, 8, 8)
    x[:3] = 1.0  # constant images: every shift sees the same pixel
    x[3:] = -1.0
    # positive v ranks 0,3,5,2,4,1; negative v ranks 1,4,2,5,3,0. Sample 2's label is the 5th class (top-5 only).
    labels = torch.tensor([0, 1, 4, 1, 0, 2])
    model = _Fixed().eval()
    m = evaluate(model, lambda: iter([(x, labels)]), max_shift=2)
    assert m["top1"] == pytest.approx(100 * 2 / 6) and m["top5"] == pytest.approx(100 * 4 / 6)
    assert m["consistency"] == 100.0
    assert not model.training  # the training flag is restored, whichever it was
    # Accuracy reads the centre crop: (1, 1) onwards for max_shift 2, where only pixel (1, 1) is positive.
    centre = torch.full((2, 3, 8, 8), -1.0)
    centre[..., 1, 1] = 1.0
    assert evaluate(_Fixed(), lambda: iter([(centre, torch.tensor([0, 0]))]), max_shift=2)["top1"] == 100.0
    ramp = torch.arange(8.0).repeat(6, 3, 8, 1).transpose(-1, -2) + torch.arange(8.0)  # varies with the offset
    agree = shift_consistency(_Fixed(), ramp, 4, torch.Generator().manual_seed(3))
    assert agree.dtype == torch.bool and agree.shape == (6,)


def test_shift_consistency_offsets_cover_zero_to_max_shift():
    class TopLeft(nn.Module):  # records the top-left pixel of every crop: 10 * dy + dx of the index image
        def __init__(self):
            super().__init__()
            self.seen = set()

        def forward(self, x):
            self.seen.add(int(x[0, 0, 0, 0]))
            return x[:, 0, :2, 0]

    index = (10 * torch.arange(6.0)[:, None] + torch.arange(6.0)).expand(1, 3, 6, 6)
    model, generator = TopLeft(), torch.Generator().manual_seed(0)
    for _ in range(100):
        shift_consistency(model, index, 2, generator)
    assert model.seen == {10 * dy + dx for dy in range(3) for dx in range(3)}


def test_random_shift_crops_are_crops():
    images = torch.arange(2 * 6 * 6 * 3, dtype=torch.int32).reshape(2, 6, 6, 3)
    crops = random_shift_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 4, 4, 3)
    for n in range(2):
        found = [
            (dy, dx) for dy in range(3) for dx in range(3) if torch.equal(images[n, dy : dy + 4, dx : dx + 4], crops[n])
        ]
        assert len(found) == 1


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown architecture 'resnet5'"):
        build_teacher("resnet5")
    with pytest.raises(ModelError, match="weights file not found"):
        build_teacher("resnet18", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_teacher("resnet18", weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ModelError, match="do not fit ResNet"):
        build_teacher("resnet18", weights=wrong)
    with pytest.raises(ModelError, match=r"unknown stage name\(s\) \['layer9'\]"):
        check_stages(demo_teacher(), ["layer1", "layer9"])
    with pytest.raises(ModelError, match="no default stages for Sequential"):
        default_stages(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ModelError, match="does not know"):
        make_student(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_teacher_weights_round_trip(tmp_path):
    model = build_teacher("resnet18", num_classes=7)
    path = tmp_path / "t.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again = build_teacher("resnet18", num_classes=7, weights=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_demo_end_to_end_tiny(tmp_path):
    logs = []
    saved = tmp_path / "teacher.pt"
    settings = DemoSettings(teacher_epochs=1, finetune_steps=2, per_class=2, save_teacher=str(saved))
    rows = run_demo(settings, log=logs.append)
    assert list(rows) == [
        "teacher (plain ResNet)",
        "student, no fine-tuning",
        "student, plain fine-tuning",
        "student, KTFT",
    ]
    for metrics in rows.values():
        assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and 0 <= metrics["consistency"] <= 100
    assert rows["teacher (plain ResNet)"]["top1"] > 50  # one epoch already learns the digits
    assert "shift consistency" in "\n".join(logs)
    teacher = build_teacher("demo", weights=saved)  # what `train --arch demo --teacher-weights` loads
    assert isinstance(teacher, torch.nn.Module)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a command: --demo, prepare or train"),
        (["--demo", "--per-class", "0"], "--per-class must be >= 1"),
        (["--demo", "--device", "cuda:0"], "no CUDA GPU"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_annealed_loss_weights(pair):
    """``anneal`` moves a weight linearly from its w_* value at step 0 to the given value at the last step; a term
    that starts at weight 0 is still computed when it anneals upwards."""
    teacher, student = pair
    cfg = KTFTConfig(steps=5, lr=0.0, stages=["layer4"], w_soft=0.0, w_pixel=2.0, anneal={"soft": 1.0, "pixel": 0.0})
    model = copy.deepcopy(student)
    step = KTFTStep(model, teacher, cfg, make_optimizer(model.parameters(), cfg))
    x, y = torch.randn(2, 3, 36, 36), torch.tensor([1, 2])
    seen = []
    for _ in range(5):
        seen.append((step.weight("soft"), step.weight("pixel")))
        terms = step.step(x, y)
        expected = (
            terms["ce"]
            + seen[-1][1] * terms["transfer.layer4.pixel"]
            + terms["transfer.layer4.global"]
            + seen[-1][0] * terms["soft"]
        )
        assert torch.allclose(terms["total"], expected, rtol=1e-5)
    step.close()
    assert seen == [(0.0, 2.0), (0.25, 1.5), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)]
    cfg = KTFTConfig(steps=3, lr=0.0, stages=["layer4"], w_dct=0.0, anneal={"dct": 1.0})
    step = KTFTStep(model, teacher, cfg, make_optimizer(model.parameters(), cfg))
    assert "dct" in step.step(x, y)  # computed from the first step, at weight 0
    step.close()
    with pytest.raises(ValueError, match="unknown loss weight"):
        KTFTStep(model, teacher, KTFTConfig(anneal={"kd": 0.0}), make_optimizer(model.parameters(), cfg))
