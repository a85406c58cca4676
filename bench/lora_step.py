"""What one training step costs: full fine-tuning against LoRA (query value, all-linear) and its dropout.

"peft's" rows run the step as torch and peft do (FAST_STEP off); the others as fine_tune_sentiment.py does (FAST_STEP,
fast_lora.py: dropout masks from 16 random bits an element, one mask for query, key and value; each LoRA layer in one autograd
function). Full fine-tuning (the HF guide's) keeps torch's dropout, and is also shown with the cheap one.

A synthetic batch of 32 x 40 tokens (--tokens) through the packaged all-MiniLM-L6-v2 (BERT, 22.7M weights): forward, backward
and an AdamW step, as the Trainer runs them, the model built by fine_tune_sentiment.build_model (the head trains in
full under LoRA). Each variant runs in a fresh process, 5 warm-up steps then the median of --steps; variants
alternate over --repeats, and the table has the median of the repeats. Precision: fp32, and `auto` (what the script's
probe picks on this CPU; it is fp32 where bf16 is emulated, and then not run twice).

    python bench/lora_step.py --repeats 2
    ../shared/cpu-class avx2 python bench/lora_step.py   # as an AVX2-only machine runs it
    python bench/lora_step.py --profile "all-linear, dropout 0"   # where the time of one variant goes
    python bench/lora_step.py --precisions bf16 --before ../earlier   # the LoRA variants with an earlier checkout too
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import cpu_flags, ensure_packages  # noqa: E402

VARIANTS = {  # name: (LoRA targets or None for full fine-tuning, lora_dropout, the step as torch and peft run it,
    # LoRA on the top this many layers only; 0: all)
    "full fine-tuning": (None, 0.0, True),
    "full fine-tuning, cheap dropout": (None, 0.0, False),
    "query value, dropout 0.1, peft's": (["query", "value"], 0.1, True),
    "query value, dropout 0.1": (["query", "value"], 0.1, False),
    "all-linear, dropout 0.1, peft's": (["all-linear"], 0.1, True),
    "all-linear, dropout 0.1": (["all-linear"], 0.1, False),
    "all-linear, dropout 0, peft's": (["all-linear"], 0.0, True),
    "all-linear, dropout 0": (["all-linear"], 0.0, False),
    "all-linear top 3, dropout 0.1": (["all-linear"], 0.1, False, 3),
    "all-linear top 4, dropout 0.1": (["all-linear"], 0.1, False, 4),
    "all-linear top 4, dropout 0": (["all-linear"], 0.0, False, 4),
}
BATCH, TOKENS = 32, 40
BEFORE = " (before)"  # a variant run with --before's checkout


def step_times(name: str, precision: str, steps: int, profile: bool = False, tokens: int = TOKENS) -> list[float]:
    """Build the variant, run warm-up and timed training steps on one synthetic batch; return seconds per step."""
    import torch

    import fine_tune_sentiment as fts

    model_dir, _ = ensure_packages()
    targets, dropout, torch_dropout, top_layers = (*VARIANTS[name], 0)[:4]
    torch.manual_seed(0)
    if targets is None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        if not torch_dropout:
            import fast_lora

            fast_lora.apply(model)  # no LoRA layers: the cheap dropout alone
    else:  # torch_dropout: as torch and peft run it (FAST_STEP off)
        model = fts.build_model(str(model_dir), targets, 8, 16, dropout, fast_step=not torch_dropout,
                                top_layers=top_layers)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01,
                                  fused=True)  # the Trainer's default (adamw_torch_fused); foreach took full
    # fine-tuning's step to 1.8x (AVX-512 BF16, fp32, 26 tokens: 660 against 365 ms)
    batch = {"input_ids": torch.randint(1000, 20000, (BATCH, tokens)), "attention_mask": torch.ones(BATCH, tokens,
             dtype=torch.long), "labels": torch.randint(0, 2, (BATCH,))}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if profile:
        from torch.profiler import ProfilerActivity, profile as run_profile

        with run_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "PRECISION"), help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT",
                        help="a subset of the variants (default: all; full fine-tuning is always run)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), help="default: fp32 and auto's")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens a row of the batch (default: %(default)s;"
                        " the Rotten Tomatoes sentences' median is 26, 90th percentile 42)")
    parser.add_argument("--profile", metavar="VARIANT", help="print torch.profiler's table for one variant (fp32)")
    parser.add_argument("--before", type=Path, metavar="DIR", help="also run the LoRA variants with the checkout in "
                        "DIR (an earlier commit's worktree), alternating with this one's")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(step_times(args.one[0], args.one[1], args.steps, tokens=args.tokens)))
        return
    if args.profile:
        step_times(args.profile, "fp32", 1, profile=True, tokens=args.tokens)
        return
    import predict_sentiment as pst

    auto, speedup = pst.resolve_precision("auto", False, 384)
    precisions = args.precisions or ["fp32"] + (["bf16"] if auto == "bf16" else [])
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"CPU: {cpu_flags()}; torch kernels: ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'native')}, "
          f"ONEDNN_MAX_CPU_ISA={isa}\nauto picks {auto}"
          f"{f' (bf16 matmuls {speedup:.2f}x fp32)' if speedup else ' (bf16 ruled out by the CPU flags)'}; "
          f"batch {BATCH} x {args.tokens} tokens, median of {args.steps} steps, {args.repeats} alternating repeats",
          flush=True)
    found = {(n, p): [] for p in precisions for n in VARIANTS if n in {"full fine-tuning", *args.variants}}
    if args.before:
        found |= {(n + BEFORE, p): [] for n, p in list(found) if VARIANTS[n][0]}
    for _ in range(args.repeats):
        for name, precision in found:
            root = args.before.resolve() if name.endswith(BEFORE) else ROOT
            out = subprocess.run([sys.executable, str(root / "bench" / "lora_step.py"), "--one",
                                  name.removesuffix(BEFORE), precision, "--steps", str(args.steps),
                                  *(["--tokens", str(args.tokens)] if args.tokens != TOKENS else [])],
                                 capture_output=True, text=True, cwd=root, check=True).stdout
            found[name, precision].append(statistics.median(json.loads(out.strip().splitlines()[-1])))
            print(f"  {name}, {precision}: {found[name, precision][-1] * 1000:.0f} ms", flush=True)
    print("\n| variant | precision | ms/step (median) | vs full fine-tuning |\n|---|---|---|---|")
    for (name, precision), times in found.items():
        full = statistics.median(found["full fine-tuning", precision])
        print(f"| {name} | {precision}{' (auto)' if precision == auto else ''} | {statistics.median(times) * 1000:.0f} "
              f"| {statistics.median(times) / full:.2f}x |")


if __name__ == "__main__":
    main()
