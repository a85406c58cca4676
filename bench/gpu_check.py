"""The GPU path, checked in one go on a machine with one GPU and no network (under 8 minutes on an H200).

1. runs the test suite (on CUDA where there is one);
2. trains a randomly initialised full-size DistilBERT (real size, so the speed is real; the weights do not
   matter for speed) on synthetic reviews of full length with the `gpu` preset's shape (512 tokens, batch 32)
   for a fixed number of steps, in PRECISION=auto and in --precision fp32, and projects the whole preset
   (25,000 training rows x 3 epochs, 25,000 eval rows evaluated after each epoch and once more at the end);
3. runs `torchrun --standalone --nproc_per_node 1` on a tiny model (NCCL on a GPU, gloo on a CPU);
4. ends with one table.

    python bench/gpu_check.py            # on the GPU machine
    python bench/gpu_check.py --small    # a tiny model, no suite: the same steps on a CPU in ~1 min (CI runs it)

The data is synthetic (a made-up 30,522-word vocab, the size of distilbert-base-uncased's), so nothing is
downloaded. A GPU machine without `datasets` needs its wheel and the ones it lacks carried over (pip download
--no-deps datasets pyarrow dill multiprocess xxhash; then pip install --no-deps those files there).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import cpu_flags  # noqa: E402

PRESET_ROWS, PRESET_EPOCHS = 25_000, 3  # full IMDB, the gpu preset
SIZES = {  # name: (model dims, vocab words, tokens, batch, steps, eval rows)
    "full": (dict(), 30_522, 512, 32, 60, 1024),
    "small": (dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64), 200, 64, 8, 10, 64),
}


def build(work: Path, dims: dict, words: int, tokens: int, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """Write a random-weight DistilBERT with a made-up WordPiece vocab, and reviews longer than `tokens`."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast
    import pandas as pd

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(words - 5)]
    model_dir, data_dir = work / "model", work / "data"
    DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    config = DistilBertConfig(vocab_size=len(vocab), **dims)
    DistilBertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    data_dir.mkdir()
    for split, rows in (("train", train_rows), ("test", eval_rows)):
        texts = [" ".join(rng.choices(vocab[5:], k=tokens + 20)) for _ in range(rows)]  # every row is cut: full batches
        pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]}).to_parquet(data_dir / f"{split}.parquet")
    return model_dir, data_dir


def train(model_dir: Path, data_dir: Path, out: Path, tokens: int, batch: int, precision: str) -> dict:
    """One epoch of fine_tune_sentiment.py over the synthetic rows; return its metrics.json and wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "fine_tune_sentiment.py"), "--model-name", str(model_dir),
                             "--dataset-name", str(data_dir), "--output-dir", str(out), "--train-samples", "0",
                             "--eval-samples", "0", "--max-length", str(tokens), "--batch-size", str(batch),
                             "--epochs", "1", "--precision", precision, "--quiet"],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode:
        sys.exit(f"training with --precision {precision} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()) | {"wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model and data, no test suite (runs on a CPU)")
    parser.add_argument("--steps", type=int, help="training steps per precision (default: 60; small: 10)")
    args = parser.parse_args()
    import torch

    dims, words, tokens, batch, steps, eval_rows = SIZES["small" if args.small else "full"]
    steps = args.steps or steps
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"device: {device} | CPU: {cpu_flags()} | torch {torch.__version__}", flush=True)
    rows = []
    if not args.small:
        started = time.perf_counter()
        suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                               capture_output=True, text=True)
        summary = (suite.stdout.strip().splitlines() or ["no output"])[-1]
        rows.append(("test suite", "ok" if suite.returncode == 0 else "FAILED", summary.strip("= "),
                     f"{time.perf_counter() - started:.0f}"))
        print(f"suite: {summary}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir, data_dir = build(work, dims, words, tokens, steps * batch, eval_rows)
    for precision in ("auto", "fp32"):
        m = train(model_dir, data_dir, work / f"out-{precision}", tokens, batch, precision)
        train_rate, eval_rate = m["train_samples_per_second"], m["eval_samples_per_second"]
        projected = (PRESET_EPOCHS * PRESET_ROWS / train_rate + (PRESET_EPOCHS + 1) * PRESET_ROWS / eval_rate) / 60
        rows.append((f"DistilBERT {tokens} tokens, batch {batch}, {precision}", m["precision"],
                     f"{train_rate:.1f} train ex/s, {eval_rate:.1f} eval ex/s; gpu preset ~{projected:.0f} min",
                     f"{m['wall']:.0f}"))
        print(rows[-1], flush=True)
    started = time.perf_counter()
    tiny_model, tiny_data = build(work / "tiny", SIZES["small"][0], 200, 32, 64, 32)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(ROOT / "fine_tune_sentiment.py"), "--model-name", str(tiny_model), "--dataset-name",
                          str(tiny_data), "--output-dir", str(work / "tiny" / "out"), "--train-samples", "0",
                          "--eval-samples", "0", "--max-length", "32", "--batch-size", "8", "--epochs", "1", "--quiet"],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    metrics_file = work / "tiny" / "out" / "metrics.json"
    backend = json.loads(metrics_file.read_text()).get("backend") if metrics_file.exists() else None
    rows.append(("torchrun --nproc_per_node 1, tiny model", "ok" if ddp.returncode == 0 else "FAILED",
                 f"backend {backend}" if ddp.returncode == 0 else ddp.stderr.strip()[-300:].replace("\n", " "),
                 f"{time.perf_counter() - started:.0f}"))
    print(f"\n| check ({device}) | result | numbers | wall s |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if any(row[1] == "FAILED" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
