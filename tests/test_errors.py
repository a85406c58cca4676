"""Bad input gets one clear line and exit code 2; interrupted runs resume; saves never leave half an adapter."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import fine_tune_sentiment as fts
from conftest import make_reviews

SCRIPT = str(Path(fts.__file__))


def fails_with(args: list[str], capsys) -> str:
    """Run main(); assert exit code 2 and a one-line error; return that line."""
    assert fts.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def write_csv(folder: Path, rows: list, columns=("text", "label")) -> str:
    path = folder / "data.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return str(path)


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    return args + [flag, value]


def test_missing_local_paths(run_args, tmp_path, capsys):
    assert "does not exist" in fails_with(with_flag(run_args, "--dataset-name", str(tmp_path / "nope")), capsys)
    assert "'./no-model' does not exist" in fails_with(with_flag(run_args, "--model-name", "./no-model"), capsys)
    assert "does not exist" in fails_with(with_flag(run_args, "--dataset-name", "reviews.csv"), capsys)


def test_unreachable_hub_fails_fast_with_advice(run_args, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fts.socket, "create_connection", no_network)
    started = time.perf_counter()
    message = fails_with(with_flag(run_args, "--model-name", "distilbert-base-uncased"), capsys)
    assert time.perf_counter() - started < 5
    assert "cannot reach the Hugging Face hub" in message and "local folder" in message


def test_offline_hub_id_not_in_cache(run_args, capsys):
    started = time.perf_counter()
    message = fails_with(with_flag(run_args, "--dataset-name", "someone/not-cached-anywhere"), capsys)
    assert time.perf_counter() - started < 5 and "could not load dataset 'someone/not-cached-anywhere'" in message


def test_missing_column_names_the_columns(run_args, tmp_path, capsys):
    path = write_csv(tmp_path, make_reviews(20, seed=1), columns=("review", "label"))
    message = fails_with(with_flag(run_args, "--dataset-name", path), capsys)
    assert "text column 'text' not found" in message and "columns: review, label" in message


@pytest.mark.parametrize("labels, expected", [([1], "only one class"), ([None], "no usable rows")])
def test_bad_labels(run_args, tmp_path, capsys, labels, expected):
    rows = [(text, labels[i % len(labels)]) for i, (text, _) in enumerate(make_reviews(30, seed=1))]
    assert expected in fails_with(with_flag(run_args, "--dataset-name", write_csv(tmp_path, rows)), capsys)


def test_empty_texts_are_dropped_and_counted(run_args, tmp_path, capsys):
    rows = make_reviews(40, seed=1) + [("", 0), ("   ", 1), (None, 1)]
    args = with_flag(run_args, "--dataset-name", write_csv(tmp_path, rows)) + ["--epochs", "1"]
    assert fts.main(args) == 0
    assert "Dropped 3 of 43 train rows" in capsys.readouterr().err
    metrics = json.loads((Path(args[args.index("--output-dir") + 1]) / "metrics.json").read_text())
    assert metrics["train_samples"] + metrics["eval_samples"] == 40


def test_nothing_left_after_dropping(run_args, tmp_path, capsys):
    path = write_csv(tmp_path, [(" ", 0), ("", 1), ("\t", 0)])
    assert "no usable rows" in fails_with(with_flag(run_args, "--dataset-name", path), capsys)


def test_too_many_samples_uses_all_with_warning(run_args, capsys):
    args = run_args + ["--train-samples", "100000", "--epochs", "1"]
    assert fts.main(args) == 0
    assert "train has 600 rows, fewer than the 100000 asked for" in capsys.readouterr().err
    assert json.loads((Path(args[args.index("--output-dir") + 1]) / "metrics.json").read_text())["train_samples"] == 600


def test_max_length_above_model_limit_is_clamped(run_args, capsys):
    args = run_args + ["--max-length", "4096", "--epochs", "1"]
    assert fts.main(args) == 0
    assert "MAX_LENGTH 4096 is above the model's limit; using 64" in capsys.readouterr().err
    adapter = Path(args[args.index("--output-dir") + 1]) / "adapter"
    assert json.loads((adapter / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_predict_without_adapter(tmp_path, capsys):
    message = fails_with(["--output-dir", str(tmp_path), "--predict", "fine"], capsys)
    assert "no saved adapter in" in message


def test_predict_with_nothing_on_stdin(tmp_path, monkeypatch, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n  \r\n")))
    assert "no reviews on stdin" in fails_with(["--output-dir", str(tmp_path), "--predict", "-"], capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(fts.InputError):
        fts.main(["--output-dir", str(tmp_path), "--predict", "fine", "--debug"])


def test_same_seed_same_result(run_args, tmp_path):
    results = []
    for name in ("a", "b"):
        args = with_flag(run_args, "--output-dir", str(tmp_path / name)) + ["--epochs", "1"]
        assert fts.main(args) == 0
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert results[0]["eval_accuracy"] == results[1]["eval_accuracy"]
    assert results[0]["eval_loss"] == results[1]["eval_loss"]


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_crash_while_saving_keeps_the_previous_adapter(run_args, monkeypatch):
    out = Path(run_args[run_args.index("--output-dir") + 1])
    assert fts.main(run_args + ["--epochs", "1"]) == 0
    before, metrics_before = folder_digest(out / "adapter"), (out / "metrics.json").read_bytes()
    from peft import PeftModel

    def dies_halfway(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", dies_halfway)
    with pytest.raises(RuntimeError, match="disk full"):
        fts.main(run_args + ["--epochs", "2", "--seed", "3"])
    assert folder_digest(out / "adapter") == before
    assert (out / "metrics.json").read_bytes() == metrics_before


def test_changed_settings_refuse_to_resume_until_fresh(run_args, capsys):
    checkpoints = Path(run_args[run_args.index("--output-dir") + 1]) / "checkpoints"
    (checkpoints / "checkpoint-5").mkdir(parents=True)
    (checkpoints / "run_config.json").write_text(json.dumps({"EPOCHS": 99}))
    assert "different settings" in fails_with(run_args + ["--epochs", "1"], capsys)
    assert fts.main(run_args + ["--epochs", "1", "--fresh"]) == 0
    assert "--fresh: removed the checkpoints" in capsys.readouterr().err


def test_sigterm_leaves_a_checkpoint_and_rerun_resumes(run_args, tmp_path):
    args = with_flag(run_args, "--output-dir", str(tmp_path / "resumed")) + ["--epochs", "3", "--batch-size", "4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, SCRIPT, *args, "--quiet"], stderr=subprocess.PIPE, env=env)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    deadline = time.time() + 90
    while not list(checkpoints.glob("checkpoint-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # wait for the first epoch's checkpoint, so training is surely under way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert "run the same command again to resume" in err.decode()
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert steps and steps[-1] % 150 != 0  # the interrupt saved mid-epoch (150 steps per epoch)
    assert not (tmp_path / "resumed" / "metrics.json").exists()

    rerun = subprocess.run([sys.executable, SCRIPT, *args, "--quiet"], capture_output=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert f"Resuming the interrupted run from {checkpoints / f'checkpoint-{steps[-1]}'}" in rerun.stderr.decode()
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())

    assert fts.main(with_flag(args, "--output-dir", str(tmp_path / "straight"))) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    # Not bit-identical (the length-grouped order after a mid-epoch resume differs); seeds alone move this
    # toy task's accuracy by up to ~0.06, so "within noise" is 0.1 here.
    assert abs(resumed["eval_accuracy"] - straight["eval_accuracy"]) <= 0.1
    assert resumed["eval_accuracy"] >= 0.85 and resumed["config"] == straight["config"] | {
        "OUTPUT_DIR": str(tmp_path / "resumed")}
