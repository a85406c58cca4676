"""Using a trained adapter: --eval-only, --predict-file, the model card; and early stopping and TensorBoard."""

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

import evaluation
import fine_tune_sentiment as fts
import predict_sentiment as pst
import conftest
from conftest import make_reviews
from helpers import digest, fails_with, near_ties

OUTPUTS = ("adapter", "merged", "metrics.json", "training.png")


def test_eval_only_on_a_dataset_folder_matches_training_and_touches_nothing(trained, imdb_folder, capsys):
    out = trained["out"]
    before = {name: digest(out / name) for name in OUTPUTS}
    assert fts.main(["--output-dir", str(out), "--dataset-name", imdb_folder, "--eval-only"]) == 0
    result = json.loads((out / "eval_metrics.json").read_text())
    test = pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*")))
    ties = near_ties(out / "adapter", list(test.text))  # training scored them before the temperature was folded in
    assert abs(result["eval_accuracy"] - trained["metrics"]["eval_accuracy"]) * 200 <= ties  # same adapter and rows
    assert result["eval_samples"] == sum(map(sum, result["confusion_matrix"])) == 200
    assert result["dataset"] == imdb_folder and result["adapter"] == str((out / "adapter").resolve())
    assert "=== eval metrics ===" in capsys.readouterr().out
    assert {name: digest(out / name) for name in OUTPUTS} == before


def test_eval_only_on_one_csv_with_string_labels(trained, tmp_path, capsys):
    rows = [(text, ["negative", "positive"][label]) for text, label in make_reviews(50, seed=9)]
    rows += [("", "positive"), ("great film", None)]
    path = tmp_path / "new.csv"
    pd.DataFrame(rows, columns=["review", "sentiment"]).to_csv(path, index=False)
    args = ["--output-dir", str(trained["out"]), "--dataset-name", str(path), "--eval-only", "--text-column",
            "review", "--label-column", "sentiment"]
    assert fts.main(args) == 0
    result = json.loads((trained["out"] / "eval_metrics.json").read_text())
    assert result["eval_samples"] == 50 and result["eval_accuracy"] >= 0.8  # the whole file: nothing held out
    assert "Dropped 2 of 52 test rows" in capsys.readouterr().err


def test_eval_only_refuses_labels_the_adapter_does_not_know(trained, tmp_path, capsys):
    path = tmp_path / "three.csv"
    pd.DataFrame({"text": ["great", "awful", "the plot"] * 3, "label": ["pos", "neg", "neutral"] * 3}).to_csv(path)
    message = fails_with(["--output-dir", str(trained["out"]), "--dataset-name", str(path), "--eval-only"], capsys)
    assert "labels the adapter does not know: ['neutral']" in message


WRITE = {".csv": lambda f, p: f.to_csv(p, index=False), ".jsonl": lambda f, p: f.to_json(p, orient="records", lines=True),
         ".parquet": lambda f, p: f.to_parquet(p, index=False)}
READ = {".csv": lambda p: pd.read_csv(p, dtype={"id": str}), ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        ".parquet": pd.read_parquet}


@pytest.mark.parametrize("kind", [".csv", ".jsonl", ".parquet"])
def test_predict_file_keeps_rows_order_and_columns(trained, tmp_path, kind, capsys):
    texts = [text for text, _ in make_reviews(30, seed=11)]
    texts[3], texts[7], texts[20] = "", None, "   "
    frame = pd.DataFrame({"id": [f"{i:03d}" for i in range(30)], "text": texts, "stars": range(30)})
    source, target = tmp_path / f"in{kind}", tmp_path / f"out{kind}"
    WRITE[kind](frame, source)
    assert pst.main(["--output-dir", str(trained["out"]), "--predict-file", str(source), "--predictions",
                     str(target)]) == 0
    result = READ[kind](target)
    assert list(result.columns) == ["id", "text", "stars", "predicted_label", "predicted_score"]
    assert list(result["id"]) == list(frame["id"]) and list(result["stars"]) == list(frame["stars"])
    empty = result["predicted_label"].isna()
    assert list(empty[empty].index) == [3, 7, 20] and result["predicted_score"][empty].isna().all()
    usable = [t for t in texts if t and t.strip()]
    expected = fts.predict(*fts.load_adapter(trained["out"] / "adapter"), usable, precision=conftest.PRECISION)
    assert list(result["predicted_label"][~empty]) == [label for label, _ in expected]
    assert result["predicted_score"][~empty].tolist() == pytest.approx([score for _, score in expected], abs=1e-6)
    captured = capsys.readouterr()
    assert "3 of 30 rows have no text" in captured.err
    assert captured.out.startswith("Scored 30 rows in ") and captured.out.strip().endswith(str(target))


def test_read_chunks_streams_every_format_in_order(tmp_path):
    frame = pd.DataFrame({"text": [f"review {i}" for i in range(7)], "n": range(7)})
    for kind in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"):
        path = tmp_path / f"data{kind}"
        if kind == ".txt":
            path.write_text("\n".join(frame.text) + "\n")
        elif kind == ".tsv":
            frame.to_csv(path, sep="\t", index=False)
        elif kind == ".json":
            frame.to_json(path, orient="records")
        else:
            WRITE[kind](frame, path)
        chunks = list(pst.read_chunks(path, "text", rows=3))
        assert [len(c) for c in chunks] == [3, 3, 1], kind
        assert [str(t) for c in chunks for t in c["text"]] == list(frame.text), kind


@pytest.mark.parametrize("stop", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_predict_file_leaves_no_partial_output(trained, tmp_path, monkeypatch, stop):
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"text": ["great film", "awful film"]}).to_csv(source, index=False)
    target.write_text("the previous predictions\n")

    def breaks(*args, **kwargs):
        raise stop

    monkeypatch.setattr(pst, "predict", breaks)
    args = ["--output-dir", str(trained["out"]), "--predict-file", str(source), "--predictions", str(target)]
    if isinstance(stop, KeyboardInterrupt):
        assert pst.main(args) == 130
    else:
        with pytest.raises(RuntimeError, match="disk full"):
            pst.main(args)
    assert target.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]


def test_predict_file_errors(trained, tmp_path, capsys):
    (tmp_path / "in.csv").write_text("review,label\nfine,1\n")
    (tmp_path / "in.xml").write_text("<a/>")
    base = ["--output-dir", str(trained["out"]), "--predict-file"]
    assert "does not exist" in fails_with(base + [str(tmp_path / "none.csv")], capsys)
    assert "must end in one of .csv, .tsv" in fails_with(base + [str(tmp_path / "in.xml")], capsys)
    message = fails_with(base + [str(tmp_path / "in.csv")], capsys)
    assert "text column 'text' not found" in message and "it has columns: review, label" in message
    message = fails_with(base + [str(tmp_path / "in.csv"), "--predictions", str(tmp_path / "no" / "o.csv")], capsys)
    assert "folder of --predictions" in message and "does not exist" in message


def test_model_card(trained, tmp_path):
    metrics = trained["metrics"]
    for folder, library in (("adapter", "peft"), ("merged", "transformers")):
        text = (trained["out"] / folder / "README.md").read_text()
        header = yaml.safe_load(text.split("---")[1])
        assert header["library_name"] == library and header["pipeline_tag"] == "text-classification"
        assert header["base_model"] == metrics["config"]["MODEL_NAME"]
        result = header["model-index"][0]["results"][0]
        assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": metrics["eval_accuracy"],
                                                                      "f1": metrics["eval_f1"]}
        assert "[More Information Needed]" not in text and "0 = NEGATIVE, 1 = POSITIVE" in text
        assert f"r={metrics['config']['LORA_R']}, alpha=" in text and metrics["date"] in text
        assert f"| accuracy | {metrics['eval_accuracy']:.4f} |" in text
        assert "layers;" not in text  # LORA_LAYERS 0: every layer
    layered = metrics | {"config": metrics["config"] | {"LORA_LAYERS": 4}}
    evaluation.write_card(tmp_path, trained["out"] / "adapter", layered, "peft")
    assert " in the encoder's last 4 layers;" in (tmp_path / "README.md").read_text()


def test_early_stopping_ends_before_the_last_epoch(run_args, tmp_path):
    args = run_args + ["--train-samples", "64", "--epochs", "12", "--early-stopping", "1", "--output-dir",
                       str(tmp_path / "out"), "--quiet"]
    assert fts.main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evaluations = [h for h in metrics["history"] if "eval_accuracy" in h]
    assert 2 <= len(evaluations) < 12
    accuracies = metrics["accuracy_per_epoch"]
    assert metrics["best_epoch"] == accuracies.index(max(accuracies)) + 1  # the best validation epoch is kept


def test_tensorboard_writes_event_files(run_args, tmp_path):
    assert fts.main(run_args + ["--epochs", "1", "--report-to", "tensorboard", "--quiet"]) == 0
    out = Path(run_args[run_args.index("--output-dir") + 1])
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    assert not (out / "checkpoints").exists()


def test_unknown_or_missing_tracker(run_args, capsys):
    assert "unknown REPORT_TO 'nope'" in fails_with(run_args + ["--report-to", "nope"], capsys)
    missing = next(name for name in ("wandb", "mlflow", "clearml", "dvclive") if importlib.util.find_spec(name) is None)
    assert f"needs a package that is not installed: pip install {missing}" in fails_with(
        run_args + ["--report-to", missing], capsys)


def test_the_best_epoch_is_picked_on_validation_and_test_is_evaluated_once(run_args, tmp_path, monkeypatch):
    sizes = []
    scored = fts.compute_metrics

    def spy(eval_pred):
        sizes.append(len(eval_pred[1]))
        return scored(eval_pred)

    monkeypatch.setattr(fts, "compute_metrics", spy)
    out = tmp_path / "out"
    assert fts.main(run_args + ["--epochs", "3", "--validation", "0.2", "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_on"] == "validation" and metrics["validation_samples"] == 120
    assert metrics["train_samples"] == 480 and metrics["eval_samples"] == 200
    # each epoch on the 120 validation rows, once more for the temperature; the 200 test rows once, last
    assert sizes == [120, 120, 120, 120, 200]
    accuracies = metrics["accuracy_per_epoch"]
    assert len(accuracies) == 3 and metrics["best_epoch"] == accuracies.index(max(accuracies)) + 1


def test_validation_comes_from_the_data_or_not_at_all(run_args, imdb_folder, tmp_path, capsys):
    folder = tmp_path / "three-splits"
    folder.mkdir()
    for split, seed, n in (("train", 1, 300), ("validation", 5, 50), ("test", 2, 100)):
        pd.DataFrame(make_reviews(n, seed), columns=["text", "label"]).to_parquet(folder / f"{split}.parquet")
    own = tmp_path / "own"
    assert fts.main(run_args + ["--dataset-name", str(folder), "--epochs", "2", "--output-dir", str(own), "--quiet"]) == 0
    metrics = json.loads((own / "metrics.json").read_text())
    assert (metrics["validation_samples"], metrics["train_samples"], metrics["eval_samples"]) == (50, 300, 100)
    one = tmp_path / "one"
    assert fts.main(run_args + ["--epochs", "1", "--output-dir", str(one), "--quiet"]) == 0
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["train_samples"] == 600 and "validation_samples" not in metrics  # one epoch: nothing held out
    capsys.readouterr()
    zero = tmp_path / "zero"
    assert fts.main(run_args + ["--epochs", "2", "--validation", "0", "--output-dir", str(zero)]) == 0
    assert "picked on the test split, so its accuracy is optimistic" in capsys.readouterr().err
    assert json.loads((zero / "metrics.json").read_text())["selected_on"] == "test"


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_lora_variants_and_cosine_schedule_train_and_reload(run_args, tmp_path, variant):
    out = tmp_path / variant
    args = run_args + ["--lora-variant", variant, "--scheduler", "cosine", "--output-dir", str(out), "--quiet"]
    assert fts.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.7  # chance is 0.5; rslora 0.795 (AMX) and 0.845 (AVX2), dora 0.88, fp32
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] == (variant == "rslora") and saved["use_dora"] == (variant == "dora")
    total, peak = metrics["history"][-1]["step"], 0.01  # run_args: --learning-rate 0.01 --warmup 0
    rates = [(h["step"], h["learning_rate"]) for h in metrics["history"] if "learning_rate" in h]
    assert len(rates) >= 10
    for step, rate in rates:  # the cosine curve; a linear one is 0.1 x peak below it at a quarter of the run
        assert rate == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * step / total)), abs=0.02 * peak), step
    model, tokenizer = fts.load_adapter(out / "adapter")
    assert fts.predict(model, tokenizer, ["great wonderful"])[0][0] == "POSITIVE"
