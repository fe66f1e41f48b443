"""pytest-benchmark suite for the transfer losses (compare runs over time with --benchmark-compare), and the recipes'
checks.

Run: ``pytest benchmarks/bench_losses.py --benchmark-enable`` (CPU: tiny shapes; GPU: ResNet-50's four stage
outputs at batch 128 and (4096, 1000) logits). In the normal test run benchmarks are disabled, so each case runs
once as a smoke test. Entries of one (device, case, mode) share a benchmark group, so the table compares them.

The unit tests pin each recipe the benchmark compares against (pixel+global, DCT-KD variant A, AT code mode, soft
targets) to the ktkernels op in float64 (value and student gradient), and run the whole report path at a toy size.
None of them needs the ``cpu`` backend: a ktkernels backend that cannot run is skipped with its reason.
"""

import importlib.util

import pytest
import torch

import ktkernels
from ktkernels.bench import harness, losses

GPU = torch.cuda.is_available()
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no GPU")]
IMPLS = [
    pytest.param(("cpu", "ktk-cpu"), id="cpu-ktk"),
    pytest.param(("cpu", "recipe"), id="cpu-recipe"),
    pytest.param(("cuda", "ktk-cuda"), id="cuda-ktk-cuda", marks=_gpu),
    pytest.param(("cuda", "ktk-triton"), id="cuda-ktk-triton", marks=_gpu),
    pytest.param(("cuda", "recipe"), id="cuda-recipe", marks=_gpu),
]
# CPU: tiny (the suite stays under a few seconds); GPU: the benchmark's shapes.
STAGES = {"cpu": [("a", 16, 14), ("b", 32, 7)], "cuda": losses.RESNET50_STAGES}
BATCH = {"cpu": 2, "cuda": 128}
LOGITS = {"cpu": (8, 100), "cuda": (4096, 1000)}


def _inputs(case: str, device: str, dtype=torch.float32, generator=None):
    if case == "soft-target":
        shapes = [LOGITS[device]]
    else:
        shapes = [(BATCH[device], c, h, h) for _, c, h in STAGES[device]]
    make = losses._features(shapes, dtype, torch.device(device), "NHWC")
    return make()


def _impl(case: str, device: str, name: str) -> losses.Impl:
    if name == "recipe":
        return losses.Impl(losses.RECIPE_FNS[case])
    backend = name.removeprefix("ktk-")
    names, skipped = losses.available_backends(torch.device(device), case)
    if backend not in names:
        pytest.skip(f"{name} cannot run {case} here: {skipped}")
    return losses.Impl(losses.ours(case), backend)


@pytest.mark.parametrize("mode", ["fwd", "f+b"])
@pytest.mark.parametrize("case", losses.CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_losses(benchmark, impl, case, mode):
    device, name = impl
    fn = _impl(case, device, name)
    inputs = _inputs(case, device)
    step = losses.loss_step(mode, fn, lambda: inputs)
    timed = (lambda: (step(), torch.cuda.synchronize())) if device == "cuda" else step
    benchmark.group = f"{device} {case} NHWC {mode}"
    benchmark(timed)


# ----------------------------------------------------------------------------------------------------------------
# The recipes equal the ktkernels ops (float64, value and student gradient)


def _f64_pair(case: str, layout: str = "NHWC"):
    torch.manual_seed(0)
    if case == "soft-target":
        shapes = [(5, 13)]
    else:
        shapes = [(3, 6, 7, 7), (3, 4, 8, 6), (3, 8, 14, 14)]
    students, teachers = losses._features(shapes, torch.float64, torch.device("cpu"), layout)()
    return [s.requires_grad_() for s in students], teachers


def _ops_loss(case: str, students, teachers):
    """The per-stage ktkernels functions (not the benchmark's wiring), summed over stages."""
    pairs = list(zip(students, teachers, strict=True))
    if case == "pixel+global":
        return sum(ktkernels.pixel_global_transfer_loss(s, t, 1.0, 1.0, "gap") for s, t in pairs)
    if case == "dct-kd":
        return sum(ktkernels.dct_attention_loss(s, t, variant="a") for s, t in pairs)
    if case == "at":
        return sum(ktkernels.attention_transfer_loss(s, t, 2, "code") for s, t in pairs)
    return ktkernels.soft_target_loss(students[0], teachers[0], losses.TEMPERATURE)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", losses.CASES)
def test_recipe_matches_ktkernels_op(case, layout):
    if case == "soft-target" and layout == "NCHW":
        pytest.skip("logits have no layout")
    students, teachers = _f64_pair(case, layout)
    expected = losses.RECIPE_FNS[case](students, teachers)
    expected_grads = torch.autograd.grad(expected, students)
    for got in (_ops_loss(case, students, teachers), losses.ours(case)(students, teachers)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for g, e in zip(torch.autograd.grad(got, students), expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12)


def test_dct_kd_recipe_is_variant_a():
    """The official recipe follows variant A (|Re FFT2|, (x - min) / max), not the default variant B."""
    students, teachers = _f64_pair("dct-kd")
    recipe = losses.dct_kd_recipe(students, teachers)
    variant_b = sum(ktkernels.dct_attention_loss(s, t, variant="b") for s, t in zip(students, teachers, strict=True))
    assert not torch.isclose(recipe, variant_b)


def test_targets():
    assert losses.target("pixel+global", "float32", "f+b") == (75.0, {})
    assert losses.target("pixel+global", "bfloat16", "f+b") == (75.0, {"pytorch": 8.0})
    assert losses.target("soft-target", "float32", "f+b") == (None, {"pytorch": 3.0})
    assert losses.target("at", "bfloat16", "f+b") is None
    assert losses.target("dct-kd", "bfloat16", "fwd") is None


# ----------------------------------------------------------------------------------------------------------------
# The report path


def test_benchmark_table_records_failures(tmp_path, monkeypatch):
    """The whole report path at a toy size: a failing implementation is a recorded error (with its text), a
    ktkernels backend that cannot run is left out with its reason, and the tables render."""
    real = losses.implementations

    def with_broken(case, device, compile_recipe, candidates=None):
        def broken(students, teachers):
            raise RuntimeError("broken recipe for the test")

        return {**real(case, device, compile_recipe, candidates), "broken": losses.Impl(broken)}

    monkeypatch.setattr(losses, "implementations", with_broken)
    device = torch.device("cpu")
    candidates = ("torch", "cpu", "nonexistent")
    rows = losses.run(
        device,
        batch=1,
        dtypes=[torch.float32, torch.bfloat16],
        layouts=["NHWC"],
        compile_recipe=False,
        cases=losses.CASES,
        stages=[("toy1", 4, 6), ("toy2", 8, 3)],
        logits=(4, 10),
        reps=1,
        candidates=candidates,
    )
    harness.finish(rows, 10.0)
    broken = [r for r in rows if r.impl == "broken"]
    assert len(broken) == 4 * 2 * 2 and all(r.ms is None and "broken recipe" in r.error for r in broken)
    assert all(r.ms for r in rows if r.impl != "broken")
    assert {r.impl for r in rows} >= {"ktk-torch", "pytorch", "official", "broken"}
    notes = [n for case in losses.CASES for n in losses.available_backends(device, case, candidates)[1]]
    assert any("ktk-nonexistent" in n and "unknown backend" in n for n in notes)
    env = {"device": "cpu", "torch": "", "triton": "", "commit": "", "date": "", "device_type": "cpu", "notes": notes}
    table = losses.write(rows, env, 10.0, tmp_path, "losses_toy")
    assert "RuntimeError: broken recipe for the test" in table and (tmp_path / "losses_toy.json").exists()
    assert table.count("### ") == 4 and "1x{4x6²,8x3²}" in table and "vs official" in table
    assert (tmp_path / "losses_toy.png").exists() or importlib.util.find_spec("matplotlib") is None
    gpu_table = losses.markdown(rows, {**env, "device_type": "cuda"}, 10.0)
    assert ">= 75% copy, >= 8x pytorch" in gpu_table and "| met |" in gpu_table
