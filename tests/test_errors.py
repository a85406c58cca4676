"""Bad input gets one clear line and exit code 2; interrupted runs resume; saves never leave half an adapter."""

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import fine_tune_sentiment as fts
import predict_sentiment as pst
from conftest import make_reviews
from helpers import fails_with

SCRIPT = str(Path(fts.__file__))


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

    monkeypatch.setattr(socket, "create_connection", no_network)
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
        pst.main(["--output-dir", str(tmp_path), "--predict", "fine", "--debug"])


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
    (checkpoints / "checkpoint-5" / "trainer_state.json").write_text("{}")  # a finished save
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
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and process.poll() is None and \
            time.time() < deadline:
        time.sleep(0.1)  # wait for the first epoch's checkpoint, so training is surely under way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert "run the same command again to resume" in err.decode()
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert steps and steps[-1] % 150 != 0  # the interrupt saved mid-epoch (150 steps per epoch)
    assert not (tmp_path / "resumed" / "metrics.json").exists()

    partial = checkpoints / f"checkpoint-{steps[-1] + 7}"  # as a SIGKILL in the middle of a save leaves it
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    rerun = subprocess.run([sys.executable, SCRIPT, *args, "--quiet"], capture_output=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert f"warning: {partial} is incomplete (its save was cut short)" in rerun.stderr.decode()
    assert f"Resuming the interrupted run from {checkpoints / f'checkpoint-{steps[-1]}'}" in rerun.stderr.decode()
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())

    assert fts.main(with_flag(args, "--output-dir", str(tmp_path / "straight"))) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    # Not bit-identical (the length-grouped order after a mid-epoch resume differs); seeds alone move this
    # toy task's accuracy by up to ~0.06, so "within noise" is 0.1 here.
    assert abs(resumed["eval_accuracy"] - straight["eval_accuracy"]) <= 0.1
    assert resumed["eval_accuracy"] >= 0.75 and resumed["config"] == straight["config"] | {
        "OUTPUT_DIR": str(tmp_path / "resumed")}


def test_predict_file_reads_every_chunk_guarded(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pst, "CHUNK_ROWS", 5)  # the error lands in the third chunk, after two were scored
    target = tmp_path / "out.csv"
    target.write_text("earlier predictions\n")
    base = ["--output-dir", str(trained["out"]), "--predictions", str(target), "--predict-file"]
    broken = tmp_path / "broken.csv"
    broken.write_text("text,stars\n" + "great film,5\n" * 11 + "awful,1,extra\n" + "dull,2\n")
    message = fails_with(base + [str(broken)], capsys)
    assert message.startswith(f"error: could not read '{broken}' after row 10: ") and "line 13" in message
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "great film"}\n' * 7 + '{"text": "awful", \n')
    assert f"could not read '{jsonl}' after row 5: " in fails_with(base + [str(jsonl)], capsys)
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"text": "great film"}\n' * 5 + '{"text": "awful", "stars": 1}\n')
    assert "columns after row 5 that the first 5 rows lack: stars" in fails_with(base + [str(extra)], capsys)
    assert target.read_text() == "earlier predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.csv", "broken.jsonl", "extra.jsonl", "out.csv"]


def test_jsonl_types_that_change_between_chunks(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pst, "CHUNK_ROWS", 4)
    rows = [{"text": "great film", "id": i, "note": None} for i in range(4)]
    rows += [{"text": "awful film", "id": i, "note": "seen twice"} for i in range(4, 8)]  # null, then text: works
    source, target = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--output-dir", str(trained["out"]), "--predictions", str(target), "--predict-file"]
    assert pst.main(base + [str(source)]) == 0
    scored = pd.read_parquet(target)
    assert scored["id"].tolist() == list(range(8)) and scored["note"].isna().tolist() == [True] * 4 + [False] * 4
    assert scored["note"][4:].tolist() == ["seen twice"] * 4
    source.write_text("".join(json.dumps(r | {"id": f"x{i}" if i >= 4 else i}) + "\n" for i, r in enumerate(rows)))
    message = fails_with(base + [str(source)], capsys)
    assert "rows 5-8: column 'id' was int64 in the first rows and is large_string here" in message
    assert "write --predictions as .csv or .jsonl" in message
    assert pd.read_parquet(target)["id"].tolist() == list(range(8))  # the earlier output stays
    csv = tmp_path / "out.csv"
    assert pst.main(base[:-2] + [str(csv), "--predict-file", str(source)]) == 0  # as the message advises
    assert pd.read_csv(csv)["id"].astype(str).tolist() == ["0", "1", "2", "3", "x4", "x5", "x6", "x7"]


@pytest.mark.parametrize("length", ["1", "2"])
def test_max_length_without_room_for_text(run_args, length, capsys):
    message = fails_with(run_args + ["--max-length", length], capsys)
    assert f"MAX_LENGTH {length} leaves no room for the review: the model adds 2 special tokens" in message


def test_modes_are_one_at_a_time(tmp_path, capsys):
    message = fails_with(["--output-dir", str(tmp_path), "--eval-only", "--export-onnx"], capsys)
    assert message == "error: --eval-only and --export-onnx are separate modes; run one at a time"
    message = fails_with(["--output-dir", str(tmp_path), "--predict", "fine", "--serve"], capsys)
    assert message == "error: --predict and --serve are separate modes; run one at a time"


@pytest.mark.parametrize("args, command", [
    (["--predict", "Fun!", "--epochs", "3"], "--predict 'Fun!'"),
    (["--output-dir", "run", "--predict-file", "in.csv", "--predictions", "out.csv", "--lora-r", "4"],
     "--output-dir run --predict-file in.csv --predictions out.csv"),
    (["--runtime", "onnx-int8", "--serve", "--port=9000"], "--runtime onnx-int8 --serve --port=9000"),
    (["--predict-file", "in/", "--ray"], "--predict-file in/ --ray")])
def test_the_training_script_names_the_inference_command(args, command, capsys):
    assert fts.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a.split("=")[0] for a in args if a.split("=")[0] in ("--predict", "--predict-file", "--serve"))
    assert err == [f"error: {flag} is predict_sentiment.py's: python predict_sentiment.py {command}"]


@pytest.mark.parametrize("name", ["reviews.tsv", "REVIEWS.CSV", "Reviews.Parquet"])
def test_dataset_files_of_every_suffix_and_case(run_args, tmp_path, name):
    frame = pd.DataFrame(make_reviews(60, seed=4), columns=["text", "label"])
    path = tmp_path / name
    if name.lower().endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if name.endswith(".tsv") else ",", index=False)
    args = run_args + ["--dataset-name", str(path), "--epochs", "1", "--quiet"]
    assert fts.main(args) == 0
    metrics = json.loads((Path(args[args.index("--output-dir") + 1]) / "metrics.json").read_text())
    assert metrics["train_samples"] + metrics["eval_samples"] == 60


def signal_at_step(monkeypatch, step: int) -> None:
    """The run's own interrupt callback, which sends this process SIGTERM as training reaches `step`."""
    real = fts.interrupt_callback

    def signalling(processes):
        callback = real(processes)
        callback.on_step_begin = lambda args, state, control, **kwargs: (
            os.kill(os.getpid(), signal.SIGTERM) if state.global_step == step else None)
        return callback

    monkeypatch.setattr(fts, "interrupt_callback", signalling)


def test_sigterm_closes_the_processes_and_restores_the_handlers(run_args, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    left = []
    monkeypatch.setattr(fts, "leave_processes", lambda state: left.append(state.num_processes))  # torchrun: barrier,
    # then teardown
    signal_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as stopped:
        fts.main(run_args)
    assert stopped.value.code == 130 and left == [1]
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_handlers_are_restored_when_training_raises(run_args, monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def breaks(eval_pred):
        raise RuntimeError("broken metric")

    monkeypatch.setattr(fts, "compute_metrics", breaks)
    with pytest.raises(RuntimeError, match="broken metric"):
        fts.main(run_args + ["--epochs", "2", "--train-samples", "64"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("failure, printed", [
    ("[gloo] Timed out waiting 1800000ms for recv operation to complete", True),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29500",
     False)])  # the main process failed and said why
def test_a_barrier_timeout_says_so(capsys, failure, printed):
    from types import SimpleNamespace

    import torch.distributed as dist

    with pytest.raises(SystemExit) as stopped, fts.waits_said(SimpleNamespace(process_index=1)):
        raise (dist.DistBackendError if printed else RuntimeError)(failure)  # as gloo raises them in a barrier
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1
    assert err == (f"error: process 1 timed out waiting for the other processes ({failure}); one of them is stuck "
                   f"or stopped without an error" if printed else "")

def test_only_folders_the_script_made_are_removed(run_args, capsys):
    out = Path(run_args[run_args.index("--output-dir") + 1])
    (out / "adapter.old").mkdir(parents=True)
    (out / "adapter.old" / "mine.txt").write_text("the user's")  # once the fixed name of the swap's old copy
    assert fts.main(run_args + ["--epochs", "1", "--quiet"]) == 0
    assert (out / "adapter.old" / "mine.txt").read_text() == "the user's" and not (out / "checkpoints").exists()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "mine.txt").write_text("the user's")
    message = fails_with(run_args + ["--epochs", "1"], capsys)
    assert "checkpoints exists and was not made by this script" in message
    assert fts.main(run_args + ["--epochs", "1", "--fresh", "--quiet"]) == 2  # --fresh removes only its own
    assert (out / "checkpoints" / "mine.txt").read_text() == "the user's"


def test_a_swap_cut_short_is_repaired_at_the_next_start(trained, imdb_folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained["out"] / "adapter", out / ".adapter.old-1")  # killed between write_dir's two renames
    assert fts.main(["--output-dir", str(out), "--eval-only", "--dataset-name", imdb_folder]) == 0
    assert "was being replaced when the run stopped; restored the previous one" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_config.json").exists() and not list(out.glob(".adapter.old-*"))
