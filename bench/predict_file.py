"""--predict-file on real text: rows/s against --eval-only's eval_samples_per_second on the same adapter, and
peak memory for 20,000 rows against 200,000 rows (the file streams, so memory should not grow).

Trains nothing: it uses the adapter that bench/run.py left in bench/runs/ours-auto-0 (MiniLM, Rotten Tomatoes).
The input files repeat the Rotten Tomatoes sentences. Each measurement runs in a fresh process.

    python bench/predict_file.py
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import WORK, cpu_flags  # noqa: E402


def run(command: list[str]) -> tuple[str, float]:
    """Run a command; return its stdout and its peak RSS in MiB (wait4: this child only)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(err)
    return out, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--run", default=str(WORK / "ours-auto-0"), help="an OUTPUT_DIR holding adapter/")
    args = parser.parse_args()
    sentences = pd.concat([pd.read_parquet(ROOT / "bench/data/rotten-tomatoes" / f"{split}.parquet")
                           for split in ("train", "test")])
    work = WORK / "predict-file"
    (work / "eval").mkdir(parents=True, exist_ok=True)
    sentences[:2000].to_parquet(work / "eval" / "test.parquet", index=False)
    run([sys.executable, "fine_tune_sentiment.py", "--output-dir", args.run, "--eval-only", "--batch-size", "32",
         "--dataset-name", str(work / "eval"), "--quiet"])  # batches of 64, as --predict-file below
    trainer = json.loads((Path(args.run) / "eval_metrics.json").read_text())["eval_samples_per_second"]
    print(f"CPU: {cpu_flags()}\n--eval-only, 2,000 rows: {trainer:.1f} rows/s", flush=True)
    print("\n| rows | --predict-file rows/s | vs --eval-only | peak RSS MiB |\n|---|---|---|---|")
    for rows in args.rows:
        source = work / f"in-{rows}.csv"
        pd.concat([sentences] * (rows // len(sentences) + 1))[:rows].to_csv(source, index=False)
        out, peak = run([sys.executable, "predict_sentiment.py", "--output-dir", args.run, "--predict-file",
                         str(source), "--predictions", str(work / f"predictions-{rows}.csv"), "--quiet",
                         "--batch-size", "64"])  # batches of 64, as the Trainer evaluated
        rate = float(out.split("(")[-1].split()[0])  # "Scored N rows in Ts (R rows/s): path"
        print(f"| {rows:,} | {rate:.1f} | {rate / trainer:.2f}x | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
