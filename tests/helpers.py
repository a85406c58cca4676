"""Helpers the test modules share (fixtures live in conftest.py)."""

import hashlib
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import conftest
import fine_tune_sentiment as fts
import predict_sentiment as pst

BF16_PROBABILITY_GAP = 0.06  # bf16 keeps 8 bits of mantissa; native AMX and AVX-512 kernels differed from fp32 by this
BF16_LOSS_GAP = 0.002  # a bf16 eval loss moved by 0.0004 with the batching (Intel AVX-512-BF16): 5x that
ROOT = Path(pst.__file__).parent
INFERENCE_MODES = {"--predict", "--predict-file", "--serve", "--ray"}  # predict_sentiment.py's; the rest train


def fails_with(args: list[str], capsys) -> str:
    """Run the main() that owns args' mode; assert exit code 2 and a one-line error; return that line."""
    main = pst.main if INFERENCE_MODES & set(args) else fts.main
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def digest(path: Path) -> str:
    """A hash of a file, or of every file under a folder with its name."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files if f.is_file())).hexdigest()


def near_ties(adapter: Path, texts: list[str]) -> int:
    """How many of texts the adapter scores so close to 0.5 (in fp32) that the suite's precision may flip them."""
    gap = BF16_PROBABILITY_GAP if conftest.PRECISION == "bf16" else 1e-4  # fp32: batch shape moves logits by ~1e-6
    probabilities = pst.softmax(pst.logits(*pst.load_adapter(adapter), texts))[:, 1]
    return int(np.sum(np.abs(probabilities - 0.5) <= gap))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(script: str, exported: Path, *flags: str):
    """Start `python script --serve` on a free loopback port; yield (url, process) once /health answers."""
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, script, "--output-dir", str(exported), "--serve", "--port", str(port),
                                *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up in 60 s"
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=30)
