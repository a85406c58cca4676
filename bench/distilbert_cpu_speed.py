"""How long does the default CPU preset take with DistilBERT? Measured without the hub.

Throughput does not depend on the weights, so this builds a randomly initialised DistilBERT of the real
size (DistilBertConfig() is distilbert-base-uncased's architecture, with the all-MiniLM-L6-v2 uncased
WordPiece vocab it shares with bert-base-uncased), makes IMDB-length reviews by joining Rotten Tomatoes
sentences (600+ tokens each, so every batch is full length, as nearly all IMDB reviews are at 128 tokens),
runs fine_tune_sentiment.py on a slice and extrapolates to the preset's rows. Run bench/run.py --data-only first.

    python bench/distilbert_cpu_speed.py --train 320 --eval 640
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=320, help="training rows to time")
    parser.add_argument("--eval", type=int, default=640, help="evaluation rows to time")
    parser.add_argument("--max-length", type=int, help="tokens per review (default: the cpu preset's)")
    args = parser.parse_args()
    import fine_tune_sentiment as fts
    from bench.run import cpu_flags, ensure_packages
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    minilm, _ = ensure_packages()
    work = Path(tempfile.mkdtemp(prefix="distilbert-speed-"))
    model_dir = work / "distilbert-random"
    DistilBertModel(DistilBertConfig()).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(model_dir)
    sentences = list(pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/train.parquet").text)
    reviews = [" ".join(sentences[i:i + 24]) for i in range(0, 24 * (args.train + args.eval), 24)]
    data = work / "reviews"
    data.mkdir()
    for split, rows in (("train", reviews[:args.train]), ("test", reviews[args.train:])):
        pd.DataFrame({"text": rows, "label": [i % 2 for i in range(len(rows))]}).to_parquet(data / f"{split}.parquet")
    preset = fts.PRESETS["cpu"] | ({"MAX_LENGTH": args.max_length} if args.max_length else {})
    subprocess.run([sys.executable, str(ROOT / "fine_tune_sentiment.py"), "--model-name", str(model_dir),
                    "--dataset-name", str(data), "--output-dir", str(work / "out"), "--quiet",
                    "--train-samples", "0", "--eval-samples", "0", "--max-length", str(preset["MAX_LENGTH"]),
                    "--batch-size", str(preset["BATCH_SIZE"]), "--epochs", "1"], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    train_rate, eval_rate = metrics["train_samples_per_second"], metrics["eval_samples_per_second"]
    minutes = (preset["EPOCHS"] * preset["TRAIN_SAMPLES"] / train_rate + preset["EVAL_SAMPLES"] / eval_rate) / 60
    print(f"CPU: {cpu_flags()}")
    print(f"DistilBERT, {preset['MAX_LENGTH']} tokens, batch {preset['BATCH_SIZE']}: {train_rate:.1f} train ex/s, "
          f"{eval_rate:.1f} eval ex/s -> cpu preset ({preset['TRAIN_SAMPLES']} train x {preset['EPOCHS']} epoch, "
          f"{preset['EVAL_SAMPLES']} eval) about {minutes:.1f} min of training and evaluation")


if __name__ == "__main__":
    main()
