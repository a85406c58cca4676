"""Tokenizing time of 25,000 review-length texts: TRUNCATION=head (the tokenizer cuts) against head+tail
(one tokenizer pass without truncation, then the ids are cut), with all-MiniLM-L6-v2's uncased WordPiece
tokenizer. Reviews are Rotten Tomatoes sentences joined to IMDB length (about 230 words, like IMDB's average).
Run bench/run.py --data-only once first.

    python bench/tokenize_speed.py --repeats 5
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fine_tune_sentiment as fts  # noqa: E402
from bench.run import cpu_flags, ensure_packages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    model, _ = ensure_packages()
    sentences = list(pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/train.parquet").text)
    rng = random.Random(0)
    reviews = [" ".join(rng.choices(sentences, k=10)) for _ in range(25_000)]
    tokenizers = {mode: fts.load_tokenizer(str(model), args.max_length, 512, mode) for mode in ("head", "head+tail")}
    lengths = [len(ids) for ids in tokenizers["head"](reviews[:2000])["input_ids"]]
    print(f"CPU: {cpu_flags()}\n25,000 reviews, median {statistics.median(lengths):.0f} tokens, "
          f"{sum(n > args.max_length for n in lengths) / len(lengths):.0%} longer than {args.max_length}", flush=True)
    times = {mode: [] for mode in tokenizers}
    for _ in range(args.repeats):
        for mode, tokenizer in tokenizers.items():  # alternate, so drift hits both
            started = time.perf_counter()
            for start in range(0, len(reviews), 1000):  # the batches datasets.map hands to tokenize()
                fts.encode(tokenizer, reviews[start:start + 1000])
            times[mode].append(time.perf_counter() - started)
    head, both = statistics.median(times["head"]), statistics.median(times["head+tail"])
    print(f"\n| TRUNCATION (median of {args.repeats}) | seconds for 25,000 | vs head |\n|---|---|---|")
    print(f"| head | {head:.2f} | 1.00x |\n| head+tail | {both:.2f} | {both / head:.2f}x |")


if __name__ == "__main__":
    main()
