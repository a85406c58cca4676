"""Decisions and pictures: THRESHOLD tuned on validation, saved with the model, used by every runtime; report.html."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import conftest
import evaluation
import fine_tune_sentiment as fts
import predict_sentiment as pst
from helpers import BF16_PROBABILITY_GAP, fails_with, server_process

sklearn = pytest.importorskip("sklearn.metrics")


def by_hand(positive: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """(threshold, precision, recall, macro F1) of 'positive if p >= t' for every distinct p, by scikit-learn."""
    rows = []
    for t in np.unique(positive):
        guess = (positive >= t).astype(int)
        rows.append((t, sklearn.precision_score(labels, guess, zero_division=0), sklearn.recall_score(labels, guess),
                     sklearn.f1_score(labels, guess, average="macro")))
    return rows


@pytest.mark.parametrize("spec", ["f1", "precision=0.8", "recall=0.9"])
def test_a_tuned_threshold_is_the_best_one_found_by_hand(spec):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = np.stack([np.zeros(400), rng.normal(1.5 * labels - 0.75, 1.0)], axis=1)  # overlapping classes
    threshold, choice = evaluation.choose_threshold(spec, logits, labels)
    rows = by_hand(pst.softmax(logits)[:, 1], labels)
    mine = next(r for r in rows if r[0] == pytest.approx(threshold, abs=1e-6))
    if spec == "f1":
        assert mine[3] == pytest.approx(max(r[3] for r in rows), abs=1e-9)
    elif spec.startswith("precision"):
        assert mine[1] >= 0.8 and mine[2] == max(r[2] for r in rows if r[1] >= 0.8)
    else:
        assert mine[2] >= 0.9 and mine[1] == max(r[1] for r in rows if r[2] >= 0.9)
    assert choice["validation"]["precision"] == pytest.approx(mine[1], abs=1e-4)
    assert 0.05 < threshold < 0.95 and threshold != 0.5  # it moved the decision


def test_a_precision_no_threshold_reaches_keeps_argmax_and_says_why():
    logits = np.array([[0, 3.0], [0, 2.0], [0, 1.0], [0, -1.0]])  # the most confident one is wrong
    threshold, choice = evaluation.choose_threshold("precision=1", logits, np.array([0, 1, 1, 0]))
    assert threshold is None and choice["threshold"] == "argmax" and "no threshold reaches precision 1" in \
        choice["status"]


def test_the_ece_interval_holds_the_ece_and_narrows_with_more_rows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (500, 8000):
        margin = rng.normal(0, 2, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(int)  # calibrated by construction
        logits = np.stack([np.zeros(n), margin], axis=1)
        low, high = evaluation.ece_interval(logits, labels)
        assert low <= evaluation.ece(logits, labels) <= high
        widths.append(high - low)
    assert 2.5 < widths[0] / widths[1] < 6  # 16x the rows: about a quarter of the width


def test_metrics_are_reported_at_the_threshold_and_at_argmax():
    labels, logits = np.array([1, 1, 0, 0]), np.array([[0, 2.0], [0, 0.5], [0, 0.2], [0, -2.0]])  # p1 .88 .62 .55 .12
    metrics = evaluation.metrics_from(logits, labels, ["NEGATIVE", "POSITIVE"], threshold=0.6)
    assert metrics["confusion_matrix"] == [[2, 0], [0, 2]] and metrics["eval_accuracy"] == 1.0
    assert metrics["argmax"]["confusion_matrix"] == [[1, 1], [0, 2]] and metrics["argmax"]["eval_accuracy"] == 0.75
    assert metrics["threshold"] == 0.6 and "argmax" not in evaluation.metrics_from(logits, labels, ["N", "P"])


@pytest.mark.parametrize("value, reason", [
    ("1.5", "THRESHOLD '1.5' is not one of: argmax, a probability"),
    ("precision=0", "THRESHOLD 'precision=0' is not one of"),
    ("best", "THRESHOLD 'best' is not one of"),
    ("f1", "THRESHOLD f1 is tuned on the validation split, and this run has none"),  # run_args: --validation 0
])
def test_a_threshold_that_cannot_work_fails_in_one_line(run_args, capsys, value, reason):
    assert reason in fails_with(run_args + ["--threshold", value], capsys)


def test_a_threshold_with_three_classes_fails_in_one_line(run_args, tmp_path, capsys):
    rows = [(f"film number {i} was {w}", w) for i in range(30) for w in ("bad", "fine", "good")]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "three.csv", index=False)
    args = run_args + ["--dataset-name", str(tmp_path / "three.csv"), "--threshold", "0.7"]
    assert "THRESHOLD 0.7 is for two classes; this data has 3: use argmax" in fails_with(args, capsys)


def test_a_tuned_threshold_is_saved_used_by_eval_only_and_reported(run_args, imdb_folder, tmp_path):
    out = tmp_path / "out"
    assert fts.main(run_args + ["--epochs", "2", "--validation", "0.25", "--threshold", "recall=0.98",
                                "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    threshold = metrics["threshold"]
    assert isinstance(threshold, float) and 0 < threshold < 1
    assert metrics["threshold_choice"]["validation"]["recall"] >= 0.98 and "confusion_matrix" in metrics["argmax"]
    assert json.loads((out / "adapter" / "tokenizer_config.json").read_text())["decision_threshold"] == threshold
    test = pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*")))
    positive = pst.softmax(pst.logits(*pst.load_adapter(out / "adapter"), list(test.text)))[:, 1]
    expected = evaluation.confusion_matrix(test.label.to_numpy(), pst.decide(np.stack([1 - positive, positive], 1),
                                                                             threshold))
    gap = BF16_PROBABILITY_GAP if conftest.PRECISION == "bf16" else 1e-4  # the Trainer's kernels against ours
    ties = int(np.sum(np.abs(positive - threshold) <= gap))
    assert np.abs(np.array(metrics["confusion_matrix"]) - expected).sum() <= 2 * ties
    assert (out / "report.html").exists()
    config, _ = fts.parse_args(run_args + ["--epochs", "2", "--validation", "0.25"])
    held = fts.load_data(config)["validation"]  # the split it was tuned on, scored by the saved (calibrated) model
    p = pst.softmax(pst.logits(*pst.load_adapter(out / "adapter"), held["text"]))[:, 1]
    found, truth = p >= threshold, np.array(held["labels"]) == 1
    ties = int(np.sum(np.abs(p - threshold) <= gap))
    assert abs(np.sum(found & truth) / truth.sum() - metrics["threshold_choice"]["validation"]["recall"]) <= \
        ties / truth.sum() + 1e-4  # tuned on the calibrated probabilities, as the saved model gives them
    assert fts.main(["--output-dir", str(out), "--dataset-name", imdb_folder, "--eval-only", "--quiet"]) == 0
    again = json.loads((out / "eval_metrics.json").read_text())
    assert again["threshold"] == threshold and again["argmax"] and (out / "eval_report.html").exists()


@pytest.fixture(scope="module")
def thresholded(exported, tmp_path_factory) -> tuple[Path, float]:
    """A copy of the exported run whose saved threshold (adapter and onnx/) sits where it changes decisions."""
    out = tmp_path_factory.mktemp("thresholded")
    shutil.copytree(exported, out, dirs_exist_ok=True)
    texts = [t for t, _ in conftest.make_reviews(120, seed=7)]
    positive = pst.softmax(pst.logits(*pst.load_exported(out / "onnx", "onnx"), texts))[:, 1]
    threshold = round(float(np.quantile(positive[positive > 0.5], 0.5)), 6)  # half the positives become negative
    for path, key in ((out / "adapter" / "tokenizer_config.json", "decision_threshold"),
                      (out / "onnx" / "config.json", "threshold")):
        path.write_text(json.dumps(json.loads(path.read_text()) | {key: threshold}))
    return out, threshold


def decided_by(threshold: float, labels, scores) -> int:
    """Check each (label, score of that label) decides as the threshold says; return how many argmax would flip."""
    flipped = 0
    for label, score in zip(labels, scores):
        positive = score if label == "POSITIVE" else 1 - score
        if abs(positive - threshold) > 1e-3:  # away from the threshold, where no kernel can flip it
            assert (label == "POSITIVE") == (positive >= threshold), (label, score, threshold)
        flipped += label == "NEGATIVE" and positive > 0.5
    return flipped


@pytest.mark.parametrize("runtime", ["torch", "onnx-int8"])
def test_files_are_labelled_with_the_saved_threshold(thresholded, tmp_path, runtime):
    out, threshold = thresholded
    pd.DataFrame({"text": [t for t, _ in conftest.make_reviews(120, seed=7)]}).to_csv(tmp_path / "in.csv")
    assert pst.main(["--output-dir", str(out), "--runtime", runtime, "--predict-file", str(tmp_path / "in.csv"),
                     "--predictions", str(tmp_path / "p.csv"), "--quiet"]) == 0
    found = pd.read_csv(tmp_path / "p.csv")
    assert decided_by(threshold, found.predicted_label, found.predicted_score) >= 3


def test_the_server_labels_with_the_saved_threshold_and_keeps_the_probabilities(thresholded):
    import httpx

    out, threshold = thresholded
    texts = [t for t, _ in conftest.make_reviews(120, seed=7)]
    with server_process("predict_sentiment.py", out, "--runtime", "onnx") as (url, _):
        answers = httpx.post(url + "/predict", json={"texts": texts}, timeout=30).json()["predictions"]
    assert decided_by(threshold, [a["label"] for a in answers], [a["score"] for a in answers]) >= 3
    assert all(a["scores"][a["label"]] == a["score"] for a in answers)


def test_the_report_holds_its_tables_and_figures(trained):
    page = (trained["out"] / "report.html").read_text()
    for key in ("metrics", "confusion", "per-class", "mistakes"):
        assert f'<table id="{key}">' in page
    figures = dict(re.findall(r'<figure id="(\w+)">(.*?)</figure>', page, re.S))
    assert set(figures) == {"reliability", "pr", "roc"}
    assert figures["reliability"].count("<polyline") == 2  # before and after calibration (the run calibrates)
    assert "temperature" in figures["reliability"] and "90%" in figures["reliability"]
    assert figures["pr"].count('class="mark"') == 1 and figures["roc"].count('class="mark"') == 1
    mistakes = re.search(r'<table id="mistakes">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td.*?</tr>", mistakes)
    assert len(rows) == min(20, sum(sum(r) - r[i] for i, r in enumerate(trained["metrics"]["confusion_matrix"])))
    test = pd.read_parquet(next(Path(trained["args"][3]).glob("plain_text/test-*")))
    truth = dict(zip(test.text, np.where(test.label == 1, "POSITIVE", "NEGATIVE")))
    for row in rows:  # each quoted review with its own true label, and a wrong prediction
        text, true, predicted = re.findall(r"<td[^>]*>(.*?)</td>", row)[:3]
        assert truth[text] == true != predicted
    assert not re.search(r"""\b(src|href)=|<link|@import|url\(""", page)  # self-contained: nothing to fetch


def test_the_report_escapes_review_text(tmp_path):
    logits, labels = np.array([[0, 4.0], [0, -4.0], [0, 1.0]]), np.array([0, 1, 1])
    texts = ["<script>alert(1)</script> & more", "fine", "ok"]
    metrics = evaluation.metrics_from(logits, labels, ["NEGATIVE", "POSITIVE"])
    page = evaluation.write_report(tmp_path / "r.html", metrics, logits, labels, texts, ["NEGATIVE", "POSITIVE"],
                                   None).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page and "<script>" not in page
