"""Measure speed levers one at a time on the benchmark data (run bench/run.py --data-only once first).

Each variant runs in a fresh process: it trains one epoch on 1,600 sentences and evaluates 1,000, with
the benchmark's settings, using fine_tune_sentiment.py's own stages. Variants alternate over the repeats.

    python bench/levers.py --repeats 2             # all variants
    python bench/levers.py --repeats 2 --only 0 1   # the guide's batching against ours
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 300  # seconds; a variant slower than this has lost
VARIANTS = {  # name: (train sampling, sort eval by length, bf16 autocast, torch.compile, threads)
    "random batches, unsorted eval (the guide)": ("random", False, False, False, 0),
    "length-grouped batches, sorted eval (ours)": ("group_by_length", True, False, False, 0),
    "ours + bf16 autocast": ("group_by_length", True, True, False, 0),
    "ours + torch.compile": ("group_by_length", True, False, True, 0),
    "ours, 1 thread": ("group_by_length", True, False, False, 1),
}


def measure(name: str) -> dict:
    """Train and evaluate one variant in this process; return its throughputs."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT))
    import fine_tune_sentiment as fts
    from bench.run import ensure_packages

    sampling, sort_eval, bf16, compile_, threads = VARIANTS[name]
    if threads:
        torch.set_num_threads(threads)
    model_dir, _ = ensure_packages()
    data = fts.prepare_data(fts.load_raw_data(str(ROOT / "bench/data/rotten-tomatoes")), "text", "label", seed=42)
    data["train"] = fts.subsample(data["train"], 1600, 42, "train")
    data["test"] = fts.subsample(data["test"], 1000, 42, "test")
    model = fts.build_model(str(model_dir), ["query", "value"], 8, 16, 0.1)
    tokenizer = fts.load_tokenizer(str(model_dir), 128, 512)
    data = fts.tokenize(data, tokenizer)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32,
                             per_device_eval_batch_size=32, learning_rate=1e-3, num_train_epochs=1,
                             train_sampling_strategy=sampling, bf16=bf16, use_cpu=True, torch_compile=compile_,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=fts.compute_metrics)
    train = trainer.train().metrics
    evaluation = trainer.evaluate(data["test"].sort("length") if sort_eval else data["test"])
    return {"train": train["train_samples_per_second"], "eval": evaluation["eval_samples_per_second"],
            "accuracy": evaluation["eval_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="+", type=int, help="run only these variants (0-based, in table order)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant)))
        return
    names = [name for i, name in enumerate(VARIANTS) if args.only is None or i in args.only]
    results = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            try:
                done = subprocess.run([sys.executable, __file__, "--variant", name], capture_output=True, text=True,
                                      timeout=LIMIT)
            except subprocess.TimeoutExpired:
                print(f"{name}: stopped after {LIMIT} s (the others take about 60 s)", flush=True)
                continue
            if done.returncode:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {results[name][-1]}", flush=True)
    base = results["random batches, unsorted eval (the guide)"]
    sys.path.insert(0, str(ROOT))
    from bench.run import cpu_flags

    print(f"\nCPU: {cpu_flags()}")
    print(f"\n| lever (median of {args.repeats}) | train ex/s | eval ex/s | train vs guide | eval vs guide |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        if runs:
            train, evaluation = (statistics.median(r[k] for r in runs) for k in ("train", "eval"))
            print(f"| {name} | {train:.1f} | {evaluation:.1f} | {train / statistics.median(r['train'] for r in base):.2f}x"
                  f" | {evaluation / statistics.median(r['eval'] for r in base):.2f}x |")


if __name__ == "__main__":
    main()
