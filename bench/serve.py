"""The HTTP service and Ray against the file scorer, on real text (loopback only, every load loop bounded).

Uses the model bench/inference.py trains and exports into bench/runs/inference/ (run that first). Then:
- the file scorer: predict_sentiment.py --predict-file on the 2,000 test sentences, rows/s;
- the server: predict_sentiment.py --serve on a free 127.0.0.1 port; the time until /health answers; then 1, 8
  and 32 concurrent clients (asyncio, one process), each posting one sentence per request until the 2,000 are
  sent (at most 120 s a level): rows/s, p50 and p99 latency;
- with --peer litserve: the same, and LitServe serving the same model and scoring code with its own batching
  (bench/litserve_peer.py: max_batch_size and batch_timeout set to our BATCH_SIZE and MAX_WAIT_MS), alternating;
- the load generator's own CPU seconds per level (it shares the cores with the server); --client raw (the
  default) writes prebuilt keep-alive HTTP/1.1 requests on asyncio streams, --client httpx uses httpx.AsyncClient;
- with --ray: the same 20,000 rows as 4 csv files, scored by one process (a folder) and by Ray Data (--ray, a
  local Ray on this machine's cores), wall time of each command.

    python bench/serve.py --runtime onnx-int8 --repeats 3
    python bench/serve.py --runtime onnx-int8 --peer litserve --repeats 3
    python bench/serve.py --runtime onnx-int8 --ray
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import ROOT, WORK, cpu_flags  # noqa: E402

CLIENTS = (1, 8, 32)
LEVEL_SECONDS = 120  # each load level stops after this long, finished or not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_scorer(out, runtime: str, source, target) -> float:
    """rows/s of --predict-file, as it reports them."""
    done = subprocess.run([sys.executable, "predict_sentiment.py", "--output-dir", str(out), "--runtime", runtime,
                           "--predict-file", str(source), "--predictions", str(target), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return float(re.search(r"\((\d+) rows/s\)", done.stdout).group(1))


async def load(url: str, texts: list[str], clients: int, kind: str = "raw") -> tuple[float, list[float], float]:
    """Send each text once, one per request, from `clients` concurrent clients; return (rows/s, latencies, the
    share of one core the client itself used). kind: httpx (AsyncClient), or raw: keep-alive HTTP/1.1 over asyncio
    streams, requests built ahead, so that the client takes less of the cores it shares with the server."""
    import httpx

    queue, latencies = list(reversed(texts)), []
    deadline = time.perf_counter() + LEVEL_SECONDS
    host, port = url.removeprefix("http://").split(":")

    async def client(http):
        while queue and time.perf_counter() < deadline:
            text, started = queue.pop(), time.perf_counter()
            answer = await http.post(url + "/predict", json={"texts": [text]})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async def raw_client(requests: list[bytes]):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while requests and time.perf_counter() < deadline:
                request, started = requests.pop(), time.perf_counter()
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"the server answered {head[:40]!r}")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    started, cpu = time.perf_counter(), time.process_time()
    if kind == "raw":
        requests = [b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                    b"\r\n\r\n%s" % (url.encode(), len(body), body)
                    for body in (json.dumps({"texts": [t]}).encode() for t in queue)]
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(raw_client(requests) for _ in range(clients)))
    else:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    return len(latencies) / wall, latencies, (time.process_time() - cpu) / wall


def serve_once(out, runtime: str, texts: list[str], peer: str | None = None, code=ROOT, client: str = "raw") -> dict:
    """Start our server (or the peer; code: the checkout whose server runs), time until /health answers, run every
    load level, stop it with SIGTERM."""
    import httpx

    port = free_port()
    url, started = f"http://127.0.0.1:{port}", time.perf_counter()
    command = ["bench/litserve_peer.py", "--port", str(port)] if peer else ["predict_sentiment.py", "--serve",
                                                                             "--port", str(port), "--quiet"]
    server = subprocess.Popen([sys.executable, *command, "--output-dir", str(out), "--runtime", runtime], cwd=code,
                              start_new_session=True)  # its own process group: LitServe's workers go with it
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.perf_counter() - started > 60 or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.02)
        found = {"ready_s": time.perf_counter() - started}
        asyncio.run(load(url, texts[:50], 1, client))  # warm-up
        for clients in CLIENTS:
            rate, latencies, client_cpu = asyncio.run(load(url, texts, clients, client))
            latencies.sort()
            found[clients] = {"rows_s": rate, "p50_ms": 1000 * latencies[len(latencies) // 2],
                              "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "sent": len(latencies),
                              "client_cpu": client_cpu}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        time.sleep(1)
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left of the group (a peer's worker processes)
        except ProcessLookupError:
            pass
    return found


def ray_against_one_process(out, runtime: str, test: pd.DataFrame) -> None:
    """20,000 rows as 4 csv files: one process scoring the folder, then --ray; wall time of each command."""
    folder = WORK / "serve" / "files"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = pd.concat([test] * 10, ignore_index=True)
    for i in range(4):
        rows[i * 5000:(i + 1) * 5000].to_csv(folder / f"part-{i}.csv", index=False)
    times = {}
    for name, flags in (("one process", ["--predictions", str(folder.parent / "one")]),
                        ("ray", ["--ray", "--predictions", str(folder.parent / "ray")])):
        started = time.perf_counter()
        subprocess.run([sys.executable, "predict_sentiment.py", "--output-dir", str(out), "--runtime", runtime,
                        "--predict-file", str(folder), "--quiet", *flags], cwd=ROOT, check=True)
        times[name] = time.perf_counter() - started
    print(f"\n20,000 rows in 4 files, {runtime}: one process {times['one process']:.1f}s "
          f"({20000 / times['one process']:.0f} rows/s), Ray {times['ray']:.1f}s ({20000 / times['ray']:.0f} rows/s): "
          f"Ray/one process = {times['one process'] / times['ray']:.2f}x the speed (command wall time, start-up "
          f"included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", default="onnx-int8", choices=("torch", "onnx", "onnx-int8", "openvino"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", choices=("litserve",), help="also serve the model through this peer, alternating")
    parser.add_argument("--before", help="also serve with the code of this checkout (a git worktree), alternating")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="the load generator: raw HTTP/1.1 on asyncio streams (light), or httpx's AsyncClient")
    parser.add_argument("--ray", action="store_true", help="measure Ray against one process instead of the server")
    args = parser.parse_args()
    out = WORK / "inference"
    if not (out / "onnx").exists():
        raise SystemExit("no model in bench/runs/inference/onnx: run python bench/inference.py first")
    test = pd.read_parquet(ROOT / "bench/data/rotten-tomatoes/test.parquet")
    print(f"CPU: {cpu_flags()} | runtime {args.runtime} | {len(test):,} test sentences | {args.client} client",
          flush=True)
    if args.ray:
        return ray_against_one_process(out, args.runtime, test)
    source, target = WORK / "serve-in.csv", WORK / "serve-out.csv"
    test[["text"]].to_csv(source, index=False)
    texts = list(test["text"])
    files, servers = [], {"ours": [], **({"before": []} if args.before else {}),
                          **({args.peer: []} if args.peer else {})}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits all alike
        files.append(file_scorer(out, args.runtime, source, target))
        for name, found in servers.items():
            found.append(serve_once(out, args.runtime, texts, args.peer if name == args.peer else None,
                                    args.before if name == "before" else ROOT, args.client))
            levels = " | ".join(f"{c} clients {found[-1][c]['rows_s']:.0f} rows/s, p50 {found[-1][c]['p50_ms']:.1f} "
                                f"ms, p99 {found[-1][c]['p99_ms']:.1f} ms" for c in CLIENTS)
            print(f"  {name}: file scorer {files[-1]:.0f} rows/s | ready in {found[-1]['ready_s']:.2f}s | {levels}",
                  flush=True)
    scorer = statistics.median(files)
    print(f"\nmedians of {args.repeats}: file scorer {scorer:.0f} rows/s")
    print("| server | clients | rows/s | vs file scorer | p50 ms | p99 ms | client CPU (cores) | ready s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, found in servers.items():
        for c in CLIENTS:
            rate = statistics.median(s[c]["rows_s"] for s in found)
            print(f"| {name} | {c} | {rate:.0f} | {rate / scorer:.2f}x | "
                  f"{statistics.median(s[c]['p50_ms'] for s in found):.1f} | "
                  f"{statistics.median(s[c]['p99_ms'] for s in found):.1f} | "
                  f"{statistics.median(s[c]['client_cpu'] for s in found):.2f} | "
                  f"{statistics.median(s['ready_s'] for s in found):.2f} |")


if __name__ == "__main__":
    main()
