"""Fine-tune a pretrained transformer for sentiment with LoRA, in one readable file.

Loads IMDB, tokenizes it for DistilBERT, wraps the model in a PEFT LoRA adapter (about 1% of the
weights train, the classification head included), trains with the Hugging Face Trainer in the precision
this hardware is fast at, reports accuracy, F1, loss and the confusion matrix, calibrates the probabilities,
prints sample predictions and saves a reusable adapter. Two classes or more, as the data says; long reviews keep
head and tail. predict_sentiment.py puts the saved model to work (predict, score files, serve, Ray).

    python fine_tune_sentiment.py                                   # sized for this machine (preset printed)
    python fine_tune_sentiment.py --train-samples 4000 --epochs 2   # every constant below is a flag
    torchrun --nproc_per_node 2 fine_tune_sentiment.py              # the same, on 2 processes or GPUs
    python fine_tune_sentiment.py --search 8                        # try 8 settings (Optuna), train the best
    python fine_tune_sentiment.py --eval-only --dataset-name new.csv     # evaluate the saved adapter on new data
    python fine_tune_sentiment.py --export-onnx                          # for predict_sentiment.py --runtime onnx-int8
    python predict_sentiment.py --predict "This movie was fantastic!"  # (this file takes that flag too)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import shlex
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

import predict_sentiment as inference
from predict_sentiment import (DATA_FILE_TYPES, ID2LABEL, InputError, add_mode_flags, add_settings, encode,
                               load_adapter, load_for_inference, logits, need_package, one_line, pad, predict,
                               print_predictions, softmax)

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
CLASS_WEIGHTS: str = "none"  # none, or balanced: each class's loss weighted by rows / (classes x its rows)
CALIBRATE: bool = True  # fit a temperature on the validation split so the probabilities mean what they say
# LoRA
LORA_R: int = 8  # rank of the low-rank update; 4-16 is typical
LORA_ALPHA: int = 16  # update scale is alpha / r; 2 * r is the usual choice
LORA_DROPOUT: float = 0.1  # dropout on LoRA's input: +0.006 test accuracy over 0 on the stand-in (bench/README.md)
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
SEARCH_SPACE = {  # --search N: each trial draws its settings from these (Optuna's TPE sampler, seeded by SEED)
    "LEARNING_RATE": (1e-4, 3e-3),  # log-uniform between the two
    "LORA_R": (4, 8, 16),
    "LORA_ALPHA": (1, 2),  # times LORA_R
    "TARGET_MODULES": ("default", "all-linear"),  # default: the attention query and value projections
    "EPOCHS": (1, 2, 3),
    "LORA_DROPOUT": (0.0, 0.1),
}
PRESETS = {  # fills the settings left at None; a value set in the file or on the command line wins
    "gpu": dict(TRAIN_SAMPLES=0, EVAL_SAMPLES=0, MAX_LENGTH=512, EPOCHS=3, BATCH_SIZE=32),  # full IMDB, 25k/25k
    "cpu": dict(TRAIN_SAMPLES=2000, EVAL_SAMPLES=1000, MAX_LENGTH=256, EPOCHS=1, BATCH_SIZE=16),  # 16.8 min, 2 AVX2 cores
}
DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"], "bert": ["query", "value"], "roberta": ["query", "value"]}
HEAD_MODULES = {"distilbert": ["pre_classifier", "classifier"], "bert": ["pooler", "classifier"]}  # trained + saved
SENTIMENT_NAMES = {"neg": "negative", "negative": "negative", "neu": "neutral", "neutral": "neutral",
                   "pos": "positive", "positive": "positive"}  # string labels read as these, case-insensitively
SENTIMENT_ORDER = ["negative", "neutral", "positive"]  # their class order; other names follow, sorted
MAX_CLASSES = 100  # more is probably the wrong column
CHOICES = {"PRECISION": ("auto", "fp32", "bf16", "fp16"), "TRUNCATION": ("head+tail", "head"),  # one of a few words
           "SCHEDULER": ("linear", "cosine"), "CLASS_WEIGHTS": ("none", "balanced"),
           "LORA_VARIANT": ("lora", "rslora", "dora"), "RUNTIME": ("torch", "onnx", "onnx-int8")}
TRACKER_PACKAGES = {"comet_ml": ("comet_ml", "comet-ml"), "azure_ml": ("azureml", "azureml-core")}  # else name, name
POSITIVE = ("LEARNING_RATE", "EPOCHS", "BATCH_SIZE", "LORA_R", "MAX_LENGTH")  # settings that must be above 0
log = logging.getLogger("sentiment")  # predict_sentiment's logger too


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
    metrics = evaluate(trainer, data, config["CALIBRATE"]) | describe(run, model, data, trainer, train_metrics)  # 5.
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
    class_weights: list[float] | None = None


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
    make_steps_cheaper(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def make_steps_cheaper(model) -> None:
    """Two rewrites of the training step that cut its time on a CPU (bench/lora_step.py); model, loss and rates stay:
    - every dropout (peft's on each LoRA input, and the encoder's own) draws its mask from 16 random bits an element,
      ~4x cheaper than torch's bernoulli_ (p rounded to 1/65536); layers that read the same tensor (query, key and
      value) share its mask, as one dropout of their common input;
    - each fp32 LoRA layer adds its x A^T B^T * scale in one autograd function: the scale is applied to the rank-r
      product, the sum is one addmm, and the weight gradients are taken in the orientation CPU matmuls are fast at.
    The masks are another draw of the same rate; the LoRA layers compute peft's sums in another order (tested).
    The saved adapter is plain peft; bf16/fp16 (autocast), DoRA and LoRA biases keep peft's own forward."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    dropout, fused = step_classes()
    shared = {}
    for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        for name, old in layer.lora_dropout.items():
            if isinstance(old, torch.nn.Dropout) and 0 < old.p < 1:
                layer.lora_dropout[name] = dropout(old.p, shared)
        if type(layer) is LoraLinear and not layer.fan_in_fan_out:
            layer.lora_variant.update({name: fused() for name in layer.lora_A if name not in layer.lora_variant
                                       and not layer.lora_bias[name]})
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and 0 < child.p < 1:
                setattr(module, name, dropout(child.p, None))  # the encoder's own: attention reads its .p only


@functools.cache
def step_classes():
    """make_steps_cheaper's dropout module and LoRA variant (made on first use: torch is imported lazily)."""
    import torch
    from peft.tuners.lora.layer import LoraVariant

    class Dropout(torch.nn.Module):
        def __init__(self, p: float, last: dict | None):
            super().__init__()
            self.p, self.last = p, last  # last: the latest input and its mask, shared by the LoRA layers

        def forward(self, x):
            if not self.training:
                return x
            if self.last is None or self.last.get("input", lambda: None)() is not x:
                bits = torch.randint(-2**63, 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64, device=x.device)
                threshold = round(self.p * 65536)
                keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= threshold - 32768
                mask = keep.to(x.dtype).mul_(65536 / (65536 - threshold))
                if self.last is None:
                    return x * mask
                self.last.update(input=weakref.ref(x), mask=mask)  # weak: the step's tensors are freed as usual
            return x * self.last["mask"]

    class LoraProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, result, a, b, scale):  # result + (x a^T * scale) b^T
            x2 = x.reshape(-1, x.shape[-1])
            low = (x2 @ a.t()).mul_(scale)
            ctx.save_for_backward(x2, low, a, b)
            ctx.scale, ctx.shape = scale, x.shape
            return torch.addmm(result.reshape(-1, result.shape[-1]), low, b.t()).view(result.shape)

        @staticmethod
        def backward(ctx, grad):
            x2, low, a, b = ctx.saved_tensors
            grad2 = grad.reshape(-1, grad.shape[-1])
            grad_low = (grad2 @ b).mul_(ctx.scale)
            grad_x = (grad_low @ a).view(ctx.shape) if ctx.needs_input_grad[0] else None
            return grad_x, grad, grad_low.t() @ x2, (low.t() @ grad2).t(), None

    class FusedLora(LoraVariant):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            pass

        @staticmethod
        def merge_safe(module, active_adapter, orig_weight):
            return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module, active_adapter, orig_weight):
            orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module, active_adapter, orig_weight):
            return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            a, b = module.lora_A[active_adapter], module.lora_B[active_adapter]
            dropped, scale = module.lora_dropout[active_adapter](x), module.scaling[active_adapter]
            if torch.is_autocast_enabled(x.device.type) or not x.dtype == a.weight.dtype == result.dtype:
                return result + b(a(dropped)) * scale  # peft's vanilla LoRA
            return LoraProduct.apply(dropped, result, a.weight, b.weight, scale)

    return Dropout, FusedLora


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


def tokenize(data: DatasetDict, tokenizer) -> DatasetDict:
    """Tokenize every split once; padding happens per batch in the collator."""
    def encode_batch(batch):
        encoded = encode(tokenizer, batch["text"])
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]  # for length-grouped batches
        return encoded

    return data.map(encode_batch, batched=True, remove_columns=["text"], desc="Tokenizing")

# 4. Train --------------------------------------------------------------------------------------------------------


def train(model, tokenizer, data: DatasetDict, run: Run):
    """Train with the Trainer, resuming from the last checkpoint in OUTPUT_DIR unless --fresh."""
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback, Trainer

    config = run.config
    checkpoints = Path(config["OUTPUT_DIR"]) / "checkpoints"
    resume_from = resume_point(checkpoints, config, run.fresh)
    interrupt = interrupt_callback()
    if config["CLASS_WEIGHTS"] == "balanced":
        run.class_weights = class_weights(data["train"]["labels"], len(model.config.id2label))
    stop_early = [EarlyStoppingCallback(config["EARLY_STOPPING"])] if config["EARLY_STOPPING"] and config[
        "EPOCHS"] > 1 else []  # it compares evaluations, and one epoch has only the final one
    trainer = Trainer(model=model, args=training_arguments(run, checkpoints, len(data["train"])),
                      train_dataset=data["train"], eval_dataset=data.get("validation", data["test"]).sort("length"),
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if run.has_gpu else None),
                      processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[interrupt, *stop_early],
                      compute_loss_func=run.class_weights and weighted_loss(run.class_weights))
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

def class_weights(labels: list[int], classes: int) -> list[float]:
    """Inverse class frequency: rows / (classes x the class's rows), so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=classes)
    return [round(float(w), 6) for w in len(labels) / (classes * counts)]


def weighted_loss(weights: list[float]):
    """The Trainer's loss hook: cross-entropy with a weight per class, averaged over the batch's weights (as torch)."""
    import torch

    table = torch.tensor(weights)

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        return torch.nn.functional.cross_entropy(logits, labels, weight=table.to(logits.device))

    return loss

# 5. Evaluate ------------------------------------------------------------------------------------------------------


def evaluate(trainer, data: DatasetDict, calibrated: bool) -> dict:
    """Score the test split once: loss, accuracy, F1, precision, recall, confusion matrix; with CALIBRATE, after the
    temperature was fitted on validation and folded into the head, so test sees the model as it is saved."""
    model = trainer.model  # the peft model (trainer.model_wrapped is the DDP one)
    temperature, held = calibrate(model, trainer, data) if calibrated else (1.0, "off")
    test = trainer.predict(data["test"].sort("length"), metric_key_prefix="eval")  # sorted by length: less padding
    speed = {k: round(v, 4) for k, v in test.metrics.items() if k.endswith(("_runtime", "_per_second"))}
    return metrics_from(test.predictions, test.label_ids, list(model.config.id2label.values())) | speed | {
        "calibration": held if isinstance(held, str) else calibration_report(held, test, temperature)}


def calibrate(model, trainer, data: DatasetDict):
    """Temperature scaling (Guo et al. 2017): find the T that minimises the validation split's NLL and fold 1/T into
    the classifier (argmax unchanged), so every way of loading the model gives calibrated probabilities; return T
    and the validation predictions (made before)."""
    if "validation" not in data:
        log.info("Calibration skipped: no validation split (one epoch, or VALIDATION=0)")
        return 1.0, "skipped: no validation split (one epoch, or VALIDATION=0)"
    held = trainer.predict(data["validation"].sort("length"), metric_key_prefix="validation")
    temperature = fit_temperature(held.predictions, held.label_ids)
    scale_classifier(model, 1 / temperature)
    return temperature, held


def calibration_report(held, test, t: float) -> dict:
    """The temperature, and NLL (validation, test) and ECE (test) before and after it; test was scored after."""
    found = {"temperature": t, "bins": 15,
             "validation_nll_before": cross_entropy(held.predictions, held.label_ids),
             "validation_nll_after": cross_entropy(held.predictions / t, held.label_ids),
             "test_ece_before": ece(test.predictions * t, test.label_ids), "test_ece_after": ece(test.predictions,
                                                                                                 test.label_ids),
             "test_nll_before": cross_entropy(test.predictions * t, test.label_ids),
             "test_nll_after": cross_entropy(test.predictions, test.label_ids)}
    log.info(f"Calibrated on {len(held.label_ids)} validation rows: temperature {t:.3f}; test ECE "
             f"{found['test_ece_before']:.4f} -> {found['test_ece_after']:.4f}, NLL {found['test_nll_before']:.4f} -> "
             f"{found['test_nll_after']:.4f}")
    return {k: round(v, 4) for k, v in found.items()}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of logits / T: golden-section search over log T (NLL is unimodal)."""
    low, high, ratio = np.log(0.05), np.log(20.0), (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if cross_entropy(logits / np.exp(a), labels) < cross_entropy(logits / np.exp(b), labels):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def scale_classifier(model, factor: float) -> None:
    """Multiply the trained classifier's last linear layer (weight and bias) by factor: the logits scale with it."""
    import torch

    heads = [m for name, m in model.named_modules()  # the classifier itself, not DistilBERT's pre_classifier
             if name.split(".")[-3:] in (["classifier", "modules_to_save", "default"],
                                         ["score", "modules_to_save", "default"])]
    last = [m for m in heads[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-probability of the true classes (NLL)."""
    return float(-np.log(np.maximum(softmax(logits)[np.arange(len(labels)), labels], 1e-12)).mean())


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by its rows."""
    probabilities = softmax(logits)
    confidence, right = probabilities.max(-1), probabilities.argmax(-1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(right[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))


def metrics_from(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """The eval_* metrics and the confusion matrix of logits against labels; per-class F1 with 3+ classes."""
    matrix = confusion_matrix(labels, np.argmax(logits, axis=-1), len(names))
    found = scores(matrix)
    metrics = {f"eval_{k}": round(found[k], 4) for k in ("accuracy", "f1", "precision", "recall")}
    metrics["eval_loss"] = round(cross_entropy(logits, labels), 4)
    metrics["per_class_recall"] = dict(zip(names, found["per_class_recall"]))  # what class weights are for
    if len(names) > 2:  # two classes keep exactly the fields they always had
        metrics |= {"average": "macro", "per_class_f1": dict(zip(names, found["per_class_f1"]))}
    return metrics | {"confusion_matrix": matrix}


def compute_metrics(eval_pred) -> dict:
    """The Trainer's per-evaluation metrics: scores() of the confusion matrix, scalars only."""
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    metrics = scores(confusion_matrix(labels, predictions, logits.shape[-1]))
    metrics["predicted_classes"] = len(np.unique(predictions))  # 1: collapsed (--search prunes such a trial)
    del metrics["per_class_f1"], metrics["per_class_recall"]  # the Trainer logs scalars; metrics_from has the lists
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
            "recall": pick(recall), "per_class_f1": [round(float(x), 4) for x in f1],
            "per_class_recall": [round(float(x), 4) for x in recall]}


def describe(run: Run, model, data: DatasetDict, trainer, train_metrics: dict) -> dict:
    """What metrics.json records about the run besides the scores: sizes, speed, hardware, settings."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"train_samples": len(data["train"]), "eval_samples": len(data["test"]),
            "train_seconds": round(train_metrics["train_runtime"], 1),
            "train_samples_per_second": round(train_metrics["train_samples_per_second"], 2),  # totals over processes
            "trainable_params": trainable, "total_params": total, "device": run.device, "preset": run.preset,
            "precision": run.precision, "bf16_speedup": run.speedup and round(run.speedup, 2),
            "class_weights": run.class_weights and dict(zip(model.config.id2label.values(), run.class_weights)),
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
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config, names = metrics["config"], list(metrics["labels"])
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
    results = [EvalResult(task_type="text-classification", task_name="Text Classification", dataset_split="test",
                          dataset_type=config["DATASET_NAME"], dataset_name=config["DATASET_NAME"], metric_type=kind,
                          metric_value=metrics[f"eval_{kind}"], metric_args=args)
               for kind, args in (("accuracy", None), ("f1", {"average": "macro"} if len(names) > 2 else None))]
    found = metrics["calibration"]
    confidence = found if isinstance(found, str) else (
        f"calibrated by temperature scaling (T = {found['temperature']}, folded into the classifier); test ECE "
        f"{found['test_ece_before']} before, {found['test_ece_after']} after")
    header = ModelCardData(base_model=config["MODEL_NAME"], library_name=library, pipeline_tag="text-classification",
                           tags=["sentiment-analysis", "lora", "fine_tune_sentiment"], eval_results=results,
                           model_name=f"{config['MODEL_NAME']} LoRA sentiment")
    ModelCard(f"""---
{header.to_yaml()}
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
- **Probabilities:** {confidence}

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

`pipeline()` cuts reviews longer than {config['MAX_LENGTH']} tokens at the head only; `predict_sentiment.py
--predict` cuts them as training did (`{config['TRUNCATION']}`).
""").save(folder / "README.md")


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

# The other modes: a settings search, and the saved adapter at work ----------------------------------------------


def run_search(config: dict, args: argparse.Namespace, trials: int) -> dict:
    """--search N: N trials of SEARCH_SPACE through Trainer.hyperparameter_search (Optuna), each a fresh model scored
    on the validation split; the study lives in OUTPUT_DIR/search.db, so the same command resumes it. Then the best
    settings train as a normal run, which scores the test split once."""
    if not config["VALIDATION"]:
        raise InputError("--search scores each trial on the validation split; set VALIDATION above 0")
    need_package("optuna", what="--search", requirements="requirements-search.txt")
    import optuna
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, set_seed

    run = start_run(config, args)
    signal.signal(signal.SIGTERM, stop)  # like Ctrl-C: the trial in progress is recorded as failed, then exit 130
    optuna.logging.set_verbosity(optuna.logging.WARNING if args.quiet else optuna.logging.INFO)
    set_seed(config["SEED"])
    data = load_data(config | {"EPOCHS": max(SEARCH_SPACE["EPOCHS"])})  # every trial is scored on validation
    if "validation" not in data:
        raise InputError("--search scores each trial on the validation split; set VALIDATION above 0")
    names = data["train"].features["labels"].names
    model, tokenizer = load_model(config, names)
    data = tokenize(data, tokenizer)
    run.precision, run.speedup = resolve_precision(config["PRECISION"], run.has_gpu, model.config.hidden_size)
    output_dir = Path(config["OUTPUT_DIR"])
    output_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="search", storage=f"sqlite:///{output_dir / 'search.db'}",
                                load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=config["SEED"]))
    for trial in study.get_trials(states=[optuna.trial.TrialState.RUNNING]):  # cut short by an interruption
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]))
    if done:
        log.warning(f"Resuming the search in {output_dir / 'search.db'}: {done} of {trials} trials done")
    if done < trials:
        def model_init(trial):
            pick = trial_settings(trial) if trial is not None else config
            return build_model(local_or_hub(config["MODEL_NAME"]), pick["TARGET_MODULES"], pick["LORA_R"],
                               pick["LORA_ALPHA"], pick["LORA_DROPOUT"], names, config["LORA_VARIANT"])

        arguments = replace(training_arguments(run, output_dir / "search", len(data["train"])), save_strategy="no",
                            load_best_model_at_end=False, eval_strategy="epoch")  # each trial: validation per epoch
        trainer = Trainer(model_init=model_init, args=arguments, train_dataset=data["train"],
                          eval_dataset=data["validation"].sort("length"), compute_metrics=compute_metrics,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        if args.quiet:
            trainer.remove_callback(PrinterCallback)
        trainer.hyperparameter_search(direction="maximize", backend="optuna", n_trials=trials - done,
                                      hp_space=lambda trial: {"learning_rate": trial_settings(trial)["LEARNING_RATE"],
                                                              "num_train_epochs": trial_settings(trial)["EPOCHS"]},
                                      compute_objective=trial_score, study_name="search", load_if_exists=True,
                                      storage=f"sqlite:///{output_dir / 'search.db'}", sampler=study.sampler)
        shutil.rmtree(output_dir / "search", ignore_errors=True)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{output_dir / 'search.db'}")
    if not study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        raise InputError(f"every one of the {trials} trials collapsed to one class or failed; see "
                         f"{output_dir / 'search.db'} (remove it to start over)")
    best = trial_settings(study.best_trial)
    shown = best | {"TARGET_MODULES": best["TARGET_MODULES"] or DEFAULT_TARGETS.get(model.config.model_type)}
    command = "python fine_tune_sentiment.py " + " ".join(
        [shlex.quote(a) for a in drop_flag(args.argv, "--search")] + [
            f"--{k.lower().replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in shown.items()])
    write_search(output_dir / "search.json", study, trials, best, command)
    print(f"Best of {trials} trials (validation accuracy {study.best_value:.4f}): {json.dumps(best)}\n"
          f"Reproduce it with: {command}")
    return run_training(config | best, args)  # test is scored once, here


def stop(signum, frame):
    """A signal handler that stops as Ctrl-C does."""
    raise KeyboardInterrupt


def trial_settings(trial) -> dict:
    """One trial's settings, drawn from SEARCH_SPACE (or read back from a finished trial)."""
    space, get = SEARCH_SPACE, getattr(trial, "suggest_categorical", None)
    if get is None:  # a FrozenTrial: the settings it drew
        params = trial.params
    else:
        params = {"LEARNING_RATE": trial.suggest_float("LEARNING_RATE", *space["LEARNING_RATE"], log=True)} | {
            name: get(name, list(space[name])) for name in space if name != "LEARNING_RATE"}
    targets = params["TARGET_MODULES"]
    return {"LEARNING_RATE": params["LEARNING_RATE"], "EPOCHS": params["EPOCHS"], "LORA_R": params["LORA_R"],
            "LORA_ALPHA": params["LORA_ALPHA"] * params["LORA_R"], "LORA_DROPOUT": params["LORA_DROPOUT"],
            "TARGET_MODULES": None if targets == "default" else [targets]}


def trial_score(metrics: dict) -> float:
    """A trial's validation accuracy; a model that predicts one class only is pruned, whatever its accuracy."""
    import optuna

    if metrics.get("eval_predicted_classes", 2) < 2:
        raise optuna.TrialPruned("it predicts one class only")
    return metrics["eval_accuracy"]


def write_search(path: Path, study, trials: int, best: dict, command: str) -> None:
    """search.json: every trial with its settings, state, validation accuracy and time; the winner; its command."""
    rows = [{"number": t.number, "state": t.state.name, "validation_accuracy": t.value,
             "settings": trial_settings(t) if t.params else {},
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
             if t.datetime_complete and t.datetime_start else None} for t in study.trials]
    write_json(path, {"trials_asked": trials, "space": SEARCH_SPACE, "best": best,
                      "best_validation_accuracy": study.best_value, "command": command, "trials": rows})


def drop_flag(argv: list[str], flag: str) -> list[str]:
    """argv without flag and its value."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out



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


def eval_batch_size(config: dict) -> int:
    """Inference batches: twice the training batch, as in the Trainer's evaluation."""
    return 2 * (config["BATCH_SIZE"] or PRESETS["cpu"]["BATCH_SIZE"])


# The machinery: flags, logging, processes, precision, sources, files ------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then train (default), search, evaluate, export, or hand an inference mode to predict_sentiment;
    return the exit code."""
    config, args = parse_args(argv)
    modes = inference.modes_of(args) + [flag for flag, on in (("--eval-only", args.eval_only), ("--export-onnx",
                                                               args.export_onnx), ("--search", args.search)) if on]
    if inference.modes_of(args) and len(modes) == 1 and rank_and_world()[1] == 1:  # one command line, either file
        inference.setup_logging(args.quiet)
        forwarded = {name: getattr(args, name) for name in inference.SETTINGS} | {
            "BATCH_SIZE": eval_batch_size(config)}  # this file's BATCH_SIZE trains; inference runs twice as many
        return inference.exit_code(lambda: inference.check_and_run(forwarded, args), args.debug)
    setup_logging(args.quiet, transformers=not (args.eval_only and config["RUNTIME"] != "torch"))
    return inference.exit_code(lambda: run_mode(config, args, modes), args.debug, report=is_main())  # one message:
    # the other processes meet the same input


def run_mode(config: dict, args: argparse.Namespace, modes: list[str]) -> None:
    """Refuse flags that do not go together, then run the one mode asked for, or train."""
    if modes and rank_and_world()[1] > 1:
        raise InputError(f"{modes[0]} runs in one process; run it with python, not torchrun")
    if len(modes) > 1:
        raise InputError(f"{' and '.join(modes)} are separate modes; run one at a time")
    if args.predictions and not args.predict_file:
        raise InputError("--predictions names the output of --predict-file; pass --predict-file IN too")
    if args.eval_only:
        run_eval_only(config, args.quiet)
    elif args.export_onnx:
        run_export_onnx(config)
    elif args.search:
        run_search(config, args, args.search)
    else:
        run_training(config, args)
        leave_processes()


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """One flag per setting of both files' constants blocks, and the mode flags; return (settings, run options)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--SETTING VALUE ...] [--predict TEXT ...] (see --help)",
                                     allow_abbrev=False)
    add_settings(parser, sys.modules[__name__])
    add_settings(parser, inference, skip=SETTINGS)  # the server's and Ray's settings, for the forwarded modes
    add_mode_flags(parser)
    parser.add_argument("--eval-only", action="store_true", help="evaluate OUTPUT_DIR/adapter on DATASET_NAME (its "
                        "test split, or a whole data file) into OUTPUT_DIR/eval_metrics.json, without training")
    parser.add_argument("--export-onnx", action="store_true", help="export OUTPUT_DIR/adapter to OUTPUT_DIR/onnx/ "
                        "(model.onnx, model_int8.onnx, tokenizer) for --runtime onnx and onnx-int8, or onnxruntime")
    parser.add_argument("--search", type=int, metavar="N", help="try N settings from SEARCH_SPACE (Optuna), each "
                        "scored on the validation split, then train the best; OUTPUT_DIR/search.db resumes it")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run; start over")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --search prints the command that reproduces its best
    return {name: getattr(args, name) for name in SETTINGS}, args


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


def resolve_precision(requested: str, has_gpu: bool, width: int) -> tuple[str, float | None]:
    """predict_sentiment's choice of precision; under torchrun the main process runs the probe and shares it."""
    return inference.resolve_precision(requested, has_gpu, width,
                                       lambda probe: from_main(probe() if is_main() else None))


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
