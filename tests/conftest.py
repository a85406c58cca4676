"""Offline fixtures: a tiny DistilBERT with a small WordPiece vocab, and IMDB-shaped data built in tmp folders.

`pytest --precision bf16` runs every training and prediction in bf16 instead of fp32 (the default), whatever
PRECISION=auto would pick on this CPU; `pytest --precision bf16 -m model` reruns only the tests that use the
model, as .ci/run does, so both precisions are exercised on every machine.
"""

import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may touch the network
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")  # no cache shared between runs
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fine_tune_sentiment as fts  # noqa: E402
import predict_sentiment as pst  # noqa: E402

GPU = torch.cuda.is_available()  # the suite runs on a GPU machine too (bench/gpu_check.py)
DEVICE = torch.cuda.get_device_name() if GPU else "cpu"  # what metrics.json records
PRESET = "gpu" if GPU else "cpu"
PRECISION = "fp32"  # set from --precision in pytest_configure, before any test module is imported
MODEL_FIXTURES = {"tiny_model", "trained", "run_args", "imdb_folder", "exported"}  # a test using one trains or predicts
POSITIVE = ["great", "wonderful", "excellent", "fantastic", "loved", "brilliant"]
NEGATIVE = ["awful", "terrible", "boring", "dull", "hated", "worst"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "acting", "story", "this", "it", "and", "really", "i"]
PROBES = ["the movie was great and wonderful", "awful boring plot , the worst", "",
          "great " + " ".join(FILLER * 4) + " awful"]  # the last is cut head+tail at 32 tokens


def pytest_addoption(parser):
    parser.addoption("--precision", default="fp32", choices=("fp32", "bf16"),
                     help="precision of every training and prediction in the suite (default fp32)")


def pytest_configure(config):
    global PRECISION
    PRECISION = config.getoption("--precision")
    config.addinivalue_line("markers", "model: trains or predicts with the tiny model (rerun with --precision bf16)")


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.model)


def precision_flags() -> list[str]:
    """The --precision flag for a run the suite starts in another process (torchrun, a resumed run)."""
    return ["--precision", PRECISION]


@pytest.fixture(autouse=True)
def suite_precision(monkeypatch):
    """Every main() call without --precision runs at the suite's precision, not at what auto picks here."""
    monkeypatch.setattr(fts, "PRECISION", PRECISION)
    monkeypatch.setattr(pst, "PRECISION", PRECISION)  # its own modes too


def make_reviews(n: int, seed: int) -> list[tuple[str, int]]:
    """n short reviews, half positive, each carrying one or two sentiment words among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 8)) + rng.choices(POSITIVE if label else NEGATIVE, k=rng.randint(1, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def sorted_by_label(rows: list[tuple[str, int]]) -> pd.DataFrame:
    """IMDB's splits hold all negatives first, then all positives."""
    return pd.DataFrame(sorted(rows, key=lambda r: r[1]), columns=["text", "label"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised 2-layer DistilBERT with a 40-word vocab, set up so LoRA can learn quickly."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-distilbert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER, "!", ".", ","]
    tokenizer = DistilBertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    assert tokenizer.unk_token_id not in tokenizer("the movie was great")["input_ids"]  # the vocab is in use
    tokenizer.save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                              seq_classif_dropout=0.0, initializer_range=0.3)  # dropout 0: learns in seconds
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def imdb_folder(tmp_path_factory) -> str:
    """A local folder in the hub IMDB layout: plain_text/{train,test,unsupervised}-*.parquet, sorted by label."""
    folder = tmp_path_factory.mktemp("imdb") / "plain_text"
    folder.mkdir()
    sorted_by_label(make_reviews(600, seed=1)).to_parquet(folder / "train-00000-of-00001.parquet")
    sorted_by_label(make_reviews(200, seed=2)).to_parquet(folder / "test-00000-of-00001.parquet")
    unsup = pd.DataFrame({"text": [t for t, _ in make_reviews(40, seed=3)], "label": -1})
    unsup.to_parquet(folder / "unsupervised-00000-of-00001.parquet")
    return str(folder.parent)


@pytest.fixture
def run_args(tiny_model, imdb_folder, tmp_path) -> list[str]:
    """Flags for a fast, complete run on the tiny model and IMDB-shaped data."""
    return ["--model-name", tiny_model, "--dataset-name", imdb_folder, "--output-dir", str(tmp_path / "out"),
            "--train-samples", "0", "--eval-samples", "0", "--max-length", "32", "--epochs", "3",
            "--batch-size", "16", "--learning-rate", "0.01", "--lora-dropout", "0", "--warmup", "0", *precision_flags(),
            "--validation", "0"]  # every row trains; the validation tests ask for a share


@pytest.fixture(scope="session")
def trained(tiny_model, imdb_folder, tmp_path_factory) -> dict:
    """One full run (4 epochs, --merge) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["--model-name", tiny_model, "--dataset-name", imdb_folder, "--output-dir", str(out),
            "--train-samples", "0", "--eval-samples", "0", "--max-length", "32", "--epochs", "4",
            "--batch-size", "16", "--learning-rate", "0.01", "--lora-dropout", "0", "--warmup", "0", "--merge",
            *precision_flags()]
    fts.setup_logging(quiet=True)
    from transformers import set_seed
    set_seed(42)  # the same seed main() uses, so this is the model main() starts from
    untrained = fts.build_model(tiny_model, None, 8, 16, 0.0)
    tokenizer = fts.load_tokenizer(tiny_model, 32, None)
    test = pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*")))
    guesses = fts.predict(untrained, tokenizer, list(test.text))
    untrained_accuracy = sum((label == "POSITIVE") == bool(y) for (label, _), y in zip(guesses, test.label)) / len(test)
    in_memory = {}
    save = fts.save_outputs

    def save_and_remember(model, tokenizer, *args, **kwargs):  # the trained model's logits, before it is saved
        in_memory["logits"] = fts.logits(model, tokenizer, PROBES, precision=PRECISION)  # bf16: still autocast
        return save(model, tokenizer, *args, **kwargs)

    fts.save_outputs = save_and_remember
    try:
        assert fts.main(args) == 0
    finally:
        fts.save_outputs = save
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text()), "args": args,
            "untrained_accuracy": untrained_accuracy, "logits_before_save": in_memory["logits"]}


@pytest.fixture(scope="session")
def exported(trained, imdb_folder, tmp_path_factory) -> Path:
    """A copy of the trained run's adapter, exported to ONNX by --export-onnx (int8 calibrated on its training set)."""
    import shutil

    out = tmp_path_factory.mktemp("onnx-run")
    shutil.copytree(trained["out"] / "adapter", out / "adapter")
    assert fts.main(["--output-dir", str(out), "--dataset-name", imdb_folder, "--export-onnx", "--quiet"]) == 0
    return out
