"""What the hostile-world defences cost and buy, on the real stand-in model (loopback only, every loop bounded).

Needs an exported run (OUTPUT_DIR/onnx, e.g. bench/inference.py's bench/runs/inference) and, for the side by side,
a checkout of the code before them (`git worktree add ../before 1e04447`):
- the file scorer: --predict-file on a folder of 4 csv files (20,000 rows in all), onnx-int8, this code (records,
  locks, unique temporary files) against --before's, alternating, median of --repeats;
- a flood: the server (onnx-int8) with 32 well-behaved clients, each posting one sentence a request for
  --seconds, while 8 others post 256 sentences and hang up after 50 ms, again and again; the well-behaved
  clients' p50 and p99 latency and rows/s, and the server's peak RSS (VmHWM), this code against --before's.

    python bench/hostile.py --run bench/runs/inference --before ../before --repeats 3
"""

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import ROOT, WORK, cpu_flags  # noqa: E402
from bench.serve import free_port  # noqa: E402


def scorer_rate(code: Path, run: str, folder: Path, out: Path) -> float:
    """Rows/s of one --predict-file run over folder (a fresh output folder each time)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(code / "predict_sentiment.py"), "--output-dir", run, "--runtime", "onnx-int8",
                    "--predict-file", str(folder), "--predictions", str(out), "--quiet"], check=True,
                   capture_output=True)
    rows = sum(len(pd.read_csv(f)) for f in folder.glob("*.csv"))
    return rows / (time.perf_counter() - started)


async def flood(url: str, sentences: list[str], seconds: float, rude_clients: int) -> dict:
    """Well-behaved and abandoning clients together for `seconds`; the well-behaved ones' latencies."""
    import httpx

    stop, latencies = time.monotonic() + seconds, []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        async def polite(i: int):
            k = i
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    answer = await http.post(url + "/predict", json={"texts": [sentences[k % len(sentences)]]})
                    latencies.append((time.perf_counter() - started, answer.status_code == 200))
                except httpx.TimeoutException:  # 30 s without an answer
                    latencies.append((time.perf_counter() - started, False))
                k += 32

        async def rude(i: int):
            while time.monotonic() < stop:
                try:
                    await http.post(url + "/predict", json={"texts": sentences[i * 256:(i + 1) * 256]}, timeout=0.05)
                except httpx.TimeoutException:
                    pass
                await asyncio.sleep(0.05)  # a retry storm, not a busy loop on the cores the server shares

        await asyncio.gather(*(polite(i) for i in range(32)), *(rude(i) for i in range(rude_clients)))
    times = sorted(t for t, _ in latencies)
    return {"answered": sum(ok for _, ok in latencies), "failed": sum(not ok for _, ok in latencies),
            "rows_per_s": sum(ok for _, ok in latencies) / seconds, "p50_ms": 1000 * times[len(times) // 2],
            "p99_ms": 1000 * times[int(len(times) * 0.99)]}


def serve_and_flood(code: Path, run: str, sentences: list[str], seconds: float, rude_clients: int) -> dict:
    """Start code's server, flood it, read its peak RSS, stop it."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, str(code / "predict_sentiment.py"), "--output-dir", run, "--runtime",
                               "onnx-int8", "--serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        found = asyncio.run(flood(url, sentences, seconds, rude_clients))
        status = Path(f"/proc/{server.pid}/status").read_text()
        found["peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        return found
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(WORK / "inference"), help="a trained and exported OUTPUT_DIR")
    parser.add_argument("--before", required=True, help="a checkout of the code to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each flood")
    parser.add_argument("--flood-only", action="store_true", help="skip the file scorer")
    args = parser.parse_args()
    sentences = list(pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/test.parquet")["text"])
    folder = WORK / "hostile" / "in"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pd.DataFrame({"text": (sentences * 3)[i * 5000:(i + 1) * 5000]}).to_csv(folder / f"part{i}.csv", index=False)
    codes = {"this code": ROOT, "before": Path(args.before)}
    print(f"CPU: {cpu_flags()}\nfile scorer, 20,000 rows in 4 files, onnx-int8, {args.repeats} alternating repeats",
          flush=True)
    rates = {name: [] for name in codes}
    for _ in range(args.repeats if not args.flood_only else 0):
        for name, code in codes.items():
            rates[name].append(scorer_rate(code, args.run, folder, WORK / "hostile" / name.replace(" ", "-")))
            print(f"  {name}: {rates[name][-1]:.0f} rows/s", flush=True)
    base = statistics.median(rates["before"] or [1])
    for name in codes if rates["before"] else ():
        print(f"| {name} | {statistics.median(rates[name]):.0f} rows/s | {statistics.median(rates[name]) / base:.2f}x |")
    print(f"\n32 clients of one sentence a request, alone and with 8 more posting 256 and hanging up at 50 ms (then "
          f"50 ms apart), {args.seconds:.0f} s each")
    for rude_clients in (0, 8):
        for name, code in codes.items():
            found = serve_and_flood(code, args.run, sentences, args.seconds, rude_clients)
            print(f"| {name} | {rude_clients} abandoning | {found['answered']} answered, {found['failed']} not "
                  f"(503/504/timeout) | {found['rows_per_s']:.0f} rows/s | p50 {found['p50_ms']:.1f} ms | p99 "
                  f"{found['p99_ms']:.1f} ms | peak RSS {found['peak_rss_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
