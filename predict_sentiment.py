"""Put a fine-tuned sentiment model to work: classify reviews, score files and folders, serve HTTP, or score on Ray.

Reads what fine_tune_sentiment.py saved in OUTPUT_DIR: adapter/ (RUNTIME torch), or onnx/ (after --export-onnx;
RUNTIME onnx, onnx-int8 or openvino, which need neither torch nor transformers). To deploy, copy this file and
OUTPUT_DIR/onnx/.

    python predict_sentiment.py --predict "This movie was fantastic!"          # or '-': one review per stdin line
    python predict_sentiment.py --predict-file reviews/ --predictions scored/  # a file, a folder or a glob; resumes
    python predict_sentiment.py --runtime onnx-int8 --serve                    # POST /predict on 127.0.0.1:8000
    python predict_sentiment.py --runtime onnx-int8 --predict-file 'reviews/*.csv' --ray  # Ray Data (RAY_ADDRESS)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import glob
import itertools
import json
import logging
import os
import platform
import queue
import re
import statistics
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# what to load
OUTPUT_DIR: str = "outputs"  # the training run's folder: adapter/ and onnx/ are read from it
RUNTIME: str = "torch"  # torch (the adapter); onnx, onnx-int8 or openvino (int8 on OpenVINO): the export, no torch
PRECISION: str = "auto"  # torch runtime only: auto (bf16 where measured fast; GPU: bf16, else fp16; else fp32), fp32...
TEXT_COLUMN: str = "text"  # the column --predict-file and --ray read the reviews from
BATCH_SIZE: int = 32  # reviews per forward pass, and the server's largest batch
# serve
HOST: str = "127.0.0.1"  # the server listens here only; 0.0.0.0 opens it to the network
PORT: int = 8000  # the server's port
MAX_WAIT_MS: float = 5.0  # a batch waits at most this long for requests still being read; a lone one never waits
MAX_TEXTS: int = 256  # texts one request may send
MAX_BODY_KB: int = 1024  # the largest request body
MAX_QUEUE: int = 1024  # texts waiting to be scored, at most; a request that would pass it gets 503 and Retry-After
REQUEST_TIMEOUT_S: float = 30.0  # a request not answered by then gets 504; its texts still waiting are dropped
MAX_CONNECTIONS: int = 256  # open connections, at most; more are closed at once
HEADER_TIMEOUT_S: float = 5.0  # a request must arrive whole (headers and body) within this, or its connection closes
DRAIN_S: float = 20.0  # on SIGTERM, how long the requests already queued get to be answered
API_KEY: str = ""  # set (or SENTIMENT_API_KEY): every route but /health needs 'Authorization: Bearer API_KEY'
# Ray
RAY_ACTORS: int = 0  # model copies scoring at once under --ray, a CPU each; 0 = the Ray cluster's CPUs less one
RAY_RETRIES: int = 2  # times Ray restarts a model copy, or retries a batch, before the run fails

SETTINGS = list(__annotations__)  # the annotated names above are the settings; each one is a flag
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}  # the names of an adapter saved without its own
CHOICES = {"PRECISION": ("auto", "fp32", "bf16", "fp16"), "RUNTIME": ("torch", "onnx", "onnx-int8", "openvino")}
EXPORTED = {"onnx": ("model.onnx", "onnxruntime"), "onnx-int8": ("model_int8.onnx", "onnxruntime"),
            "openvino": ("model_int8.onnx", "openvino")}  # RUNTIME: the file of onnx/ it runs, and with what
POSITIVE = ("BATCH_SIZE", "PORT", "MAX_TEXTS", "MAX_BODY_KB", "MAX_QUEUE", "REQUEST_TIMEOUT_S", "MAX_CONNECTIONS",
            "HEADER_TIMEOUT_S")  # settings that must be above 0
FRACTIONS = ()  # settings that must be below 1
FAST_BF16 = 1.3  # auto picks bf16 on a CPU only where its matmuls measured at least this much faster than fp32
PREDICT_FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")  # --predict-file reads these
PREDICTIONS_FILE_TYPES = (".csv", ".jsonl", ".parquet")  # and writes these
OUTPUT_TYPE = {".tsv": ".csv", ".txt": ".csv", ".json": ".jsonl"}  # in a folder, files of these types become these
CHUNK_ROWS = 10_000  # --predict-file reads, scores and writes this many rows at a time
MAX_WINDOWS = 16  # TRUNCATION=window: a review is read as at most this many windows, spread over it
SHORTEST_IN_BATCH = 0.9  # on ONNX Runtime a batch holds no row shorter than this share of its longest: the server's
# batches of 8 texts of any length ran at 1.6x the rows/s cut so (bench/README.md). Torch's calls cost more than the
# padding they would save, and OpenVINO kept a plan per new shape (peak RSS 670 -> 1,075 MiB, no faster): their
# batches are cut by BATCH_SIZE alone
CHARS_PER_TOKEN = 32  # reviews are cut to this many characters a token of MAX_LENGTH before tokenizing: generous
DELIMITER = {".csv": ",", ".tsv": "\t"}
log = logging.getLogger("sentiment")


# The modes: what each flag does ----------------------------------------------------------------------------------


def run_mode(config: dict, args: argparse.Namespace) -> None:
    """Run the one mode the flags ask for, on the saved model."""
    if args.serve:
        run_serve(config)
    elif args.ray:
        run_ray(config, args.predict_file, args.predictions, args.quiet)
    elif args.predict_file:
        run_predict_file(config, args.predict_file, args.predictions, args.quiet)
    else:
        run_predict(config, args.predict)


def run_predict(config: dict, texts: list[str]) -> None:
    """--predict: classify the given texts (or stdin's lines) and print each with its label and probability."""
    reviews = read_stdin_reviews() if texts == ["-"] else argument_reviews(texts)
    if not reviews:
        raise InputError("no reviews on stdin; pass one review per line, or the texts after --predict")
    model, tokenizer, precision = load_for_inference(config)
    print_predictions(reviews, predict(model, tokenizer, reviews, config["BATCH_SIZE"], precision))


def run_predict_file(config: dict, source: str, target: str | None, quiet: bool) -> None:
    """--predict-file: score a file, or every file of a folder or glob (then --predictions is a folder)."""
    sources, many = input_files(source)
    if not many:
        target = Path(target).expanduser() if target else Path(config["OUTPUT_DIR"]) / "predictions.csv"
        check_target(sources[0], target)
        column = check_text_column(sources[0], config["TEXT_COLUMN"])
        score_file(load_for_inference(config, streams=True), sources[0], target, column, config["BATCH_SIZE"], quiet)
        return
    folder = Path(target).expanduser() if target else Path(config["OUTPUT_DIR"]) / "predictions"
    if folder.suffix.lower() in PREDICTIONS_FILE_TYPES or (folder.exists() and not folder.is_dir()):
        raise InputError(f"--predictions {str(folder)!r} must be a folder when --predict-file names several files")
    pairs = output_files(sources, source, folder)
    todo = stale_outputs(pairs, model_record(config))
    loaded, failed = load_for_inference(config, streams=True) if todo else None, []
    for src, dst, record in todo:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with output_lock(dst) as ours:
                if not ours:  # first one wins: another scorer holds this output
                    log.warning(f"warning: {dst} is being scored by another process; skipped it")
                elif why_stale(dst, record):  # not finished by another scorer meanwhile
                    score_file(loaded, src, dst, check_text_column(src, config["TEXT_COLUMN"]),
                               config["BATCH_SIZE"], quiet)
                    write_record(dst, record)
        except WriteError:
            raise  # a full disk or a permission: nothing after it would fare better
        except InputError as error:  # one bad file: say which, keep going; the finished outputs stay
            print(f"error: {error}", file=sys.stderr)
            failed.append(src)
    if failed:
        raise InputError(f"{len(failed)} of {len(pairs)} files could not be scored (above); the other outputs are "
                         f"in {str(folder)!r}, and a rerun scores only what is missing")
    print(f"Scored {len(pairs)} files into {folder}")


def run_serve(config: dict) -> None:
    """--serve: answer POST /predict (and POST /, the Inference format) with batches of concurrent requests. SIGTERM
    stops accepting and answers what is queued within DRAIN_S, then exits 0; if the drain runs out of time it
    refuses the rest (503) and exits 1, saying how many."""
    import signal

    need_package("starlette", "uvicorn", "httptools", "prometheus_client", what="--serve",
                 requirements="requirements-serve.txt")
    import uvicorn

    from types import SimpleNamespace

    started = time.perf_counter()
    model, tokenizer, precision = load_for_inference(config, streams=True)  # an export: a batch on each stream
    models = [SimpleNamespace(**{**vars(model), "session_forward": forward, "session_streams": None})
              for forward in model.session_streams] if getattr(model, "session_streams", None) else [model]
    app = build_app([lambda texts, one=one: logits(one, tokenizer, texts, config["BATCH_SIZE"], precision)
                     for one in models], list(model.config.id2label.values()), config, threshold_of(tokenizer))
    if not is_loopback(config["HOST"]) and not app.key:
        log.warning(f"warning: serving on {config['HOST']} without an API key: anyone who reaches this port can use "
                    f"it (set --api-key or SENTIMENT_API_KEY)")
    log.warning(f"Serving {config['RUNTIME']} ({precision}) on http://{config['HOST']}:{config['PORT']} "
                f"(loaded in {time.perf_counter() - started:.1f}s): POST /predict, POST /, GET /health, GET /metrics")
    server = draining_server(uvicorn.Config(
        app, host=config["HOST"], port=config["PORT"], log_level="warning", timeout_keep_alive=5,
        http=guarded_protocol(config["MAX_CONNECTIONS"], config["HEADER_TIMEOUT_S"]),
        timeout_graceful_shutdown=config["DRAIN_S"] + 5), app.state.batcher, config["DRAIN_S"])
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn drains on SIGTERM, then raises it again: end with 0
    server.run()
    if server.refused:
        raise SystemExit(f"error: the drain ran out of its {config['DRAIN_S']:g} s: {server.refused} queued "
                         f"requests were refused (503)")


def is_loopback(host: str) -> bool:
    """Whether host is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def draining_server(config, batcher: MicroBatcher, drain_s: float):
    """A uvicorn Server whose SIGTERM (or Ctrl-C) also makes the batcher refuse new requests, and refuse those still
    queued after drain_s; `refused` says how many it refused so."""
    import uvicorn

    class Draining(uvicorn.Server):
        refused = 0

        def handle_exit(self, sig, frame):
            if not batcher.draining:
                batcher.draining = True
                asyncio.get_event_loop().call_later(drain_s, lambda: setattr(self, "refused", batcher.drain()))
            super().handle_exit(sig, frame)

    return Draining(config)


def run_ray(config: dict, source: str | None, target: str | None, quiet: bool) -> None:
    """--ray: score files with Ray Data (read, map_batches over model copies, write parquet); every column kept."""
    if not source:
        raise InputError("--ray scores files: pass --predict-file IN (a file, folder or glob) too")
    if config["RUNTIME"] == "torch":
        raise InputError("--ray runs the exported model: pass --runtime onnx-int8, openvino or onnx (after "
                         "--export-onnx)")
    need_package("ray", what="--ray", requirements="requirements-ray.txt")
    import ray
    import ray.data

    import pyarrow.fs

    sources, _ = input_files(source)
    folder = target if target and "://" in target else str(
        Path(target or Path(config["OUTPUT_DIR"]) / "predictions-ray").expanduser().resolve())
    files, path = pyarrow.fs.FileSystem.from_uri(folder)  # a local folder, or s3:// and the like on a cluster
    if files.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        raise InputError(f"--predictions {folder!r} exists; Ray writes a new folder (name another one)")
    for src in sources:  # here, in one line each, rather than in a worker's traceback
        check_text_column(src, config["TEXT_COLUMN"])
    onnx = Path(config["OUTPUT_DIR"]) / "onnx"
    load_exported(onnx, config["RUNTIME"])  # fails here, in one line, if the export is missing
    weights, engine = EXPORTED[config["RUNTIME"]]
    shipped = {name: (onnx / name).read_bytes() for name in ("config.json", "tokenizer.json", weights)}  # to the
    # workers with the job: no shared file system needed
    ray.init(logging_level="ERROR", log_to_driver=False)  # RAY_ADDRESS joins a cluster; unset, a local Ray starts
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    parent, name = path.rstrip("/").rsplit("/", 1)
    started, tmp = time.perf_counter(), f"{parent}/.{name}.tmp-{os.getpid()}-{time.time_ns()}"  # this run's own
    try:
        actors = ray_actors(config["RAY_ACTORS"], int(ray.cluster_resources().get("CPU", 1)))
        data = read_with_ray(sources, config["TEXT_COLUMN"])
        data.map_batches(RayScorer, fn_constructor_args=(shipped, engine, config["TEXT_COLUMN"], config["BATCH_SIZE"]),
                         batch_format="pandas", batch_size=CHUNK_ROWS // 10, concurrency=actors, num_cpus=1,
                         max_restarts=config["RAY_RETRIES"], max_task_retries=config["RAY_RETRIES"]
                         ).write_parquet(folder.replace(path, tmp) if "://" in folder else tmp)
        files.move(tmp, path)  # only a finished run takes the name
    except ray.exceptions.RayError as error:  # retried RAY_RETRIES times, and failed each time
        raise InputError(f"Ray could not score {source!r}: {one_line(error)}") from error
    finally:
        if files.get_file_info(tmp).type != pyarrow.fs.FileType.NotFound:
            files.delete_dir(tmp)
        ray.shutdown()
    print(f"Scored {len(sources)} files on Ray in {time.perf_counter() - started:.1f}s: {folder}")


# Loading the model ------------------------------------------------------------------------------------------------


def ray_actors(asked: int, cpus: int) -> int:
    """How many model copies --ray runs: RAY_ACTORS, or every CPU but one, which reads the files (without one the
    job waits for ever); a number that cannot run is refused."""
    if cpus < 2:
        raise InputError(f"--ray needs 2 CPUs or more (one reads the files, the others score); this Ray has {cpus}")
    if asked > cpus - 1:
        raise InputError(f"RAY_ACTORS={asked} leaves no CPU to read the files on a Ray of {cpus} CPUs; use at most "
                         f"{cpus - 1}, or 0 for that many")
    return asked or cpus - 1


def load_for_inference(config: dict, streams: bool = False):
    """What every mode starts with: the saved model, its tokenizer, and the precision to run them in; streams: an
    exported model runs several batches at once (files: throughput, where the server wants each batch soon)."""
    if config["RUNTIME"] != "torch":  # the exported model: no torch, transformers or peft is imported
        model, tokenizer = load_exported(Path(config["OUTPUT_DIR"]) / "onnx", config["RUNTIME"], streams=streams)
        return model, tokenizer, config["RUNTIME"]
    model, tokenizer = load_adapter(Path(config["OUTPUT_DIR"]) / "adapter")
    precision, _ = resolve_precision(config["PRECISION"], model.device.type == "cuda", model.config.hidden_size)
    return model, tokenizer, precision


def load_adapter(adapter_dir: Path):
    """Load a saved adapter (with its head and tokenizer) for inference."""
    import torch
    import transformers
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    if not (adapter_dir / "adapter_config.json").exists():
        raise InputError(f"no saved adapter in {adapter_dir}; train first (python fine_tune_sentiment.py) "
                         f"or point --output-dir at a finished run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformers.logging.set_verbosity_error()  # else "head newly initialized": true of the base, not of the adapter
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    names = tokenizer.init_kwargs.get("id2label", ID2LABEL)  # the base's config lacks our label names
    id2label = {int(i): name for i, name in names.items()}
    try:
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            str(adapter_dir), use_safetensors=True, id2label=id2label, label2id={n: i for i, n in id2label.items()})
    except OSError as error:  # e.g. the base model is a hub id and the hub is out of reach
        raise InputError(f"could not load the adapter in {adapter_dir}: {one_line(error)}") from error
    return model.to(device), tokenizer


def load_exported(folder: Path, runtime: str, threads: int = 0, streams: bool = False):
    """The model RUNTIME (onnx, onnx-int8 or openvino) runs from an export, and its tokenizer."""
    weights, engine = EXPORTED[runtime]
    return load_onnx(folder, weights == "model_int8.onnx", threads, engine, streams)


def load_onnx(folder: Path, int8: bool, threads: int = 0, engine: str = "onnxruntime", streams: bool = False):
    """An exported model and its tokenizer, without torch or transformers: engine (onnxruntime or openvino) and
    tokenizers stand in; threads: the engine's (0: one per core); streams: see onnx_model."""
    if not (folder / "config.json").exists():
        raise InputError(f"no exported model in {folder}; run python fine_tune_sentiment.py --export-onnx first")
    need_package(engine, "tokenizers", what="the OpenVINO runtime" if engine == "openvino" else "the ONNX runtime")
    return onnx_model(json.loads((folder / "config.json").read_text()), (folder / "tokenizer.json").read_text(),
                      str(folder / ("model_int8.onnx" if int8 else "model.onnx")), threads, engine, streams)


def onnx_model(saved: dict, tokenizer_json: str, weights: str | bytes, threads: int = 0, engine: str = "onnxruntime",
               streams: bool = False):
    """The model and tokenizer of an export, from its config, tokenizer.json and weights (a path, or the bytes).
    streams: the engine runs batches side by side, each on its share of the cores, and logits() tokenizes the next
    ones meanwhile: 1.13-1.29x the rows/s of one batch at a time on all cores (2 cores, bench/README.md)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    forwards = (openvino_forward if engine == "openvino" else onnxruntime_forward)(weights, threads, streams)
    model = SimpleNamespace(config=SimpleNamespace(id2label={int(i): n for i, n in saved["id2label"].items()}),
                            session_forward=forwards[0], engine=engine,
                            session_streams=forwards if len(forwards) > 1 else None)
    tokenizer = SimpleNamespace(backend_tokenizer=Tokenizer.from_str(tokenizer_json),
                                model_max_length=saved["max_length"], model_input_names=saved["inputs"],
                                init_kwargs={"review_truncation": saved["truncation"],
                                             "review_stride": saved.get("stride"),
                                             "decision_threshold": saved.get("threshold")},
                                pad_token_id=saved["pad_token_id"])  # what encode() and pad() read
    return model, tokenizer


def onnxruntime_forward(weights: str | bytes, threads: int, streams: bool = False) -> list:
    """Functions from a padded batch to the logits, on ONNX Runtime's CPU kernels: one, or with streams one per
    stream (two, the cores split between them; one session, which runs batches from several threads at once)."""
    import onnxruntime

    count = 2 if streams and (threads or cores()) >= 2 else 1
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = (threads or cores()) // count if count > 1 else threads
    session = onnxruntime.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
    return [lambda batch: session.run(["logits"], batch)[0]] * count


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def openvino_forward(weights: str | bytes, threads: int, streams: bool = False) -> list:
    """Functions from a padded batch to the logits (with streams: one per stream OpenVINO's THROUGHPUT hint makes,
    each its own infer request), on OpenVINO's CPU plugin: the int8 MatMuls on its kernels
    (AMX and VNNI where the CPU has them), everything else in fp32 (the plugin's default on a bf16 CPU, bf16
    elsewhere, moved scores by 0.005 with the batch). Its kernels still differ by shape: a review's score moved by
    up to 0.009 between batches of other lengths (bench/int8.py); onnx-int8 is exact."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(weights), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT" if streams else "LATENCY",
        "INFERENCE_NUM_THREADS": threads})
    requests = [compiled.create_infer_request()  # each runs one batch at a time
                for _ in range(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if streams else 1)]
    return [lambda batch, request=request: request.infer(batch)[0] for request in requests]


def need_package(*modules: str, what: str = "the ONNX runtime", requirements: str = "requirements-onnx.txt") -> None:
    """Fail in one line, with the install command, when an optional package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{what} needs {', '.join(missing)}: pip install -r {requirements}")


# Scoring: one encode and logits path for every mode, training's evaluation included -------------------------------


def predict(model, tokenizer, texts: list[str], batch_size: int = 32, precision: str = "fp32"
            ) -> list[tuple[str, float]]:
    """Classify texts: (label, probability of that label) for each, in input order, deciding as the model was saved
    to (its THRESHOLD, or argmax)."""
    probabilities = softmax(logits(model, tokenizer, texts, batch_size, precision))
    chosen = decide(probabilities, threshold_of(tokenizer))
    return [(model.config.id2label[int(i)], float(p[i])) for p, i in zip(probabilities, chosen)]


def decide(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """The class of each row: with a threshold (two classes), the positive one (class 1) where its probability is
    at least the threshold, else the other; without, the most probable."""
    if threshold is None:
        return probabilities.argmax(-1)
    return (probabilities[:, 1] >= threshold).astype(np.int64)


def threshold_of(tokenizer) -> float | None:
    """The decision threshold saved with the model (training's THRESHOLD), or None for argmax."""
    return tokenizer.init_kwargs.get("decision_threshold")


def logits(model, tokenizer, texts: list[str], batch_size: int = 32, precision: str = "fp32",
           progress: bool = False) -> np.ndarray:
    """The model's logits for texts, returned in input order (a review cut into windows: their mean). Tokenized a
    span of 16 batches at a time (memory stays flat), each span run in batches of similar token counts, longest
    first: sorting by characters instead wasted 40% of the tokens run on padding (Rotten Tomatoes sentences). A
    model with several streams runs a span's batches side by side while the next span is tokenized."""
    forwards = getattr(model, "session_streams", None) or [
        model.session_forward if hasattr(model, "session_forward") else torch_forward(model, precision)]
    texts, shortest = list(texts), shortest_in_batch(getattr(model, "engine", None))  # texts: a column, a series
    found = np.zeros((len(texts), len(model.config.id2label)), dtype=np.float32)
    bar = progress_bar(total=len(texts), unit=" texts") if progress else None
    free, pending = queue.SimpleQueue(), collections.deque()  # the streams not running a batch; spans not summed

    def run(batch: dict, rows: np.ndarray, chosen: list[int]) -> None:
        forward = free.get()
        try:
            rows[chosen] = forward(batch)
        finally:
            free.put(forward)

    def finish(span: int, count: int, owner: np.ndarray, rows: np.ndarray, jobs: list) -> None:
        for job in jobs:
            job.result()  # a stream's error is raised here
        sums = np.zeros((count, found.shape[1]), dtype=np.float32)
        np.add.at(sums, owner, rows)
        found[span:span + len(sums)] = sums / np.bincount(owner, minlength=len(sums))[:, None]
        if bar is not None:
            bar.update(len(sums))

    for forward in forwards:
        free.put(forward)
    with ThreadPoolExecutor(len(forwards)) if len(forwards) > 1 else contextlib.nullcontext() as pool:
        for span in range(0, len(texts), 16 * batch_size):
            chunk = texts[span:span + 16 * batch_size]
            encoded = encode(tokenizer, chunk)
            owner = np.array(encoded.pop("owner", range(len(chunk))))
            rows, jobs = np.zeros((len(owner), found.shape[1]), dtype=np.float32), []
            for chosen, batch in length_batches(encoded, batch_size, tokenizer.pad_token_id, shortest):
                if pool is None:
                    run(batch, rows, chosen)
                else:
                    jobs.append(pool.submit(run, batch, rows, chosen))
            pending.append((span, len(chunk), owner, rows, jobs))
            while len(pending) > (pool is not None):  # one span may still run while the next is tokenized
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    if bar is not None:
        bar.close()
    return found


def shortest_in_batch(engine: str | None) -> float:
    """The share of its batch's longest row every row must reach on engine: SHORTEST_IN_BATCH on ONNX Runtime, whose
    calls cost little; 0 (any length) for torch (None) and OpenVINO."""
    return SHORTEST_IN_BATCH if engine == "onnxruntime" else 0.0


def length_batches(encoded: dict, batch_size: int, pad_id: int, shortest: float = 0.0):
    """encoded's rows in padded batches of similar token counts, longest first: (the rows' indices, the batch). A
    batch holds at most batch_size rows, and none shorter than `shortest` times its longest (0: any length)."""
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order, start = sorted(range(len(lengths)), key=lambda i: -lengths[i]), 0
    while start < len(order):
        end = start + 1
        while end < min(len(order), start + batch_size) and lengths[order[end]] >= shortest * lengths[order[start]]:
            end += 1
        chosen, start = order[start:end], end
        yield chosen, pad({key: [ids[i] for i in chosen] for key, ids in encoded.items()}, pad_id)


def encode(tokenizer, texts: list[str]) -> dict:
    """Tokenize once, without padding, and cut reviews longer than model_max_length as TRUNCATION says: head,
    head+tail, or window (overlapping windows, review_stride tokens apart, at most MAX_WINDOWS spread over the
    review; then "owner" gives the text each row is of)."""
    backend = tokenizer.backend_tokenizer  # the tokenizers library itself: the same cut with or without transformers
    backend.no_truncation()  # a call of the tokenizer may have left its own settings behind
    backend.no_padding()
    limit, cut = tokenizer.model_max_length, tokenizer.init_kwargs.get("review_truncation", "head")
    chars = CHARS_PER_TOKEN * limit * (MAX_WINDOWS // 2 if cut == "window" else 1)  # cut first, in characters:
    rows = backend.encode_batch([t if len(t) <= 2 * chars else t[:chars] + " " + t[-chars:] if cut != "head" else
                                 t[:chars] for t in texts])  # a 1 MB review costs what a long one does
    word, with_specials = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    before = with_specials.index(word[0])  # [CLS] and the like
    after = len(with_specials) - before - len(word)  # [SEP] and the like
    budget = limit - before - after
    fields = {key: field for key, field in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                            ("token_type_ids", "type_ids")) if key in tokenizer.model_input_names}
    if cut == "window":
        stride = min(budget, tokenizer.init_kwargs.get("review_stride") or max(1, budget // 2))
        spans = [(owner, span) for owner, row in enumerate(rows)
                 for span in windows(len(row.ids) - before - after, budget, stride)]
        piece = lambda ids, start, end: ids[:before] + ids[before + start:before + end] + ids[len(ids) - after:]  # noqa
        return {key: [piece(getattr(rows[owner], field), *span) for owner, span in spans]
                for key, field in fields.items()} | {"owner": [owner for owner, _ in spans]}
    head = budget // 4 if cut == "head+tail" else budget
    tail = budget - head  # Sun et al. 2019: the head and the tail keep IMDB's verdict best
    return {key: [ids if len(ids) <= limit else ids[:before + head] + ids[len(ids) - tail - after:]
                  for ids in (getattr(row, field) for row in rows)]
            for key, field in fields.items()}


def windows(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of windows over length tokens: size long, stride apart, the last one ending at the end; at most
    MAX_WINDOWS of them, spread evenly over the review (a batch never holds more than BATCH_SIZE rows anyway)."""
    if length <= size:
        return [(0, length)]
    starts = list(range(0, length - size, stride)) + [length - size]
    if len(starts) > MAX_WINDOWS:
        starts = [starts[round(i)] for i in np.linspace(0, len(starts) - 1, MAX_WINDOWS)]
    return [(start, start + size) for start in starts]


def pad(encoded: dict, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch of token lists to its longest row: int64 arrays, ids with pad_id, mask and types with 0."""
    width = max(map(len, encoded["input_ids"]))
    return {key: np.array([row + [pad_id if key == "input_ids" else 0] * (width - len(row)) for row in rows],
                          dtype=np.int64) for key, rows in encoded.items() if key != "owner"}


def torch_forward(model, precision: str):
    """A function from a padded batch (numpy) to the logits of a transformers model, in the given precision."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(batch: dict) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()}).logits.float().cpu().numpy()

    return forward


def softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities from logits, along the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def print_predictions(texts: list[str], predictions: list[tuple[str, float]]) -> None:
    """Print each review (shortened to one line) with its predicted label and probability."""
    for text, (label, score) in zip(texts, predictions):
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode()  # no terminal codes
                        for c in " ".join(text.split()))
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        print(f'Review: "{shown}"\nPrediction: {label} ({score:.2f})')


# Files and folders ------------------------------------------------------------------------------------------------


def score_file(loaded: tuple, source: Path, target: Path, column: str, batch_size: int, quiet: bool) -> None:
    """Score every row of source into target (every input column kept, plus the prediction), streaming in chunks;
    target is written under a temporary name and takes its own only when complete."""
    rows, empty, started = 0, 0, time.perf_counter()
    bar = None if quiet else progress_bar(unit=" rows", desc=source.name, leave=False)
    try:
        with temporary_file(target) as (tmp, handle):
            with open_writer(handle, target.suffix.lower()) as write:
                for chunk in read_chunks(source, column):  # a row that cannot be read or written: InputError
                    scored, without_text = predict_column(loaded, chunk, column, batch_size)
                    try:
                        write(scored)
                    except InputError as error:
                        raise InputError(f"{str(source)!r}, rows {rows + 1}-{rows + len(chunk)}: {error}"
                                         ) from error
                    rows, empty = rows + len(chunk), empty + without_text
                    if bar is not None:
                        bar.update(len(chunk))
            handle.close()
            os.replace(tmp, target)  # only a complete file takes the name; an earlier one stays until then
    except OSError as error:  # writing: reading errors are InputErrors already
        raise WriteError(f"could not write {str(target)!r}: {error.strerror or one_line(error)}; the earlier "
                         f"outputs are intact") from error
    finally:
        if bar is not None:
            bar.close()
    if empty:
        log.warning(f"warning: {source}: {empty} of {rows} rows have no text (or text that is not valid Unicode); "
                    f"their predicted_label and predicted_score are empty")
    seconds = time.perf_counter() - started
    print(f"Scored {rows} rows in {seconds:.1f}s ({rows / max(seconds, 1e-9):.0f} rows/s): {target}")


def predict_column(loaded: tuple, frame, column: str, batch_size: int):
    """frame with predicted_label and predicted_score for the texts in its column, and the number of rows without
    text (whose two are empty); loaded: (model, tokenizer, precision)."""
    import pandas as pd

    model, tokenizer, precision = loaded
    usable = [has_words(t) and valid_unicode(t) for t in frame[column]]
    scored = iter(predict(model, tokenizer, list(frame[column][usable]), batch_size, precision))
    pairs = [next(scored) if ok else (None, None) for ok in usable]  # typed: a chunk may be all empty
    return frame.assign(predicted_label=pd.Series([p[0] for p in pairs], dtype="string", index=frame.index),
                        predicted_score=pd.Series([p[1] for p in pairs], dtype="float64", index=frame.index)
                        ), usable.count(False)


def progress_bar(**options):
    """A tqdm progress bar."""
    from tqdm.auto import tqdm

    return tqdm(**options)


def input_files(source: str) -> tuple[list[Path], bool]:
    """The files --predict-file names: one file, every data file under a folder, or a glob's; and whether many."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in PREDICT_FILE_TYPES:
            raise InputError(f"input file {str(path)!r} must end in one of {', '.join(PREDICT_FILE_TYPES)}")
        return [path], False
    if path.is_dir():
        found = [p for p in walk(path) if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    elif glob.has_magic(source):  # hidden files and folders above: not reviews
        root = Path(os.path.expanduser(source.split("*")[0].split("?")[0].split("[")[0]) or ".")
        root = root if root.is_dir() else root.parent
        found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True))
                 if Path(p).is_file() and not through_linked_folder(Path(p), root)]
    else:
        raise InputError(f"input file {str(path)!r} does not exist")
    seen = set()  # a file reached twice (two links to it) is scored once
    found = [p for p in found if p.suffix.lower() in PREDICT_FILE_TYPES and not (
        p.resolve() in seen or seen.add(p.resolve()))]
    if not found:
        raise InputError(f"no {', '.join(PREDICT_FILE_TYPES)} files in {source!r}")
    return found, True


def walk(folder: Path) -> list[Path]:
    """Every file under folder, in order, without entering linked folders (out of the tree, or into a loop)."""
    found = []
    for top, folders, files in os.walk(folder, followlinks=False):
        folders.sort()
        found += [Path(top) / name for name in sorted(files) if (Path(top) / name).is_file()]
    return found


def through_linked_folder(path: Path, root: Path) -> bool:
    """Whether path lies under root by way of a linked folder."""
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        return False
    return any((root.joinpath(*parts[:i + 1])).is_symlink() for i in range(len(parts)))


def output_files(sources: list[Path], source: str, folder: Path) -> list[tuple[Path, Path]]:
    """Pair each input with its output in folder: the same relative path, as csv, jsonl or parquet."""
    root = Path(source).expanduser() if Path(source).expanduser().is_dir() else Path(os.path.commonpath(
        [p.parent for p in sources]))
    if folder.resolve() == root.resolve() or root.resolve() in folder.resolve().parents:
        raise InputError(f"--predictions {str(folder)!r} is inside the input folder {str(root)!r}, where it could "
                         f"write over inputs; name a folder outside it")
    pairs, taken = [], {}
    for src in sources:
        kind = src.suffix.lower()
        dst = folder / src.relative_to(root).with_suffix(OUTPUT_TYPE.get(kind, kind))
        if dst.resolve() in taken:
            raise InputError(f"{str(taken[dst.resolve()])!r} and {str(src)!r} would both be scored into "
                             f"{str(dst)!r}; rename one")
        taken[dst.resolve()] = src
        pairs.append((src, dst))
    return pairs


def model_record(config: dict) -> dict:
    """What, besides an input, decides its output: a hash of the model's files, the runtime, precision, text
    column, and the cut (MAX_LENGTH, TRUNCATION) saved with the model."""
    import hashlib

    if config["RUNTIME"] == "torch":
        folder = Path(config["OUTPUT_DIR"]) / "adapter"
        files = sorted(p for p in folder.glob("*") if p.is_file())
        saved = json.loads((folder / "tokenizer_config.json").read_text()) if files else {}
        cut = saved.get("model_max_length"), saved.get("review_truncation", "head")
    else:
        folder = Path(config["OUTPUT_DIR"]) / "onnx"
        files = [folder / n for n in (EXPORTED[config["RUNTIME"]][0], "tokenizer.json", "config.json")
                 if (folder / n).exists()]
        saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
        cut = saved.get("max_length"), saved.get("truncation")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as data:
            while block := data.read(1 << 20):
                digest.update(block)
    return {"model": digest.hexdigest(), "runtime": config["RUNTIME"], "precision": config["PRECISION"],
            "text_column": config["TEXT_COLUMN"], "max_length": cut[0], "truncation": cut[1]}


RECORD_CHANGES = {"runtime": "RUNTIME changed", "model": "the model changed", "precision": "PRECISION changed",
                  "text_column": "TEXT_COLUMN changed", "max_length": "MAX_LENGTH changed",
                  "truncation": "TRUNCATION changed", "input": "the input changed"}  # what why_stale() says


def stale_outputs(pairs: list[tuple[Path, Path]], model: dict) -> list[tuple[Path, Path, dict]]:
    """The (input, output, record) of every output to write: missing, or recorded from another model, settings or
    input (its size and mtime in ns); says how many are up to date and why the others are not."""
    todo, reasons = [], collections.Counter()
    for src, dst in pairs:
        stat = src.stat()  # before scoring: an input changed while it is scored is scored again next time
        record = model | {"input": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
        why = why_stale(dst, record)
        if why:
            todo.append((src, dst, record))
            reasons[why] += why != "not scored yet"
    if len(todo) < len(pairs) or +reasons:
        because = ", ".join(f"{count}: {why}" for why, count in (+reasons).items())
        log.info(f"{len(pairs) - len(todo)} of {len(pairs)} files were scored before; scoring the other {len(todo)}"
                 + (f" ({because})" if because else ""))
    return todo


def why_stale(output: Path, record: dict) -> str | None:
    """Why output must be written (again), or None where its record says it came from record's model and input."""
    if not output.exists():
        return "not scored yet"
    try:
        saved = json.loads(record_path(output).read_text())
    except (OSError, ValueError):
        return "no record of what scored it"
    return next((RECORD_CHANGES[key] for key in RECORD_CHANGES if saved.get(key) != record[key]), None)


def record_path(output: Path) -> Path:
    """The hidden file beside an output that records what produced it."""
    return output.with_name(f".{output.name}.record.json")


def write_record(output: Path, record: dict) -> None:
    """Write output's record, atomically."""
    with temporary_file(record_path(output)) as (tmp, handle):
        handle.write(json.dumps(record, indent=1).encode())
        handle.close()
        os.replace(tmp, record_path(output))


@contextmanager
def output_lock(output: Path):
    """Yield True while this process alone writes output (an advisory lock beside it), False where another does."""
    import fcntl

    lock = output.with_name(f".{output.name}.lock")
    handle = os.open(lock, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        yield False
        return
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)
        os.close(handle)


@contextmanager
def temporary_file(target: Path):
    """Yield (path, binary handle) of a new, uniquely named file beside target (created exclusively, so never
    through a planted link); it is removed unless the caller renamed it."""
    import tempfile

    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as opened:
            yield Path(name), opened
    finally:
        Path(name).unlink(missing_ok=True)


def check_target(source: Path, target: Path) -> None:
    """One file's output: a known type, in an existing folder, not the input."""
    if target.suffix.lower() not in PREDICTIONS_FILE_TYPES:
        raise InputError(f"--predictions {str(target)!r} must end in one of {', '.join(PREDICTIONS_FILE_TYPES)}")
    if not target.parent.is_dir():
        raise InputError(f"the folder of --predictions {str(target)!r} does not exist")
    if target.resolve() == source.resolve():
        raise InputError("--predictions must not be the input file")


def check_text_column(source: Path, column: str) -> str:
    """Fail early, naming the columns there are, when the file's first rows lack the text column or any row."""
    first = next(read_chunks(source, column, rows=1), None)  # the columns; every row is read when scored
    if first is None:
        raise InputError(f"could not read {str(source)!r}: no rows")
    if column not in first.columns:
        raise InputError(f"text column {column!r} not found in {str(source)!r}; it has columns: "
                         f"{', '.join(map(str, first.columns))} (set --text-column)")
    return column


def argument_reviews(texts: list[str]) -> list[str]:
    """The --predict texts that are valid text; bytes that were not UTF-8 (Python keeps them as lone surrogates)
    are skipped with a warning."""
    for number, text in enumerate(texts, start=1):
        if not valid_unicode(text):
            log.warning(f"warning: skipping --predict text {number}: not valid UTF-8 text")
    return [t for t in texts if valid_unicode(t)]


def read_stdin_reviews() -> list[str]:
    """Read one review per line from stdin; skip blank lines and lines that are not UTF-8 text."""
    reviews = []
    for number, raw in enumerate(sys.stdin.buffer.read().split(b"\n"), start=1):
        try:
            if b"\0" in raw:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary data")
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            log.warning(f"warning: skipping stdin line {number}: not valid UTF-8 text")
            continue
        if line.strip():
            reviews.append(line)
    return reviews


def read_chunks(path: Path, text_column: str, rows: int | None = None):
    """Yield a data file as DataFrames of at most `rows` (CHUNK_ROWS) rows, in order, all with the first rows'
    columns; csv and tsv values stay text as written. A row that cannot be read anywhere in the file, or keys that
    the first rows lack, end it with an InputError that names the file and the rows read before."""
    columns, done = None, 0
    try:
        for chunk in file_chunks(path, text_column, rows or CHUNK_ROWS):
            columns = list(chunk.columns) if columns is None else columns
            extra = [str(c) for c in chunk.columns if c not in columns]
            if extra:
                raise InputError(f"{str(path)!r} has columns after row {done} that the first {done} rows lack: "
                                 f"{', '.join(extra[:5])}; give every row the same keys")
            yield chunk.reindex(columns=columns)  # a jsonl row may leave a key out: empty there
            done += len(chunk)
    except (ValueError, OSError) as error:  # pandas' and pyarrow's parse errors, bad UTF-8, a truncated file
        raise InputError(f"could not read {str(path)!r} after row {done}: {one_line(error)}") from error


def file_chunks(path: Path, text_column: str, rows: int):
    """The file's rows as DataFrames of at most `rows`, as its type is read."""
    import pandas as pd

    kind = path.suffix.lower()
    if kind in (".csv", ".tsv"):
        yield from pd.read_csv(path, sep=DELIMITER[kind], dtype=str, keep_default_na=False, chunksize=rows,
                               encoding="utf-8-sig")  # -sig: a byte-order mark is skipped, not read as text
    elif kind == ".jsonl":
        yield from pd.read_json(path, lines=True, dtype=False, chunksize=rows, encoding="utf-8-sig")
    elif kind == ".json":  # one JSON array cannot be read in pieces; .jsonl can
        frame = pd.read_json(path, dtype=False, encoding="utf-8-sig")
        yield from (frame[start:start + rows] for start in range(0, max(len(frame), 1), rows))
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        yield from (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=rows))
    else:  # .txt: one review per line
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as lines:
            while chunk := [line.rstrip("\r\n") for line in itertools.islice(lines, rows)]:
                yield pd.DataFrame({text_column: chunk})


def open_writer(out, kind: str):
    """A context that yields write(frame), which appends rows to the open binary file out as csv, jsonl or parquet."""
    return parquet_writer(out) if kind == ".parquet" else text_writer(out, kind)


@contextmanager
def parquet_writer(path):
    """Yield write(frame), which appends rows to a parquet file; the first rows set the column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None

    def write(frame):
        nonlocal writer
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:  # one column holding numbers and text
            raise InputError(f"{one_line(error)}; write --predictions as .csv or .jsonl") from error
        if writer is None:  # a column empty in the first rows may hold text later: string, not null
            writer = pq.ParquetWriter(path, pa.schema(
                [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]))
        columns = []
        for field in writer.schema:  # a file's types may change after its first rows (jsonl)
            try:
                columns.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
                raise InputError(f"column {field.name!r} was {field.type} in the first rows and is "
                                 f"{table.column(field.name).type} here ({one_line(error)}); write "
                                 f"--predictions as .csv or .jsonl") from error
        writer.write_table(pa.Table.from_arrays(columns, schema=writer.schema))

    try:
        yield write
    finally:
        if writer:
            writer.close()


@contextmanager
def text_writer(binary, kind: str):
    """Yield write(frame), which appends rows to a csv (header first) or jsonl file, open in binary."""
    import io

    out = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=True)

    def write(frame):
        if kind == ".csv":
            frame.to_csv(out, header=binary.tell() == 0, index=False)
        elif len(frame):
            out.write(frame.to_json(orient="records", lines=True, force_ascii=False).rstrip("\n") + "\n")

    yield write
    out.detach()  # the caller closes the file


# The HTTP service -------------------------------------------------------------------------------------------------


class Refused(Exception):
    """A request the server will not score: its HTTP status (503, 504) and one line saying why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class MicroBatcher:
    """Gathers the texts of concurrent callers into batches of up to max_batch and runs score(texts) -> one row per
    text in a worker thread, so the event loop stays free; score may be a list, one function per stream of the
    model (each on its share of the cores), and then as many batches run at once. A batch starts as soon as a
    worker is free, waiting
    (at most max_wait_s: LitServe's batch_timeout) only while other requests are still being read, inside
    `with batcher.arriving():`; a lone caller never waits. Batches take texts round-robin across the waiting
    requests, so a small request is not stuck behind a large one. At most max_queue texts wait (more: Refused 503);
    a request not answered within timeout_s gets Refused 504, and its texts still waiting are dropped, as are those
    of a caller that left; a batch that fails is retried text by text, so only the failing texts get the error.
    Use it as `async with batcher:`, then `await batcher.submit(texts)`."""

    def __init__(self, score, max_batch: int, max_wait_s: float, max_queue: int = 1 << 30,
                 timeout_s: float | None = None, on_batch=lambda size: None, on_drop=lambda reason, count: None):
        self.scores = list(score) if isinstance(score, (list, tuple)) else [score]
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.timeout_s, self.on_batch, self.on_drop = timeout_s, on_batch, on_drop
        self.batches, self.waiting, self.draining = 0, collections.deque(), False  # waiting: [texts, answers, next]
        self.ready = self.task = self.thread = self.free = None
        self.running = set()  # the batches being scored
        self.reading = 0  # requests being read, whose texts a batch may wait for

    async def __aenter__(self) -> None:  # None: it also serves as a Starlette lifespan, which yields no state
        self.ready, self.thread = asyncio.Event(), ThreadPoolExecutor(len(self.scores))  # a thread a stream
        self.free = asyncio.Queue()  # the score functions not running a batch
        for score in self.scores:
            self.free.put_nowait(score)
        self.task = asyncio.create_task(self.run())

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        for batch in self.running:
            batch.cancel()
        self.thread.shutdown(wait=False)

    @contextlib.contextmanager
    def arriving(self):
        """Around reading a request: while any are being read, a batch waits up to max_wait_s for their texts."""
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1
            if self.ready is not None:
                self.ready.set()  # a batch waiting for this request looks again

    @property
    def queued(self) -> int:
        """Texts waiting to be scored."""
        return sum(len(job[0]) - job[2] for job in self.waiting)

    async def submit(self, texts: list[str]) -> list:
        """score()'s row for each text, in order; Refused when full, draining or late; a model error is raised here."""
        if self.draining:
            raise Refused(503, "the server is shutting down; retry on another replica")
        if self.queued + len(texts) > self.max_queue:
            self.on_drop("refused", len(texts))
            raise Refused(503, f"{self.queued} texts are waiting to be scored, and MAX_QUEUE is {self.max_queue}; "
                               f"retry in a moment")
        job = [texts, [asyncio.get_running_loop().create_future() for _ in texts], 0]
        self.waiting.append(job)
        self.ready.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*job[1]), self.timeout_s))
        except asyncio.TimeoutError:
            self.on_drop("deadline", self.drop(job))
            raise Refused(504, f"not answered within REQUEST_TIMEOUT_S ({self.timeout_s:g} s)") from None
        except asyncio.CancelledError:  # the caller left: what is still waiting is never scored
            self.on_drop("gone", self.drop(job))
            raise

    def drop(self, job: list) -> int:
        """Take job's waiting texts out of the queue; return how many there were."""
        left = len(job[0]) - job[2]
        job[2] = len(job[0])
        for answer in job[1]:
            answer.cancel()
        return left

    def drain(self) -> int:
        """Refuse every new request and every text still waiting (503); return how many requests were waiting."""
        self.draining, waiting = True, [job for job in self.waiting if job[2] < len(job[0])]
        for job in waiting:
            self.on_drop("drain", len(job[0]) - job[2])
            job[2] = len(job[0])
            for answer in job[1]:
                if not answer.done():
                    answer.set_exception(Refused(503, "the server shut down before this request was scored"))
        return len(waiting)

    async def run(self) -> None:
        """Forever: once a worker is free, take the next batch and score it off the event loop."""
        while True:
            score = await self.free.get()
            batch = await self.next_batch()
            if not batch:  # every text of it was dropped meanwhile
                self.free.put_nowait(score)
                continue
            task = asyncio.create_task(self.answer(score, batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def answer(self, score, batch: list) -> None:
        """Score one batch in a worker thread, then answer each waiting text."""
        try:
            found = await asyncio.get_running_loop().run_in_executor(self.thread, self.score_each, score,
                                                                     [text for text, _ in batch])
        finally:
            self.free.put_nowait(score)
        self.batches += 1
        self.on_batch(len(batch))
        for (_, answer), row in zip(batch, found):
            if not answer.done():
                answer.set_exception(row) if isinstance(row, Exception) else answer.set_result(row)

    def score_each(self, score, texts: list[str]) -> list:
        """score(texts); where the batch fails, each text alone, so that only the failing ones get the error."""
        try:
            return list(score(texts))
        except Exception as error:  # noqa: BLE001  one bad text must not fail the others
            return [error] if len(texts) == 1 else [row for text in texts
                                                    for row in self.score_each(score, [text])]

    async def next_batch(self) -> list:
        """Up to max_batch (text, answer) pairs, one from each waiting request in turn; after the first text, wait at
        most max_wait_s for more while requests are being read."""
        loop = asyncio.get_running_loop()
        while not self.queued:
            self.ready.clear()
            await self.ready.wait()
        deadline = loop.time() + self.max_wait_s
        while self.queued < self.max_batch and self.reading and loop.time() < deadline:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        batch = []
        while self.waiting and len(batch) < self.max_batch:
            job = self.waiting.popleft()
            if job[2] < len(job[0]):
                batch.append((job[0][job[2]], job[1][job[2]]))
                job[2] += 1
            if job[2] < len(job[0]):
                self.waiting.append(job)  # round-robin: to the back of the line
        return batch


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sentiment</title>
<style>body{font:15px system-ui,sans-serif;max-width:640px;margin:2em auto;color:#222}textarea{width:100%;height:8em}
.bar{background:#4a80c8;height:1.1em}.row{display:grid;grid-template-columns:7em 1fr 4em;gap:.5em;margin:.3em 0}
#decision{font-size:1.4em;font-weight:600}#error{color:#b00}</style></head>
<body><h1>Try the sentiment model</h1>
<textarea id="text" placeholder="Type or paste a review"></textarea>
<p><label>API key <input id="key" type="password" placeholder="if the server has one"></label>
<button id="send">Classify</button></p>
<p id="decision"></p><div id="scores"></div><p id="error"></p>
<script>
const $ = id => document.getElementById(id);
$("key").value = sessionStorage.getItem("key") || "";
$("send").onclick = async () => {
  $("error").textContent = ""; $("decision").textContent = "..."; $("scores").replaceChildren();
  const headers = {"Content-Type": "application/json"}, key = $("key").value.trim();
  if (key) { headers.Authorization = "Bearer " + key; sessionStorage.setItem("key", key); }
  const answer = await fetch("predict", {method: "POST", headers, body: JSON.stringify({texts: [$("text").value]})});
  const body = await answer.json().catch(() => ({error: answer.statusText}));
  if (!answer.ok) {
    $("decision").textContent = ""; $("error").textContent = answer.status + ": " + body.error; return;
  }
  const found = body.predictions[0];
  $("decision").textContent = found.label + " (" + found.score.toFixed(2) + ")";
  for (const [label, p] of Object.entries(found.scores).sort((a, b) => b[1] - a[1])) {
    const [row, name, track, bar, value] = ["div", "span", "div", "div", "span"].map(t => document.createElement(t));
    row.className = "row"; row.dataset.label = label; name.textContent = label; value.textContent = p.toFixed(3);
    bar.className = "bar"; bar.style.width = (100 * p).toFixed(1) + "%";
    track.append(bar); row.append(name, track, value); $("scores").append(row);
  }
};
</script></body></html>
"""  # GET /: a page to try the model, self-contained, talking to /predict with JSON


def build_app(score, names: list[str], config: dict, threshold: float | None = None):
    """A Starlette app: POST /predict and POST / (the Hugging Face Inference format) score texts with score(texts) ->
    logits (or a list of such functions, one per stream: see MicroBatcher), batched across concurrent requests by a
    MicroBatcher; /predict labels with the saved threshold; GET / is a page to try the model; GET /health answers
    during a long batch and says when the queue is full; GET /metrics is Prometheus'. Guard checks the key and
    content type, and counts. Plain Starlette: FastAPI's layers took 3-8% of the rows/s at 32 clients, on an
    event loop that shares the cores with the model, and every answer here is our own."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    meters = server_meters()
    batcher = MicroBatcher(score, config["BATCH_SIZE"], config["MAX_WAIT_MS"] / 1000, config["MAX_QUEUE"],
                           config["REQUEST_TIMEOUT_S"], meters.batch_size.observe,
                           lambda reason, count: meters.dropped.labels(reason).inc(count))
    meters.queue.set_function(lambda: batcher.queued)

    async def answer(request, field: str, encode):
        with batcher.arriving():
            got = await read_texts(request, config, field)
        found = got if isinstance(got, Response) else await scored(request, batcher, got[0]) if got[0] else \
            np.zeros((0, len(names)))
        return found if isinstance(found, Response) else JSONResponse(encode(found, got[1]))

    async def predict_route(request):  # the request as it came, our own 4xx answers
        return await answer(request, "texts", lambda found, _: predictions(found, names, threshold))

    async def inference_route(request):  # what huggingface_hub's InferenceClient.text_classification sends
        return await answer(request, "inputs", lambda found, options: hf_classification(found, names, options))

    async def health(request):
        full = batcher.draining or batcher.queued >= config["MAX_QUEUE"]
        return JSONResponse({"status": "draining" if batcher.draining else "saturated" if full else "ok",
                             "runtime": config["RUNTIME"], "labels": names, "queued": batcher.queued,
                             "max_queue": config["MAX_QUEUE"]}, status_code=503 if full else 200)

    async def metrics(request):
        return Response(generate_latest(meters.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request):  # the page to try the model
        return HTMLResponse(PAGE)

    app = Starlette(routes=[Route("/predict", predict_route, methods=["POST"]),
                            Route("/", inference_route, methods=["POST"]), Route("/", page, methods=["GET"]),
                            Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers=json_errors(), lifespan=lambda app: batcher)  # it batches while the app runs
    app.state.batcher = batcher
    return Guard(app, config["API_KEY"] or os.environ.get("SENTIMENT_API_KEY", ""), meters)


def json_errors() -> dict:
    """Handlers that answer 404, 405 and errors of the model in the same {"error": "one line"} shape as the 4xx
    answers."""
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    async def http_error(request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    async def internal_error(request, error: Exception):
        log.error(f"error: {request.url.path}: {one_line(error)}")
        return JSONResponse({"error": f"internal error: {one_line(error)}"}, status_code=500)

    return {HTTPException: http_error, Exception: internal_error}


def server_meters():
    """The server's Prometheus metrics, on a registry of its own."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    return SimpleNamespace(registry=registry, requests=Counter(
        "sentiment_requests", "HTTP requests answered, by route and status code", ["route", "code"],
        registry=registry), latency=Histogram("sentiment_request_seconds", "Time to answer a request, by route",
                                              ["route"], registry=registry),
        batch_size=Histogram("sentiment_batch_size", "Texts per batch gathered (an export runs it in parts of "
                             "similar length)", registry=registry,
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        queue=Gauge("sentiment_queue_texts", "Texts waiting to be scored", registry=registry),
        dropped=Counter("sentiment_texts_dropped", "Texts not scored: gone (the client left), deadline, refused "
                        "(queue full), drain (shut down)", ["reason"], registry=registry))


class Guard:
    """ASGI middleware in front of every route: with an API key, Bearer authentication (but /health and the page at
    GET /); POSTs in the content types a web page may send without a CORS preflight refused (415); every answer
    counted and timed."""

    FORMS = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
    ROUTES = ("/", "/predict", "/health", "/metrics")

    def __init__(self, app, api_key: str, meters):
        self.app, self.key, self.meters = app, api_key.encode(), meters
        self.state = app.state  # the app's: run_serve reads its batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            await (refusal or self.app)(scope, receive, sending)
        finally:
            route = scope["path"] if scope["path"] in self.ROUTES else "other"
            self.meters.requests.labels(route, str(status[0])).inc()
            self.meters.latency.labels(route).observe(time.perf_counter() - started)

    def refusal(self, scope):
        """A 401 or 415 answer for this request, or None."""
        import hmac

        from starlette.responses import JSONResponse

        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        public = scope["path"] == "/health" or (scope["path"] == "/" and scope["method"] in ("GET", "HEAD"))
        if self.key and not public and not hmac.compare_digest(
                headers.get("authorization", b""), b"Bearer " + self.key):
            return JSONResponse({"error": "send the API key as 'Authorization: Bearer KEY'"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        kind = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if scope["method"] == "POST" and kind in self.FORMS:
            return JSONResponse({"error": f"Content-Type {kind} is not accepted; send application/json"},
                                status_code=415)
        return None


async def read_texts(request, config: dict, field: str):
    """(texts, parameters) of a request, the texts under field ("texts" for /predict; "inputs", a string or a list,
    for the Inference format), or a 4xx JSON answer that says in one line what is wrong with them."""
    from starlette.responses import JSONResponse

    example = '{"texts": ["a review", ...]}' if field == "texts" else '{"inputs": "a review"}'
    data = await read_json(request, config, example)
    if isinstance(data, JSONResponse):
        return data
    texts = data.get(field) if isinstance(data, dict) else None
    texts = [texts] if field == "inputs" and isinstance(texts, str) else texts
    options = data.get("parameters") or {} if isinstance(data, dict) else {}
    if texts is None:
        problem = f'no "{field}" in the body; send {example}'
    elif not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        problem = f'"{field}" must be a list of strings'
    elif len(texts) > config["MAX_TEXTS"]:
        problem = f'{len(texts)} texts in one request; send at most {config["MAX_TEXTS"]} (MAX_TEXTS)'
    else:
        problem = text_problem(texts, field) or option_problem(options)
    return JSONResponse({"error": problem}, status_code=422) if problem else (texts, options)


async def read_json(request, config: dict, example: str):
    """The request's body as JSON, or a 400 or 413 answer."""
    from starlette.responses import JSONResponse

    limit, too_big = config["MAX_BODY_KB"] * 1024, f"the body is over {config['MAX_BODY_KB']} KB; send fewer or " \
                                                    f"shorter texts per request"
    if int(request.headers.get("content-length") or 0) > limit:
        return JSONResponse({"error": too_big}, status_code=413)
    body = b""
    async for part in request.stream():  # a body without a length is counted as it comes
        body += part
        if len(body) > limit:
            return JSONResponse({"error": too_big}, status_code=413)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: brackets nested thousands deep
        reason = "it is nested too deeply" if isinstance(error, RecursionError) else one_line(error)
        return JSONResponse({"error": f"the body is not JSON: {reason}; send {example}"}, status_code=400)


def text_problem(texts: list[str], field: str = "texts") -> str | None:
    """What is wrong with the first text that cannot be scored (not valid Unicode, a NUL, no visible characters)."""
    for i, text in enumerate(texts):
        where = f"{field}[{i}]" if field == "texts" or len(texts) > 1 else field
        if "\0" in text:
            return f"{where} holds a NUL character; send text"
        if not valid_unicode(text):
            return f"{where} is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"
        if not has_words(text):
            return f"{where} is empty; every text needs some words"
    return None


def option_problem(options) -> str | None:
    """What is wrong with the Inference format's parameters, if anything."""
    if not isinstance(options, dict):
        return '"parameters" must be an object'
    top_k, function = options.get("top_k"), options.get("function_to_apply")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        return '"parameters.top_k" must be a whole number of at least 1'
    if function not in (None, "softmax", "sigmoid", "none"):
        return '"parameters.function_to_apply" must be softmax, sigmoid or none'
    return None


def predictions(found: np.ndarray, names: list[str], threshold: float | None) -> dict:
    """Logits as /predict answers them: each text's label (by the threshold), its probability, and every class's."""
    probabilities = softmax(found)
    return {"predictions": [{"label": names[i], "score": float(p[i]), "scores": dict(zip(names, map(float, p)))}
                            for p, i in zip(probabilities, decide(probabilities, threshold))]}


def hf_classification(found: np.ndarray, names: list[str], options: dict) -> list[list[dict]]:
    """Logits in the Hugging Face Inference format: for each text, its labels best first (top_k of them)."""
    function = options.get("function_to_apply") or "softmax"
    scores = softmax(found) if function == "softmax" else 1 / (1 + np.exp(-found)) if function == "sigmoid" else found
    top_k = options.get("top_k") or len(names)
    return [[{"label": names[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")[:top_k]]
            for row in scores]


async def scored(request, batcher: MicroBatcher, texts: list[str]):
    """The batcher's logits for texts, or the answer when it refuses them; if the client disconnects first, its
    texts are dropped before compute."""
    from starlette.responses import JSONResponse

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(batcher.submit(texts)), asyncio.ensure_future(gone())
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not work.done():
        work.cancel()  # the client left: nobody to answer
        return JSONResponse({"error": "the client disconnected"}, status_code=499)
    try:
        return np.stack(work.result())
    except Refused as error:
        return JSONResponse({"error": str(error)}, status_code=error.status,
                            headers={"Retry-After": "1"} if error.status == 503 else None)


def valid_unicode(text: str) -> bool:
    """Whether text can be encoded as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_words(text) -> bool:
    """Whether text holds a visible character: not only spaces, control or format characters (zero-width ones)."""
    return isinstance(text, str) and any(unicodedata.category(c)[0] not in "CZ" for c in text)


def guarded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's HTTP protocol (httptools) with a bound on open connections (over it, the oldest connection still
    waiting for its request is closed, so /health gets through) and a deadline for each request to arrive whole,
    headers and body: uvicorn has neither, so a half-sent request holds its connection for good."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Guarded(HttpToolsProtocol):
        deadline, armed_at = None, 0.0

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # over the bound: the slowest half-sent request goes
                waiting = [c for c in self.connections if c is not self and getattr(c, "deadline", None)]
                if not waiting:  # every connection has a whole request in hand: this one waits its turn elsewhere
                    transport.close()
                    return
                min(waiting, key=lambda c: c.armed_at).transport.close()
            self.arm()

        def on_message_begin(self):
            super().on_message_begin()
            self.arm()  # the next request on a kept-alive connection

        def on_message_complete(self):
            self.disarm()
            super().on_message_complete()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

        def arm(self):
            self.disarm()
            self.armed_at = self.loop.time()
            self.deadline = self.loop.call_later(header_timeout_s, self.transport.close)

        def disarm(self):
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

    return Guarded


# Ray --------------------------------------------------------------------------------------------------------------


def read_with_ray(sources: list[Path], column: str):
    """One Ray Dataset of every input file's rows, each file read by its type."""
    import ray.data

    parts = []
    for kind in sorted({p.suffix.lower() for p in sources}):
        paths = [str(p) for p in sources if p.suffix.lower() == kind]
        if kind in (".csv", ".tsv"):  # types as pyarrow infers them (the single process keeps csv values as text)
            import pyarrow.csv as pacsv

            parts.append(ray.data.read_csv(paths, parse_options=pacsv.ParseOptions(delimiter=DELIMITER[kind])))
        elif kind in (".json", ".jsonl"):
            parts.append(ray.data.read_json(paths, lines=kind == ".jsonl"))
        elif kind == ".parquet":
            parts.append(ray.data.read_parquet(paths))
        else:
            parts.append(ray.data.read_text(paths).rename_columns({"text": column}))
    if len(parts) == 1:
        return parts[0]
    same = [part.map_batches(lambda table: table, batch_format="pyarrow", batch_size=None) for part in parts]
    return same[0].union(*same[1:])  # readers give arrow or pandas blocks, and one batch may not mix them


class RayScorer:
    """One model copy in a Ray actor: rebuilt from the shipped bytes, so no shared file system is needed."""

    def __init__(self, shipped: dict, engine: str, column: str, batch_size: int):
        weights = shipped.get("model_int8.onnx") or shipped["model.onnx"]  # from memory: no copy left on disk
        model, tokenizer = onnx_model(json.loads(shipped["config.json"]), shipped["tokenizer.json"].decode(), weights,
                                      threads=1, engine=engine)  # 1 CPU each
        self.loaded, self.column, self.batch_size = (model, tokenizer, "onnx"), column, batch_size

    def __call__(self, frame):
        return predict_column(self.loaded, frame, self.column, self.batch_size)[0]


# The machinery: flags, precision, errors --------------------------------------------------------------------------


class InputError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class WriteError(InputError):
    """An output that could not be written (a full disk, a permission): it ends a folder run too."""


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the mode they ask for; return the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        modes = [flag for flag, on in (("--predict", args.predict), ("--predict-file", args.predict_file and not
                                       args.ray), ("--serve", args.serve), ("--ray", args.ray)) if on]
        if len(modes) > 1:  # --ray takes --predict-file as its input, so that pair is one mode
            raise InputError(f"{' and '.join(modes)} are separate modes; run one at a time")
        if not modes:
            raise InputError("pass --predict TEXT, --predict-file IN, --serve or --ray (see --help)")
        if args.predictions and not args.predict_file:
            raise InputError("--predictions names the output of --predict-file; pass --predict-file IN too")
        run_mode({name: getattr(args, name) for name in SETTINGS}, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except InputError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The settings' flags and the mode flags."""
    parser = settings_parser(sys.modules[__name__])
    parser.add_argument("--predict", nargs="+", metavar="TEXT", help="classify TEXT with the saved model; '-' reads "
                        "one review per line from stdin")
    parser.add_argument("--predict-file", metavar="IN", help="score every row of IN (.csv .tsv .jsonl .json .parquet "
                        ".txt), or of every such file in a folder or glob; the text is in TEXT_COLUMN")
    parser.add_argument("--predictions", metavar="OUT", help="where --predict-file writes: a .csv .jsonl .parquet file "
                        "(default OUTPUT_DIR/predictions.csv) or, for a folder or glob, a folder (default "
                        "OUTPUT_DIR/predictions/); every input row and column, plus the prediction")
    parser.add_argument("--serve", action="store_true", help="serve POST /predict, GET /health and GET /metrics on "
                        "HOST:PORT (needs requirements-serve.txt)")
    parser.add_argument("--ray", action="store_true", help="score --predict-file's files with Ray Data into a "
                        "parquet folder (needs requirements-ray.txt and an onnx runtime)")
    return parser


def settings_parser(module, usage: str | None = None) -> argparse.ArgumentParser:
    """A parser with one flag per setting of module's constants block, and --quiet and --debug; both files' CLIs
    start from it."""
    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=usage, allow_abbrev=False)
    add_settings(parser, module)
    parser.add_argument("--quiet", action="store_true", help="print only the results")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def add_settings(parser: argparse.ArgumentParser, module) -> None:
    """One flag per setting of module's constants block, its help taken from the trailing comment; the module names
    its settings' CHOICES, and which are POSITIVE (above 0) and FRACTIONS (below 1)."""
    comments = dict(re.findall(r"^([A-Z_]+):.*?#\s*(.+)$", Path(module.__file__).read_text(), re.M))
    for name in module.SETTINGS:
        kind, default = str(module.__annotations__[name]), getattr(module, name)  # the annotation is text
        flag = "--" + name.lower().replace("_", "-")
        helptext = f"{comments.get(name, '')} (default: {default!r})".replace("%", "%%")
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=name, nargs="+", default=default, metavar="TEXT", help=helptext)
        else:
            parser.add_argument(flag, dest=name, default=default, help=helptext,
                                type=value_parser(name, kind, module))


def value_parser(name: str, kind: str, module) -> callable:
    """An argparse type that checks a flag value against the setting's type and range."""
    base = int if "int" in kind else float if "float" in kind else str
    choices = module.CHOICES

    def parse(text: str):
        if "None" in kind and text.lower() in ("none", "auto"):
            return None
        if name in choices:
            if text.lower() not in choices[name]:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices[name])}, got {text!r}")
            return text.lower()
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if base is not str and (value < 0 or not np.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
        if name in module.POSITIVE and value == 0:
            raise argparse.ArgumentTypeError("must be greater than 0")
        if name in module.FRACTIONS and value >= 1:
            raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
        return value

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def setup_logging(quiet: bool) -> None:
    """Our messages go to stderr plainly."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, force=True)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids the fork warning from the tokenizers crate


def cpu_may_have_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """False on an x86 Linux CPU whose flags lack avx512_bf16 and amx_bf16 (bf16 is emulated there, many times
    slower, and its first use alone takes seconds); True where that is not ruled out, so the probe decides."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.exists():
        return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), None)
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bf16_speedup(width: int, seconds: float = 0.2, rounds: int = 5) -> float:
    """Time width-wide matmuls on this CPU in fp32 and in bf16, taking turns over rounds (seconds each in all);
    return how many times faster bf16 ran, in the median round. A moment's load (another process starting) then
    spoils one round, not one dtype's whole timing: timed once each, a stall in fp32's 0.2 s read a CPU whose bf16
    runs 0.55x as 1.32x, and auto trained in bf16 (bench/README.md, AVX-512-BF16, 2026-12-02)."""
    import torch

    width = max(width, 256)  # at a tiny test model's width the timing would be all overhead
    draw = torch.Generator().manual_seed(0)  # its own: the probe leaves the seeded stream (LoRA's init) alone
    x, w = torch.randn(128, width, generator=draw), torch.randn(width, width, generator=draw)
    pairs = [(x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)]
    for a, b in pairs:
        a @ b  # warm-up: the first bf16 call picks and builds its kernel

    def seconds_per_call(a, b) -> float:
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds / rounds:  # without fast bf16 a call can take 0.1 s
            a @ b
            calls += 1
        return (time.perf_counter() - start) / calls

    return statistics.median(seconds_per_call(*pairs[0]) / seconds_per_call(*pairs[1]) for _ in range(rounds))


def choose_precision(requested: str, has_gpu: bool, gpu_has_bf16: bool = False, speedup: float | None = None) -> str:
    """Resolve PRECISION for this hardware: on a CPU, auto takes bf16 only where the probe measured it fast."""
    if has_gpu:
        if requested == "bf16" and not gpu_has_bf16:
            raise InputError("this GPU has no bf16 support; use --precision fp16, fp32 or auto")
        return ("bf16" if gpu_has_bf16 else "fp16") if requested == "auto" else requested
    if requested == "fp16":
        raise InputError("fp16 needs a GPU (CPU autocast runs bf16 only); use --precision bf16, fp32 or auto")
    fast = speedup is not None and speedup >= FAST_BF16
    if requested == "bf16" and (speedup is None or speedup < 1):  # slower than fp32, not just short of FAST_BF16
        found = f"measured {speedup:.2f}x the speed of fp32" if speedup else "has no avx512_bf16 or amx_bf16"
        log.warning(f"warning: bf16 on this CPU {found}; it will be slow (--precision auto picks the faster one)")
    return "bf16" if requested == "bf16" or (requested == "auto" and fast) else "fp32"


def resolve_precision(requested: str, has_gpu: bool, width: int) -> tuple[str, float | None]:
    """Measure what the hardware needs measured, then choose; return (precision, measured bf16 speedup or None)."""
    speedup = bf16_speedup(width) if bf16_probe_needed(requested, has_gpu) else None
    return settle_precision(requested, has_gpu, speedup), speedup


def bf16_probe_needed(requested: str, has_gpu: bool) -> bool:
    """Whether choosing needs bf16's speed measured: auto or bf16 asked for, on a CPU that may have it fast."""
    return not has_gpu and requested in ("auto", "bf16") and cpu_may_have_fast_bf16()


def settle_precision(requested: str, has_gpu: bool, speedup: float | None) -> str:
    """choose_precision on this machine, given the measured bf16 speedup (or None), logged with its reason; on a GPU
    fp32 matmuls may use tensor cores (TF32)."""
    import torch

    note = ""
    if has_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        precision = choose_precision(requested, True, torch.cuda.is_bf16_supported())
    else:
        if speedup is not None:
            note = f"; bf16 matmuls ran {speedup:.2f}x as fast as fp32 on this CPU"
        elif requested in ("auto", "bf16"):
            note = "; no avx512_bf16 or amx_bf16 in this CPU's flags, so bf16 was not timed"
        precision = choose_precision(requested, False, speedup=speedup)
    log.info(f"Precision: {precision} ({requested}{note})")
    return precision


def one_line(error: BaseException) -> str:
    """The first line of an exception message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
