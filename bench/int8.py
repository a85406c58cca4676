"""int8 formats on the real model: the u8u8 weights --export-onnx writes against the u8s8 ones it wrote before.

ONNX Runtime's u8s8 kernels multiply uint8 activations by int8 weights with VPMADDUBSW on x86 CPUs without VNNI
(AVX2, AVX-512 without VNNI), which adds pairs into 16 bits and can saturate; VNNI and AMX CPUs add in 32 bits.
So u8s8 can answer differently by CPU class. u8u8 never saturates. This re-quantizes bench/runs/inference/onnx/model.onnx
(left by bench/inference.py) each way (and u8s8 with 7-bit weights, which cannot saturate either) and scores the 2,000 held-out Rotten Tomatoes sentences with each, in this
process, alternating over --repeats: accuracy, labels that differ from fp32, the largest probability gap, rows/s.

    python bench/int8.py --repeats 3      # run bench/inference.py first
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fine_tune_sentiment as fts
import predict_sentiment as pst  # noqa: E402
from bench.run import WORK, cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", default=str(WORK / "inference"), help="an OUTPUT_DIR holding onnx/")
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    formats = {"u8s8": (QuantType.QInt8, False), "u8s8, 7-bit weights (reduce_range)": (QuantType.QInt8, True),
               "u8u8": (QuantType.QUInt8, False)}  # name: (weight type, reduce_range)

    onnx = Path(args.run) / "onnx"
    test = pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/test.parquet")
    texts, labels = list(test.text), test.label.to_numpy()
    work = Path(tempfile.mkdtemp(prefix="int8-"))
    for name, (kind, reduce_range) in formats.items():
        quantize_dynamic(str(onnx / "model.onnx"), str(work / f"{name}.onnx"), weight_type=kind, per_channel=True,
                         reduce_range=reduce_range)
    fp32_model, tokenizer = pst.load_onnx(onnx, int8=False)
    reference = fts.softmax(fts.logits(fp32_model, tokenizer, texts, 64))
    print(f"CPU: {cpu_flags()}\n{len(texts):,} sentences, batches of 64, {args.repeats} alternating repeats\n"
          f"fp32: accuracy {np.mean(reference.argmax(-1) == labels):.4f}", flush=True)
    import onnxruntime

    found = {name: [] for name in formats}
    probabilities = {}
    for _ in range(args.repeats):
        for name in found:
            session = onnxruntime.InferenceSession(str(work / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            fp32_model.session_forward = lambda batch, s=session: s.run(["logits"], batch)[0]
            started = time.perf_counter()
            probabilities[name] = fts.softmax(fts.logits(fp32_model, tokenizer, texts, 64))
            found[name].append(len(texts) / (time.perf_counter() - started))
    print("\n| int8 weights | accuracy | labels unlike fp32 | max prob. gap to fp32 | rows/s (median) | size MB |\n"
          "|---|---|---|---|---|---|")
    for name, rates in found.items():
        p = probabilities[name]
        print(f"| {name} | {np.mean(p.argmax(-1) == labels):.4f} | {int(np.sum(p.argmax(-1) != reference.argmax(-1)))} "
              f"| {np.abs(p - reference).max():.3f} | {statistics.median(rates):.0f} | "
              f"{(work / f'{name}.onnx').stat().st_size / 1e6:.1f} |")


if __name__ == "__main__":
    main()
