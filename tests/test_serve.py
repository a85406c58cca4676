"""The HTTP service: a real server process on a loopback port, spoken to over real HTTP."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import predict_sentiment as pst
from conftest import make_reviews

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ROOT = Path(pst.__file__).parent
LONG = "the movie was great " + "the plot and the acting " * 20 + "awful , the worst"  # longer than 32 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(script: str, exported: Path, *flags: str):
    """Start `python script --serve` on a free loopback port; yield (url, process) once /health answers."""
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


@pytest.fixture(scope="module")
def server(exported):
    with server_process("predict_sentiment.py", exported, "--runtime", "onnx", "--max-wait-ms", "20",
                        "--max-texts", "50", "--max-body-kb", "16") as (url, _):
        yield url


def post(url: str, texts) -> httpx.Response:
    return httpx.post(url + "/predict", json={"texts": texts}, timeout=30)


def test_answers_equal_the_file_scorers(server, exported, tmp_path):
    texts = [t for t, _ in make_reviews(40, seed=21)] + [LONG]
    answer = post(server, texts)
    assert answer.status_code == 200
    found = answer.json()["predictions"]
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"text": texts}).to_csv(source, index=False)
    assert pst.main(["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(source),
                     "--predictions", str(target), "--quiet"]) == 0
    scored = pd.read_csv(target)
    assert [p["label"] for p in found] == list(scored["predicted_label"])  # in request order
    assert [p["score"] for p in found] == pytest.approx(list(scored["predicted_score"]), abs=1e-5)  # other batches
    for p in found:
        assert set(p["scores"]) == {"NEGATIVE", "POSITIVE"} and sum(p["scores"].values()) == pytest.approx(1)
        assert p["scores"][p["label"]] == p["score"] == max(p["scores"].values())


def test_64_concurrent_clients_are_all_answered_in_shared_batches(server):
    before = metrics(server)
    texts = [t for t, _ in make_reviews(64 * 3, seed=22)]
    alone = {t: p["score"] for t, p in zip(texts, post(server, texts[:50]).json()["predictions"])}

    def client(i: int) -> list:
        answers = []
        for k in range(3):  # bounded: 3 requests of 1 text each
            text = texts[i * 3 + k]
            response = post(server, [text])
            answers.append((text, response.status_code, response.json()["predictions"][0]["score"]))
        return answers

    with ThreadPoolExecutor(64) as pool:
        answers = [a for client_answers in pool.map(client, range(64)) for a in client_answers]
    assert len(answers) == 192 and all(status == 200 for _, status, _ in answers)
    assert all(score == pytest.approx(alone[text], abs=1e-5) for text, _, score in answers if text in alone)
    after = metrics(server)
    change = {name: sample(after, name) - sample(before, name)
              for name in ("sentiment_batch_size_sum", "sentiment_batch_size_count")}
    answered = [sample(m, "sentiment_requests_total", route="/predict", code="200") for m in (before, after)]
    assert change["sentiment_batch_size_sum"] == 50 + 192 and answered[1] - answered[0] == 1 + 192
    assert change["sentiment_batch_size_count"] < 150  # concurrent requests shared batches (one each would be 193)


def metrics(url: str, headers: dict | None = None) -> dict:
    """The server's Prometheus samples, parsed by prometheus_client: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10, headers=headers).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "the body is not JSON"),
    (b'["a list"]', 422, 'no "texts" in the body'),
    (b'{"text": ["singular"]}', 422, 'no "texts" in the body'),
    (b'{"texts": "one string"}', 422, '"texts" must be a list of strings'),
    (b'{"texts": ["fine", 3]}', 422, '"texts" must be a list of strings'),
    (json.dumps({"texts": ["fine"] * 51}).encode(), 422, "51 texts in one request; send at most 50"),
    (b'{"texts": ["fine", "  "]}', 422, "texts[1] is empty"),
    (json.dumps({"texts": ["x" * 20000]}).encode(), 413, "the body is over 16 KB"),
])
def test_bad_requests_get_a_4xx_json_reason(server, body, status, reason):
    answer = httpx.post(server + "/predict", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert answer.status_code == status and reason in answer.json()["error"]
    assert "\n" not in answer.json()["error"]
    assert post(server, ["still up"]).status_code == 200


def test_wrong_paths_and_methods_answer_json(server):
    answer = httpx.get(server + "/predict", timeout=10)
    assert answer.status_code == 405 and answer.json() == {"error": "Method Not Allowed"}
    answer = httpx.post(server + "/nowhere", json={"texts": ["fine"]}, timeout=10)
    assert answer.status_code == 404 and answer.json() == {"error": "Not Found"}


def test_a_body_without_a_length_is_still_limited(server):
    chunks = (b'{"texts": ["' + b"x" * 4096 for _ in range(5))  # sent chunked: no content-length header
    answer = httpx.post(server + "/predict", content=chunks, timeout=10)
    assert answer.status_code == 413 and "over 16 KB" in answer.json()["error"]


@contextmanager
def server_thread(score, **settings):
    """build_app with a stand-in model, served by uvicorn on a loopback port in this process."""
    import uvicorn

    config = {name: getattr(pst, name) for name in pst.SETTINGS} | {
        "BATCH_SIZE": 8, "MAX_WAIT_MS": 1.0, "MAX_TEXTS": 10, "MAX_BODY_KB": 64, "RUNTIME": "test"} | settings
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(pst.build_app(score, ["NEGATIVE", "POSITIVE"], config), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def stand_in(texts: list[str]) -> np.ndarray:
    if "boom" in texts:
        raise RuntimeError("the model broke")
    if "slow" in texts:
        time.sleep(2)
    return np.array([[0.0, 2.0]] * len(texts), dtype=np.float32)


def test_an_internal_error_is_a_500_and_the_server_stays_up():
    with server_thread(stand_in) as url:
        answer = post(url, ["boom"])
        assert answer.status_code == 500 and answer.json() == {"error": "internal error: the model broke"}
        assert post(url, ["fine"]).json()["predictions"][0]["label"] == "POSITIVE"


def test_health_answers_during_a_long_batch():
    with server_thread(stand_in) as url, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, ["slow"])
        time.sleep(0.5)  # the batch is in the model now, for 2 s
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0 and not slow.done()
        assert slow.result().status_code == 200


def test_sigterm_answers_requests_in_flight_then_exits_0(exported):
    with server_process("predict_sentiment.py", exported, "--runtime", "onnx-int8", "--max-wait-ms", "1500",
                        "--batch-size", "64") as (url, process), ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, ["the movie was great", "awful , boring", LONG])
        time.sleep(0.5)  # the request now waits for its batch to fill (1.5 s)
        process.send_signal(signal.SIGTERM)
        answer = pending.result(timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
        assert process.wait(timeout=30) == 0


def test_the_micro_batcher_batches_concurrent_callers_without_http():
    import asyncio

    batches = []

    def score(texts):
        batches.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("the model broke")
        return [len(t) for t in texts]

    async def callers():
        batcher = pst.MicroBatcher(score, max_batch=4, max_wait_s=0.2, max_queue=30)
        async with batcher:
            started = time.monotonic()
            together = await asyncio.gather(*(batcher.submit(["x" * i, "y" * i]) for i in range(1, 4)))
            seconds = time.monotonic() - started
            alone = await batcher.submit(["z"])  # nobody joins: it waits max_wait_s, not longer
            shared = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["fine"]), return_exceptions=True)
            fair = await asyncio.gather(batcher.submit(["long"] * 20), batcher.submit(["late"]))
            try:
                await batcher.submit(["too many"] * 31)
            except pst.Refused as error:
                refused = error.status, str(error)
            return together, seconds, alone, shared, fair, refused, batcher.batches

    together, seconds, alone, shared, fair, refused, count = asyncio.run(asyncio.wait_for(callers(), 30))
    assert together == [[1, 1], [2, 2], [3, 3]]  # each caller gets its own rows, in order
    assert batches[:2] == [["x", "xx", "xxx", "y"], ["yy", "yyy"]] and seconds < 2  # round-robin, 4 at a time
    assert alone == [1]
    assert str(shared[0]) == "the model broke" and shared[1] == [4]  # one bad text fails its own request only
    assert batches[3:6] == [["boom", "fine"], ["boom"], ["fine"]]  # the failed batch, retried text by text
    assert fair[1] == [4] and batches[6] == ["long", "late", "long", "long"]  # the small request is not stuck
    assert refused[0] == 503 and "MAX_QUEUE is 30" in refused[1] and count == 10  # 4 + 1 + 5 of the 21
