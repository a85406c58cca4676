"""One process with 2 threads against torchrun with 2 processes of 1 thread, on the benchmark's real text.

The same MiniLM + Rotten Tomatoes training (bench/run.py's settings, 1 epoch, full split) as
`python fine_tune_sentiment.py` and as `torchrun --standalone --nproc_per_node 2 fine_tune_sentiment.py`,
with half the per-process batch size under torchrun so that each step sees the same 32 examples.
On a 2-core machine this checks correctness (same accuracy, every eval row once), not a speed-up.
Run bench/run.py --data-only once first.

    python bench/distributed.py --repeats 1
"""

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import cpu_flags, ensure_packages, our_command, run_once  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the 2,000-sentence split of bench/run.py --quick")
    args = parser.parse_args()
    model, _ = ensure_packages()
    data = ROOT / "bench" / "data" / ("rotten-tomatoes-quick" if args.quick else "rotten-tomatoes")
    print(f"CPU: {cpu_flags()} | data: {data.name}", flush=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    variants = {  # the later --batch-size wins: 2 x 16 = 32 examples a step, as in the single process
        "1 process x 2 threads": lambda out: our_command(model, data, out),
        "2 processes x 1 thread": lambda out: torchrun + our_command(model, data, out, ["--batch-size", "16"])[1:],
    }
    runs = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, command in variants.items():
            r = run_once(f"ddp-{len(runs[name])}-{name[0]}", command)
            runs[name].append(r)
            print(f"  {name} #{i}: {r['train_samples_per_second']:.1f} train ex/s, accuracy {r['eval_accuracy']:.4f}, "
                  f"eval rows {r['eval_samples']} (matrix {sum(map(sum, r['confusion_matrix']))}), "
                  f"world size {r['world_size']}, {r['wall_seconds']:.0f}s wall", flush=True)
    print(f"\n| run (median of {args.repeats}) | train ex/s | eval ex/s | accuracy | loss | wall s |\n|---|---|---|---|---|---|")
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in
               ("train_samples_per_second", "eval_samples_per_second", "eval_accuracy", "eval_loss", "wall_seconds")}
        print(f"| {name} | {med['train_samples_per_second']:.1f} | {med['eval_samples_per_second']:.1f} | "
              f"{med['eval_accuracy']:.4f} | {med['eval_loss']:.4f} | {med['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
