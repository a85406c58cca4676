"""PRECISION: auto follows a measured probe; bf16 trains and predicts like fp32; fp16 needs a GPU."""

import collections
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import fine_tune_sentiment as fts
import predict_sentiment as pst
from conftest import GPU
from helpers import BF16_PROBABILITY_GAP, fails_with



@pytest.mark.parametrize("speedup, expected", [(0.01, "fp32"), (1.0, "fp32"), (1.29, "fp32"), (1.3, "bf16"),
                                               (4.4, "bf16"), (None, "fp32")])
def test_auto_on_cpu_follows_the_probe(speedup, expected):
    assert pst.choose_precision("auto", has_gpu=False, speedup=speedup) == expected


def test_auto_on_gpu_and_explicit_choices():
    assert pst.choose_precision("auto", has_gpu=True, gpu_has_bf16=True) == "bf16"
    assert pst.choose_precision("auto", has_gpu=True, gpu_has_bf16=False) == "fp16"
    assert pst.choose_precision("fp32", has_gpu=False, speedup=9.0) == "fp32"
    with pytest.raises(fts.InputError, match="no bf16 support"):
        pst.choose_precision("bf16", has_gpu=True, gpu_has_bf16=False)


def test_explicit_bf16_on_a_slow_cpu_runs_with_a_warning(caplog):
    assert pst.choose_precision("bf16", has_gpu=False, speedup=0.05) == "bf16"
    assert "bf16 on this CPU measured 0.05x the speed of fp32" in caplog.text
    caplog.clear()
    assert pst.choose_precision("bf16", has_gpu=False, speedup=4.4) == "bf16" and not caplog.text
    assert pst.choose_precision("bf16", has_gpu=False, speedup=1.28) == "bf16" and not caplog.text  # faster all the same


@pytest.mark.parametrize("flags, expected", [("fpu sse avx avx2 fma", False), ("avx2 avx512f avx512_vnni", False),
                                            ("avx2 avx512f avx512_bf16", True), ("avx2 amx_tile amx_bf16", True)])
def test_cpu_flags_rule_out_fast_bf16_only_on_x86(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(pst.platform, "machine", lambda: "x86_64")
    assert pst.cpu_may_have_fast_bf16(cpuinfo) is expected
    monkeypatch.setattr(pst.platform, "machine", lambda: "aarch64")
    assert pst.cpu_may_have_fast_bf16(cpuinfo) is True  # no x86 flags to read: the probe decides


def test_explicit_bf16_without_the_flags_warns(caplog):
    assert pst.choose_precision("bf16", has_gpu=False, speedup=None) == "bf16"
    assert "has no avx512_bf16 or amx_bf16" in caplog.text


@pytest.mark.parametrize("slow, faster", [("bfloat16", lambda x: x < 0.5), ("float32", lambda x: x > 2)])
def test_probe_is_the_ratio_of_measured_matmul_times(monkeypatch, slow, faster):
    import time

    import torch

    matmul = torch.Tensor.__matmul__

    def slowed(a, b):  # one dtype made 200 ms slower a call: the probe must see it. Emulated bf16 takes ~2 ms
        if str(a.dtype) == f"torch.{slow}":  # idle and measured 1.31x of 30 ms under 3 jobs' load, so 30 ms was
            time.sleep(0.2)  # too little to stay above 2x
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", slowed)
    assert faster(pst.bf16_speedup(64, seconds=0.02))


def test_probe_is_not_fooled_by_a_moment_s_stall(monkeypatch):
    import time

    import torch

    matmul, calls = torch.Tensor.__matmul__, collections.Counter()

    def timed(a, b):  # bf16 made 10 ms slower a call; fp32's first timed call stalls 0.3 s once (a process starting)
        calls[a.dtype] += 1
        time.sleep(0.01 if a.dtype == torch.bfloat16 else 0.3 if calls[a.dtype] == 2 else 0)
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed)
    assert pst.bf16_speedup(64, seconds=0.05) < 1  # timed once each, the stall made bf16 look 21x faster


@pytest.mark.skipif(GPU, reason="fp16 runs on a GPU")
def test_fp16_on_cpu_and_unknown_precision_are_refused(run_args, capsys):
    assert "fp16 needs a GPU" in fails_with(run_args + ["--precision", "fp16"], capsys)
    with pytest.raises(SystemExit):
        fts.main(["--precision", "fp8"])
    assert "expected one of auto, fp32, bf16, fp16, got 'fp8'" in capsys.readouterr().err


def test_bf16_trains_to_the_floor_and_saves_fp32_weights(run_args, imdb_folder):
    from safetensors.torch import load_file

    args = run_args + ["--precision", "bf16"]
    assert fts.main(args) == 0
    out = Path(args[args.index("--output-dir") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16"
    assert metrics["eval_accuracy"] >= 0.85  # the fp32 floor in test_learns_a_separable_task; measured 0.915
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}

    model, tokenizer = fts.load_adapter(out / "adapter")
    texts = list(pd.read_parquet(next(Path(imdb_folder).glob("plain_text/test-*"))).text[:64])
    full, half = ([score if label == "POSITIVE" else 1 - score for label, score in
                   fts.predict(model, tokenizer, texts, precision=p)] for p in ("fp32", "bf16"))
    assert max(abs(a - b) for a, b in zip(full, half)) <= BF16_PROBABILITY_GAP
    clear = [(a > 0.5, b > 0.5) for a, b in zip(full, half) if abs(a - 0.5) > 0.1]  # near-ties may flip in bf16
    assert len(clear) >= 32 and all(a == b for a, b in clear)


@pytest.mark.skipif(GPU, reason="on a GPU auto follows the device, not the CPU probe")
@pytest.mark.parametrize("flags_allow, speedup, expected", [(True, 2.5, "bf16"), (True, 1.1, "fp32"),
                                                            (False, None, "fp32")])
def test_auto_trains_in_what_the_probe_found_and_records_it(run_args, tmp_path, monkeypatch, flags_allow, speedup,
                                                            expected):
    monkeypatch.setattr(pst, "cpu_may_have_fast_bf16", lambda: flags_allow)
    monkeypatch.setattr(pst, "bf16_speedup", lambda width: speedup)  # what the probe would have measured
    out = tmp_path / "auto"
    args = run_args + ["--precision", "auto", "--epochs", "1", "--train-samples", "64", "--output-dir", str(out),
                       "--quiet"]
    assert fts.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["precision"], metrics["bf16_speedup"]) == (expected, speedup)
    assert metrics["config"]["PRECISION"] == "auto"


def test_the_probe_leaves_the_seeded_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    pst.bf16_speedup(64, seconds=0.01)  # training probes before the LoRA weights are drawn
    assert torch.equal(torch.rand(4), expected)
