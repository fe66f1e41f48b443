"""``python -m ktkernels.bench train``: a CPU smoke run of the CLI, and the reference step computing the same loss
as the ktkernels step (so the benchmark compares like with like). No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from ktkernels.bench import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return train.build_models("resnet18")


def test_reference_step_computes_the_ktk_loss(models):
    """fp32 on CPU, same weights and batch, before any optimizer step: the ktk step (ktkernels blur layers, fused
    loss) and the reference step (recipe blur layers, unfused recipe loss) give the same total loss."""
    teacher, student = models
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, train.NUM_CLASSES, (4,), generator=gen)
    totals, transfers = {}, {}
    for name in ("ktk", "reference"):
        step = train.make_step(name, teacher, student, "cpu", amp=False)
        assert (train.count_blur_layers(step.student) == 0) == (name == "reference")
        with torch.no_grad():
            terms = step.losses(x, y)
        step.close()
        totals[name] = float(terms["total"])
        transfers[name] = totals[name] - float(terms["ce"])
    assert transfers["ktk"] > 0  # the transfer loss is really in the total (blurred student != teacher)
    assert totals["reference"] == pytest.approx(totals["ktk"], rel=1e-4)
    assert transfers["reference"] == pytest.approx(transfers["ktk"], rel=1e-3)


def test_cli_smoke(tmp_path, capsys):
    train.main(
        [
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "--batch",
            "2",
            "--size",
            "64",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--variants",
            "ktk,reference",
            "--loader-images",
            "32",
            "--loader-classes",
            "4",
            "--loader-epochs",
            "1",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
            "--stem",
            "train_smoke",
        ]
    )
    payload = json.loads((tmp_path / "train_smoke.json").read_text())
    table = (tmp_path / "train_smoke.md").read_text()
    assert [r["variant"] for r in payload["results"]] == ["ktk", "reference"]
    for r in payload["results"]:
        assert r["error"] is None and r["ms"] > 0 and r["samples"] == 1, r
        assert r["met"] is None  # targets are checked on CUDA only
        assert f"| {r['variant']} |" in table
    stages = [r["stage"] for r in payload["loader"]]
    assert stages == ["synthetic JPEGs", "prepare_cache", "CachedLoader", "CachedLoader + train_transform"]
    for r in payload["loader"]:
        assert r["error"] is None and r["images"] == 32 and r["img_s"] > 0, r
        assert f"| {r['stage']} |" in table
    assert payload["env"]["cpu_count"] >= 1 and "cores" in table
    # same weights, same batch: the first step's loss agrees between the variants
    first = [r["first_loss"] for r in payload["results"]]
    assert first[1] == pytest.approx(first[0], rel=1e-4)
    assert "## KTFT training step" in capsys.readouterr().out
