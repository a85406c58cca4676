"""Fine-tune a pretrained transformer for sentiment with LoRA, in one readable file.

Loads IMDB, tokenizes it for DistilBERT, wraps the model in a PEFT LoRA adapter (about 1% of the
weights train, the classification head included), trains with the Hugging Face Trainer in the precision
this hardware is fast at, reports accuracy, F1, loss and the confusion matrix, prints sample predictions
and saves a reusable adapter. Two classes or more, as the data says; long reviews keep head and tail.

    python fine_tune_sentiment.py                                   # sized for this machine (preset printed)
    python fine_tune_sentiment.py --train-samples 4000 --epochs 2   # every constant below is a flag
    torchrun --nproc_per_node 2 fine_tune_sentiment.py              # the same, on 2 processes or GPUs
    python fine_tune_sentiment.py --predict "This movie was fantastic!"  # reuse the saved adapter
    python fine_tune_sentiment.py --eval-only --dataset-name new.csv     # evaluate it on new data
    python fine_tune_sentiment.py --predict-file in.csv --predictions out.csv  # score a whole file
    python fine_tune_sentiment.py --export-onnx && python fine_tune_sentiment.py --runtime onnx-int8 --predict "Fun!"
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
# torch, transformers, datasets and peft take ~6 s to import, so each stage imports what it uses:
# importing this file, --help and a bad flag stay instant.

# model and data
MODEL_NAME: str = "distilbert-base-uncased"  # hub id, or a local folder with config, safetensors weights and tokenizer
DATASET_NAME: str = "imdb"  # hub id, local dataset folder, .csv/.tsv/.json/.jsonl/.parquet file, or the aclImdb/ folder
TEXT_COLUMN: str = "text"  # column holding the review text
LABEL_COLUMN: str = "label"  # column holding the classes: 0/1, neg/pos, negative/neutral/positive, any names or ints
# sizes (None = the preset for this hardware, printed at start; 0 = every row)
TRAIN_SAMPLES: int | None = None  # training rows, drawn after a seeded shuffle (IMDB is sorted by label)
EVAL_SAMPLES: int | None = None  # evaluation rows from the test split, drawn the same way
MAX_LENGTH: int | None = None  # tokens per review, clamped to the model's limit; longer ones are cut (TRUNCATION)
TRUNCATION: str = "head+tail"  # head+tail keeps a long review's first quarter and last three quarters; or head
# training
EPOCHS: int | None = None  # passes over the training rows; with 2+ the best epoch (by validation accuracy) is kept
BATCH_SIZE: int | None = None  # training examples per step; evaluation uses twice as many
LEARNING_RATE: float = 5e-4  # LoRA wants about 10x full fine-tuning's 5e-5
WARMUP: float = 0.06  # fraction of steps spent warming the learning rate up from 0
WEIGHT_DECAY: float = 0.01  # AdamW weight decay on the trainable weights
EARLY_STOPPING: int = 0  # with EPOCHS > 1, stop after this many evaluations without better accuracy; 0 = off
VALIDATION: float = 0.1  # with EPOCHS > 1, the share of train that picks the epoch (0: test does, optimistic)
SCHEDULER: str = "linear"  # how the learning rate decays after warmup: linear or cosine
# LoRA
LORA_R: int = 8  # rank of the low-rank update; 4-16 is typical
LORA_ALPHA: int = 16  # update scale is alpha / r; 2 * r is the usual choice
LORA_DROPOUT: float = 0.1  # dropout on the LoRA branch input
TARGET_MODULES: list[str] | None = None  # None = q_lin v_lin (DistilBERT) or query value (BERT); or all-linear
LORA_VARIANT: str = "lora"  # lora; rslora (scale alpha / sqrt(r)); dora (weight-decomposed, slower per step)
# speed
RUNTIME: str = "torch"  # what --predict, --predict-file and --eval-only run on: torch, onnx or onnx-int8 (no torch)
PRECISION: str = "auto"  # auto (bf16 where measured fast; GPU: bf16, else fp16; else fp32), fp32, bf16 or fp16
# run
SEED: int = 42  # seeds shuffling, subsets, LoRA init and dropout: same seed, same CPU result
OUTPUT_DIR: str = "outputs"  # gets adapter/, metrics.json, training.png, checkpoints/ while training
MERGE: bool = False  # also write OUTPUT_DIR/merged/, a plain transformers model with LoRA folded in
REPORT_TO: str = "none"  # none, tensorboard (logs in OUTPUT_DIR/runs/), wandb, mlflow or another Trainer tracker
SAMPLE_REVIEWS: list[str] = [  # predicted and printed after training
    "This movie was fantastic!",
    "A dull, lifeless film. I want my two hours back.",
    "The acting was uneven, but the ending completely won me over.",
]

SETTINGS = list(__annotations__)  # the annotated names above are the settings; each one is a flag
PRESETS = {  # fills the settings left at None; a value set in the file or on the command line wins
    "gpu": dict(TRAIN_SAMPLES=0, EVAL_SAMPLES=0, MAX_LENGTH=512, EPOCHS=3, BATCH_SIZE=32),  # full IMDB, 25k/25k
    "cpu": dict(TRAIN_SAMPLES=2000, EVAL_SAMPLES=1000, MAX_LENGTH=256, EPOCHS=1, BATCH_SIZE=16),  # 16.8 min, 2 AVX2 cores
}
DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"], "bert": ["query", "value"], "roberta": ["query", "value"]}
HEAD_MODULES = {"distilbert": ["pre_classifier", "classifier"], "bert": ["pooler", "classifier"]}  # trained + saved
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}
SENTIMENT_NAMES = {"neg": "negative", "negative": "negative", "neu": "neutral", "neutral": "neutral",
                   "pos": "positive", "positive": "positive"}  # string labels read as these, case-insensitively
SENTIMENT_ORDER = ["negative", "neutral", "positive"]  # their class order; other names follow, sorted
MAX_CLASSES = 100  # more is probably the wrong column
CHOICES = {"PRECISION": ("auto", "fp32", "bf16", "fp16"), "TRUNCATION": ("head+tail", "head"),  # one of a few words
           "SCHEDULER": ("linear", "cosine"), "LORA_VARIANT": ("lora", "rslora", "dora"),
           "RUNTIME": ("torch", "onnx", "onnx-int8")}
FAST_BF16 = 1.3  # auto picks bf16 on a CPU only where its matmuls measured at least this much faster than fp32
TRACKER_PACKAGES = {"comet_ml": ("comet_ml", "comet-ml"), "azure_ml": ("azureml", "azureml-core")}  # else name, name
PREDICT_FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")  # --predict-file reads these
PREDICTIONS_FILE_TYPES = (".csv", ".jsonl", ".parquet")  # and writes these
CHUNK_ROWS = 10_000  # --predict-file reads, scores and writes this many rows at a time
DATA_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
log = logging.getLogger("fine_tune_sentiment")


# The training story: what `python fine_tune_sentiment.py` does, step by step ------------------------------------


def run_training(config: dict, args: argparse.Namespace) -> dict:
    """Load and prepare the data, tokenize it, wrap the model in LoRA, train, evaluate, predict, save."""
    from transformers import set_seed

    run = start_run(config, args)  # device, processes and preset, printed
    set_seed(config["SEED"])  # once, before any shuffling and before the LoRA weights are drawn
    with main_process_first():  # downloads and dataset caches are written once, then read by the other processes
        data = load_data(config)  # 1. load, clean and subsample
        model, tokenizer = load_model(config, data["train"].features["labels"].names)  # 2. the LoRA model
        data = tokenize(data, tokenizer)  # 3. tokenize once; batches are padded later
    run.precision, run.speedup = resolve_precision(config["PRECISION"], run.has_gpu, model.config.hidden_size)
    trainer, train_metrics = train(model, tokenizer, data, run)  # 4. train
    metrics = evaluate(trainer, data["test"]) | describe(run, model, data, trainer, train_metrics)  # 5. evaluate
    if not is_main():
        return metrics  # the main process prints and saves
    print_metrics(metrics)
    samples = config["SAMPLE_REVIEWS"]
    print_predictions(samples, predict(model, tokenizer, samples, precision=run.precision))  # 6. predict
    paths = save_outputs(model, tokenizer, metrics, trainer.state, Path(config["OUTPUT_DIR"]), config["MERGE"])  # 7.
    shutil.rmtree(Path(config["OUTPUT_DIR"]) / "checkpoints", ignore_errors=True)  # finished: nothing to resume
    log.info(f"Done: accuracy {metrics['eval_accuracy']:.4f}, F1 {metrics['eval_f1']:.4f}, trained in "
             f"{metrics['train_seconds']:.0f}s | " + " | ".join(f"{k}: {p}" for k, p in paths.items()))
    return metrics


@dataclass
class Run:
    """One training run's resolved state: the settings, and what this machine and launch made of them."""
    config: dict
    has_gpu: bool
    device: str
    preset: str
    backend: str | None
    fresh: bool
    quiet: bool
    precision: str = "fp32"
    speedup: float | None = None


def start_run(config: dict, args: argparse.Namespace) -> Run:
    """Find the device, join the other processes (torchrun), fill the preset, check the tracker; print the plan."""
    import torch

    has_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if has_gpu else "cpu"
    backend = join_processes(has_gpu)
    preset = apply_preset(config, has_gpu)
    log.info(f"Preset: {preset} ({'CUDA: ' + device if has_gpu else 'no GPU found'}); "
             f"settings: {json.dumps({k: v for k, v in config.items() if k != 'SAMPLE_REVIEWS'})}")
    check_tracker(config["REPORT_TO"], Path(config["OUTPUT_DIR"]))
    return Run(config, has_gpu, device, preset, backend, args.fresh, args.quiet)


# 1. Load and prepare the data ------------------------------------------------------------------------------------


def load_data(config: dict) -> DatasetDict:
    """The train and test splits, cleaned, with class ids, subsampled after a seeded shuffle."""
    data = prepare_data(load_raw_data(config["DATASET_NAME"]), config["TEXT_COLUMN"], config["LABEL_COLUMN"],
                        config["SEED"])
    data["train"] = subsample(data["train"], config["TRAIN_SAMPLES"], config["SEED"], "train")
    data["test"] = subsample(data["test"], config["EVAL_SAMPLES"], config["SEED"], "test")
    if config["EPOCHS"] == 1:
        data.pop("validation", None)  # one epoch: nothing to pick, nothing held out
    elif "validation" not in data and config["VALIDATION"]:
        try:
            held = data["train"].train_test_split(test_size=config["VALIDATION"], seed=config["SEED"],
                                                  stratify_by_column="labels")
        except ValueError as error:  # a class too small to be split both ways
            raise InputError(f"cannot hold out VALIDATION={config['VALIDATION']} of the training rows: "
                             f"{one_line(error)}") from error
        data["train"], data["validation"] = held["train"], held["test"]
    if "validation" in data:
        log.info(f"The best epoch is picked on {len(data['validation'])} validation rows; the test split is "
                 f"evaluated once, at the end")
    elif config["EPOCHS"] > 1:
        log.warning("warning: VALIDATION=0: the best epoch is picked on the test split, so its accuracy is optimistic")
    return data


def load_raw_data(dataset_name: str) -> DatasetDict:
    """Load a hub dataset, a local dataset folder, one data file, or the Stanford aclImdb/ folder."""
    from datasets import load_dataset, load_from_disk

    check_source(dataset_name, "dataset")
    path = Path(dataset_name).expanduser()
    try:
        if (path / "train" / "pos").is_dir():
            return load_aclimdb(path)
        if (path / "dataset_dict.json").exists():
            return load_from_disk(str(path))
        if path.is_file():
            kind = path.suffix.lower()
            if kind not in DATA_FILE_TYPES:
                raise InputError(f"dataset file {dataset_name!r} must end in one of {', '.join(DATA_FILE_TYPES)}")
            return load_dataset(DATA_FILE_TYPES[kind], data_files={"train": str(path)},
                                **({"delimiter": "\t"} if kind == ".tsv" else {}))
        return load_dataset(str(path) if path.exists() else dataset_name)
    except (OSError, ValueError) as error:  # the libraries' not-found, offline and format errors
        raise InputError(f"could not load dataset {dataset_name!r}: {one_line(error)}") from error


def load_aclimdb(path: Path) -> DatasetDict:
    """Read the original aclImdb/ folder (split/pos/*.txt, split/neg/*.txt); unsup/ is never read."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for split in ("train", "test"):
        texts, labels = [], []
        for label, folder in enumerate(("neg", "pos")):
            for file in sorted((path / split / folder).glob("*.txt")):
                texts.append(file.read_text(encoding="utf-8", errors="replace").replace("<br />", "\n"))
                labels.append(label)
        if texts:
            splits[split] = Dataset.from_dict({"text": texts, "label": labels})
    return DatasetDict(splits)


def prepare_data(raw: DatasetDict, text_column: str, label_column: str, seed: int,
                 names: list[str] | None = None) -> DatasetDict:
    """Keep train and test (carving a seeded test split if there is none), with clean text and class ids.

    Given the class names of a trained adapter (--eval-only), keep only the test split (or validation, or a
    single file whole) and map its labels onto those names."""
    from datasets import ClassLabel, DatasetDict, Features

    if "train" not in raw and names is None:
        raise InputError(f"the dataset has no 'train' split; it has: {', '.join(raw) or 'none'}")
    eval_split = next((s for s in ("test", "validation") if s in raw), None)
    if names is not None:
        data = DatasetDict({"test": raw[eval_split or next(iter(raw))]})  # a single file loads as 'train'
    else:
        keep = ("train", eval_split, "validation" if eval_split == "test" else None)  # never IMDB's 'unsupervised'
        data = DatasetDict({s: raw[s] for s in keep if s in raw})
    columns = next(iter(data.values())).column_names
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise InputError(f"{role} column {column!r} not found; the dataset has columns: {', '.join(columns)} "
                             f"(set --{role}-column)")
    data = data.select_columns([text_column, label_column])
    if text_column != "text":
        data = data.rename_column(text_column, "text")
    if label_column != "labels":
        data = data.rename_column(label_column, "labels")  # the name the Trainer passes to the model
    feature = next(iter(data.values())).features["labels"]
    before = {s: len(d) for s, d in data.items()}
    data = data.filter(lambda b: [isinstance(t, str) and bool(t.strip()) and label_key(l, feature) is not None
                                  for t, l in zip(b["text"], b["labels"])], batched=True, desc="Cleaning")
    for split, count in before.items():
        if count - len(data[split]):
            log.warning(f"Dropped {count - len(data[split])} of {count} {split} rows: empty text or unlabelled")
        if not len(data[split]):
            raise InputError(f"no usable rows left in the {split} split (empty texts or missing labels)")
    if names is None:
        names, label_map = class_names(data, feature, label_column)  # from the cleaned rows: every class has text
    else:
        label_map = {label_key(name, None): i for i, name in enumerate(names)} | (
            {0: 0, 1: 1} if names == list(ID2LABEL.values()) else {})  # binary data may say 0/1 or neg/pos
        unknown = {label_key(v, feature) for v in data["test"].unique("labels")} - set(label_map)
        if unknown:
            raise InputError(f"column {label_column!r} has labels the adapter does not know: "
                             f"{sorted(map(str, unknown))[:10]}; it knows {names}")
    data = data.map(lambda b: {"labels": [label_map[label_key(l, feature)] for l in b["labels"]]}, batched=True,
                    desc="Labelling", features=Features(next(iter(data.values())).features | {
                        "labels": ClassLabel(names=names)}))
    if eval_split is None and "train" in data:
        log.info("No test split: holding out a seeded, stratified 20% of train for evaluation")
        try:
            data = data["train"].train_test_split(test_size=0.2, seed=seed, stratify_by_column="labels")
        except ValueError as error:  # a class with a single row cannot be split both ways
            raise InputError(f"cannot hold out a stratified 20% for evaluation: {one_line(error)}") from error
    elif names is None and eval_split != "test":
        data["test"] = data.pop(eval_split)
    return data


def label_key(value, feature):
    """A raw label as an int or a lower-case name (neg read as negative); None for unlabelled (None, NaN, empty,
    or IMDB's -1)."""
    from datasets import ClassLabel

    if isinstance(feature, ClassLabel) and isinstance(value, int) and 0 <= value < feature.num_classes:
        value = feature.names[value]
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, float):
        return None if np.isnan(value) else int(value) if value.is_integer() else str(value)
    if isinstance(value, str):
        value = value.strip().lower()
        value = int(value) if value.lstrip("-").isdigit() else SENTIMENT_NAMES.get(value, value)  # neg: negative
    if value is None or value == -1 or value == "":
        return None
    return value


def class_names(data: DatasetDict, feature, label_column: str) -> tuple[list[str], dict]:
    """Name the classes found in the cleaned train rows, in a stable order; return (names, key -> class id)."""
    from datasets import ClassLabel

    keys = {label_key(v, feature) for v in data["train"].unique("labels")}
    unseen = {label_key(v, feature) for split in data if split != "train" for v in data[split].unique("labels")}
    if isinstance(feature, ClassLabel):
        unseen |= {label_key(i, feature) for i in range(feature.num_classes)}
    unseen -= keys
    if unseen:
        raise InputError(f"column {label_column!r} has classes with no usable training rows: "
                         f"{sorted(map(str, unseen))[:10]}; every class needs training examples")
    if len(keys) < 2:
        raise InputError(f"column {label_column!r} holds only one class ({sorted(map(str, keys))}) after dropping "
                         f"empty or unlabelled rows; classification needs at least two")
    if len(keys) > MAX_CLASSES:
        raise InputError(f"column {label_column!r} has {len(keys)} classes, more than {MAX_CLASSES}; is it the "
                         f"label column? (set --label-column)")
    if len({type(k) for k in keys}) > 1:
        raise InputError(f"column {label_column!r} mixes numbers and names: {sorted(map(str, keys))[:10]}")
    if isinstance(feature, ClassLabel):
        order = [label_key(i, feature) for i in range(feature.num_classes)]
    elif isinstance(next(iter(keys)), int):
        order = sorted(keys)  # 0..K-1, or star ratings 1..5
    else:  # sentiment names first, in their order (so 3 classes read negative, neutral, positive)
        order = [k for k in SENTIMENT_ORDER if k in keys] + sorted(keys - set(SENTIMENT_ORDER))
    names = [str(k) for k in order]
    if names in (["0", "1"], ["negative", "positive"]):
        names = list(ID2LABEL.values())  # binary sentiment keeps NEGATIVE/POSITIVE, as before
    return names, {key: i for i, key in enumerate(order)}


def subsample(data: Dataset, n: int, seed: int, split: str) -> Dataset:
    """Draw n rows after a seeded shuffle (IMDB is sorted by label); 0 or too many means all rows."""
    if n > len(data):
        log.warning(f"warning: {split} has {len(data)} rows, fewer than the {n} asked for; using all of them")
    if n == 0 or n >= len(data):
        return data
    return data.shuffle(seed=seed).select(range(n))

# 2. The model: a pretrained encoder, a head for the classes, LoRA around it ------------------------------------


def load_model(config: dict, names: list[str]):
    """The LoRA-wrapped model and its tokenizer, from a hub id or a local folder."""
    check_source(config["MODEL_NAME"], "model")
    model_name = local_or_hub(config["MODEL_NAME"])
    try:
        model = build_model(model_name, config["TARGET_MODULES"], config["LORA_R"], config["LORA_ALPHA"],
                            config["LORA_DROPOUT"], names, config["LORA_VARIANT"])
        tokenizer = load_tokenizer(model_name, config["MAX_LENGTH"],
                                   getattr(model.config, "max_position_embeddings", None), config["TRUNCATION"])
    except OSError as error:  # not found, offline and not cached, or no safetensors weights
        raise InputError(f"could not load model {config['MODEL_NAME']!r}: {one_line(error)}") from error
    return model, tokenizer


def build_model(model_name: str, target_modules: list[str] | None, lora_r: int, lora_alpha: int,
                lora_dropout: float, names: list[str] = tuple(ID2LABEL.values()), variant: str = "lora"):
    """Load the pretrained encoder with a head for the classes and wrap it in LoRA; the head trains fully."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    saved = AutoConfig.from_pretrained(model_name)
    other_head = any(a.endswith("ForSequenceClassification") for a in saved.architectures or []) and \
        saved.num_labels != len(names)  # e.g. an SST-2 checkpoint (2 labels) trained on 3 classes
    if other_head:
        log.warning(f"warning: the checkpoint's classification head has {saved.num_labels} labels and the data "
                    f"has {len(names)} classes; training a new head")
    model = AutoModelForSequenceClassification.from_pretrained(
        model_name, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        use_safetensors=True, ignore_mismatched_sizes=other_head)
    model_type = model.config.model_type
    targets = target_modules or DEFAULT_TARGETS.get(model_type)
    if targets is None:
        raise InputError(f"no default LoRA targets for model type {model_type!r}; pass --target-modules "
                         f"NAME [NAME ...] or --target-modules all-linear")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      modules_to_save=HEAD_MODULES.get(model_type, ["classifier", "score"]),
                      use_rslora=variant == "rslora", use_dora=variant == "dora")
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:  # peft's "target modules not found"
        raise InputError(f"LoRA targets {targets} do not fit {model_type!r}: {one_line(error)}") from error
    trainable, total = model.get_nb_trainable_parameters()
    log.info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model

# 3. Tokenize ------------------------------------------------------------------------------------------------------


def load_tokenizer(model_name: str, max_length: int, model_limit: int | None, truncation: str = "head"):
    """Load the tokenizer, clamp MAX_LENGTH to what the model and tokenizer can take, and set how reviews are cut."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer_limit = tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else None
    limit = min(x for x in (tokenizer_limit, model_limit, max_length) if x)
    if limit < max_length:
        log.warning(f"warning: MAX_LENGTH {max_length} is above the model's limit; using {limit}")
    specials = tokenizer.num_special_tokens_to_add()
    if limit <= specials:
        raise InputError(f"MAX_LENGTH {limit} leaves no room for the review: the model adds {specials} special "
                         f"tokens to each; use at least {specials + 1} (64 or more is useful)")
    tokenizer.model_max_length = limit  # both saved with the adapter, so --predict cuts reviews the same way
    tokenizer.init_kwargs["review_truncation"] = truncation
    return tokenizer


def encode(tokenizer, texts: list[str]) -> dict:
    """Tokenize once, without padding, and cut reviews longer than model_max_length as TRUNCATION says."""
    backend = tokenizer.backend_tokenizer  # the tokenizers library itself: the same cut with or without transformers
    backend.no_truncation()  # a call of the tokenizer may have left its own settings behind
    backend.no_padding()
    limit, rows = tokenizer.model_max_length, backend.encode_batch(texts)
    word, with_specials = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    before = with_specials.index(word[0])  # [CLS] and the like
    after = len(with_specials) - before - len(word)  # [SEP] and the like
    budget = limit - before - after
    head = budget // 4 if tokenizer.init_kwargs.get("review_truncation", "head") == "head+tail" else budget
    tail = budget - head  # Sun et al. 2019: the head and the tail keep IMDB's verdict best
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {key: [ids if len(ids) <= limit else ids[:before + head] + ids[len(ids) - tail - after:]
                  for ids in (getattr(row, field) for row in rows)]
            for key, field in fields.items() if key in tokenizer.model_input_names}


def tokenize(data: DatasetDict, tokenizer) -> DatasetDict:
    """Tokenize every split once; padding happens per batch in the collator."""
    def encode_batch(batch):
        encoded = encode(tokenizer, batch["text"])
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]  # for length-grouped batches
        return encoded

    return data.map(encode_batch, batched=True, remove_columns=["text"], desc="Tokenizing")

# 4. Train ---------------------------------------------------------------------------------------------------------


def train(model, tokenizer, data: DatasetDict, run: Run):
    """Train with the Trainer, resuming from the last checkpoint in OUTPUT_DIR unless --fresh."""
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback, Trainer

    config = run.config
    checkpoints = Path(config["OUTPUT_DIR"]) / "checkpoints"
    resume_from = resume_point(checkpoints, config, run.fresh)
    interrupt = interrupt_callback()
    stop_early = [EarlyStoppingCallback(config["EARLY_STOPPING"])] if config["EARLY_STOPPING"] and config[
        "EPOCHS"] > 1 else []  # it compares evaluations, and one epoch has only the final one
    trainer = Trainer(model=model, args=training_arguments(run, checkpoints, len(data["train"])),
                      train_dataset=data["train"], eval_dataset=data.get("validation", data["test"]).sort("length"),
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if run.has_gpu else None),
                      processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[interrupt, *stop_early])
    if run.quiet:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        interrupt.restore()  # also when training raises: Ctrl-C must not stay a "save and stop" request
    if interrupt.interrupted:
        log.warning(f"Checkpoint saved in {checkpoints}; run the same command again to resume, "
                    f"or pass --fresh to start over")
        leave_processes()  # every process stopped after the same step, so all of them get here
        raise SystemExit(130)
    return trainer, result.metrics


def training_arguments(run: Run, output_dir: Path, train_rows: int):
    """The Trainer's settings: ours, plus the choices that make it fast and correct here."""
    from transformers import TrainingArguments

    config, multi_epoch = run.config, run.config["EPOCHS"] > 1
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config["EPOCHS"],
        per_device_train_batch_size=config["BATCH_SIZE"],
        per_device_eval_batch_size=2 * config["BATCH_SIZE"],  # no gradients, so twice the batch fits
        learning_rate=config["LEARNING_RATE"],
        warmup_steps=config["WARMUP"],  # a float below 1 is a fraction of all steps
        weight_decay=config["WEIGHT_DECAY"],
        train_sampling_strategy="group_by_length",  # batches of similar length waste less on padding
        eval_strategy="epoch" if multi_epoch else "no",  # one epoch: the final evaluation is enough
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=multi_epoch,
        metric_for_best_model="accuracy",  # on the validation split: the test split is evaluated once, at the end
        lr_scheduler_type=config["SCHEDULER"],
        logging_steps=max(1, train_rows // config["BATCH_SIZE"] // 10),
        bf16=run.precision == "bf16",  # autocast: the weights, and so the saved adapter, stay fp32
        fp16=run.precision == "fp16",
        use_cpu=not run.has_gpu,  # tells the Trainer to run CPU autocast, and DDP over gloo under torchrun
        ddp_find_unused_parameters=False,  # every trainable weight (LoRA, head) is used each step: skip the graph walk
        average_tokens_across_devices=False,  # the loss is a mean per process already; else x N processes (peft)
        dataloader_num_workers=4 if run.has_gpu else 0,  # on CPU workers compete with the math for 2 cores
        seed=config["SEED"],
        report_to=config["REPORT_TO"],
        disable_tqdm=run.quiet or not is_main(),
    )


def resume_point(checkpoints: Path, config: dict, fresh: bool) -> str | None:
    """The checkpoint of an interrupted run with the same settings, or None; --fresh removes them first."""
    from transformers.trainer_utils import get_last_checkpoint

    run_file, main = checkpoints / "run_config.json", is_main()
    with main_process_first():  # the main process decides (and cleans up); the others then see what it left
        if fresh and checkpoints.exists() and main:
            shutil.rmtree(checkpoints)
            log.info("--fresh: removed the checkpoints of the earlier run")
        resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if resume_from and main:
            saved = json.loads(run_file.read_text()) if run_file.exists() else {}
            changed = sorted(k for k in config if k not in ("SAMPLE_REVIEWS", "MERGE") and saved.get(k) != config[k])
            if changed:
                raise InputError(f"{checkpoints} holds an interrupted run with different settings "
                                 f"({', '.join(changed)}); rerun it with the same settings, or pass --fresh")
            log.warning(f"Resuming the interrupted run from {resume_from}")  # shown even with --quiet
        if main:
            checkpoints.mkdir(parents=True, exist_ok=True)
            write_json(run_file, config)
    return resume_from


def interrupt_callback():
    """A Trainer callback that turns Ctrl-C or SIGTERM into 'save a checkpoint, then stop' at the next step."""
    from transformers import TrainerCallback

    class SaveOnInterrupt(TrainerCallback):  # the Trainer only takes callbacks as TrainerCallback subclasses
        def __init__(self):
            self.interrupted, self.previous = False, {}

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

        def handle(self, signum, frame):
            if self.interrupted and rank_and_world()[1] == 1:  # a second Ctrl-C stops at once; under torchrun
                raise KeyboardInterrupt  # a worker gets both the terminal's SIGINT and torchrun's forwarded one
            self.interrupted = True
            log.warning("\nInterrupted: saving a checkpoint after this step (press Ctrl-C again to quit now)")

        def on_step_end(self, args, state, control, **kwargs):
            if rank_and_world()[1] > 1:  # all processes must stop after the same step, or the save hangs
                import torch

                flag = torch.tensor([float(self.interrupted)], device=args.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                self.interrupted = bool(flag.item())
            if self.interrupted:
                control.should_save = control.should_training_stop = True

        def restore(self):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

    return SaveOnInterrupt()

# 5. Evaluate ------------------------------------------------------------------------------------------------------


def evaluate(trainer, dataset: Dataset) -> dict:
    """Evaluate the (best) model on dataset: loss, accuracy, F1, precision, recall, confusion matrix."""
    output = trainer.predict(dataset.sort("length"), metric_key_prefix="eval")  # sorted by length: less padding
    speed = {k: round(v, 4) for k, v in output.metrics.items() if k.endswith(("_runtime", "_per_second"))}
    return metrics_from(output.predictions, output.label_ids, list(trainer.model.config.id2label.values())) | speed


def metrics_from(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """The eval_* metrics and the confusion matrix of logits against labels; per-class F1 with 3+ classes."""
    matrix = confusion_matrix(labels, np.argmax(logits, axis=-1), len(names))
    found = scores(matrix)
    loss = -np.log(np.maximum(softmax(logits)[np.arange(len(labels)), labels], 1e-12)).mean()  # cross-entropy
    metrics = {f"eval_{k}": round(found[k], 4) for k in ("accuracy", "f1", "precision", "recall")}
    metrics["eval_loss"] = round(float(loss), 4)
    if len(names) > 2:  # two classes keep exactly the fields they always had
        metrics |= {"average": "macro", "per_class_f1": dict(zip(names, found["per_class_f1"]))}
    return metrics | {"confusion_matrix": matrix}


def compute_metrics(eval_pred) -> dict:
    """The Trainer's per-evaluation metrics: scores() of the confusion matrix, scalars only."""
    logits, labels = eval_pred
    metrics = scores(confusion_matrix(labels, np.argmax(logits, axis=-1), logits.shape[-1]))
    del metrics["per_class_f1"]  # the Trainer logs scalars; evaluate() adds the list for more than two classes
    return metrics


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = 2) -> list[list[int]]:
    """Counts of (true class, predicted class); for two classes [[tn, fp], [fn, tp]]."""
    return [[int(np.sum((labels == true) & (predictions == guess))) for guess in range(classes)]
            for true in range(classes)]


def scores(matrix: list[list[int]]) -> dict:
    """Accuracy, F1, precision, recall and per-class F1 from a confusion matrix: no hub, no extra package.

    With two classes F1, precision and recall are POSITIVE's; with more they are the macro average."""
    matrix = np.array(matrix)
    hits, predicted, actual = np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1)
    precision, recall = hits / np.maximum(predicted, 1), hits / np.maximum(actual, 1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(hits)),
                   where=precision + recall > 0)
    pick = (lambda x: float(x[1])) if len(hits) == 2 else (lambda x: float(x.mean()))
    return {"accuracy": float(hits.sum() / matrix.sum()), "f1": pick(f1), "precision": pick(precision),
            "recall": pick(recall), "per_class_f1": [round(float(x), 4) for x in f1]}


def describe(run: Run, model, data: DatasetDict, trainer, train_metrics: dict) -> dict:
    """What metrics.json records about the run besides the scores: sizes, speed, hardware, settings."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"train_samples": len(data["train"]), "eval_samples": len(data["test"]),
            "train_seconds": round(train_metrics["train_runtime"], 1),
            "train_samples_per_second": round(train_metrics["train_samples_per_second"], 2),  # totals over processes
            "trainable_params": trainable, "total_params": total, "device": run.device, "preset": run.preset,
            "precision": run.precision, "bf16_speedup": run.speedup and round(run.speedup, 2),
            "world_size": rank_and_world()[1], "backend": run.backend, "labels": list(model.config.id2label.values()),
            "lora_targets": short_names(model.peft_config["default"].target_modules),
            "date": time.strftime("%Y-%m-%d"), "config": run.config} | selection(trainer.state, data)


def selection(state, data: DatasetDict) -> dict:
    """How the kept epoch was chosen: on which split, its accuracy per epoch, and the epoch the Trainer kept."""
    accuracies = [h["eval_accuracy"] for h in state.log_history if "eval_accuracy" in h]
    if not accuracies:
        return {}
    steps_per_epoch = state.max_steps / state.num_train_epochs
    return {"selected_on": "validation" if "validation" in data else "test",
            "validation_samples": len(data["validation"]) if "validation" in data else 0,
            "accuracy_per_epoch": accuracies, "best_epoch": round(state.best_global_step / steps_per_epoch)}


# 6. Predict -------------------------------------------------------------------------------------------------------


def predict(model, tokenizer, texts: list[str], batch_size: int = 32, precision: str = "fp32"
            ) -> list[tuple[str, float]]:
    """Classify texts: (label, probability) for each, in input order."""
    probabilities = softmax(logits(model, tokenizer, texts, batch_size, precision))
    return [(model.config.id2label[int(i)], float(p[i])) for p, i in zip(probabilities, probabilities.argmax(-1))]


def logits(model, tokenizer, texts: list[str], batch_size: int = 32, precision: str = "fp32",
           progress: bool = False) -> np.ndarray:
    """The model's logits for texts, run longest first in batches (less padding), returned in input order."""
    from tqdm.auto import tqdm

    forward = model.session_forward if hasattr(model, "session_forward") else torch_forward(model, precision)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    found = np.zeros((len(texts), len(model.config.id2label)), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), unit=" batches", disable=not progress):
        rows = order[start:start + batch_size]
        found[rows] = forward(pad(encode(tokenizer, [texts[i] for i in rows]), tokenizer.pad_token_id))
    return found


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


def pad(encoded: dict, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch of token lists to its longest row: int64 arrays, ids with pad_id, mask and types with 0."""
    width = max(map(len, encoded["input_ids"]))
    return {key: np.array([row + [pad_id if key == "input_ids" else 0] * (width - len(row)) for row in rows],
                          dtype=np.int64) for key, rows in encoded.items()}


def softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities from logits, along the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def print_predictions(texts: list[str], predictions: list[tuple[str, float]]) -> None:
    """Print each review (shortened to one line) with its predicted label and probability."""
    for text, (label, score) in zip(texts, predictions):
        shown = " ".join(text.split())
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        print(f'Review: "{shown}"\nPrediction: {label} ({score:.2f})')

# 7. Save ----------------------------------------------------------------------------------------------------------


def save_outputs(model, tokenizer, metrics: dict, state, output_dir: Path, merge: bool) -> dict:
    """Write adapter/, metrics.json, training.png (and merged/) so an earlier run's files survive a crash."""
    paths = {"adapter": output_dir / "adapter", "metrics": output_dir / "metrics.json"}
    history = state.log_history
    if not any("eval_accuracy" in h for h in history):  # one epoch: the final evaluation is the only one
        history = history + [{"step": state.global_step, "eval_loss": metrics["eval_loss"],
                              "eval_accuracy": metrics["eval_accuracy"]}]
    tokenizer.init_kwargs["id2label"] = model.config.id2label  # an adapter folder has no model config to hold them
    write_dir(paths["adapter"], lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                             write_card(Path(tmp), paths["adapter"], metrics, "peft")))
    write_json(paths["metrics"], metrics | {"history": history})
    plot = save_plot(history, metrics["confusion_matrix"], list(model.config.id2label.values()),
                     output_dir / "training.png")
    if plot:
        paths["plot"] = plot
    if merge:  # last: merging folds LoRA into the base weights of this in-memory model
        merged = model.merge_and_unload()
        paths["merged"] = output_dir / "merged"
        write_dir(paths["merged"], lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                                write_card(Path(tmp), paths["merged"], metrics, "transformers")))
    return paths


def write_card(folder: Path, where: Path, metrics: dict, library: str) -> None:
    """Replace peft's empty template in folder (to become where) with a filled model card and hub metadata."""
    config, names = metrics["config"], list(metrics["labels"])
    data, base = json.dumps(config["DATASET_NAME"]), json.dumps(config["MODEL_NAME"])
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    load = {"peft": f"""classify = pipeline("text-classification", model="{where}", model_kwargs=labels)
# or, with peft's own class:
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
model = AutoPeftModelForSequenceClassification.from_pretrained("{where}", **labels)
classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{where}"))""",
            "transformers": f'classify = pipeline("text-classification", model="{where}")'}[library]
    rows = "\n".join(f"| {k.removeprefix('eval_')} | {metrics[k]:.4f} |" for k in
                     ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "eval_loss"))
    (folder / "README.md").write_text(f"""---
base_model: {base}
library_name: {library}
pipeline_tag: text-classification
tags: [sentiment-analysis, lora, fine_tune_sentiment]
model-index:
- name: {json.dumps(f"{config['MODEL_NAME']} LoRA sentiment")}
  results:
  - task: {{type: text-classification, name: Text Classification}}
    dataset: {{name: {data}, type: {data}, split: test}}
    metrics:
    - {{type: accuracy, value: {metrics['eval_accuracy']}}}
    - {{type: f1, value: {metrics['eval_f1']}{', args: {average: macro}' if len(names) > 2 else ''}}}
---

# LoRA sentiment adapter for `{config['MODEL_NAME']}`

Trained by `fine_tune_sentiment.py` on {metrics['date']}: a LoRA adapter plus a fully trained classification head{
', here merged into the base weights (no peft needed)' if library == 'transformers' else ''}.

- **Labels:** {', '.join(f'{i} = {name}' for i, name in enumerate(names))}
- **Data:** `{config['DATASET_NAME']}`, {metrics['train_samples']:,} training and \
{metrics['eval_samples']:,} evaluation rows; reviews longer than {config['MAX_LENGTH']} tokens cut as `{config['TRUNCATION']}`
- **LoRA:** r={config['LORA_R']}, alpha={config['LORA_ALPHA']}, dropout={config['LORA_DROPOUT']}, targets \
{metrics['lora_targets']}; {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters trained
- **Training:** {config['EPOCHS']} epoch(s), batch size {config['BATCH_SIZE']} x {metrics['world_size']} process(es), \
learning rate {config['LEARNING_RATE']}, precision {metrics['precision']}, on {metrics['device']}

## Evaluation ({metrics['eval_samples']:,} rows, {metrics['date']})

| metric | value |
|---|---|
{rows}

## How to use

```python
from transformers import pipeline
labels = {labels!r}
{load}
classify("This movie was fantastic!")
```

`pipeline()` cuts reviews longer than {config['MAX_LENGTH']} tokens at the head only; `fine_tune_sentiment.py
--predict` cuts them as training did (`{config['TRUNCATION']}`).
""")


def save_plot(history: list, matrix: list, names: list[str], path: Path) -> Path | None:
    """Plot train/eval loss and eval accuracy per step next to the confusion matrix."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("warning: matplotlib is not installed, so no plot was drawn (pip install matplotlib)")
        return None
    fig, (curves, cells) = plt.subplots(1, 2, figsize=(11, 4 + len(names) // 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-"), ("eval_accuracy", "s--")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            curves.plot(*zip(*points), style, label=key.replace("_", " "))
    curves.set(xlabel="step", title="Training")
    curves.legend()
    cells.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(np.array(matrix)):
        cells.text(col, row, str(count), ha="center", va="center", fontsize=14 if len(names) < 6 else 8)
    ticks = list(range(len(names)))
    cells.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names,
              xlabel="predicted", ylabel="true", title="Confusion matrix (eval)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path

# The other modes: the saved adapter at work ---------------------------------------------------------------------


def run_predict(config: dict, texts: list[str]) -> None:
    """--predict: classify the given texts with the saved adapter, without training."""
    reviews = read_stdin_reviews() if texts == ["-"] else texts
    if not reviews:
        raise InputError("no reviews on stdin; pass one review per line, or the texts after --predict")
    model, tokenizer, precision = load_for_inference(config)
    print_predictions(reviews, predict(model, tokenizer, reviews, precision=precision))


def run_eval_only(config: dict, quiet: bool) -> dict:
    """--eval-only: evaluate the saved adapter on DATASET_NAME without training; write OUTPUT_DIR/eval_metrics.json."""
    output_dir = Path(config["OUTPUT_DIR"])
    model, tokenizer, precision = load_for_inference(config)
    names = list(model.config.id2label.values())
    data = prepare_data(load_raw_data(config["DATASET_NAME"]), config["TEXT_COLUMN"], config["LABEL_COLUMN"],
                        config["SEED"], names=names)["test"]
    data = subsample(data, config["EVAL_SAMPLES"] or 0, config["SEED"], "test")  # unset: every row, not the preset's
    started = time.perf_counter()
    found = logits(model, tokenizer, data["text"], eval_batch_size(config), precision, progress=not quiet)
    seconds = time.perf_counter() - started
    metrics = metrics_from(found, np.array(data["labels"]), names) | {
        "eval_runtime": round(seconds, 4), "eval_samples_per_second": round(len(data) / seconds, 3),
        "eval_samples": len(data), "dataset": config["DATASET_NAME"],
        "adapter": str((output_dir / "adapter").resolve()), "precision": precision,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print_metrics(metrics)
    write_json(output_dir / "eval_metrics.json", metrics)  # never metrics.json: that one describes the training
    log.info(f"Done: accuracy {metrics['eval_accuracy']:.4f} on {len(data)} rows | "
             f"eval_metrics: {output_dir / 'eval_metrics.json'}")
    return metrics


def run_predict_file(config: dict, source: str, target: str | None, quiet: bool) -> None:
    """--predict-file: score every row of a file with the saved adapter, streaming, into --predictions."""
    import pandas as pd
    from tqdm.auto import tqdm

    source = Path(source).expanduser()
    target = Path(target).expanduser() if target else Path(config["OUTPUT_DIR"]) / "predictions.csv"
    if not source.is_file():
        raise InputError(f"input file {str(source)!r} does not exist")
    if source.suffix.lower() not in PREDICT_FILE_TYPES:
        raise InputError(f"input file {str(source)!r} must end in one of {', '.join(PREDICT_FILE_TYPES)}")
    if target.suffix.lower() not in PREDICTIONS_FILE_TYPES:
        raise InputError(f"--predictions {str(target)!r} must end in one of {', '.join(PREDICTIONS_FILE_TYPES)}")
    if not target.parent.is_dir():
        raise InputError(f"the folder of --predictions {str(target)!r} does not exist")
    if target.resolve() == source.resolve():
        raise InputError("--predictions must not be the input file")
    column = config["TEXT_COLUMN"]
    chunks = read_chunks(source, column)
    first = next(chunks, None)
    if first is None:
        raise InputError(f"could not read {str(source)!r}: no rows")
    if column not in first.columns:
        raise InputError(f"text column {column!r} not found in {str(source)!r}; it has columns: "
                         f"{', '.join(map(str, first.columns))} (set --text-column)")
    model, tokenizer, precision = load_for_inference(config)
    tmp, rows, empty, started = target.with_name(f".{target.name}.tmp"), 0, 0, time.perf_counter()
    try:
        with open_writer(tmp, target.suffix.lower()) as write, tqdm(unit=" rows", disable=quiet) as bar:
            for chunk in itertools.chain([first], chunks):  # a row that cannot be read or written: InputError
                usable = [isinstance(t, str) and bool(t.strip()) for t in chunk[column]]
                texts = list(chunk[column][usable])
                scored = iter(predict(model, tokenizer, texts, eval_batch_size(config), precision))
                pairs = [next(scored) if ok else (None, None) for ok in usable]  # typed: a chunk may be all empty
                try:
                    write(chunk.assign(
                        predicted_label=pd.Series([p[0] for p in pairs], dtype="string", index=chunk.index),
                        predicted_score=pd.Series([p[1] for p in pairs], dtype="float64", index=chunk.index)))
                except InputError as error:
                    raise InputError(f"{str(source)!r}, rows {rows + 1}-{rows + len(chunk)}: {error}") from error
                rows, empty = rows + len(chunk), empty + usable.count(False)
                bar.update(len(chunk))
        os.replace(tmp, target)  # only a complete file takes the name; an earlier one stays until then
    finally:
        tmp.unlink(missing_ok=True)
    if empty:
        log.warning(f"warning: {empty} of {rows} rows have no text; their predicted_label and predicted_score "
                    f"are empty")
    seconds = time.perf_counter() - started
    print(f"Scored {rows} rows in {seconds:.1f}s ({rows / max(seconds, 1e-9):.0f} rows/s): {target}")


def run_export_onnx(config: dict) -> Path:
    """--export-onnx: write OUTPUT_DIR/onnx/ from the saved adapter: fp32 and int8 models, tokenizer, config."""
    need_package("onnx", "onnxruntime")
    model, tokenizer = load_adapter(Path(config["OUTPUT_DIR"]) / "adapter")
    target = Path(config["OUTPUT_DIR"]) / "onnx"
    write_dir(target, lambda tmp: export_onnx(model.merge_and_unload().cpu(), tokenizer, Path(tmp)))
    log.info(f"Done: exported to {target} (model.onnx, model_int8.onnx); use it with --runtime onnx-int8")
    return target


def export_onnx(model, tokenizer, folder: Path) -> None:
    """Write model.onnx (fp32, dynamic batch and length), model_int8.onnx (int8 weights), the tokenizer, config."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir()
    sample = pad(encode(tokenizer, ["a review", "a longer review than that"]), tokenizer.pad_token_id)
    inputs = list(sample)  # input_ids, attention_mask (and token_type_ids): the order forward() takes them in
    model.config.return_dict = False  # a tuple out, so the graph's one output is the logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes, about what we do not use
        torch.onnx.export(model.eval(), tuple(torch.from_numpy(sample[k]) for k in inputs), str(folder / "model.onnx"),
                          input_names=inputs, output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "tokens"} for k in inputs} | {"logits": {0: "batch"}})
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model_int8.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True)  # 7-bit weights: CPUs without VNNI add pairs of products
    # in 16 bits, where 8-bit weights can saturate; with 7 they cannot, so every x86 class gives the same answer
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "config.json", {
        "id2label": model.config.id2label, "max_length": tokenizer.model_max_length, "inputs": inputs,
        "truncation": tokenizer.init_kwargs.get("review_truncation", "head"), "pad_token_id": tokenizer.pad_token_id,
        "base_model": model.config.name_or_path, "date": time.strftime("%Y-%m-%d")})


def load_onnx(folder: Path, int8: bool):
    """An exported model and its tokenizer, without torch or transformers: onnxruntime and tokenizers stand in."""
    from types import SimpleNamespace

    if not (folder / "config.json").exists():
        raise InputError(f"no exported model in {folder}; run python fine_tune_sentiment.py --export-onnx first")
    need_package("onnxruntime")
    import onnxruntime
    from tokenizers import Tokenizer

    saved = json.loads((folder / "config.json").read_text())
    session = onnxruntime.InferenceSession(str(folder / ("model_int8.onnx" if int8 else "model.onnx")),
                                           providers=["CPUExecutionProvider"])
    model = SimpleNamespace(config=SimpleNamespace(id2label={int(i): n for i, n in saved["id2label"].items()}),
                            session_forward=lambda batch: session.run(["logits"], batch)[0])
    tokenizer = SimpleNamespace(backend_tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
                                model_max_length=saved["max_length"], model_input_names=saved["inputs"],
                                init_kwargs={"review_truncation": saved["truncation"]},
                                pad_token_id=saved["pad_token_id"])  # what encode() and pad() read
    return model, tokenizer


def need_package(*modules: str) -> None:
    """Fail in one line, with the install command, when an optional package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"the ONNX runtime needs {', '.join(missing)}: pip install -r requirements-onnx.txt")


def eval_batch_size(config: dict) -> int:
    """Inference batches: twice the training batch, as in the Trainer's evaluation."""
    return 2 * (config["BATCH_SIZE"] or PRESETS["cpu"]["BATCH_SIZE"])


def load_for_inference(config: dict):
    """What every inference mode starts with: the saved model, its tokenizer, and the precision to run them in."""
    if config["RUNTIME"] != "torch":  # the exported model: no torch, transformers or peft is imported
        model, tokenizer = load_onnx(Path(config["OUTPUT_DIR"]) / "onnx", int8=config["RUNTIME"] == "onnx-int8")
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
        yield from pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", dtype=str, keep_default_na=False,
                               chunksize=rows)
    elif kind == ".jsonl":
        yield from pd.read_json(path, lines=True, dtype=False, chunksize=rows)
    elif kind == ".json":  # one JSON array cannot be read in pieces; .jsonl can
        frame = pd.read_json(path, dtype=False)
        yield from (frame[start:start + rows] for start in range(0, max(len(frame), 1), rows))
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        yield from (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=rows))
    else:  # .txt: one review per line
        with open(path, encoding="utf-8", errors="replace", newline="") as lines:
            while chunk := [line.rstrip("\r\n") for line in itertools.islice(lines, rows)]:
                yield pd.DataFrame({text_column: chunk})


@contextmanager
def open_writer(path: Path, kind: str):
    """Yield write(frame), which appends rows to path as csv, jsonl or parquet (kind); close it at the end."""
    if kind == ".parquet":
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
        return
    with open(path, "w", encoding="utf-8", newline="") as out:
        def write(frame):
            if kind == ".csv":
                frame.to_csv(out, header=out.tell() == 0, index=False)
            elif len(frame):
                out.write(frame.to_json(orient="records", lines=True, force_ascii=False).rstrip("\n") + "\n")

        yield write

# The machinery: flags, logging, processes, precision, sources, files ------------------------------------------


class InputError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then either train (default) or predict with a saved adapter; return the exit code."""
    config, args = parse_args(argv)
    inference = bool(args.predict or args.eval_only or args.predict_file)
    setup_logging(args.quiet, transformers=not (inference and config["RUNTIME"] != "torch"))
    try:
        if (inference or args.export_onnx) and rank_and_world()[1] > 1:
            raise InputError("--predict, --eval-only, --predict-file and --export-onnx run in one process; run them "
                             "with python, not torchrun")
        modes = [flag for flag, on in (("--predict", args.predict), ("--eval-only", args.eval_only),
                                       ("--predict-file", args.predict_file), ("--export-onnx", args.export_onnx)) if on]
        if len(modes) > 1:
            raise InputError(f"{' and '.join(modes)} are separate modes; run one at a time")
        if args.predictions and not args.predict_file:
            raise InputError("--predictions names the output of --predict-file; pass --predict-file IN too")
        if args.predict:
            run_predict(config, args.predict)
        elif args.eval_only:
            run_eval_only(config, args.quiet)
        elif args.predict_file:
            run_predict_file(config, args.predict_file, args.predictions, args.quiet)
        elif args.export_onnx:
            run_export_onnx(config)
        else:
            run_training(config, args)
            leave_processes()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except InputError as error:
        if args.debug:
            raise
        if is_main():  # the other processes meet the same input, so one message is enough
            print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Build one flag per setting (from the constants block) and return (settings, run options)."""
    comments = dict(re.findall(r"^([A-Z_]+):.*?#\s*(.+)$", Path(__file__).read_text(), re.M))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--SETTING VALUE ...] [--predict TEXT ...] (see --help)",
                                     allow_abbrev=False)
    for name in SETTINGS:
        kind, default = str(__annotations__[name]), globals()[name]  # the annotation is text, e.g. "int | None"
        flag = "--" + name.lower().replace("_", "-")
        helptext = f"{comments.get(name, '')} (default: {default!r})".replace("%", "%%")
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=name, nargs="+", default=default, metavar="TEXT", help=helptext)
        else:
            parser.add_argument(flag, dest=name, type=value_parser(name, kind), default=default, help=helptext)
    parser.add_argument("--predict", nargs="+", metavar="TEXT", help="load OUTPUT_DIR/adapter and classify TEXT "
                        "without training; '-' reads one review per line from stdin")
    parser.add_argument("--eval-only", action="store_true", help="evaluate OUTPUT_DIR/adapter on DATASET_NAME (its "
                        "test split, or a whole data file) into OUTPUT_DIR/eval_metrics.json, without training")
    parser.add_argument("--predict-file", metavar="IN", help="score every row of IN (.csv .tsv .jsonl .json .parquet "
                        ".txt) with OUTPUT_DIR/adapter; the text is in TEXT_COLUMN")
    parser.add_argument("--predictions", metavar="OUT", help="where --predict-file writes (.csv .jsonl .parquet; "
                        "default OUTPUT_DIR/predictions.csv): every input row and column, plus the prediction")
    parser.add_argument("--export-onnx", action="store_true", help="export OUTPUT_DIR/adapter to OUTPUT_DIR/onnx/ "
                        "(model.onnx, model_int8.onnx, tokenizer) for --runtime onnx and onnx-int8, or onnxruntime")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run; start over")
    parser.add_argument("--quiet", action="store_true", help="print only the metrics and the predictions")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    return {name: getattr(args, name) for name in SETTINGS}, args


def value_parser(name: str, kind: str) -> callable:
    """Return an argparse type that checks a flag value against the setting's type and range."""
    base = int if "int" in kind else float if "float" in kind else str

    def parse(text: str):
        if "None" in kind and text.lower() in ("none", "auto"):
            return None
        if name in CHOICES:
            if text.lower() not in CHOICES[name]:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(CHOICES[name])}, got {text!r}")
            return text.lower()
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if base is not str and (value < 0 or not np.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
        if name in ("LEARNING_RATE", "EPOCHS", "BATCH_SIZE", "LORA_R", "MAX_LENGTH") and value == 0:
            raise argparse.ArgumentTypeError("must be greater than 0")
        if name in ("WARMUP", "LORA_DROPOUT", "VALIDATION") and value >= 1:
            raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
        return value

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def apply_preset(config: dict, has_gpu: bool) -> str:
    """Fill the settings left at None from the hardware preset; return the preset's name."""
    preset = "gpu" if has_gpu else "cpu"
    for name, value in PRESETS[preset].items():
        if config[name] is None:
            config[name] = value
    return preset


def setup_logging(quiet: bool, transformers: bool = True) -> None:
    """Our messages go to stderr plainly; the libraries' routine chatter is turned down at the source."""
    import datasets

    logging.basicConfig(format="%(message)s", stream=sys.stderr, force=True)
    main = is_main()
    quiet = quiet or not main  # under torchrun only the main process reports; the others show only errors
    log.setLevel(logging.ERROR if not main else logging.WARNING if quiet else logging.INFO)
    if quiet:
        datasets.disable_progress_bars()
    if transformers:  # the ONNX runtime never imports it (~5 s)
        import transformers

        transformers.logging.set_verbosity_error() if quiet else transformers.logging.set_verbosity_warning()
        if quiet:
            transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids the fork warning from the tokenizers crate
    for noise in (".*is_gradient_checkpointing.*", ".*null_placement.*"):  # from peft and pyarrow internals
        warnings.filterwarnings("ignore", message=noise, category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator.*")  # the Trainer's default, on CPU


def print_metrics(metrics: dict) -> None:
    """Print the metrics block: one 'name: value' per line, easy to scan and to parse."""
    print("=== eval metrics ===")
    for key in ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "eval_loss"):
        print(f"{key}: {metrics[key]:.4f}")
    if len(metrics["confusion_matrix"]) == 2:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        print(f"confusion_matrix: [[tn={tn}, fp={fp}], [fn={fn}, tp={tp}]]")
    else:  # rows are the true classes, columns the predicted ones, both in class order
        print(f"per_class_f1: {json.dumps(metrics['per_class_f1'])}")
        print(f"confusion_matrix: {json.dumps(metrics['confusion_matrix'])}")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes; torchrun and accelerate launch set both, else 0 and 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True in the process that prints and saves: the only one, or rank 0 under torchrun."""
    return rank_and_world()[0] == 0


def join_processes(has_gpu: bool) -> str | None:
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPU) and share the cores; return the backend."""
    import torch
    from accelerate import PartialState

    if "LOCAL_RANK" not in os.environ:  # a plain python run; torchrun sets it, also for one process
        return None
    PartialState(cpu=not has_gpu)  # what the Trainer does later; done now so data preparation can take turns
    if not has_gpu:  # torchrun gives each process 1 thread; a process should get its share of the cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return torch.distributed.get_backend()


@contextmanager
def main_process_first():
    """Run the block on the main process first (it writes the caches), then on the others (they read them)."""
    import torch.distributed as dist

    together, main = dist.is_available() and dist.is_initialized(), is_main()
    if together and not main:
        barrier()
    yield
    if together and main:
        barrier()


def leave_processes() -> None:
    """Under torchrun, wait for every process (the main one saves last), then close the process group: a process
    that exits while the others still use the group can abort in its teardown."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    barrier()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process. One that failed has printed why (torchrun then ends the rest); a timeout says so."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError as error:  # gloo and NCCL raise DistBackendError, a RuntimeError
        if re.search(r"time[d ]?\s?out", str(error), re.I):
            print(f"error: process {rank_and_world()[0]} timed out waiting for the other processes "
                  f"({one_line(error)}); one of them is stuck or stopped without an error", file=sys.stderr)
        raise SystemExit(1) from None


def from_main(value):
    """Under torchrun, every process takes the main process's value, so they all decide alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cpu_may_have_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """False on an x86 Linux CPU whose flags lack avx512_bf16 and amx_bf16 (bf16 is emulated there, many times
    slower, and its first use alone takes seconds); True where that is not ruled out, so the probe decides."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpuinfo.exists():
        return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), None)
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bf16_speedup(width: int, seconds: float = 0.2) -> float:
    """Time width-wide matmuls on this CPU in fp32 and in bf16; return how many times faster bf16 ran."""
    import torch

    width = max(width, 256)  # at a tiny test model's width the timing would be all overhead
    x, w = torch.randn(128, width), torch.randn(width, width)

    def seconds_per_call(dtype) -> float:
        a, b = x.to(dtype), w.to(dtype)
        a @ b  # warm-up: the first bf16 call picks and builds its kernel
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds:  # without fast bf16 one call can take 0.1 s
            a @ b
            calls += 1
        return (time.perf_counter() - start) / calls

    return seconds_per_call(torch.float32) / seconds_per_call(torch.bfloat16)


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
    import torch

    speedup, note = None, ""
    if has_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
        precision = choose_precision(requested, True, torch.cuda.is_bf16_supported())
    else:
        if requested in ("auto", "bf16") and not cpu_may_have_fast_bf16():
            note = "; no avx512_bf16 or amx_bf16 in this CPU's flags, so bf16 was not timed"
        elif requested in ("auto", "bf16"):  # the main process times; the others take its result
            speedup = from_main(bf16_speedup(width) if is_main() else None)
            note = f"; bf16 matmuls ran {speedup:.2f}x as fast as fp32 on this CPU"
        precision = choose_precision(requested, False, speedup=speedup)
    log.info(f"Precision: {precision} ({requested}{note})")
    return precision, speedup


def check_source(name: str, what: str) -> None:
    """Fail fast on a missing local path, or on a hub id when the hub cannot be reached."""
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_FILE_TYPES or "\\" in name:
        raise InputError(f"{what} {name!r} does not exist; pass an existing local path or a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return  # the libraries look in the local cache and fail fast themselves
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct probe says nothing when traffic goes through a proxy
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        raise InputError(f"cannot reach the Hugging Face hub to fetch {what} {name!r}; pass a local folder "
                         f"instead (see README 'Try it without internet'), or set HF_HUB_OFFLINE=1 to use "
                         f"the local cache") from None


def check_tracker(report_to: str, output_dir: Path) -> None:
    """Fail fast, in one line, on a tracker the Trainer does not know or whose package is missing."""
    import importlib.util

    from transformers.integrations import INTEGRATION_TO_CALLBACK

    if report_to in ("none", "all"):
        return
    if report_to not in INTEGRATION_TO_CALLBACK:
        raise InputError(f"unknown REPORT_TO {report_to!r}; use none, all or one of: "
                         f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
    module, package = TRACKER_PACKAGES.get(report_to, (report_to, report_to))
    if importlib.util.find_spec(module) is None:
        raise InputError(f"REPORT_TO {report_to!r} needs a package that is not installed: pip install {package}")
    if report_to == "tensorboard":  # the Trainer's default is inside checkpoints/, which a finished run removes
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "runs")


def local_or_hub(name: str) -> str:
    """An existing local path made absolute (the adapter records it, and --predict may run elsewhere), else name."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def short_names(targets: set | str) -> list[str]:
    """LoRA's target modules as short names (all-linear lists every full path)."""
    return [targets] if isinstance(targets, str) else sorted({name.split(".")[-1] for name in targets})


def one_line(error: BaseException) -> str:
    """The first line of an exception message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a crash leaves the old file, never half of the new one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_dir(path: Path, write) -> None:
    """Fill a temporary folder with write(tmp), then swap it in for path; the old copy goes only after."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(str(tmp))
    except BaseException:  # a failed or interrupted write leaves the old folder, and no half one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
