"""The deployable artefact: --export-onnx writes fp32 and int8 ONNX models that run without torch."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fine_tune_sentiment as fts
import predict_sentiment as pst
from conftest import make_reviews
from helpers import digest, fails_with

pytest.importorskip("onnxruntime")
ROOT = Path(fts.__file__).parent
INT8_PROBABILITY_GAP = 0.3  # a text whose fp32 probability is this far from 0.5 is clear: int8 keeps its label
INT8_MEAN_GAP = 0.03  # int8 against fp32, the mean over the test texts of the probability's move
INT8_CLEAR_GAP = 0.2  # the largest move of a clear text's probability
INT8_BATCH_GAP = 1e-5  # float sums in another order: measured under 1e-6
LONG = "the movie was great " + "the plot and the acting " * 20 + "awful , the worst"  # longer than 32 tokens


def test_export_writes_the_folder(exported):
    names = {p.name for p in (exported / "onnx").iterdir()}
    assert {"model.onnx", "model_int8.onnx", "tokenizer.json", "config.json"} <= names
    config = json.loads((exported / "onnx" / "config.json").read_text())
    assert config["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"} and config["max_length"] == 32
    assert config["truncation"] == "head+tail" and config["inputs"] == ["input_ids", "attention_mask"]
    assert (exported / "onnx" / "model_int8.onnx").stat().st_size < (exported / "onnx" / "model.onnx").stat().st_size


def test_onnx_logits_equal_torch_fp32_on_short_and_long_reviews(exported):
    texts = ["the movie was great", "awful , boring", LONG, "", "great " * 60]
    torch_model, tokenizer = fts.load_adapter(exported / "adapter")
    onnx_model, onnx_tokenizer = pst.load_onnx(exported / "onnx", int8=False)
    assert fts.encode(onnx_tokenizer, texts) == fts.encode(tokenizer, texts)  # the same head+tail cut
    assert np.allclose(fts.logits(onnx_model, onnx_tokenizer, texts), fts.logits(torch_model, tokenizer, texts),
                       atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnx-int8", "openvino"])
def test_int8_agrees_with_fp32(exported, imdb_folder, runtime):
    pytest.importorskip(pst.EXPORTED[runtime][1])
    texts = list(pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*"))).text) + [LONG]
    full = pst.softmax(fts.logits(*pst.load_onnx(exported / "onnx", int8=False), texts))[:, 1]
    small = pst.softmax(fts.logits(*pst.load_exported(exported / "onnx", runtime), texts))[:, 1]
    # the tiny model is steep (logits of 10): near a tie int8 moved a probability by up to 0.41 (0.39 -> 0.81, AMX,
    # bf16 fixture), so only a clear text's probability and label are held; on average int8 moved them by 0.006-0.008
    gap, clear = np.abs(full - small), np.abs(full - 0.5) > INT8_PROBABILITY_GAP
    assert gap.mean() <= INT8_MEAN_GAP
    assert clear.sum() >= 150 and gap[clear].max() <= INT8_CLEAR_GAP  # measured up to 0.095 (AMX, fp32 fixture)
    assert ((full > 0.5) == (small > 0.5))[clear].all()  # only a near-tie may change its label


@pytest.mark.parametrize("runtime", ["onnx-int8", "openvino"])
def test_an_int8_score_does_not_depend_on_the_batch(exported, imdb_folder, runtime, monkeypatch):
    pytest.importorskip(pst.EXPORTED[runtime][1])
    texts = list(pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*"))).text)[:48] + [LONG, "fun"]
    model, tokenizer = pst.load_exported(exported / "onnx", runtime)
    monkeypatch.setattr(pst, "SHORTEST_IN_BATCH", 0.0)  # rows of any length side by side: padding beside each
    alone = np.concatenate([fts.logits(model, tokenizer, [text]) for text in texts])
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = np.empty_like(alone)
    shuffled[order] = fts.logits(model, tokenizer, [texts[i] for i in order], batch_size=7)
    # the 2 lines above pad each row beside up to 6 others, ranked by length: under dynamic int8 (each batch its
    # own activation range) logits moved by 0.1-0.2 between such arrangements
    for batched in (fts.logits(model, tokenizer, texts, batch_size=50), shuffled):
        assert np.abs(pst.softmax(batched) - pst.softmax(alone)).max() <= INT8_BATCH_GAP


def test_batches_hold_rows_of_similar_length():
    lengths = [30, 5, 29, 12, 28, 27, 11, 26, 4, 6]
    encoded = {"input_ids": [[7] * n for n in lengths], "attention_mask": [[1] * n for n in lengths]}
    batches = list(pst.length_batches(encoded, 3, 0, shortest=0.9))
    assert [[lengths[i] for i in chosen] for chosen, _ in batches] == [[30, 29, 28], [27, 26], [12, 11], [6], [5], [4]]
    assert [batch["input_ids"].shape for _, batch in batches] == [(3, 30), (2, 27), (2, 12), (1, 6), (1, 5), (1, 4)]
    assert [len(chosen) for chosen, _ in pst.length_batches(encoded, 4, 0)] == [4, 4, 2]  # shortest 0: any length


def test_an_export_runs_a_batch_of_mixed_lengths_in_parts_of_similar_length(exported, imdb_folder):
    """The server's batches hold texts of every length; padding them to the longest cost an export more than the
    extra calls do (bench/README.md), so each call holds rows within SHORTEST_IN_BATCH of its longest."""
    texts = list(pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*"))).text)[:30] + [LONG, "fun"]
    model, tokenizer = pst.load_exported(exported / "onnx", "onnx")
    forward, lengths = model.session_forward, []
    model.session_forward = lambda batch: (lengths.append(batch["attention_mask"].sum(1)), forward(batch))[1]
    batched = fts.logits(model, tokenizer, texts, batch_size=32)
    assert len(lengths) > 2 and sum(map(len, lengths)) == len(texts)
    assert all(rows.min() >= pst.SHORTEST_IN_BATCH * rows.max() for rows in lengths)
    alone = np.concatenate([fts.logits(model, tokenizer, [text]) for text in texts])
    assert np.abs(batched - alone).max() <= INT8_BATCH_GAP  # fp32: the same logits in any company
    if importlib.util.find_spec("openvino"):  # OpenVINO keeps a plan per shape: its batches are cut by size alone
        model, tokenizer = pst.load_exported(exported / "onnx", "openvino")
        forward, lengths = model.session_forward, []
        model.session_forward = lambda batch: (lengths.append(len(batch["input_ids"])), forward(batch))[1]
        fts.logits(model, tokenizer, texts, batch_size=32)
        assert lengths == [32]


@pytest.mark.parametrize("runtime", ["onnx-int8", "openvino"])
def test_streams_give_the_logits_of_one_batch_at_a_time_over_many_spans_and_windows(exported, imdb_folder, runtime):
    """--predict-file runs batches side by side (streams); each row must land where it belongs, spans apart."""
    pytest.importorskip(pst.EXPORTED[runtime][1])
    texts = list(pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*"))).text)[:150] + [LONG, "fun"] * 5
    one, tokenizer = pst.load_exported(exported / "onnx", runtime)
    streamed, _ = pst.load_exported(exported / "onnx", runtime, streams=True)
    if pst.cores() >= 2:
        assert len(streamed.session_streams) >= 2
    for cut in ("head+tail", "window"):  # window: a LONG review is several rows, averaged back into one
        tokenizer.init_kwargs["review_truncation"] = cut
        alone = fts.logits(one, tokenizer, texts, batch_size=4)  # spans of 64 texts: 4 of them
        assert np.abs(fts.logits(streamed, tokenizer, texts, batch_size=4) - alone).max() <= INT8_BATCH_GAP
    streamed.session_streams = [lambda batch: 1 / 0] * 2
    with pytest.raises(ZeroDivisionError):  # a stream's error reaches the caller
        fts.logits(streamed, tokenizer, texts, batch_size=4)


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8", "openvino"])
def test_every_mode_on_onnx(exported, imdb_folder, tmp_path, runtime, capsys):
    pytest.importorskip(pst.EXPORTED[runtime][1])
    base = ["--output-dir", str(exported), "--runtime", runtime]
    assert pst.main(base + ["--predict", "the movie was great , wonderful", "awful boring , the worst"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Prediction: POSITIVE \((0\.[6-9]\d|1\.00)\)", lines[1]), lines
    assert re.fullmatch(r"Prediction: NEGATIVE \((0\.[6-9]\d|1\.00)\)", lines[3]), lines
    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    pd.DataFrame({"text": [t for t, _ in make_reviews(20, seed=5)] + [""]}).to_csv(source, index=False)
    assert pst.main(base + ["--predict-file", str(source), "--predictions", str(target), "--quiet"]) == 0
    scored = pd.read_parquet(target)
    assert len(scored) == 21 and scored["predicted_label"].isna().tolist() == [False] * 20 + [True]
    assert fts.main(base + ["--eval-only", "--dataset-name", imdb_folder, "--quiet"]) == 0
    result = json.loads((exported / "eval_metrics.json").read_text())
    assert result["eval_samples"] == 200 and result["eval_accuracy"] >= 0.8 and result["precision"] == runtime


def test_onnx_runtime_imports_no_torch(exported):
    code = ("import sys, predict_sentiment as p; code = p.main(sys.argv[1:]); "
            "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules]); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--output-dir", str(exported), "--runtime", "onnx-int8",
                             "--predict", "the movie was great"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]" and "Prediction: " in result.stdout


def test_an_interrupted_export_leaves_the_old_folder(exported, imdb_folder, monkeypatch):
    before = digest(exported / "onnx")

    def breaks(model, tokenizer, folder, calibration):
        folder.mkdir(exist_ok=True)
        (folder / "model.onnx").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fts, "export_onnx", breaks)
    assert fts.main(["--output-dir", str(exported), "--dataset-name", imdb_folder, "--export-onnx", "--quiet"]) == 130
    assert digest(exported / "onnx") == before and not (exported / "onnx.tmp").exists()


def test_missing_folder_and_missing_package(exported, tmp_path, monkeypatch, capsys):
    message = fails_with(["--output-dir", str(tmp_path), "--runtime", "onnx-int8", "--predict", "fine"], capsys)
    assert "no exported model in" in message and "--export-onnx first" in message
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    message = fails_with(["--output-dir", str(exported), "--runtime", "onnx", "--predict", "fine"], capsys)
    assert "needs onnxruntime: pip install -r requirements-onnx.txt" in message
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    message = fails_with(["--output-dir", str(exported), "--runtime", "openvino", "--predict", "fine"], capsys)
    assert message == "error: the OpenVINO runtime needs openvino: pip install -r requirements-onnx.txt"


def test_the_readme_deploy_snippet_runs(exported):
    readme = (ROOT / "docs" / "inference.md").read_text()  # linked from the README
    snippet = readme.split("<!-- deploy snippet -->")[1].split("```python")[1].split("```")[0]
    reviews = ["the movie was great", "awful , boring", LONG, "awful " + LONG]  # the long ones take the head+tail cut
    assert 'reviews = ["A gorgeous, funny film.", "A dull, lifeless film."]' in snippet
    snippet = snippet.replace('["A gorgeous, funny film.", "A dull, lifeless film."]', repr(reviews))
    snippet = snippet.replace("print([", "print([round(float(p[1]), 6) for p in probs])\nprint([")
    result = subprocess.run([sys.executable, "-c", snippet.replace("outputs/onnx", str(exported / "onnx"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    printed, labelled = map(ast.literal_eval, result.stdout.splitlines())
    model, tokenizer = pst.load_onnx(exported / "onnx", int8=True)
    ours = pst.softmax(fts.logits(model, tokenizer, reviews))[:, 1]
    assert printed == pytest.approx(ours.tolist(), abs=1e-5)  # the same cut; batches padded alike
    assert [label for label, _ in labelled] == [label for label, _ in fts.predict(model, tokenizer, reviews)]


def test_an_export_without_its_training_reviews_fails_in_one_line_and_keeps_the_old_folder(exported, tmp_path,
                                                                                            capsys):
    before = digest(exported / "onnx")
    message = fails_with(["--output-dir", str(exported), "--export-onnx", "--dataset-name", str(tmp_path / "nope")],
                         capsys)
    assert message == (f"error: the int8 model is calibrated on training reviews: dataset '{tmp_path / 'nope'}' "
                       "does not exist; pass an existing local path or a hub id")
    assert digest(exported / "onnx") == before
