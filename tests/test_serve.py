"""The HTTP service: a real server process on a loopback port, spoken to over real HTTP."""

import json
import signal
import socket
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
from helpers import free_port, server_process

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
ROOT = Path(pst.__file__).parent
LONG = "the movie was great " + "the plot and the acting " * 20 + "awful , the worst"  # longer than 32 tokens


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
        batcher = pst.MicroBatcher(score, max_batch=4, max_wait_s=1.0, max_queue=30)
        async with batcher:
            started = time.monotonic()
            together = await asyncio.gather(*(batcher.submit(["x" * i, "y" * i]) for i in range(1, 4)))
            seconds = time.monotonic() - started
            started = time.monotonic()
            alone = await batcher.submit(["z"])  # nobody else is being read: it runs at once
            alone_seconds = time.monotonic() - started
            with batcher.arriving():  # a request is being read: the batch waits for its texts
                early = asyncio.create_task(batcher.submit(["early"]))
                await asyncio.sleep(0.05)
                late = asyncio.create_task(batcher.submit(["late"]))
                await asyncio.sleep(0)
            joined = await asyncio.gather(early, late)
            shared = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["fine"]), return_exceptions=True)
            fair = await asyncio.gather(batcher.submit(["long"] * 20), batcher.submit(["late"]))
            try:
                await batcher.submit(["too many"] * 31)
            except pst.Refused as error:
                refused = error.status, str(error)
            return together, seconds, (alone, alone_seconds, joined), shared, fair, refused, batcher.batches

    together, seconds, (alone, alone_seconds, joined), shared, fair, refused, count = asyncio.run(
        asyncio.wait_for(callers(), 30))
    assert together == [[1, 1], [2, 2], [3, 3]]  # each caller gets its own rows, in order
    assert batches[:2] == [["x", "xx", "xxx", "y"], ["yy", "yyy"]] and seconds < 2  # round-robin, 4 at a time
    assert alone == [1] and alone_seconds < 0.5  # not the 1 s max_wait_s
    assert joined == [[5], [4]] and batches[3] == ["early", "late"]
    assert str(shared[0]) == "the model broke" and shared[1] == [4]  # one bad text fails its own request only
    assert batches[4:7] == [["boom", "fine"], ["boom"], ["fine"]]  # the failed batch, retried text by text
    assert fair[1] == [4] and batches[7] == ["long", "late", "long", "long"]  # the small request is not stuck
    assert refused[0] == 503 and "MAX_QUEUE is 30" in refused[1] and count == 11  # 4 + 1 + 1 + 5 of the 21


def test_a_batcher_with_two_streams_runs_two_batches_at_once_each_on_its_own():
    import asyncio
    import threading

    meeting, used, lock = threading.Barrier(2, timeout=10), [], threading.Lock()  # only two batches at once pass it
    running = []

    def stream(name):
        def score(texts):
            with lock:
                running.append(name)
                assert running.count(name) == 1  # a stream never runs two batches at once
            meeting.wait()  # breaks (and the test fails) unless the other stream is scoring at the same time
            with lock:
                running.remove(name)
                used.append((name, list(texts)))
            return [len(t) for t in texts]
        return score

    async def callers():
        batcher = pst.MicroBatcher([stream("a"), stream("b")], max_batch=2, max_wait_s=0.0)
        async with batcher:
            return await asyncio.gather(*(batcher.submit(["x" * i]) for i in range(1, 5))), batcher.batches

    answers, count = asyncio.run(asyncio.wait_for(callers(), 30))
    assert answers == [[1], [2], [3], [4]] and count == 2  # 2 batches of 2, one on each stream, side by side
    assert sorted(name for name, _ in used) == ["a", "b"]


# A hostile world: bad texts, floods, clients that leave, slow and many connections, strangers, web pages ---------


def raw_post(url: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json"} | headers, timeout=30)


def test_one_bad_text_fails_only_its_own_request(server):
    good = [t for t, _ in make_reviews(60, seed=40)]
    bodies = [json.dumps({"texts": [t]}).encode() for t in good]
    for i in range(0, 60, 6):  # 10 lone surrogates, as JSON allows them, among 60 good requests
        bodies.insert(i, b'{"texts": ["fine", "\\ud800"]}')
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: raw_post(server + "/predict", body), bodies))
    bad = [a for a, b in zip(answers, bodies) if b"ud800" in b]
    assert len(bad) == 10 and all(a.status_code == 422 and "texts[1] is not valid Unicode" in a.json()["error"]
                                  for a in bad)
    assert [a.status_code for a, b in zip(answers, bodies) if b"ud800" not in b] == [200] * 60


@pytest.mark.parametrize("body, reason", [
    (b'{"texts": ["fine", "a\\u0000b"]}', "texts[1] holds a NUL character"),
    (json.dumps({"texts": ["\u200b\u200d \ufeff\t\x07"]}).encode(), "texts[0] is empty"),  # zero-width, control
    (b"[" * 5000 + b"]" * 5000, "the body is not JSON: it is nested too deeply")])  # 10 KB: under MAX_BODY_KB
def test_texts_without_words_and_deep_json_are_4xx(server, body, reason):
    answer = raw_post(server + "/predict", body)
    assert answer.status_code in (400, 422) and reason in answer.json()["error"]


def test_a_web_page_cannot_post_without_a_preflight(server):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        answer = raw_post(server + "/predict", b'{"texts": ["fine"]}', **{"content-type": kind})
        assert answer.status_code == 415 and "is not accepted; send application/json" in answer.json()["error"]
    no_type = httpx.post(server + "/predict", content=b'{"texts": ["fine"]}', timeout=10)  # curl -d sends none
    assert no_type.status_code == 200


def test_metrics_are_prometheus_s_and_count_every_answer(server):
    httpx.post(server + "/nowhere", json={}, timeout=10)
    raw_post(server + "/predict", b"{not json")
    assert post(server, ["fine", "great"]).status_code == 200
    text = httpx.get(server + "/metrics", timeout=10).text
    assert "# HELP sentiment_requests_total" in text and "# TYPE sentiment_request_seconds histogram" in text
    found = metrics(server)
    assert sample(found, "sentiment_requests_total", route="/predict", code="400") >= 1
    assert sample(found, "sentiment_requests_total", route="other", code="404") >= 1
    assert ("sentiment_queue_texts", frozenset()) in found
    assert sample(found, "sentiment_batch_size_count") >= 1


def test_the_hugging_face_inference_client_classifies_through_the_server(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # it refuses every URL offline; this one is local
    client = InferenceClient(base_url=server)
    labels = client.text_classification("the movie was great and wonderful")
    ours = post(server, ["the movie was great and wonderful"]).json()["predictions"][0]
    assert [x.label for x in labels] == sorted(ours["scores"], key=ours["scores"].get, reverse=True)  # best first
    assert [x.score for x in labels] == pytest.approx(sorted(ours["scores"].values(), reverse=True), abs=1e-6)
    top = client.text_classification("awful boring , the worst", top_k=1, function_to_apply="none")
    assert len(top) == 1 and top[0].label == "NEGATIVE" or top[0].score > 0  # raw logits, not probabilities
    many = httpx.post(server, json={"inputs": ["great", "awful"], "parameters": {"top_k": 2}}, timeout=10).json()
    assert len(many) == 2 and all(len(row) == 2 for row in many)
    assert httpx.post(server, json={"inputs": "x", "parameters": {"top_k": 0}}, timeout=10).status_code == 422


def test_a_full_queue_refuses_with_retry_after_and_health_says_so():
    def slow(texts):
        time.sleep(0.3)
        return stand_in(texts)

    with server_thread(slow, MAX_QUEUE=12, BATCH_SIZE=4) as url, ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: post(url, ["fine"] * 4), range(24)))
        assert httpx.get(url + "/health", timeout=5).status_code in (200, 503)  # answers, whatever the load
        codes = [a.status_code for a in answers]
        refused = [a for a in answers if a.status_code == 503]
        assert codes.count(200) >= 3 and refused and set(codes) <= {200, 503}
        assert refused[0].headers["retry-after"] == "1" and "MAX_QUEUE is 12" in refused[0].json()["error"]
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["status"] == "ok" and health["queued"] == 0  # drained again


def test_a_request_past_its_deadline_gets_504_and_is_not_scored():
    scored = []

    def slow(texts):
        scored.extend(texts)
        time.sleep(1.0)
        return stand_in(texts)

    with server_thread(slow, REQUEST_TIMEOUT_S=0.4, BATCH_SIZE=2) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, ["one", "two"])
        time.sleep(0.1)
        late = post(url, ["three", "four"])  # waits behind a 1 s batch, past its 0.4 s
        assert late.status_code == 504 and "REQUEST_TIMEOUT_S (0.4 s)" in late.json()["error"]
        assert first.result().status_code == 504  # its batch ran past 0.4 s too
    assert "three" not in scored and "four" not in scored


def test_texts_of_clients_that_left_are_not_scored():
    scored = []

    def slow(texts):
        scored.extend(texts)
        time.sleep(0.2)
        return stand_in(texts)

    with server_thread(slow, BATCH_SIZE=8, MAX_TEXTS=256) as url:
        def leaves(i: int):
            try:
                httpx.post(url + "/predict", json={"texts": [f"gone {i}"] * 64}, timeout=0.1)
            except httpx.TimeoutException:
                pass  # hung up after 0.1 s

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(leaves, range(10)))  # 640 texts asked for, every client gone at 0.1 s
        time.sleep(1.0)
        started = time.monotonic()
        assert post(url, ["still here"]).status_code == 200
        assert time.monotonic() - started < 1.5  # not behind 80 batches of 0.2 s
    assert len(scored) < 100  # at most the batches already running when they left


def test_the_tokenizer_never_sees_more_than_a_bounded_cut(exported):
    model, tokenizer = pst.load_onnx(exported / "onnx", int8=False)
    seen, encode_batch = [], tokenizer.backend_tokenizer.encode_batch
    huge = "great " * 200_000 + "awful , the worst"  # 1.2 MB of one review

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer.backend_tokenizer_real, name)

        def encode_batch(self, texts):
            seen.extend(len(t) for t in texts)
            return encode_batch(texts)

    tokenizer.backend_tokenizer_real, tokenizer.backend_tokenizer = tokenizer.backend_tokenizer, Spy()
    found = pst.encode(tokenizer, [huge])["input_ids"][0]
    tokenizer.backend_tokenizer = tokenizer.backend_tokenizer_real
    assert max(seen) < 100 * tokenizer.model_max_length  # characters handed to the tokenizer
    assert found == pst.encode(tokenizer, ["great " * 100 + "awful , the worst"])["input_ids"][0]  # the same cut


@pytest.fixture(scope="module")
def guarded(exported):
    with server_process("predict_sentiment.py", exported, "--runtime", "onnx", "--api-key", "s3cret",
                        "--header-timeout-s", "1", "--max-connections", "24") as (url, process):
        yield url, process


def test_an_api_key_guards_every_route_but_health(guarded):
    url, _ = guarded
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    for answer in (httpx.post(url + "/predict", json={"texts": ["fine"]}, timeout=5),
                   httpx.get(url + "/metrics", timeout=5), httpx.post(url, json={"inputs": "fine"}, timeout=5),
                   httpx.post(url + "/predict", json={"texts": ["fine"]}, timeout=5,
                              headers={"authorization": "Bearer s3cre"})):
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    key = {"authorization": "Bearer s3cret"}
    assert httpx.post(url + "/predict", json={"texts": ["fine"]}, timeout=5, headers=key).status_code == 200
    assert sample(metrics(url, key), "sentiment_requests_total", route="/predict", code="401") == 2


def test_slow_and_many_connections_are_closed_and_health_still_answers(guarded):
    url, _ = guarded
    port = int(url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(60):  # half-sent requests, 60 of them: more than MAX_CONNECTIONS
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            sockets.append(s)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 3
        time.sleep(1.5)  # past HEADER_TIMEOUT_S: every half-sent request's connection is closed
        closed = 0
        for s in sockets:
            s.settimeout(2)
            try:
                closed += s.recv(100) == b""
            except (ConnectionResetError, socket.timeout):
                closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        assert closed == 60
    finally:
        for s in sockets:
            s.close()


def test_a_drain_that_runs_out_of_time_refuses_the_rest_and_exits_1(exported):
    with server_process("predict_sentiment.py", exported, "--runtime", "onnx", "--max-wait-ms", "2000",
                        "--batch-size", "64", "--drain-s", "0.3") as (url, process), ThreadPoolExecutor(8) as pool:
        slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
        slow.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 40\r\n\r\n{\"texts\": [")  # a body still coming: batches wait for it
        time.sleep(0.2)
        pending = [pool.submit(post, url, ["the movie was great"]) for _ in range(8)]
        time.sleep(0.5)  # queued: waiting up to 2 s for the slow request's text to join the batch
        process.send_signal(signal.SIGTERM)
        codes = sorted(p.result(timeout=30).status_code for p in pending)
        assert process.wait(timeout=30) == 1
        assert codes == [503] * 8
        assert "the drain ran out of its 0.3 s: 8 queued requests were refused" in process.communicate()[1]
        slow.close()
