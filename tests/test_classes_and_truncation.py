"""Long reviews keep their end (TRUNCATION=head+tail); labels with any number of classes."""

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

import evaluation
import fine_tune_sentiment as fts
import predict_sentiment as pst
from conftest import FILLER, NEGATIVE, POSITIVE
from helpers import fails_with

LONG = "great " + " ".join(FILLER * 4) + " awful"  # 54 words: the first and the last carry the sentiment


def tokenizer(tiny_model: str, truncation: str, max_length: int = 16):
    return fts.load_tokenizer(tiny_model, max_length, None, truncation)


def test_head_tail_keeps_the_first_quarter_and_the_rest_from_the_end(tiny_model):
    tok = tokenizer(tiny_model, "head+tail")
    full = tok(LONG)["input_ids"]
    cut = fts.encode(tok, [LONG])
    ids = cut["input_ids"][0]
    assert len(ids) == 16 and len(cut["attention_mask"][0]) == 16
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:4] == full[1:4]  # (16 - 2) // 4 = 3 tokens of the head
    assert ids[4:15] == full[-12:-1]  # the other 11 from the tail, ending in "awful"
    assert tok.convert_ids_to_tokens(ids[1:2] + ids[-2:-1]) == ["great", "awful"]


def test_head_cuts_the_end_and_short_reviews_are_unchanged(tiny_model):
    head, both = tokenizer(tiny_model, "head"), tokenizer(tiny_model, "head+tail")
    ids = fts.encode(head, [LONG])["input_ids"][0]
    assert ids == head(LONG, truncation=True)["input_ids"] and "awful" not in head.convert_ids_to_tokens(ids)
    short = ["the movie was great", ""]
    assert fts.encode(both, short)["input_ids"] == fts.encode(head, short)["input_ids"] == head(short)["input_ids"]


def filler_then_word(n: int, seed: int) -> pd.DataFrame:
    """Reviews whose only sentiment words come after 30 filler words."""
    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(FILLER, k=30) + rng.choices(POSITIVE if i % 2 else NEGATIVE, k=2)), i % 2)
            for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def train_each_cut(run_args, tmp_path, reviews, modes) -> dict:
    """Train on reviews(n, seed) once per TRUNCATION mode at 16 tokens; return each run's metrics.json."""
    folder = tmp_path / "data"
    folder.mkdir()
    reviews(400, seed=1).to_parquet(folder / "train.parquet")
    reviews(200, seed=2).to_parquet(folder / "test.parquet")
    found = {}
    for mode in modes:
        out = tmp_path / mode
        args = run_args + ["--dataset-name", str(folder), "--max-length", "16", "--truncation", mode,
                           "--output-dir", str(out), "--quiet"]
        assert fts.main(args) == 0
        found[mode] = json.loads((out / "metrics.json").read_text())
    return found


def test_only_head_tail_learns_a_verdict_at_the_end(run_args, tmp_path):
    found = train_each_cut(run_args, tmp_path, filler_then_word, ("head", "head+tail"))
    accuracy = {mode: metrics["eval_accuracy"] for mode, metrics in found.items()}
    # measured head+tail 0.915-0.935 and head 0.50-0.56 (AVX2, fp32 and bf16); chance is 0.5
    assert accuracy["head+tail"] >= 0.8 and accuracy["head"] <= 0.65, accuracy
    model, tok = fts.load_adapter(tmp_path / "head+tail" / "adapter")  # --predict cuts as training did
    assert fts.encode(tok, [LONG]) == fts.encode(tokenizer(str(run_args[1]), "head+tail"), [LONG])
    assert fts.predict(model, tok, ["the " * 40 + "wonderful"])[0][0] == "POSITIVE"


def test_windows_cover_a_long_review_and_stay_bounded(tiny_model):
    assert pst.windows(10, 14, 7) == [(0, 10)]
    assert pst.windows(30, 14, 7) == [(0, 14), (7, 21), (14, 28), (16, 30)]  # the last one ends at the end
    spread = pst.windows(100_000, 14, 7)
    assert len(spread) == pst.MAX_WINDOWS and spread[0] == (0, 14) and spread[-1] == (100_000 - 14, 100_000)
    tok = fts.load_tokenizer(tiny_model, 16, None, "window", stride=5)
    cut = pst.encode(tok, [LONG, "the movie was great"])
    full = tok(LONG)["input_ids"][1:-1]
    rows = [ids for ids, owner in zip(cut["input_ids"], cut["owner"]) if owner == 0]
    assert cut["owner"][-1] == 1 and cut["input_ids"][-1] == tok("the movie was great")["input_ids"]
    assert all(len(ids) == 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids in rows)
    assert [ids[1:-1] for ids in rows[:-1]] == [full[i:i + 14] for i in range(0, len(full) - 14, 5)]
    assert rows[-1][1:-1] == full[-14:]


def test_a_windowed_review_scores_as_its_windows_mean_in_bounded_batches(tiny_model):
    from types import SimpleNamespace

    tok = fts.load_tokenizer(tiny_model, 16, None, "window")
    batches = []

    def forward(batch):  # a stand-in model: a review's logit is the mean of its windows' token ids
        batches.append(batch["input_ids"].shape)
        mean = (batch["input_ids"] * batch["attention_mask"]).sum(1) / batch["attention_mask"].sum(1)  # not padding
        return np.stack([mean, -mean], axis=1).astype(np.float32)

    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "NEGATIVE", 1: "POSITIVE"}), session_forward=forward)
    huge = " ".join(FILLER * 8000)  # 104,000 words
    found = pst.logits(model, tok, [huge, LONG, "great"], batch_size=4)
    cut = pst.encode(tok, [huge, LONG, "great"])
    assert cut["owner"].count(0) == pst.MAX_WINDOWS and max(b[0] for b in batches) <= 4
    for owner in range(3):
        rows = [np.mean(ids) for ids, o in zip(cut["input_ids"], cut["owner"]) if o == owner]
        assert found[owner, 0] == pytest.approx(np.mean(rows), rel=1e-5)


def filler_around_word(n: int, seed: int) -> pd.DataFrame:
    """Reviews whose only sentiment words sit between 15 filler words and 15 more."""
    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(FILLER, k=15) + rng.choices(POSITIVE if i % 2 else NEGATIVE, k=2)
                      + rng.choices(FILLER, k=15)), i % 2) for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def test_only_window_learns_a_verdict_in_the_middle_and_every_runtime_reads_it_so(run_args, tmp_path):
    found = train_each_cut(run_args, tmp_path, filler_around_word, ("head+tail", "window"))
    accuracy = {mode: metrics["eval_accuracy"] for mode, metrics in found.items()}
    for metrics in found.values():
        assert metrics["eval_samples"] == sum(map(sum, metrics["confusion_matrix"])) == 200  # reviews, not windows
    assert found["window"]["train_windows"] > 3 * found["window"]["train_samples"]
    assert accuracy["window"] >= 0.8 and accuracy["head+tail"] <= 0.7, accuracy
    out = tmp_path / "window"
    assert fts.main(["--output-dir", str(out), "--dataset-name", str(tmp_path / "data"), "--export-onnx", "--quiet"]) == 0
    assert json.loads((out / "onnx" / "config.json").read_text())["truncation"] == "window"
    texts = list(filler_around_word(40, seed=3).text)
    torch_side = pst.softmax(pst.logits(*pst.load_adapter(out / "adapter"), texts))
    onnx_side = pst.softmax(pst.logits(*pst.load_exported(out / "onnx", "onnx"), texts))
    assert np.abs(torch_side - onnx_side).max() < 1e-3  # both fp32: the same windows, averaged the same way


def three_class_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """negative/neutral/positive (in mixed spellings), each marked by one word among filler."""
    rng, spellings = random.Random(seed), [["Negative", "neg"], ["NEUTRAL", "neu"], ["positive", "Pos"]]
    neutral, filler = ["plot", "acting", "story"], [w for w in FILLER if w not in ("plot", "acting", "story")]
    rows = []
    for i in range(n):
        label = i % 3
        words = rng.choices(filler, k=rng.randint(2, 6)) + [rng.choice([NEGATIVE, neutral, POSITIVE][label])]
        rng.shuffle(words)
        rows.append((" ".join(words), rng.choice(spellings[label])))
    return rows


def test_three_string_classes_learn_with_macro_metrics(run_args, tmp_path, capsys):
    pd.DataFrame(three_class_rows(600, seed=3), columns=["text", "label"]).to_csv(tmp_path / "three.csv", index=False)
    out = tmp_path / "out"
    args = run_args + ["--dataset-name", str(tmp_path / "three.csv"), "--output-dir", str(out), "--epochs", "4", "--learning-rate", "0.02",
                       "--merge"]
    assert fts.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.55  # chance is 0.33; seeds 1-3 and 42 gave 0.59-0.87
    assert metrics["average"] == "macro" and list(metrics["per_class_f1"]) == ["negative", "neutral", "positive"]
    assert metrics["eval_f1"] == pytest.approx(sum(metrics["per_class_f1"].values()) / 3, abs=1e-3)
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix) and sum(map(sum, matrix)) == 120
    printed = capsys.readouterr().out
    assert f"confusion_matrix: {json.dumps(matrix)}" in printed
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    model, tok = fts.load_adapter(out / "adapter")
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    labels = {label for label, _ in fts.predict(model, tok, ["great wonderful", "awful dull", "the movie"])}
    assert labels <= {"negative", "neutral", "positive"} and len(labels) >= 2


def test_classlabel_names_and_integer_classes(tmp_path):
    texts = [t for t, _ in three_class_rows(60, seed=4)]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["bad", "okay", "good"])})
    raw = DatasetDict({s: Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(60)]}, features=features)
                       for s in ("train", "test")})
    data = fts.prepare_data(raw, "text", "label", seed=0)
    assert data["train"].features["labels"].names == ["bad", "okay", "good"]
    assert data["train"]["labels"][:3] == [0, 1, 2]
    stars = DatasetDict({"train": Dataset.from_dict({"text": texts, "label": [i % 4 for i in range(60)]})})
    data = fts.prepare_data(stars, "text", "label", seed=0)
    assert data["train"].features["labels"].names == ["0", "1", "2", "3"] and len(data["test"]) == 12


@pytest.mark.parametrize("labels, names", [
    ([0, 1], ["NEGATIVE", "POSITIVE"]), (["pos", "NEG"], ["NEGATIVE", "POSITIVE"]), ([True, False], ["NEGATIVE", "POSITIVE"]),
    (["positive", "neutral", "negative"], ["negative", "neutral", "positive"]), ([5, 1, 3], ["1", "3", "5"]),
    (["sports", "Politics", "neg"], ["negative", "politics", "sports"])])
def test_class_order(labels, names):
    rows = {"text": ["a review"] * 4 * len(labels), "label": labels * 4}
    data = fts.prepare_data(DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}),
                            "text", "label", seed=0)
    assert data["train"].features["labels"].names == names


def test_binary_metrics_keep_their_fields():
    labels, logits = [1, 1, 0, 0, 0], [[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]]
    import numpy as np
    metrics = evaluation.compute_metrics((np.array(logits), np.array(labels)))
    assert metrics == {"accuracy": 0.6, "f1": 0.5, "precision": 0.5, "recall": 0.5, "predicted_classes": 2}
    assert all(type(metrics[k]) is float for k in ("accuracy", "f1", "precision", "recall"))


def csv_rows(tmp_path: Path, rows: list, name: str = "data.csv") -> str:
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / name, index=False)
    return str(tmp_path / name)


@pytest.mark.parametrize("rows, expected", [
    ([("fine film", "pos")] * 20, "holds only one class (['positive'])"),
    ([("fine film", "pos")] * 20 + [("", "neg"), ("  ", "neg")], "only one class (['positive']) after dropping"),
    ([(f"text {i}", f"c{i}") for i in range(101)] * 2, "101 classes, more than 100"),
    ([("fine film", 1), ("dull film", "neg")] * 10, "mixes numbers and names"),
])
def test_bad_classes(run_args, tmp_path, capsys, rows, expected):
    assert expected in fails_with(run_args + ["--dataset-name", csv_rows(tmp_path, rows)], capsys)


def test_class_only_in_test_is_refused(run_args, tmp_path, capsys):
    folder = tmp_path / "split"
    folder.mkdir()
    csv_rows(folder, [("fine film", "pos"), ("dull film", "neg")] * 10, "train.csv")
    csv_rows(folder, [("fine film", "pos"), ("so so", "neutral")] * 5, "test.csv")
    message = fails_with(run_args + ["--dataset-name", str(folder)], capsys)
    assert "classes with no usable training rows: ['neutral']" in message


@pytest.fixture(scope="module")
def two_label_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved as a fine-tuned sentiment classifier: DistilBertForSequenceClassification, 2 labels."""
    import torch
    from transformers import AutoTokenizer, DistilBertForSequenceClassification

    folder = tmp_path_factory.mktemp("sst2-like")
    torch.manual_seed(1)
    model = DistilBertForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # a head unlike a fresh one, so keeping it shows
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_a_checkpoint_with_another_head_size_gets_a_new_head(two_label_checkpoint, run_args, tmp_path, capsys):
    pd.DataFrame(three_class_rows(600, seed=3), columns=["text", "label"]).to_csv(tmp_path / "three.csv", index=False)
    out = tmp_path / "out"
    args = run_args + ["--model-name", str(two_label_checkpoint), "--dataset-name", str(tmp_path / "three.csv"),
                       "--output-dir", str(out), "--epochs", "4", "--learning-rate", "0.02"]
    assert fts.main(args) == 0
    assert "head has 2 labels and the data has 3 classes; training a new head" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.55 and len(metrics["confusion_matrix"]) == 3  # as from the base model


def test_a_checkpoint_with_the_same_head_size_keeps_its_head(two_label_checkpoint, caplog):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the movie was great", "awful , boring plot"]
    encoded = AutoTokenizer.from_pretrained(two_label_checkpoint)(texts, padding=True, return_tensors="pt")
    saved = AutoModelForSequenceClassification.from_pretrained(two_label_checkpoint).eval()
    wrapped = fts.build_model(str(two_label_checkpoint), None, 8, 16, 0.0).eval()  # LoRA starts as a no-op
    with torch.no_grad():
        assert torch.allclose(wrapped(**encoded).logits, saved(**encoded).logits, atol=1e-6)
    assert "training a new head" not in caplog.text
