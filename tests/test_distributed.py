"""The same script under torchrun: 2 CPU processes (gloo) on the tiny model, checked against one process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import fine_tune_sentiment as fts

from conftest import GPU, PRESET, precision_flags
from helpers import near_ties

pytestmark = pytest.mark.skipif(GPU and torch.cuda.device_count() < 2, reason="2 processes need 2 GPUs under NCCL")

SCRIPT = str(Path(fts.__file__))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def torchrun(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def flags(run_args: list[str], out: Path, batch_size: int) -> list[str]:
    return run_args + ["--output-dir", str(out), "--batch-size", str(batch_size)]


@pytest.fixture(scope="module")
def two_runs(tiny_model, imdb_folder, tmp_path_factory) -> dict:
    """The same training as 1 process with batch 16 and as 2 processes with batch 8 each (the same 16 a step)."""
    root = tmp_path_factory.mktemp("ddp")
    base = ["--model-name", tiny_model, "--dataset-name", imdb_folder, "--train-samples", "0", "--eval-samples", "0",
            "--max-length", "32", "--epochs", "3", "--learning-rate", "0.01", "--lora-dropout", "0", "--warmup", "0",
            "--class-weights", "balanced", *precision_flags()]  # balanced data: weights of 1, the loss hook runs
    two = torchrun(flags(base, root / "two", 8))
    assert two.returncode == 0, two.stderr
    assert fts.main(flags(base, root / "one", 16) + ["--quiet"]) == 0
    return {"two": two, "root": root, "metrics": {name: json.loads((root / name / "metrics.json").read_text())
                                                  for name in ("one", "two")}}


def test_one_process_reports_and_saves(two_runs):
    out, err = two_runs["two"].stdout, two_runs["two"].stderr
    assert out.count("=== eval metrics ===") == 1 and out.count("Prediction: ") == len(fts.SAMPLE_REVIEWS)
    assert err.count(f"Preset: {PRESET}") == 1 and err.count("trainable params:") == 1 and err.count("Done: ") == 1
    assert "Traceback" not in err
    folder = two_runs["root"] / "two"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "metrics.json", "report.html", "training.png"]


def test_every_eval_row_counted_once(two_runs):
    metrics = two_runs["metrics"]["two"]
    assert metrics["world_size"] == 2 and metrics["backend"] == ("nccl" if GPU else "gloo")
    assert metrics["eval_samples"] == sum(map(sum, metrics["confusion_matrix"])) == 200  # not 100, nor padded
    assert metrics["train_samples"] + metrics["validation_samples"] == 600


def test_training_loss_is_the_one_process_loss(two_runs):
    one, two = (two_runs["metrics"][name]["history"][-1]["train_loss"] for name in ("one", "two"))
    # the same rows, 16 a step, in another order: measured 0.7x-1.3x of each other; N times it if DDP scales it
    assert 0.6 < two / one < 1.6, (one, two)


def test_eval_loss_and_accuracy_are_the_one_process_ones_of_the_same_adapter(two_runs, imdb_folder, tmp_path):
    adapter = two_runs["root"] / "two" / "adapter"
    shutil.copytree(adapter, tmp_path / "adapter")
    assert fts.main(["--output-dir", str(tmp_path), "--dataset-name", imdb_folder, "--eval-only", "--quiet"]) == 0
    alone = json.loads((tmp_path / "eval_metrics.json").read_text())
    two = two_runs["metrics"]["two"]
    assert two["eval_loss"] == pytest.approx(alone["eval_loss"], rel=0.02)  # not N times it; batch means differ
    test = pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*")))
    allowed = near_ties(adapter, list(test.text)) / len(test)  # rows whose label the precision may flip
    assert abs(two["eval_accuracy"] - alone["eval_accuracy"]) <= allowed + 1e-9, allowed


def test_accuracy_matches_one_process(two_runs):
    one, two = two_runs["metrics"]["one"]["eval_accuracy"], two_runs["metrics"]["two"]["eval_accuracy"]
    # chance is 0.5; measured 0.85-0.865 for 2 x batch 8 and 0.865-0.885 for 1 x 16 (AVX2, fp32 and bf16), and
    # seeds alone move this toy task by up to ~0.07
    assert two >= 0.75 and abs(one - two) <= 0.1


def interrupt_two_processes(args: list[str], checkpoints: Path) -> str:
    """Start a 2-process run, SIGTERM torchrun once the first epoch's checkpoint exists; return its stderr."""
    process = subprocess.Popen([*TORCHRUN, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    deadline = time.time() + 120
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and process.poll() is None and \
            time.time() < deadline:
        time.sleep(0.1)  # the first epoch's checkpoint: training is surely under way
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    return process.communicate(timeout=60)[1]


def test_interrupted_two_process_run_resumes(run_args, tmp_path):
    for attempt in range(2):  # CI saw torchrun kill its workers before they saved, about 1 run in 5 (2026-12-01):
        out = tmp_path / f"out{attempt}"  # a second try from scratch; the story must hold in one of the two
        args, checkpoints = flags(run_args, out, 4) + ["--quiet"], out / "checkpoints"
        err = interrupt_two_processes(args, checkpoints)
        if err.count("run the same command again to resume") == 1:
            break
    assert err.count("run the same command again to resume") == 1, err[-3000:]
    saved = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert int(saved[-1].name.split("-")[1]) % 75 != 0  # mid-epoch (600 rows / (2 x 4) = 75 steps an epoch)
    assert {p.name for p in saved[-1].glob("rng_state_*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (out / "metrics.json").exists()

    rerun = subprocess.run([*TORCHRUN, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"Resuming the interrupted run from {saved[-1]}" in rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.75 and not checkpoints.exists()  # measured 0.90-0.905; chance 0.5


def test_an_error_ends_every_process_with_one_line(run_args, tmp_path):
    started = time.time()
    result = torchrun(flags(run_args, tmp_path / "out", 8) + ["--dataset-name", str(tmp_path / "nope")], timeout=120)
    assert result.returncode != 0 and time.time() - started < 100  # no hang in the waiting process
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: dataset '{tmp_path / 'nope'}' does not exist; pass an existing local path or a hub id"]
    assert "[rank1]" not in result.stderr


@pytest.mark.parametrize("mode", [["--eval-only"], ["--search", "3"], ["--export-onnx"]])
def test_one_process_modes_refuse_torchrun(monkeypatch, capsys, tmp_path, mode):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fts.main(["--output-dir", str(tmp_path), *mode]) == 2
    assert f"error: {mode[0]} runs in one process; run it with python, not torchrun" in capsys.readouterr().err


def test_class_weights_and_calibration_under_torchrun(two_runs):
    for name in ("one", "two"):
        metrics = two_runs["metrics"][name]
        assert metrics["class_weights"] == {"NEGATIVE": 1.0, "POSITIVE": 1.0}  # 270 and 270 training rows
        found = metrics["calibration"]
        assert found["temperature"] > 0 and found["validation_nll_after"] <= found["validation_nll_before"]
