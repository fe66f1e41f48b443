"""The benchmark harness: a table never compares different work unnoticed, caches cannot inflate "% of copy",
and the report files say where they come from."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ktkernels.bench import blurpool, harness, model


def test_agreement_flags_what_differs_and_nothing_else():
    x = torch.randn(4, 8, dtype=torch.float64)
    steps = {
        "ours": lambda: x * 2,
        "same": lambda: (x * 2 + 1e-12,),  # a tuple of one tensor: f+b steps return torch.autograd.grad's tuple
        "scaled": lambda: x * 2.2,
        "nan": lambda: torch.full_like(x, float("nan")),
        "shape": lambda: (x * 2)[:2],
        "fails": lambda: 1 / 0,
    }
    found = harness.agreement(steps, torch.float64)
    assert set(found) == {"scaled", "nan", "shape"}, found
    assert found["scaled"].startswith("differs from ours by 1.0e-01 of its largest value (tolerance 1e-09)")
    assert found["nan"].startswith("differs from ours by nan")
    assert "shapes [(2, 8)] vs [(4, 8)] of ours" in found["shape"]
    assert harness.agreement({"fails": lambda: 1 / 0, "other": lambda: x}, torch.float64) == {}


def test_bench_flags_a_recipe_that_computes_something_else():
    """A blurpool table group whose recipe pads with zeros instead of reflecting: its rows carry the mismatch (so
    does the printed log line), ours do not; the table lists it under a note."""
    pads = (1, 2, 1, 2)

    def zero_padded(x):
        filt = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype) / 8
        filt = (filt[:, None] * filt[None, :]).expand(x.shape[1], 1, 4, 4)
        return F.conv2d(F.pad(x, pads), filt, stride=2, groups=x.shape[1])

    impls = {"ktk-torch": blurpool.ours("blur", 4, pads, "torch"), "pytorch": blurpool.recipe("blur", 4, pads)}
    impls["zero-padded"] = zero_padded
    rows = blurpool._time_case(
        torch.device("cpu"), 2, "adobe k4 L2 down", 3, 10, "blur", 4, pads, torch.float32, "NCHW", False, 1, False,
        impls=impls,
    )  # fmt: skip
    flagged = {(r.mode, r.impl) for r in rows if r.mismatch}
    assert flagged == {("fwd", "zero-padded"), ("f+b", "zero-padded")}, [(r.impl, r.mismatch) for r in rows]
    harness.finish(rows, 10.0)
    table = harness.markdown(
        rows, {"device": "cpu", "torch": "x", "triton": "y", "commit": "z", "date": "d"}, 10.0, "pytorch"
    )
    assert " ≠ [1]" in table and "|\n\n- [1] zero-padded: differs from ktk-torch by" in table
    assert " ≠ [2]" in table  # f+b: its own note, its own size


def test_log_lines_carry_the_mismatch_back(tmp_path):
    text = (
        "adobe k4 L2 down (128, 256, 56, 56) float32 NHWC fwd pytorch: 1.5 ≠ differs from ktk-triton by 1.0e-01 of "
        "its largest value (tolerance 3e-03)\n"
        "adobe k4 L2 down (128, 256, 56, 56) float32 NHWC fwd ktk-triton: 0.2\n"
    )
    rows = blurpool.rows_from_log(text)
    assert [(r.impl, r.ms, r.mismatch) for r in rows] == [
        ("pytorch", 1.5, "differs from ktk-triton by 1.0e-01 of its largest value (tolerance 3e-03)"),
        ("ktk-triton", 0.2, None),
    ]


def test_from_log_keeps_the_eager_name(tmp_path):
    """``--from-log --eager`` writes the eager table's files, as the live ``--eager`` run does, not the graph
    table's."""
    from ktkernels.bench.__main__ import main

    log = tmp_path / "bench.log"
    log.write_text("adobe k4 L2 down (128, 256, 56, 56) float32 NHWC fwd ktk-triton: 0.2\n")
    env = ["device=Test GPU", "torch=2.11", "triton=3.6", "commit=abc", "date=today", "timing=eager"]
    main(["blurpool", "--from-log", str(log), "--eager", "--copy-gbps", "1000", "--out", str(tmp_path)]
         + [f"--env={e}" for e in env])  # fmt: skip
    assert (tmp_path / "blurpool_test_gpu_eager.json").is_file()
    assert not (tmp_path / "blurpool_test_gpu.json").exists()


def test_inputs_that_fit_in_the_cpu_cache_rotate(monkeypatch):
    """On the CPU too, small inputs are cycled through copies that together outgrow the last-level cache (the
    copy bandwidth they are compared with is DRAM's): with one copy, inputs smaller than the 32 MiB L3 stayed in
    it, and dct_cpu.md had rows at 113% and 189% of copy."""
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda device: 32 << 20)
    made = []
    next_input = harness.rotating(lambda: made.append(1) or len(made), 12 << 20, torch.device("cpu"))
    assert len(made) == 8 and [next_input() for _ in range(9)] == [2, 3, 4, 5, 6, 7, 8, 1, 2]  # 96 MiB in all
    harness.rotating(lambda: made.append(1), 200 << 20, torch.device("cpu"))
    assert len(made) == 9  # larger than three caches: one copy
    harness.rotating(lambda: made.append(1), 1000, torch.device("cpu"))
    assert len(made) == 9 + harness.MAX_INPUT_COPIES
    assert harness.last_level_cache_bytes(torch.device("cpu")) > 0


def test_model_verdicts_only_at_the_target_setup():
    results = [model.Result("aa-ktk", "", ms=10.0, x_floor=1.01, vs_recipe=2.0)]
    cpu = model.Config("cpu", "resnet18", 2, 64, "none", 1, 1, 1, ["aa-ktk"])
    gpu = model.Config("cuda", "resnet50", 128, 224, "bf16", 1, 1, 1, ["aa-ktk"])
    env = {"device": "d", "torch": "t", "triton": "x", "commit": "c", "date": "d", "timing": "t"}
    assert "Targets" not in model.markdown(results, env, cpu)
    assert "target <= +5%: met" in model.markdown(results, env, gpu)


def test_step_time_percentiles():
    times = [float(t) for t in range(10, 0, -1)]  # 1..10 ms, unordered
    median, p10, p90 = harness.median_and_deciles(times)
    assert (median, p10, p90) == (5.5, 1.9, 9.1)
    assert harness.median_and_deciles([3.0]) == (3.0, 3.0, 3.0)


def test_timing_note_names_how_each_device_is_timed():
    assert "perf_counter" in harness.timing_note(torch.device("cpu"), eager=False)
    assert "CUDA graph" in harness.timing_note(torch.device("cuda"), eager=False)
    assert "eager" in harness.timing_note(torch.device("cuda"), eager=True)


def test_commit_recorded(monkeypatch):
    monkeypatch.setenv("KTK_COMMIT", "1234abc")
    assert harness.source_commit() == "1234abc"
    monkeypatch.delenv("KTK_COMMIT")
    commit = harness.source_commit()
    assert commit == "unknown" or commit.split("-")[0].isalnum()


@pytest.mark.parametrize("name", ["dct", "losses"])
def test_every_table_checks_agreement(name, monkeypatch):
    """The dct and losses tables run the same check (a spy on harness.agreement sees each mode of a case)."""
    import importlib

    bench = importlib.import_module(f"ktkernels.bench.{name}")
    seen = []
    real = harness.agreement
    monkeypatch.setattr(harness, "agreement", lambda steps, dtype: seen.append(sorted(steps)) or real(steps, dtype))
    if name == "dct":
        impls = {"a": lambda x: x * 2, "b": lambda x: x * 2}
        make = lambda: torch.randn(2, 3, 4, 4)  # noqa: E731
        rows = bench._time_impls(
            "dct", "c", (2, 3, 4, 4), torch.float32, "NCHW", impls, make, make, {"fwd": 1, "f+b": 1},
            torch.device("cpu"), 1, False,
        )  # fmt: skip
    else:
        impl = bench.Impl(lambda s, t: sum((a - b).square().mean() for a, b in zip(s, t, strict=True)))
        rows = bench._time_case(
            "pixel+global", (2,), [(2, 3, 4, 4)], torch.float32, "NCHW", {"a": impl, "b": impl},
            torch.device("cpu"), 1, False,
        )  # fmt: skip
    assert seen == [["a", "b"], ["a", "b"]] and not any(r.mismatch for r in rows)
    assert json.dumps([r.mismatch for r in rows]) == "[null, null, null, null]"
