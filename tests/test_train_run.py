"""The training job (``ktkernels.train.run`` and the ``train`` / ``prepare`` commands), end to end on the CPU.

Resume equivalence is checked bit for bit: a run stopped (``stop_after``) or interrupted (SIGINT) and resumed
must end with exactly the weights and the logged losses of the uninterrupted run. DDP runs through ``torchrun``
with two gloo processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from imagefolders import write_image_folder

from ktkernels.train.__main__ import main
from ktkernels.train.engine import KTFTConfig
from ktkernels.train.run import RunConfig, train

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("img_per_s", "seconds")


def _config(run_dir, **kwargs) -> RunConfig:
    ktft = KTFTConfig(**{"steps": 6, "lr": 0.05, **kwargs.pop("ktft", {})})
    base = {"per_class": 4, "batch_size": 8, "log_every": 4, "checkpoint_every": 100, "progress": False}
    return RunConfig(run_dir=str(run_dir), **{**base, "plots": False, **kwargs}, ktft=ktft)


def _rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:  # csv
        import csv

        rows = []
        for kind in ("step", "epoch"):
            with open(Path(run_dir) / f"{kind}s.csv", newline="") as f:
                rows += [{"kind": kind, **{k: float(v) for k, v in r.items() if v != ""}} for r in csv.DictReader(f)]
        rows.sort(key=lambda r: (r["step"], r["kind"] == "epoch"))
    return [{k: float(v) if isinstance(v, int) else v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "student.pt", weights_only=True)


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    result = train(_config(run_dir), log=lambda _: None)
    assert result.status == "done" and result.step == 6 and result.final_eval is not None
    return run_dir


def test_run_directory_contents(uninterrupted):
    names = {p.name for p in uninterrupted.iterdir()}
    assert {"checkpoint.pt", "student.pt", "config.json", "subset.json", "metrics.jsonl"} <= names
    subset = json.loads((uninterrupted / "subset.json").read_text())
    assert subset["source"] == "digits" and len(subset["indices"]) == 40  # 4 per class x 10 classes
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["ktft"]["stages"] == ["layer1", "layer2", "layer3", "layer4"] and config["arch"] == "demo"
    rows = _rows(uninterrupted)
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert steps == [4, 6]  # every log_every steps, and the last step
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [5, 6]  # 5 batches per epoch
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 and 0 <= r["val_consistency"] <= 100 for r in epochs)
    total = [r["loss/total"] for r in rows if r["kind"] == "step"]
    assert all(t > 0 for t in total) and rows[0]["loss/transfer.layer1.pixel"] > 0


def test_stop_and_resume_is_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "resumed"
    first = train(_config(run_dir, stop_after=3), log=lambda _: None)
    assert first.status == "stopped" and first.step == 3 and not (run_dir / "student.pt").exists()
    with pytest.raises(ValueError, match="already holds a run"):
        train(_config(run_dir), log=lambda _: None)
    second = train(_config(run_dir), resume=True, log=lambda _: None)
    assert second.status == "done" and second.step == 6
    assert _same_weights(uninterrupted, run_dir)
    assert _rows(uninterrupted) == _rows(run_dir)


def test_sigint_checkpoints_and_resume_from_cli_is_bit_identical(uninterrupted, tmp_path):
    """Ctrl-C (SIGINT) mid-run: the step finishes, a checkpoint is written, status "interrupted"; ``train
    --resume --run-dir`` continues from the saved configuration. CSV metrics are truncated and continued."""
    run_dir = tmp_path / "interrupted"

    def ctrl_c(step: int) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    # Whatever was installed before (SIG_IGN when the suite runs in a background job) must be back afterwards.
    before = signal.getsignal(signal.SIGINT)
    result = train(_config(run_dir, metrics="csv", checkpoint_every=1), log=lambda _: None, on_step=ctrl_c)
    assert result.status == "interrupted" and result.step == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert _same_weights(uninterrupted, run_dir)
    assert _rows(uninterrupted) == _rows(run_dir)


def test_crash_after_a_checkpoint_at_an_epoch_end_resumes_bit_identical(uninterrupted, tmp_path):
    """A periodic checkpoint that falls on an epoch's last step (5 batches per epoch) is written after the epoch row
    and the validation, so a run that dies later and resumes from it logs that row once, as the uninterrupted run."""
    run_dir = tmp_path / "crashed"

    def crash(step: int) -> None:
        if step == 6:
            raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        train(_config(run_dir, checkpoint_every=5), log=lambda _: None, on_step=crash)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 5
    assert train(_config(run_dir, checkpoint_every=5), resume=True, log=lambda _: None).status == "done"
    assert _same_weights(uninterrupted, run_dir)
    assert _rows(uninterrupted) == _rows(run_dir)


def test_tensorboard_keeps_the_rows_at_the_resume_step(tmp_path):
    """TensorBoard gets every row once across a stop and resume: the events after the checkpoint's step are purged
    (the resumed run logs them again), those at it are kept (it does not)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged_steps(run_dir) -> list[int]:
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        return sorted(e.step for e in events.Scalars("step/loss/total"))

    full, part = tmp_path / "full", tmp_path / "part"
    train(_config(full, tensorboard=True, log_every=2), log=lambda _: None)
    train(_config(part, tensorboard=True, log_every=2, stop_after=4), log=lambda _: None)
    train(_config(part, tensorboard=True, log_every=2), resume=True, log=lambda _: None)
    assert logged_steps(full) == logged_steps(part) == [2, 4, 6]


def test_validation_images_do_not_follow_the_subset_seed(tmp_path):
    """--subset-seed picks the K training images per class; the validation images (for the digits, the train/test
    split too) stay the same, so runs on different subsets are compared on the same images."""
    from ktkernels.train.run import _build_data, _Dist

    data = {
        seed: _build_data(_config(tmp_path / str(seed), subset_seed=seed, val_per_class=3).resolved(), _Dist())
        for seed in (0, 1)
    }
    assert data[0].record["indices"] != data[1].record["indices"]
    val = {seed: [torch.cat(parts) for parts in zip(*data[seed].val_batches(), strict=True)] for seed in (0, 1)}
    assert len(val[0][1]) == 30 and all(torch.equal(a, b) for a, b in zip(val[0], val[1], strict=True))


def test_epochs_and_explicit_steps_are_refused(tmp_path):
    """RunConfig.epochs sets the length unless ktft.steps does: a KTFTConfig of one's own counts as giving steps
    (its default is 100), so both together are refused rather than epochs silently ignored."""
    with pytest.raises(ValueError, match="epochs=1 and ktft.steps=100 both set the run's length"):
        train(RunConfig(run_dir=str(tmp_path / "r"), epochs=1, ktft=KTFTConfig(lr=0.02), progress=False))
    assert not (tmp_path / "r" / "config.json").exists()


def test_reference_switch_gives_the_same_losses(uninterrupted, tmp_path):
    run_dir = tmp_path / "reference"
    train(_config(run_dir, stop_after=4, ktft={"reference": True}), log=lambda _: None)
    ours, ref = _rows(uninterrupted)[0], _rows(run_dir)[0]
    assert ours["step"] == ref["step"] == 4
    for key in (k for k in ours if k.startswith("loss/")):
        assert ref[key] == pytest.approx(ours[key], rel=2e-4, abs=1e-6), key


def test_compiled_student_gives_the_same_losses(uninterrupted, tmp_path):
    """Forward hooks survive torch.compile (dynamo inlines them); aot_eager keeps the test fast."""
    run_dir = tmp_path / "compiled"
    train(_config(run_dir, stop_after=4, ktft={"compile": True, "compile_backend": "aot_eager"}), log=lambda _: None)
    ours, compiled = _rows(uninterrupted)[0], _rows(run_dir)[0]
    for key in (k for k in ours if k.startswith("loss/")):
        assert compiled[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key


def test_plain_finetuning_and_plots_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "plain"
    config = _config(run_dir, stages="none", plots=True, tensorboard=True, ktft={"steps": 2})
    train(config, log=lambda _: None)
    rows = _rows(run_dir)
    assert {k for k in rows[0] if k.startswith("loss/")} == {"loss/ce", "loss/total"}
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert (run_dir / "plots" / "accuracy.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())


def test_dct_and_soft_terms_with_annealing_from_the_cli(tmp_path):
    run_dir = tmp_path / "extras"
    argv = ["train", "--run-dir", str(run_dir), "--per-class", "2", "--batch-size", "10", "--steps", "3"]
    argv += ["--w-dct", "1", "--w-soft", "0.5", "--anneal", "soft=0", "--log-every", "1", "--no-progress"]
    assert main(argv) == 0
    steps = [r for r in _rows(run_dir) if r["kind"] == "step"]
    assert [r["w/soft"] for r in steps] == [0.5, 0.25, 0.0]  # the weight of each row's (last) step
    assert all(r["loss/dct"] > 0 and r["loss/soft"] >= 0 for r in steps)


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder data: prepare, the cache path, the torchvision path
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root)  # 3 classes x 4 images; class "a" also holds 3 corrupt files
    return root


def _folder_args(tmp_path, *extra: str) -> list[str]:
    return [
        "train", "--arch", "resnet18", "--new-head", "--per-class", "4",
        "--cache-size", "48", "--image-size", "40", "--batch-size", "4", "--steps", "2", "--log-every", "1",
        "--workers", "0", "--no-progress", "--no-plots", "--run-dir", str(tmp_path / "run"), *extra,
    ]  # fmt: skip


def test_imagefolder_cache_path_records_the_subset(folder, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt files are reported as a warning by prepare
        assert main([*_folder_args(tmp_path), "--data", str(folder), "--val", str(folder)]) == 0
    run = tmp_path / "run"
    subset = json.loads((run / "subset.json").read_text())
    assert subset["source"] == "cache" and subset["classes"] == ["a", "b", "c"] and subset["per_class"] == 4
    assert len(subset["samples"]) + len(subset["skipped"]) == 12  # 4 per class picked, corrupt ones skipped
    assert {s["path"] for s in subset["skipped"]} <= {"a/truncated.jpg", "a/zero.png", "a/text.jpg"}
    assert (run / "cache" / "train" / "index.json").is_file() and (run / "cache" / "val" / "index.json").is_file()
    epochs = [r for r in _rows(run) if r["kind"] == "epoch"]
    assert epochs and "val_top1" in epochs[-1]
    assert f"{len(subset['samples'])} training images" in capsys.readouterr().out


@pytest.mark.parametrize("loader", ["cache", "torchvision"])
def test_folder_validation_images_do_not_follow_the_subset_seed(folder, tmp_path, loader):
    """As for the digits: with image folders too, --subset-seed picks the training images and not the
    ``val_per_class`` validation images, on both loaders."""
    from ktkernels.train.run import _build_data, _Dist

    def data(seed: int):
        kwargs = {"data": str(folder), "val": str(folder), "loader": loader, "workers": 0}
        kwargs |= {"cache_size": 24, "image_size": 16}
        c = _config(tmp_path / str(seed), per_class=4, val_per_class=3, subset_seed=seed, batch_size=2, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the corrupt files of class "a"
            return _build_data(c.resolved(), _Dist())

    picked = {seed: data(seed) for seed in (0, 1)}
    assert picked[0].record["samples"] != picked[1].record["samples"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision loader replaces the corrupt ones with the next image
        val = {s: [torch.cat(parts) for parts in zip(*picked[s].val_batches(), strict=True)] for s in (0, 1)}
    assert len(val[0][1]) == {"cache": 7, "torchvision": 9}[loader]  # 3 per class, 2 corrupt ones in class "a"
    assert all(torch.equal(a, b) for a, b in zip(val[0], val[1], strict=True))


def test_prepare_then_train_from_the_cache(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["prepare", str(folder), "--out", str(cache), "--per-class", "4", "--size", "48", "--workers", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "classes at 48x48" in out
    args = _folder_args(tmp_path)
    del args[args.index("--cache-size") : args.index("--cache-size") + 2]  # the cache decides: 48
    args[args.index("--per-class") + 1] = "3"  # ... and its 4 per class
    assert main([*args, "--data", str(cache)]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache_size"] == 48 and config["per_class"] == 4  # the cache's, whatever --per-class said
    subset = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert subset["cache"] == str(cache) and subset["per_class"] == 4
    assert not (tmp_path / "run" / "cache").exists()  # a prepared cache is used in place


def test_torchvision_loader_path(folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt files are skipped with a warning mid-run
        code = main([*_folder_args(tmp_path), "--data", str(folder), "--loader", "torchvision", "--val", str(folder)])
    assert code == 0
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2]
    assert not (tmp_path / "run" / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_an_image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("notes")
    (root / "notes.txt").write_text("hello\n")
    return root


CLI_ERRORS = [
    (["train", "--data", "/no/such/folder"], "image folder not found: /no/such/folder"),
    (["train", "--data", "{notes}/notes.txt"], "is not a directory"),
    (["train", "--data", "{notes}"], "no class folders"),
    (["train", "--arch", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["train", "--stages", "layer1,layer7"], "unknown stage name(s) ['layer7']"),
    (["train", "--teacher-weights", "{notes}/notes.txt"], "cannot read weights"),
    (["train", "--teacher-weights", "/no/such.pt"], "weights file not found"),
    (["train", "--resume", "--run-dir", "{notes}"], "nothing to resume"),
    (["train", "--per-class", "0"], "--per-class must be an integer >= 1"),
    (["train", "--optimizer", "lion"], "invalid choice: 'lion'"),
    (["train", "--image-size", "64"], "larger than the cache size 40"),
    (["train", "--crop-scale", "0.5"], "expected two numbers"),
    (["train", "--epochs", "2", "--steps", "3"], "not allowed with argument"),
    (["train", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["train", "--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["train", "--warmup-steps", "-5"], "--warmup-steps must be an integer >= 0"),
    (["train", "--schedule", "step", "--step-every", "0"], "--step-every must be an integer >= 1"),
    (["train", "--lr", "-1"], "--lr must be a finite number >= 0"),
    (["train", "--w-soft", "1", "--temperature", "0"], "temperature must be finite and > 0"),
    (["train", "--per-class", "1000"], "fewer than per_class=1000 images"),
    (["prepare", "/no/such/folder", "--out", "{notes}/c"], "image folder not found"),
    ([], "give a command"),
    (["train", "--run-dir", "{notes}/notes.txt"], "File exists"),  # a file where a folder belongs
    (["train", "--run-dir", "{notes}/notes.txt/run"], "Not a directory"),
    (["train", "--device", "foo"], "--device 'foo' is not a device"),
    (["train", "--stages", ","], "expected module names, auto or none"),
    (["train", "--val", "/no/such/folder"], "--val is for image folders and caches"),
    (["train", "--arch", "resnet18", "--tv-weights", "NOPE"], "resnet18 has no torchvision weights 'NOPE'"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_ERRORS)
def test_cli_errors_are_one_line(argv, message, not_an_image_dir, capsys, tmp_path):
    argv = [a.replace("{notes}", str(not_an_image_dir)) for a in argv]
    if argv and argv[0] == "train" and "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp_path / "run"), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ktk-train: error: "), err
    assert message in lines[0]
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run directory is written


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch, tmp_path, capsys):
    """torchrun --nproc-per-node 2 on a one-GPU box: rank 1 gets a one-line error naming the fix, before any
    process group or run directory, instead of torch's "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail(f"set_device({dev}) was called"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "ktk-train: error: LOCAL_RANK 1 needs cuda:1, but 1 GPU(s) are visible: start torchrun with "
        "--nproc-per-node 1 or fewer"
    )
    assert not (tmp_path / "run").exists()


def test_resume_refuses_changed_settings(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume with different settings: --lr 0.5 (the run has 0.05)" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------------------------
# DDP: torchrun with two gloo processes
# ---------------------------------------------------------------------------------------------------------------


def _torchrun(run_dir, *extra: str) -> subprocess.CompletedProcess:
    # --log-dir: torchrun otherwise leaves a torchelastic_* folder in the system temp dir on every launch.
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--log-dir", str(run_dir.parent / "torchrun-logs"),
        "-m", "ktkernels.train", "train", "--run-dir", str(run_dir), "--steps", "4", "--per-class", "5",
        "--batch-size", "8", "--log-every", "2", "--no-progress", "--no-plots", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _saved_student_accuracy(run_dir) -> list[float]:
    """Top-1 and top-5 of ``student.pt`` on the run's validation images, in one process."""
    from ktkernels.train.data import digits_dataset
    from ktkernels.train.engine import evaluate
    from ktkernels.train.models import build_teacher, make_student
    from ktkernels.train.run import _array_eval_batches, _Dist

    c = RunConfig(**{**json.loads((Path(run_dir) / "config.json").read_text()), "ktft": KTFTConfig()}).resolved()
    images, labels, _ = digits_dataset("test", size=c.cache_size, seed=c.subset_seed)
    student = make_student(build_teacher(c.arch)).to(memory_format=torch.channels_last)
    student.load_state_dict(_weights(run_dir))
    result = evaluate(student, _array_eval_batches(images, labels, c, _Dist()), max_shift=c.cache_size - c.image_size)
    return [result["top1"], result["top5"]]


@pytest.mark.slow
def test_ddp_two_processes_rank0_writes_and_resume_is_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    done = _torchrun(full)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "25 training images" not in done.stdout and "batches of 8 x 2 per epoch" in done.stdout
    rows = _rows(full)
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4]  # rank 0 alone writes: no duplicates
    ckpt = torch.load(full / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4
    # The logged validation is the saved student's: every rank evaluates with rank 0's BatchNorm statistics.
    assert _saved_student_accuracy(full) == pytest.approx([rows[-1]["val_top1"], rows[-1]["val_top5"]], abs=1e-9)

    stopped = _torchrun(part, "--stop-after", "2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = _torchrun(part, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(full, part)
    assert _rows(full) == _rows(part)
