"""Inference runtimes side by side: torch fp32, torch auto, ONNX fp32, ONNX int8 and OpenVINO int8, on real text.

Trains the README's "Try it without internet" adapter into bench/runs/inference/ if it is not there (all-MiniLM-L6-v2,
Rotten Tomatoes, all-linear LoRA, 2 epochs), exports it with --export-onnx, then, each in a fresh process:
- --predict-file on the benchmark's 2,000 test sentences repeated to 20,000 rows: rows/s, peak RSS, and the
  accuracy on the first 2,000 rows (each test sentence once);
- --predict from a cold start, median of 3, for torch (auto) and onnx-int8.
The runs alternate over --repeats, so drift in machine load hits all alike; the table has the medians.

    python bench/inference.py --repeats 2     # run bench/run.py --data-only first
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.predict_file import run  # noqa: E402
from bench.run import ROOT, WORK, cpu_flags, ensure_packages  # noqa: E402

RUNTIMES = {"torch fp32": ["--precision", "fp32"], "torch auto": ["--precision", "auto"],
            "onnx": ["--runtime", "onnx"], "onnx-int8": ["--runtime", "onnx-int8"],
            "openvino": ["--runtime", "openvino"]}
TRAIN = ["--train-samples", "0", "--eval-samples", "0", "--max-length", "128", "--batch-size", "32",
         "--target-modules", "all-linear", "--lora-layers", "4", "--lora-dropout", "0", "--learning-rate", "1e-3",
         "--epochs", "2", "--merge"]  # the README's
# "Try it without internet" command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), metavar="RUNTIME",
                        help=f"a subset of: {', '.join(RUNTIMES)} (default: all)")
    parser.add_argument("--before", metavar="DIR", help="also run the exported runtimes with DIR's "
                        "predict_sentiment.py (a worktree of an earlier commit), as 'NAME (before)'")
    args = parser.parse_args()
    model, _ = ensure_packages()
    data, out = ROOT / "bench/data/rotten-tomatoes", WORK / "inference"
    script = [sys.executable, "fine_tune_sentiment.py", "--output-dir", str(out)]
    predict = [sys.executable, "predict_sentiment.py", "--output-dir", str(out)]
    if not (out / "adapter").exists():
        started = time.perf_counter()
        run([*script, "--model-name", str(model), "--dataset-name", str(data), *TRAIN, "--quiet"])
        trained = json.loads((out / "metrics.json").read_text())
        print(f"trained (the README command): accuracy {trained['eval_accuracy']:.4f}, loss {trained['eval_loss']:.4f}, "
              f"matrix {trained['confusion_matrix']}, {trained['train_seconds']:.0f}s training, "
              f"{time.perf_counter() - started:.0f}s wall, per-epoch validation {trained['accuracy_per_epoch']}")
    run([*script, "--dataset-name", str(data), "--export-onnx", "--quiet"])  # int8 calibrated on its training set
    test = pd.read_parquet(data / "test.parquet")
    source = out / "in.csv"
    pd.concat([test] * (args.rows // len(test) + 1))[:args.rows].to_csv(source, index=False)
    print(f"CPU: {cpu_flags()}\n{args.rows:,} rows ({len(test):,} test sentences repeated), batches of 64, "
          f"{args.repeats} alternating repeats", flush=True)
    found = {name: [] for name in args.runtimes}
    if args.before:
        found |= {f"{name} (before)": [] for name in args.runtimes if name.startswith(("onnx", "openvino"))}
    for repeat in range(args.repeats):
        for name in found:
            flags = RUNTIMES[name.removesuffix(" (before)")]
            script = [sys.executable, os.path.join(args.before, "predict_sentiment.py"), *predict[2:]
                      ] if name.endswith("(before)") else predict
            target = out / f"predictions-{name.replace(' ', '-').replace('(', '').replace(')', '')}.csv"
            printed, peak = run([*script, *flags, "--predict-file", str(source), "--predictions", str(target),
                                 "--quiet", "--batch-size", "64"])
            rate = float(printed.split("(")[-1].split()[0])  # "Scored N rows in Ts (R rows/s): path"
            labels = pd.read_csv(target, nrows=len(test))
            accuracy = ((labels["predicted_label"] == "POSITIVE").astype(int) == labels["label"]).mean()
            found[name].append({"rate": rate, "peak": peak, "accuracy": accuracy})
            print(f"  {name} #{repeat}: {rate:.1f} rows/s, peak RSS {peak:.0f} MiB, accuracy {accuracy:.4f}", flush=True)
    cold = {}
    for name in [n for n in ("torch auto", "onnx-int8", "openvino") if n in found]:
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([*predict, *RUNTIMES[name], "--predict", "A gorgeous, funny film."], cwd=ROOT, check=True,
                           capture_output=True)
            seconds.append(time.perf_counter() - started)
        cold[name] = statistics.median(seconds)
    first = next(iter(found))  # the baseline of the ratios: torch fp32 unless --runtimes leaves it out
    base = statistics.median(r["rate"] for r in found[first])
    print(f"\n| runtime | --predict-file rows/s (median) | vs {first} | peak RSS MiB | accuracy (2,000) | "
          "--predict cold start s (median of 3) |\n|---|---|---|---|---|---|")
    for name, rows in found.items():
        rate = statistics.median(r["rate"] for r in rows)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {statistics.median(r['peak'] for r in rows):.0f} | "
              f"{rows[0]['accuracy']:.4f} | {f'{cold[name]:.1f}' if name in cold else ''} |")
    sizes = {f: (out / "onnx" / f).stat().st_size / 1e6 for f in ("model.onnx", "model_int8.onnx")}
    print(f"\nmodel.onnx {sizes['model.onnx']:.1f} MB, model_int8.onnx {sizes['model_int8.onnx']:.1f} MB")


if __name__ == "__main__":
    main()
