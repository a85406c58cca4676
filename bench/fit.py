"""Fitting the user's data on real text: class weights on skewed data, calibration, and --search against the recipe.

all-MiniLM-L6-v2 on bench/run.py's Rotten Tomatoes split (run `python bench/run.py --data-only` first), the README
recipe (all-linear LoRA, r8/a16, lr 1e-3, 2 epochs, 128 tokens, batch 32), each run in a fresh process:

- `weights`: the training sentences with negatives cut to 10% of the rows, the 2,000 balanced test sentences;
  CLASS_WEIGHTS none against balanced: macro F1 and the negative class's recall;
- `calibration`: the recipe on the whole split: test ECE (15 bins) and NLL before and after the temperature, and the
  same out of domain: "reviews" of another kind, five test sentences of one class joined into one paragraph
  (the saved model is calibrated; its logits times the temperature are the uncalibrated model's);
- `search`: --search N against the recipe: validation and test accuracy, and time.

    python bench/fit.py weights calibration
    python bench/fit.py search --trials 8 --train-samples 3000
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import ROOT, WORK, cpu_flags, ensure_packages, timed  # noqa: E402

RECIPE = ["--train-samples", "0", "--eval-samples", "0", "--max-length", "128", "--batch-size", "32",
          "--target-modules", "all-linear", "--learning-rate", "1e-3", "--epochs", "2", "--quiet"]


def command(model, data, out, *extra) -> list[str]:
    return [sys.executable, "fine_tune_sentiment.py", "--model-name", str(model), "--dataset-name", str(data),
            "--output-dir", str(out), *RECIPE, *extra]


def fresh(name: str):
    import shutil

    out = WORK / "fit" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def weights(model, data) -> None:
    """CLASS_WEIGHTS none against balanced on training sentences that are 10% negative."""
    train, test = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "test.parquet")
    positives = train[train.label == 1]
    negatives = train[train.label == 0].sample(n=len(positives) // 9, random_state=1)  # 10% of the rows
    skewed = WORK / "fit" / "skewed-data"
    skewed.mkdir(parents=True, exist_ok=True)
    pd.concat([positives, negatives]).to_parquet(skewed / "train.parquet", index=False)
    test.to_parquet(skewed / "test.parquet", index=False)
    print(f"skewed training split: {len(positives)} positive, {len(negatives)} negative; test {len(test)} balanced")
    for mode in ("none", "balanced"):
        out = fresh(f"weights-{mode}")
        found = timed(command(model, skewed, out, "--class-weights", mode), out)
        matrix = np.array(found["confusion_matrix"])
        macro_f1 = np.mean([2 * matrix[k, k] / (matrix[k].sum() + matrix[:, k].sum()) for k in range(2)])
        print(f"| {mode} | {found['eval_accuracy']:.4f} | {macro_f1:.4f} | {found['per_class_recall']['NEGATIVE']:.4f} "
              f"| {found['per_class_recall']['POSITIVE']:.4f} | {found['train_seconds']:.0f} |", flush=True)


def calibration(model, data) -> None:
    """The recipe's test ECE and NLL before and after calibration, in domain and on joined-sentence paragraphs."""
    import evaluation
    import predict_sentiment as pst

    out = fresh("calibration")
    found = timed(command(model, data, out), out)
    c = found["calibration"]
    print(f"recipe: accuracy {found['eval_accuracy']:.4f}, temperature {c['temperature']}; test ECE "
          f"{c['test_ece_before']:.4f} -> {c['test_ece_after']:.4f}, NLL {c['test_nll_before']:.4f} -> "
          f"{c['test_nll_after']:.4f}; validation NLL {c['validation_nll_before']:.4f} -> "
          f"{c['validation_nll_after']:.4f}", flush=True)
    test = pd.read_parquet(data / "test.parquet")
    rng = np.random.default_rng(0)
    paragraphs, labels = [], []
    for label in (0, 1):
        rows = list(test[test.label == label].text)
        rng.shuffle(rows)
        paragraphs += [" ".join(rows[i:i + 5]) for i in range(0, len(rows) - 4, 5)]
        labels += [label] * (len(rows) // 5)
    model_, tokenizer = pst.load_adapter(out / "adapter")
    calibrated = pst.logits(model_, tokenizer, paragraphs)
    labels = np.array(labels)
    t = c["temperature"]
    print(f"out of domain ({len(paragraphs)} paragraphs of 5 test sentences of one class): accuracy "
          f"{np.mean(calibrated.argmax(-1) == labels):.4f}; ECE {evaluation.ece(calibrated * t, labels):.4f} -> "
          f"{evaluation.ece(calibrated, labels):.4f}, NLL {evaluation.cross_entropy(calibrated * t, labels):.4f} -> "
          f"{evaluation.cross_entropy(calibrated, labels):.4f}", flush=True)


def search(model, data, trials: int, rows: int) -> None:
    """--search N against the recipe on the same training rows: validation and test accuracy, and time."""
    sized = ["--train-samples", str(rows)] if rows else []
    for name, extra in (("recipe", []), (f"search-{trials}", ["--search", str(trials)])):
        out = fresh(name)
        found = timed(command(model, data, out, *sized, *extra), out)
        picked = found.get("accuracy_per_epoch", [None])
        best = json.loads((out / "search.json").read_text()) if (out / "search.json").exists() else {}
        print(f"| {name} | {best.get('best_validation_accuracy') or max(picked):.4f} | {found['eval_accuracy']:.4f} | "
              f"{found['wall_seconds']:.0f} | {json.dumps(best.get('best', {}))} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=("weights", "calibration", "search"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=0, help="for search: training rows of both (0: all)")
    args = parser.parse_args()
    model, _ = ensure_packages()
    data = ROOT / "bench" / "data" / "rotten-tomatoes"
    print(f"CPU: {cpu_flags()} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if "weights" in args.parts:
        print("| CLASS_WEIGHTS | accuracy | macro F1 | negative recall | positive recall | training s |\n"
              "|---|---|---|---|---|---|", flush=True)
        weights(model, data)
    if "calibration" in args.parts:
        calibration(model, data)
    if "search" in args.parts:
        print("| run | validation accuracy | test accuracy | wall s | settings |\n|---|---|---|---|---|", flush=True)
        search(model, data, args.trials, args.train_samples)


if __name__ == "__main__":
    main()
