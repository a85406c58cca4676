"""int8 on the real model: does a review's score depend on its batch, what accuracy is kept, how near the CPU's peak.

Scores the 2,000 held-out Rotten Tomatoes sentences with the export bench/inference.py left in
bench/runs/inference/onnx/: fp32 ONNX, the static int8 model --export-onnx writes (on ONNX Runtime and on OpenVINO),
and dynamic int8 (what --export-onnx wrote before: each batch quantized with its own activation range), all in this
process, alternating over --repeats. For each: accuracy, labels unlike fp32, rows/s (median), and on the first
--alone sentences the largest probability gap between a sentence scored alone and scored in the file scorer's
batches of 64, or in shuffled batches of 16 (as the server forms them), and how many labels flip.
Achieved GOP/s counts the MatMuls' multiply-adds (x2) of the tokens run, padding included, against the peak of one
large matmul of that precision measured here (torch for fp32, ONNX Runtime's MatMulInteger for int8).

    python bench/int8.py --repeats 3      # run bench/inference.py first
"""

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import predict_sentiment as pst  # noqa: E402
from bench.run import WORK, cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alone", type=int, default=400, help="sentences also scored one at a time")
    parser.add_argument("--run", default=str(WORK / "inference"), help="an OUTPUT_DIR holding onnx/")
    args = parser.parse_args()
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnxruntime.set_default_logger_severity(3)
    onnx = Path(args.run) / "onnx"
    dynamic = Path(tempfile.mkdtemp(prefix="int8-")) / "dynamic.onnx"
    logging.disable(logging.WARNING)
    quantize_dynamic(str(onnx / "model.onnx"), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True)
    test = pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/test.parquet")
    texts, labels = list(test.text), test.label.to_numpy()
    model, tokenizer = pst.load_onnx(onnx, int8=False)
    forwards = {"onnx fp32": model.session_forward, "onnx-int8 (static, the export)":
                pst.load_exported(onnx, "onnx-int8")[0].session_forward,
                "openvino (static, the export)": pst.load_exported(onnx, "openvino")[0].session_forward,
                "onnx int8, dynamic (before)": pst.onnxruntime_forward(str(dynamic), 0)[0]}
    engine = {name: "openvino" if name.startswith("openvino") else "onnxruntime" for name in forwards}
    rates = {name: [] for name in forwards}
    for _ in range(args.repeats):
        for name, forward in forwards.items():
            model.session_forward, model.engine = forward, engine[name]  # batches as logits() cuts them for it
            started = time.perf_counter()
            pst.logits(model, tokenizer, texts, 64)
            rates[name].append(len(texts) / (time.perf_counter() - started))
    flops = {kind: matmul_ops(onnx, tokenizer, texts, 64, kind) for kind in set(engine.values())}
    peaks = {"fp32": peak_fp32(), "int8": peak_int8()}
    print(f"CPU: {cpu_flags()}\n{len(texts):,} sentences, batches of 64, {args.repeats} alternating repeats; "
          f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s\n"
          f"| model | accuracy | labels unlike fp32 | rows/s (median) | GOP/s | % of peak | alone vs batches of 64: "
          f"max gap, flips | alone vs shuffled 16s: max gap, flips |\n|---|---|---|---|---|---|---|---|")
    reference = None
    for name, forward in forwards.items():
        model.session_forward, model.engine = forward, engine[name]
        found = pst.softmax(pst.logits(model, tokenizer, texts, 64))
        reference = found if reference is None else reference
        alone = pst.softmax(np.concatenate([forward(pst.pad(pst.encode(tokenizer, [t]), tokenizer.pad_token_id))
                                            for t in texts[:args.alone]]))
        shuffled = shuffled_batches(model, tokenizer, texts[:args.alone], 16)
        rate = statistics.median(rates[name])
        ops = flops[engine[name]] * rate / len(texts) / 1e9
        peak = peaks["fp32" if "fp32" in name else "int8"]
        gaps = [f"{np.abs(alone - p[:args.alone]).max():.4f}, "
                f"{int((alone.argmax(-1) != p[:args.alone].argmax(-1)).sum())}" for p in (found, shuffled)]
        unlike = int((found.argmax(-1) != reference.argmax(-1)).sum())
        print(f"| {name} | {np.mean(found.argmax(-1) == labels):.4f} | {unlike} "
              f"| {rate:.0f} | {ops:.0f} | {100 * ops / peak:.0f}% | {gaps[0]} | {gaps[1]} |", flush=True)


def shuffled_batches(model, tokenizer, texts: list[str], size: int) -> np.ndarray:
    """Probabilities with the texts in random batches of size, unsorted: the server's arrangement."""
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    found = np.zeros((len(texts), 2), dtype=np.float32)
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        batch = pst.pad(pst.encode(tokenizer, [texts[i] for i in rows]), tokenizer.pad_token_id)
        found[rows] = pst.softmax(model.session_forward(batch))
    return found


def matmul_ops(onnx: Path, tokenizer, texts: list[str], batch_size: int, engine: str) -> float:
    """Multiply-adds x2 of the model's MatMuls over texts as logits() batches them on engine (tokens run, padding
    included)."""
    import json

    config = json.loads((ROOT / "bench/runs/inference/merged/config.json").read_text())
    width, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    total = 0.0
    for start in range(0, len(texts), 16 * batch_size):  # logits()' spans, each sorted, then batched
        encoded = pst.encode(tokenizer, texts[start:start + 16 * batch_size])
        for _, batch in pst.length_batches(encoded, batch_size, tokenizer.pad_token_id,
                                              pst.shortest_in_batch(engine)):
            rows, tokens = batch["input_ids"].shape
            total += 2 * layers * rows * tokens * (4 * width * width + 2 * width * inner + 2 * tokens * width)
    return total


def peak_fp32(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of one n x n x n fp32 matmul in torch, the best of repeats."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def peak_int8(n: int = 2048, repeats: int = 10) -> float:
    """GOP/s of one n x n x n uint8 x int8 MatMulInteger in ONNX Runtime, the best of repeats."""
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "peak",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8),
             "b": np.random.randint(-63, 63, (n, n), dtype=np.int8)}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


if __name__ == "__main__":
    main()
