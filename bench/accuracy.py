"""LoRA against full fine-tuning on real text, every choice made on a validation split.

bench/run.py's split (Rotten Tomatoes, 10,808 training and 2,000 test sentences, all-MiniLM-L6-v2) loses a
seeded, stratified 1,500 sentences of its training rows to a validation split. Then:

1. levers, one at a time, on top of the base LoRA settings: each run trains on the other 9,308 rows and
   picks its epoch on validation; its folder's "test" split IS the validation split, so the real test
   split is never read here;
2. the best combination of the winning levers, the same way;
3. the final comparison, with --seeds N (median of N): the best LoRA settings and full fine-tuning of every
   weight (bench/baseline.py --full, 3 epochs, lr 5e-5, length-grouped, the same precision), both picking
   their epoch on validation and scoring the test split once, at the end.

    python bench/accuracy.py --seeds 3     # ~50 min on 2 cores with bf16 (AMX); run bench/run.py --data-only first
    python bench/accuracy.py --only-final --lora "--target-modules query value ..." --lora "..." --seeds 3

Each finished run is appended to bench/runs/accuracy/results.jsonl, so an interrupted study keeps its rows.
"""

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import WORK, cpu_flags, ensure_packages, run_once  # noqa: E402

VALIDATION_ROWS = 1500
BASE = ["--target-modules", "query", "value", "--lora-r", "8", "--lora-alpha", "16", "--learning-rate", "1e-3",
        "--epochs", "2", "--warmup", "0.06", "--scheduler", "linear", "--lora-variant", "lora"]
LEVERS = {  # group: {name: flags on top of BASE (later flags win)}
    "targets": {"all-linear": ["--target-modules", "all-linear"]},
    "rank": {"r16/a32": ["--lora-r", "16", "--lora-alpha", "32"], "rsLoRA r16/a16": ["--lora-r", "16",
             "--lora-alpha", "16", "--lora-variant", "rslora"], "DoRA r8/a16": ["--lora-variant", "dora"]},
    "learning rate": {"lr 5e-4": ["--learning-rate", "5e-4"], "lr 2e-3": ["--learning-rate", "2e-3"],
                      "lr 3e-3": ["--learning-rate", "3e-3"]},
    "schedule": {"cosine": ["--scheduler", "cosine"], "warmup 0.1": ["--warmup", "0.1"]},
    "epochs": {"3 epochs": ["--epochs", "3"]},
}
MIN_GAIN = 0.005  # a lever wins only above this much validation accuracy (7 of 1,500 sentences): one seed is noisy
FULL = ["--full", "--epochs", "3", "--learning-rate", "5e-5", "--grouped"]


def write_folders(data: Path) -> tuple[Path, Path]:
    """Two dataset folders: {train, validation, test = validation} for the levers, {train, validation, test}."""
    train, test = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "test.parquet")
    validation = train.groupby("label", group_keys=False).sample(frac=VALIDATION_ROWS / len(train), random_state=1)
    train = train.drop(validation.index)
    folders = WORK / "accuracy" / "select", WORK / "accuracy" / "final"
    for folder, last in zip(folders, (validation, test)):
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in (("train", train), ("validation", validation), ("test", last)):
            frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folders


def ours(model: Path, data: Path, flags: list[str], seed: int) -> callable:
    return lambda out: [sys.executable, "fine_tune_sentiment.py", "--model-name", str(model), "--dataset-name",
                        str(data), "--output-dir", str(out), "--train-samples", "0", "--eval-samples", "0",
                        "--max-length", "128", "--batch-size", "32", "--lora-dropout", "0.1", "--quiet",
                        "--seed", str(seed), *flags]


def full(model: Path, data: Path, seed: int, bf16: bool) -> callable:
    return lambda out: [sys.executable, "bench/baseline.py", "--model", str(model), "--data", str(data), "--out",
                        str(out), "--max-length", "128", "--batch-size", "32", "--lora-r", "8", "--lora-alpha", "16",
                        "--lora-dropout", "0.1", "--target-modules", "query", "value", "--seed", str(seed),
                        *FULL, *(["--bf16"] if bf16 else [])]


def record(name: str, result: dict) -> dict:
    """Keep one finished run: print it and append it to results.jsonl."""
    row = {"name": name, "accuracy": result["eval_accuracy"], "train_seconds": result["train_seconds"],
           "precision": result.get("precision", "bf16" if "--bf16" in name else None),
           "per_epoch": result.get("accuracy_per_epoch") or result.get("epoch_accuracies"),
           "validation": result.get("validation_accuracy")}
    with open(WORK / "accuracy" / "results.jsonl", "a") as log:
        log.write(json.dumps(row) + "\n")
    print(f"  {name}: {row['accuracy']:.4f} in {row['train_seconds']:.0f}s training (per epoch {row['per_epoch']})",
          flush=True)
    return row


def earlier_runs() -> list[dict]:
    """Every run results.jsonl has kept, oldest first."""
    log = WORK / "accuracy" / "results.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the final comparison (median)")
    parser.add_argument("--only-final", action="store_true", help="skip the levers; compare --lora with full FT")
    parser.add_argument("--lora", action="append", help="LoRA flags for the final comparison (default: the study's "
                        "winner); repeat it to compare several against the same full fine-tuning runs")
    parser.add_argument("--reuse-full", action="store_true", help="take full fine-tuning's runs of the same seeds "
                        "from results.jsonl (the latest of each) instead of training them again")
    parser.add_argument("--first-seed", type=int, default=1, help="the seeds are FIRST_SEED to FIRST_SEED+SEEDS-1")
    parser.add_argument("--lora-only", action="store_true", help="no full fine-tuning runs (more seeds of --lora, "
                        "or --lora against an earlier checkout's)")
    args = parser.parse_args()
    import predict_sentiment as pst

    model, _ = ensure_packages()
    select, final = write_folders(ROOT / "bench" / "data" / "rotten-tomatoes")
    speedup = pst.bf16_speedup(384) if pst.cpu_may_have_fast_bf16() else None
    bf16 = pst.choose_precision("auto", False, speedup=speedup) == "bf16"
    print(f"CPU: {cpu_flags()} | auto: {'bf16' if bf16 else 'fp32'} | validation {VALIDATION_ROWS} rows", flush=True)
    configs = [shlex.split(flags) for flags in args.lora or [" ".join(BASE)]]
    if not args.only_final:
        print("Levers (validation accuracy of the kept epoch; the test split is not read):", flush=True)
        base = record("base: q,v r8/a16, lr 1e-3, 2 epochs, linear", run_once(
            "acc-base", ours(model, select, BASE, 42)))
        winners, candidates = [], [(base["accuracy"], BASE)]
        for group, levers in LEVERS.items():
            rows = {name: record(name, run_once(f"acc-{name.replace(' ', '-').replace('/', '-')}",
                                                ours(model, select, BASE + flags, 42))) for name, flags in levers.items()}
            name, row = max(rows.items(), key=lambda item: item[1]["accuracy"])
            candidates.append((row["accuracy"], BASE + levers[name]))
            if row["accuracy"] >= base["accuracy"] + MIN_GAIN:
                winners.append(levers[name])
        if len(winners) > 1:  # one winner alone is already a candidate
            winners = [flag for flags in winners for flag in flags]
            combined = record(f"combination: {' '.join(winners)}", run_once(
                "acc-combined", ours(model, select, BASE + winners, 42)))
            candidates.append((combined["accuracy"], BASE + winners))
        configs = [max(candidates, key=lambda c: c[0])[1]]  # the best on validation: combination, lever or base
    print(f"Final, {args.seeds} seeds, test scored once per run: LoRA " + " | ".join(map(" ".join, configs)), flush=True)
    finals = {"full": []} | {i: [] for i in range(len(configs))}
    for seed in range(args.first_seed, args.first_seed + args.seeds):  # alternate: drift hits all alike
        for i, flags in enumerate(configs):
            finals[i].append(record(f"final LoRA {' '.join(flags)} seed {seed}", run_once(
                f"acc-final-lora{i}-{seed}", ours(model, final, flags, seed))))
        if args.lora_only:
            continue
        name = f"final full fine-tuning seed {seed}{' --bf16' if bf16 else ''}"
        earlier = [row for row in earlier_runs() if row["name"] == name] if args.reuse_full else []
        finals["full"].append(earlier[-1] if earlier else record(name, run_once(
            f"acc-final-full-{seed}", full(model, final, seed, bf16))))
    median = {n: {k: statistics.median(r[k] for r in rows) for k in ("accuracy", "train_seconds")}
              for n, rows in finals.items() if rows}
    anchor = median.get("full")  # none with --lora-only
    print(f"\n| run (median of {args.seeds}) | test accuracy | training s | vs full fine-tuning |\n|---|---|---|---|")
    if anchor:
        print(f"| full fine-tuning, 3 epochs, lr 5e-5 | {anchor['accuracy']:.4f} | {anchor['train_seconds']:.0f} | "
              "1.00x |")
    for i, flags in enumerate(configs):
        lora = median[i]
        versus = f"{lora['train_seconds'] / anchor['train_seconds']:.2f}x time, " \
                 f"{lora['accuracy'] - anchor['accuracy']:+.4f}" if anchor else "not run"
        print(f"| LoRA {' '.join(flags)} | {lora['accuracy']:.4f} | {lora['train_seconds']:.0f} | {versus} |")


if __name__ == "__main__":
    main()
