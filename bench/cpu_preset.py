"""How long `python fine_tune_sentiment.py` takes on this CPU with the `cpu` preset, measured end to end.

The preset trains DistilBERT on 2,000 IMDB reviews (256 tokens, batch 16, 1 epoch) and evaluates 1,000. The hub is
out of reach here, so this runs the same command on a randomly initialised full-size DistilBERT (66M weights; the
values do not change the speed) and synthetic reviews whose lengths follow IMDB's (median 174 words, mean ~230;
a made-up word is 1.3 tokens on average, as WordPiece splits English), so about the same share is cut at 256
tokens. Nothing but the model and data flags is passed: the preset decides the rest, as for a user.

    python bench/cpu_preset.py          # ~10 min on 2 AVX2 cores
"""

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


def build(work: Path, train_rows: int = 2000, eval_rows: int = 1000) -> tuple[Path, Path]:
    """A random-weight distilbert-base-uncased (same shape, made-up 30,522-piece vocab) and IMDB-long reviews."""
    import numpy as np
    import pandas as pd
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(15_000)] + \
        [f"##s{i}" for i in range(30_522 - 15_005)]
    model_dir, data_dir = work / "model", work / "data"
    DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(vocab))).save_pretrained(model_dir)
    rng, lengths = random.Random(0), np.random.default_rng(0)
    data_dir.mkdir()
    for split, rows in (("train", train_rows), ("test", eval_rows)):
        words = np.clip(lengths.lognormal(np.log(174), 0.75, rows), 10, 2500).astype(int)
        texts = [" ".join(f"w{rng.randrange(15_000)}" + (f"s{rng.randrange(9)}" if rng.random() < 0.3 else "")
                          for _ in range(n)) for n in words]  # "w12s3" is two pieces: w12 ##s3
        pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]}).to_parquet(data_dir / f"{split}.parquet")
    return model_dir, data_dir


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cpu-preset-"))
    model_dir, data_dir = build(work)
    print(f"CPU: {cpu_flags()}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "fine_tune_sentiment.py"), "--model-name", str(model_dir),
                             "--dataset-name", str(data_dir), "--output-dir", str(work / "out"), "--quiet"],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"the run failed:\n{result.stderr[-3000:]}")
    m = json.loads((work / "out" / "metrics.json").read_text())
    config = m["config"]
    print(f"cpu preset ({config['TRAIN_SAMPLES']} train x {config['EPOCHS']} epoch, {config['EVAL_SAMPLES']} eval, "
          f"{config['MAX_LENGTH']} tokens, batch {config['BATCH_SIZE']}), precision {m['precision']}: "
          f"training {m['train_seconds']:.0f} s ({m['train_samples_per_second']:.1f} ex/s), evaluation "
          f"{m['eval_runtime']:.0f} s ({m['eval_samples_per_second']:.1f} ex/s), whole command {wall:.0f} s "
          f"({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
