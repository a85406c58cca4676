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
    python predict_sentiment.py --predict "This movie was fantastic!"  # then put it to work (predict, serve, Ray)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import predict_sentiment as inference
from data import check_source, load_raw_data, prepare_data, subsample
from evaluation import (calibration_report, choose_threshold, compute_metrics, fit_temperature, metrics_from,
                        parse_threshold, save_plot, write_card, write_report)
from predict_sentiment import (ID2LABEL, InputError, encode, load_adapter, load_for_inference, logits, need_package,
                               one_line, pad, predict, print_predictions, settings_parser, threshold_of)

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
TRUNCATION: str = "head+tail"  # a long review: head+tail keeps its first quarter and last three quarters; head; or
STRIDE: int = 0  # window: it is read as overlapping windows this many tokens apart (0: half a window), logits averaged
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
THRESHOLD: str = "argmax"  # two classes: argmax, a probability (0.7), or tuned on validation: f1, precision=P, recall=R
# LoRA
LORA_R: int = 8  # rank of the low-rank update; 4-16 is typical
LORA_ALPHA: int = 16  # update scale is alpha / r; 2 * r is the usual choice
LORA_DROPOUT: float = 0.1  # dropout on LoRA's input; 0 trains a little faster (bench/README.md has both)
TARGET_MODULES: list[str] | None = None  # None = q_lin v_lin (DistilBERT) or query value (BERT); or all-linear
LORA_VARIANT: str = "lora"  # lora; rslora (scale alpha / sqrt(r)); dora (weight-decomposed, slower per step)
LORA_LAYERS: int = 0  # LoRA in the encoder's last this many layers only (0 = all): backward stops below them
# speed
FAST_STEP: bool = True  # fast_lora.py's cheaper dropout and fused fp32 LoRA layers; off: peft's own step, same model
RUNTIME: str = "torch"  # what --eval-only runs on: torch; onnx, onnx-int8 or openvino (the --export-onnx model)
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
    "cpu": dict(TRAIN_SAMPLES=2000, EVAL_SAMPLES=1000, MAX_LENGTH=256, EPOCHS=1, BATCH_SIZE=16),  # minutes on 2 cores
}
DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"], "bert": ["query", "value"], "roberta": ["query", "value"]}
HEAD_MODULES = {"distilbert": ["pre_classifier", "classifier"], "bert": ["pooler", "classifier"]}  # trained + saved
CHOICES = {"PRECISION": ("auto", "fp32", "bf16", "fp16"), "TRUNCATION": ("head+tail", "head", "window"),  # words
           "SCHEDULER": ("linear", "cosine"), "CLASS_WEIGHTS": ("none", "balanced"),
           "LORA_VARIANT": ("lora", "rslora", "dora"), "RUNTIME": ("torch", "onnx", "onnx-int8", "openvino")}
TRACKER_PACKAGES = {"comet_ml": ("comet_ml", "comet-ml"), "azure_ml": ("azureml", "azureml-core")}  # else name, name
POSITIVE = ("LEARNING_RATE", "EPOCHS", "BATCH_SIZE", "LORA_R", "MAX_LENGTH")  # settings that must be above 0
FRACTIONS = ("WARMUP", "LORA_DROPOUT", "VALIDATION")  # settings that must be below 1
CALIBRATION_TEXTS = 1024  # --export-onnx measures int8's activation ranges on this many training reviews
MARKER = ".made-by-fine_tune_sentiment"  # in OUTPUT_DIR/checkpoints/: only a folder holding it is ever removed
INFERENCE_FLAGS = ("--predict", "--predict-file", "--predictions", "--serve", "--ray")  # predict_sentiment.py's
log = logging.getLogger("sentiment")  # predict_sentiment's logger too


# The training story: what `python fine_tune_sentiment.py` does, step by step ------------------------------------


def run_training(config: dict, args: argparse.Namespace, state) -> dict:
    """Load and prepare the data, tokenize it, wrap the model in LoRA, train, evaluate, predict, save."""
    run, data, tokenizer = prepare(config, args, state)  # 1. load, clean, subsample; 2. tokenize
    with state.main_process_first():  # a download is written once, then read by the other processes
        model = load_model(config, run.model_name, data["train"].features["labels"].names)  # 3. the LoRA model
    trainer, train_metrics = train(model, tokenizer, data, run)  # 3. train
    metrics, scored = evaluate(trainer, data, config)  # 4. evaluate (calibrate, choose the threshold)
    metrics |= describe(run, model, data, trainer, train_metrics)
    if not state.is_main_process:
        return metrics  # the main process prints and saves
    print_metrics(metrics)
    tokenizer.init_kwargs["decision_threshold"] = scored.threshold  # saved with the model: every runtime decides so
    samples = config["SAMPLE_REVIEWS"]
    print_predictions(samples, predict(model, tokenizer, samples, precision=run.precision))  # 5. predict
    paths = save_outputs(model, tokenizer, metrics, trainer.state, Path(config["OUTPUT_DIR"]), config["MERGE"],
                         scored)  # 6. save
    remove_checkpoints(Path(config["OUTPUT_DIR"]) / "checkpoints")  # finished: nothing to resume
    log.info(f"Done: accuracy {metrics['eval_accuracy']:.4f}, F1 {metrics['eval_f1']:.4f}, trained in "
             f"{metrics['train_seconds']:.0f}s | " + " | ".join(f"{k}: {p}" for k, p in paths.items()))
    return metrics


def prepare(config: dict, args: argparse.Namespace, state, epochs: int | None = None):
    """What training and --search start with: the run's resolved state, the tokenized data and the tokenizer;
    epochs: the number of epochs the data is split for, if not EPOCHS."""
    from transformers import AutoConfig, set_seed

    run = start_run(config, args, state)  # device, processes and preset, printed
    set_seed(config["SEED"])  # once, before any shuffling and before the LoRA weights are drawn
    with state.main_process_first():  # downloads and dataset caches are written once, then read by the others
        data = load_data(config | ({"EPOCHS": epochs} if epochs else {}))
        try:
            run.model_config = AutoConfig.from_pretrained(run.model_name)
            tokenizer = load_tokenizer(run.model_name, config["MAX_LENGTH"], getattr(
                run.model_config, "max_position_embeddings", None), config["TRUNCATION"], config["STRIDE"])
        except OSError as error:  # not found, offline and not cached
            raise InputError(f"could not load model {config['MODEL_NAME']!r}: {one_line(error)}") from error
        data = tokenize(data, tokenizer)  # once; batches are padded later
    check_threshold(config["THRESHOLD"], data)
    run.precision, run.speedup = resolve_precision(state, config["PRECISION"], run.has_gpu,
                                                   run.model_config.hidden_size)
    return run, data, tokenizer


def check_threshold(spec: str, data: DatasetDict) -> None:
    """THRESHOLD is for two classes, and the tuned ones need a validation split: say so before training."""
    kind, _ = parse_threshold(spec)
    classes = data["train"].features["labels"].num_classes
    if kind != "argmax" and classes != 2:
        raise InputError(f"THRESHOLD {spec} is for two classes; this data has {classes}: use argmax")
    if kind not in ("argmax", "fixed") and "validation" not in data:
        raise InputError(f"THRESHOLD {spec} is tuned on the validation split, and this run has none (one epoch, or "
                         f"VALIDATION=0): train 2+ epochs, or give a fixed threshold such as 0.7")


@dataclass
class Run:
    """One training run's resolved state: the settings, and what this machine and launch made of them."""
    config: dict
    state: object  # accelerate's PartialState: which process this is, of how many
    has_gpu: bool
    device: str
    preset: str
    fresh: bool
    quiet: bool
    model_name: str  # MODEL_NAME, a local path made absolute
    model_config: object = None
    precision: str = "fp32"
    speedup: float | None = None
    class_weights: list[float] | None = None


def start_run(config: dict, args: argparse.Namespace, state) -> Run:
    """Share the cores among torchrun's processes, fill the preset, check the sources and tracker; print the plan."""
    import torch

    has_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if has_gpu else "cpu"
    if not has_gpu and "LOCAL_WORLD_SIZE" in os.environ:  # torchrun gives each process 1 thread: give it its share
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))
    parse_threshold(config["THRESHOLD"])  # a bad value fails before anything loads
    preset = apply_preset(config, has_gpu)
    repair_outputs(Path(config["OUTPUT_DIR"]))
    log.info(f"Preset: {preset} ({'CUDA: ' + device if has_gpu else 'no GPU found'}); "
             f"settings: {json.dumps({k: v for k, v in config.items() if k != 'SAMPLE_REVIEWS'})}")
    check_source(config["MODEL_NAME"], "model")
    check_tracker(config["REPORT_TO"], Path(config["OUTPUT_DIR"]))
    return Run(config, state, has_gpu, device, preset, args.fresh, args.quiet, local_or_hub(config["MODEL_NAME"]))


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


# 2. Tokenize ------------------------------------------------------------------------------------------------------


def load_tokenizer(model_name: str, max_length: int, model_limit: int | None, truncation: str = "head",
                   stride: int = 0):
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
    tokenizer.init_kwargs["review_stride"] = stride if truncation == "window" and stride else None
    return tokenizer


def tokenize(data: DatasetDict, tokenizer) -> DatasetDict:
    """Tokenize every split once; padding happens per batch in the collator. A row's review is its index in the
    split: with TRUNCATION=window a long review gives several rows (its label on each), averaged when scored."""
    def encode_batch(batch, indices):
        encoded = encode(tokenizer, batch["text"])
        owner = encoded.pop("owner", range(len(indices)))
        return encoded | {"labels": [batch["labels"][o] for o in owner], "review": [indices[o] for o in owner],
                          "text": [batch["text"][o] for o in owner],  # the report quotes the test split's mistakes
                          "length": [len(ids) for ids in encoded["input_ids"]]}  # for length-grouped batches

    columns = next(iter(data.values())).column_names
    tokenized = data.map(encode_batch, batched=True, with_indices=True, remove_columns=columns, desc="Tokenizing")
    tokenized = tokenized.cast_column("labels", next(iter(data.values())).features["labels"])
    for split in tokenized:
        if split != "test":
            tokenized[split] = tokenized[split].remove_columns("text")
    return tokenized

# 3. The model: a pretrained encoder, a head for the classes, LoRA around it ------------------------------------


def load_model(config: dict, model_name: str, names: list[str]):
    """The LoRA-wrapped model that config describes, for the classes names."""
    try:
        return build_model(model_name, config["TARGET_MODULES"], config["LORA_R"], config["LORA_ALPHA"],
                           config["LORA_DROPOUT"], names, config["LORA_VARIANT"], config["FAST_STEP"],
                           config["LORA_LAYERS"])
    except OSError as error:  # not found, offline and not cached, or no safetensors weights
        raise InputError(f"could not load model {config['MODEL_NAME']!r}: {one_line(error)}") from error


def build_model(model_name: str, target_modules: list[str] | None, lora_r: int, lora_alpha: int,
                lora_dropout: float, names: list[str] = tuple(ID2LABEL.values()), variant: str = "lora",
                fast_step: bool = True, top_layers: int = 0):
    """Load the pretrained encoder with a head for the classes and wrap it in LoRA; the head trains fully.
    fast_step: train with fast_lora.py's step (the same model, cheaper on a CPU). top_layers: LoRA on the encoder's
    last this many layers only (0: all), so that backward stops below them."""
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
    layers = top_layer_indices(model.config, top_layers)
    if targets == ["all-linear"] and layers:  # peft takes layers_to_transform with named targets only
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if type(module).__name__ == "Linear" and re.search(r"\.\d+\.", name)})
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      modules_to_save=HEAD_MODULES.get(model_type, ["classifier", "score"]),
                      use_rslora=variant == "rslora", use_dora=variant == "dora",
                      layers_to_transform=layers)
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:  # peft's "target modules not found"
        raise InputError(f"LoRA targets {targets} do not fit {model_type!r}: {one_line(error)}") from error
    if fast_step:
        import fast_lora  # torch and peft at its top: imported here, when a model is built

        fast_lora.apply(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def top_layer_indices(config, top_layers: int) -> list[int] | None:
    """The indices of the encoder's last top_layers layers, or None (every layer) for 0 or at least all of them."""
    if not top_layers:
        return None
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise InputError(f"LORA_LAYERS needs a model config with num_hidden_layers; {config.model_type!r} has none")
    return list(range(count - top_layers, count)) if top_layers < count else None


# 4. Train --------------------------------------------------------------------------------------------------------


def train(model, tokenizer, data: DatasetDict, run: Run):
    """Train with the Trainer, resuming from the last checkpoint in OUTPUT_DIR unless --fresh."""
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback, Trainer

    config = run.config
    checkpoints = Path(config["OUTPUT_DIR"]) / "checkpoints"
    resume_from = resume_point(checkpoints, config, run.fresh, run.state)
    interrupt = interrupt_callback(run.state.num_processes)
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
        leave_processes(run.state)  # every process stopped after the same step, so all of them get here
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
        disable_tqdm=run.quiet or not run.state.is_main_process,
    )


def resume_point(checkpoints: Path, config: dict, fresh: bool, state) -> str | None:
    """The checkpoint of an interrupted run with the same settings, or None; --fresh removes them first."""
    run_file, on_main = checkpoints / "run_config.json", state.is_main_process
    with state.main_process_first():  # the main process decides (and cleans up); the others then see what it left
        if checkpoints.exists() and not ours(checkpoints):
            raise InputError(f"{checkpoints} exists and was not made by this script, which writes and removes "
                             f"checkpoints there; move it, or set another OUTPUT_DIR")
        if fresh and checkpoints.exists() and on_main:
            remove_checkpoints(checkpoints)
            log.info("--fresh: removed the checkpoints of the earlier run")
        resume_from = last_complete_checkpoint(checkpoints, on_main) if checkpoints.is_dir() else None
        if resume_from and on_main:
            saved = json.loads(run_file.read_text()) if run_file.exists() else {}
            changed = sorted(k for k in config if k not in ("SAMPLE_REVIEWS", "MERGE") and saved.get(k) != config[k])
            if changed:
                raise InputError(f"{checkpoints} holds an interrupted run with different settings "
                                 f"({', '.join(changed)}); rerun it with the same settings, or pass --fresh")
            log.warning(f"Resuming the interrupted run from {resume_from}")  # shown even with --quiet
        if on_main:
            checkpoints.mkdir(parents=True, exist_ok=True)
            (checkpoints / MARKER).touch()
            write_json(run_file, config)
    return resume_from


def ours(checkpoints: Path) -> bool:
    """Whether checkpoints/ was made by this script (its marker, or an earlier version's run_config.json)."""
    return (checkpoints / MARKER).exists() or (checkpoints / "run_config.json").exists()


def remove_checkpoints(checkpoints: Path) -> None:
    """Remove checkpoints/, where this script made it."""
    if checkpoints.exists() and ours(checkpoints):
        shutil.rmtree(checkpoints)


def last_complete_checkpoint(checkpoints: Path, on_main: bool) -> str | None:
    """The newest checkpoint-N whose save finished (the Trainer writes trainer_state.json last); newer ones that a
    hard kill cut short are skipped, with a warning, and removed by the main process."""
    numbered = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            log.warning(f"warning: {folder} is incomplete (its save was cut short); resuming from the one before")
            if on_main:
                shutil.rmtree(folder, ignore_errors=True)
    return None


def interrupt_callback(processes: int = 1):
    """A Trainer callback that turns Ctrl-C or SIGTERM into 'save a checkpoint, then stop' at the next step;
    processes: how many torchrun started (they all stop after the same step)."""
    from transformers import TrainerCallback

    class SaveOnInterrupt(TrainerCallback):  # the Trainer only takes callbacks as TrainerCallback subclasses
        def __init__(self):
            self.interrupted, self.previous = False, {}

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

        def handle(self, signum, frame):
            if self.interrupted and processes == 1:  # a second Ctrl-C stops at once; under torchrun
                raise KeyboardInterrupt  # a worker gets both the terminal's SIGINT and torchrun's forwarded one
            self.interrupted = True
            log.warning("\nInterrupted: saving a checkpoint after this step (press Ctrl-C again to quit now)")

        def on_step_end(self, args, state, control, **kwargs):
            if processes > 1:  # all processes must stop after the same step, or the save hangs
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


def evaluate(trainer, data: DatasetDict, config: dict) -> tuple[dict, Reviews]:
    """Score the test split once: loss, accuracy, F1, precision, recall, confusion matrix; with CALIBRATE, after the
    temperature was fitted on validation and folded into the head, so test sees the model as it is saved; labelled
    with THRESHOLD, chosen after calibration (and at argmax too)."""
    model = trainer.model  # the peft model (trainer.model_wrapped is the DDP one)
    found = calibrate(model, trainer, data) if config["CALIBRATE"] else Calibration("off")
    threshold, choice = tune_threshold(config["THRESHOLD"], trainer, data, found)
    test = score_reviews(trainer, data["test"], "eval")
    report = found.status
    if found.status == "calibrated":
        report = calibration_report(found.temperature, *found.held, test.logits, test.labels)
        log.info(f"Calibrated on {len(found.held[1])} validation reviews: temperature {found.temperature:.3f}; test "
                 f"ECE {report['test_ece_before']:.4f} -> {report['test_ece_after']:.4f} (90% "
                 f"{report['test_ece_after_90'][0]:.4f}-{report['test_ece_after_90'][1]:.4f}), NLL "
                 f"{report['test_nll_before']:.4f} -> {report['test_nll_after']:.4f}")
    test.threshold, test.temperature = threshold, found.temperature
    metrics = metrics_from(test.logits, test.labels, list(model.config.id2label.values()), threshold)
    return metrics | test.speed | {"calibration": report, "threshold_choice": choice}, test


@dataclass
class Reviews:
    """A split as the model scored it, a row per review (its windows' logits averaged): logits, labels, texts, the
    Trainer's speed figures; for the report, the decision threshold (None: argmax) and the temperature folded in."""
    logits: np.ndarray
    labels: np.ndarray
    texts: list[str] | None
    speed: dict
    threshold: float | None = None
    temperature: float = 1.0


def score_reviews(trainer, split: Dataset, prefix: str) -> Reviews:
    """The Trainer's logits for a split (run sorted by length: less padding), a row per review, in split order."""
    rows = split.sort("length")
    strategy, trainer.args.train_sampling_strategy = trainer.args.train_sampling_strategy, "sequential"
    try:  # group_by_length would shuffle evaluation too: in order, each output row is known to be its review's
        found = trainer.predict(rows, metric_key_prefix=prefix)
    finally:
        trainer.args.train_sampling_strategy = strategy
    review, count = np.array(rows["review"]), reviews(rows)
    logits = np.zeros((count, found.predictions.shape[1]))
    np.add.at(logits, review, found.predictions)
    labels = np.zeros(count, dtype=np.int64)
    labels[review] = found.label_ids
    texts = None
    if "text" in rows.column_names:
        texts = [""] * count
        for i, text in zip(review, rows["text"]):
            texts[i] = text
    speed = {k: round(v, 4) for k, v in found.metrics.items() if k.endswith(("_runtime", "_per_second"))}
    return Reviews(logits / np.bincount(review, minlength=count)[:, None], labels, texts, speed)


def reviews(split: Dataset) -> int:
    """How many reviews a tokenized split holds (with TRUNCATION=window, fewer than its rows)."""
    return int(max(split["review"])) + 1 if len(split) else 0


def tune_threshold(spec: str, trainer, data: DatasetDict, found: Calibration) -> tuple[float | None, dict]:
    """THRESHOLD's value: fixed, or tuned on the validation split's calibrated probabilities."""
    if parse_threshold(spec)[0] in ("argmax", "fixed"):
        return choose_threshold(spec, None, None)
    held = found.held
    if held is None:  # not calibrated: score validation now
        scored = score_reviews(trainer, data["validation"], "validation")
        held = scored.logits, scored.labels
    threshold, choice = choose_threshold(spec, held[0] / found.temperature, held[1])
    if "status" in choice:
        log.warning(f"warning: THRESHOLD {spec}: {choice['status']}")
    else:
        log.info(f"Threshold {threshold:.4f} ({spec}, on {len(held[1])} validation reviews: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in choice["validation"].items()) + ")")
    return threshold, choice


@dataclass
class Calibration:
    """What calibrate() did: status 'calibrated', 'off' or 'skipped: <why>'; the temperature it folded into the
    head; the validation split's (logits, labels), scored before."""
    status: str
    temperature: float = 1.0
    held: tuple | None = None


def calibrate(model, trainer, data: DatasetDict) -> Calibration:
    """Temperature scaling (Guo et al. 2017): find the T that minimises the validation split's NLL and fold 1/T into
    the classifier (argmax unchanged), so every way of loading the model gives calibrated probabilities."""
    if "validation" not in data:
        log.info("Calibration skipped: no validation split (one epoch, or VALIDATION=0)")
        return Calibration("skipped: no validation split (one epoch, or VALIDATION=0)")
    held = score_reviews(trainer, data["validation"], "validation")
    temperature = fit_temperature(held.logits, held.labels)
    scale_classifier(model, 1 / temperature)
    return Calibration("calibrated", temperature, (held.logits, held.labels))


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


def describe(run: Run, model, data: DatasetDict, trainer, train_metrics: dict) -> dict:
    """What metrics.json records about the run besides the scores: sizes, speed, hardware, settings."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"train_samples": reviews(data["train"]), "eval_samples": reviews(data["test"]),
            "train_windows": len(data["train"]),  # TRUNCATION=window: the rows trained on; else = train_samples
            "train_seconds": round(train_metrics["train_runtime"], 1),
            "train_samples_per_second": round(train_metrics["train_samples_per_second"], 2),  # totals over processes
            "trainable_params": trainable, "total_params": total, "device": run.device, "preset": run.preset,
            "precision": run.precision, "bf16_speedup": run.speedup and round(run.speedup, 2),
            "class_weights": run.class_weights and dict(zip(model.config.id2label.values(), run.class_weights)),
            "world_size": run.state.num_processes, "backend": run.state.backend,
            "labels": list(model.config.id2label.values()),
            "lora_targets": short_names(model.peft_config["default"].target_modules),
            "date": time.strftime("%Y-%m-%d"), "config": run.config} | selection(trainer.state, data)


def selection(state, data: DatasetDict) -> dict:
    """How the kept epoch was chosen: on which split, its accuracy per epoch, and the epoch the Trainer kept."""
    accuracies = [h["eval_accuracy"] for h in state.log_history if "eval_accuracy" in h]
    if not accuracies:
        return {}
    steps_per_epoch = state.max_steps / state.num_train_epochs
    return {"selected_on": "validation" if "validation" in data else "test",
            "validation_samples": reviews(data["validation"]) if "validation" in data else 0,
            "accuracy_per_epoch": accuracies, "best_epoch": round(state.best_global_step / steps_per_epoch)}


# 7. Save ----------------------------------------------------------------------------------------------------------


def save_outputs(model, tokenizer, metrics: dict, state, output_dir: Path, merge: bool, scored: Reviews) -> dict:
    """Write adapter/, metrics.json, report.html, training.png (and merged/), so an earlier run's files survive a
    crash."""
    paths = {"adapter": output_dir / "adapter", "metrics": output_dir / "metrics.json",
             "report": output_dir / "report.html"}
    history = state.log_history
    if not any("eval_accuracy" in h for h in history):  # one epoch: the final evaluation is the only one
        history = history + [{"step": state.global_step, "eval_loss": metrics["eval_loss"],
                              "eval_accuracy": metrics["eval_accuracy"]}]
    tokenizer.init_kwargs["id2label"] = model.config.id2label  # an adapter folder has no model config to hold them
    write_dir(paths["adapter"], lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                             write_card(Path(tmp), paths["adapter"], metrics, "peft")))
    write_json(paths["metrics"], metrics | {"history": history})
    names = list(model.config.id2label.values())
    write_report(paths["report"], metrics, scored.logits, scored.labels, scored.texts, names, scored.threshold,
                 scored.temperature)
    plot = save_plot(history, metrics["confusion_matrix"], names, output_dir / "training.png", log)
    if plot:
        paths["plot"] = plot
    if merge:  # last: merging folds LoRA into the base weights of this in-memory model
        merged = model.merge_and_unload()
        paths["merged"] = output_dir / "merged"
        write_dir(paths["merged"], lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                                write_card(Path(tmp), paths["merged"], metrics, "transformers")))
    return paths


# The other modes: a settings search, and the saved adapter at work ----------------------------------------------


def run_search(config: dict, args: argparse.Namespace, state, trials: int) -> dict:
    """--search N: N trials of SEARCH_SPACE through Trainer.hyperparameter_search (Optuna), each a fresh model scored
    on the validation split; the study lives in OUTPUT_DIR/search.db, so the same command resumes it. Then the best
    settings train as a normal run, which scores the test split once."""
    if not config["VALIDATION"]:
        raise InputError("--search scores each trial on the validation split; set VALIDATION above 0")
    need_package("optuna", what="--search", requirements="requirements-search.txt")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING if args.quiet else optuna.logging.INFO)
    run, data, tokenizer = prepare(config, args, state, epochs=max(SEARCH_SPACE["EPOCHS"]))  # validation held out
    if "validation" not in data:
        raise InputError("--search scores each trial on the validation split; set VALIDATION above 0")
    output_dir = Path(config["OUTPUT_DIR"])
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{output_dir / 'search.db'}"
    done = finished_trials(storage)
    if done:
        log.warning(f"Resuming the search in {output_dir / 'search.db'}: {done} of {trials} trials done")
    if done < trials:
        try:
            hyperparameter_search(run, data, tokenizer, storage, trials - done)
        except ValueError:  # transformers asks the study for its best trial, and with none complete it has none
            if finished_trials(storage, complete=True):
                raise
    study = optuna.load_study(study_name="search", storage=storage)
    if not study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        write_search(output_dir / "search.json", study, trials, None, None)
        raise InputError(f"every one of the {trials} trials collapsed to one class or failed; see "
                         f"{output_dir / 'search.json'} (remove {output_dir / 'search.db'} to start over)")
    best = trial_settings(study.best_trial)
    shown = best | {"TARGET_MODULES": best["TARGET_MODULES"] or DEFAULT_TARGETS.get(run.model_config.model_type)}
    command = "python fine_tune_sentiment.py " + " ".join(
        [shlex.quote(a) for a in drop_flag(args.argv, "--search")] + [
            f"--{k.lower().replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in shown.items()])
    write_search(output_dir / "search.json", study, trials, best, command)
    print(f"Best of {trials} trials (validation accuracy {study.best_value:.4f}): {json.dumps(best)}\n"
          f"Reproduce it with: {command}")
    return run_training(config | best, args, state)  # test is scored once, here


def finished_trials(storage: str, complete: bool = False) -> int:
    """How many trials of the stored study are complete or pruned (complete: complete only; 0 without a study);
    trials that an interruption cut short, still marked running, are marked failed."""
    import optuna

    if not Path(storage.removeprefix("sqlite:///")).exists():
        return 0  # no study yet: Trainer.hyperparameter_search creates it
    try:
        study = optuna.load_study(study_name="search", storage=storage)
    except KeyError:  # a database without the study
        return 0
    for trial in study.get_trials(states=[optuna.trial.TrialState.RUNNING]):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    done = [optuna.trial.TrialState.COMPLETE] + ([] if complete else [optuna.trial.TrialState.PRUNED])
    return len(study.get_trials(states=done))


def hyperparameter_search(run: Run, data: DatasetDict, tokenizer, storage: str, trials: int) -> None:
    """Run trials more trials of the study in storage (which it creates, or resumes), each a fresh LoRA model."""
    import optuna
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    config, names, folder = run.config, data["train"].features["labels"].names, Path(run.config["OUTPUT_DIR"])
    arguments = replace(training_arguments(run, folder / "search", len(data["train"])), save_strategy="no",
                        load_best_model_at_end=False, eval_strategy="epoch")  # each trial: validation per epoch
    trainer = Trainer(model_init=lambda trial: load_model(config | (trial_settings(trial) if trial else {}),
                                                          run.model_name, names),
                      args=arguments, train_dataset=data["train"], eval_dataset=data["validation"].sort("length"),
                      compute_metrics=compute_metrics, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    if run.quiet:
        trainer.remove_callback(PrinterCallback)
    stopper = trial_stopper()
    trainer.add_callback(stopper)
    try:
        trainer.hyperparameter_search(direction="maximize", backend="optuna", n_trials=trials,
                                      hp_space=lambda trial: {"learning_rate": trial_settings(trial)["LEARNING_RATE"],
                                                              "num_train_epochs": trial_settings(trial)["EPOCHS"]},
                                      compute_objective=trial_score, study_name="search", load_if_exists=True,
                                      storage=storage, sampler=optuna.samplers.TPESampler(seed=config["SEED"]))
    finally:
        stopper.restore()
    if stopper.interrupted:  # after the last trial's training: stop before the winner trains
        raise KeyboardInterrupt
    shutil.rmtree(folder / "search", ignore_errors=True)


def trial_stopper():
    """A Trainer callback for --search: Ctrl-C or SIGTERM stops the trial in progress after its step, and Optuna
    records it failed (then exit 130). Never at once: a KeyboardInterrupt inside Optuna's own write to search.db
    leaves the file locked, and the write that records the trial fails ("database is locked")."""
    from transformers import TrainerCallback

    class StopTrial(TrainerCallback):
        def __init__(self):
            self.interrupted = False
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handle(self, signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt  # a second Ctrl-C quits now
            self.interrupted = True
            log.warning("\nInterrupted: the trial stops after this step (press Ctrl-C again to quit now)")

        def on_step_end(self, args, state, control, **kwargs):
            if self.interrupted:
                raise KeyboardInterrupt

        on_train_begin = on_evaluate = on_step_end

        def restore(self):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    return StopTrial()


def trial_settings(trial) -> dict:
    """One trial's settings, drawn from SEARCH_SPACE (or read back from a finished trial)."""
    import optuna

    space = SEARCH_SPACE
    if isinstance(trial, optuna.trial.FrozenTrial):  # a finished trial (it has suggest_* too): what it drew
        params = trial.params
    else:
        params = {"LEARNING_RATE": trial.suggest_float("LEARNING_RATE", *space["LEARNING_RATE"], log=True)} | {
            name: trial.suggest_categorical(name, list(space[name])) for name in space if name != "LEARNING_RATE"}
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


def write_search(path: Path, study, trials: int, best: dict | None, command: str | None) -> None:
    """search.json: every trial with its settings, state, validation accuracy and time; the winner; its command."""
    rows = [{"number": t.number, "state": t.state.name, "validation_accuracy": t.value,
             "settings": trial_settings(t) if set(t.params) == set(SEARCH_SPACE) else t.params,  # stopped early
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
             if t.datetime_complete and t.datetime_start else None} for t in study.trials]
    write_json(path, {"trials_asked": trials, "space": SEARCH_SPACE, "best": best,
                      "best_validation_accuracy": study.best_value if best else None, "command": command,
                      "trials": rows})


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
    repair_outputs(output_dir)
    model, tokenizer, precision = load_for_inference(config)
    names = list(model.config.id2label.values())
    data = prepare_data(load_raw_data(config["DATASET_NAME"]), config["TEXT_COLUMN"], config["LABEL_COLUMN"],
                        config["SEED"], names=names)["test"]
    data = subsample(data, config["EVAL_SAMPLES"] or 0, config["SEED"], "test")  # unset: every row, not the preset's
    started = time.perf_counter()
    found = logits(model, tokenizer, data["text"], eval_batch_size(config), precision, progress=not quiet)
    seconds = time.perf_counter() - started
    labels, threshold = np.array(data["labels"]), threshold_of(tokenizer)
    metrics = metrics_from(found, labels, names, threshold) | {
        "eval_runtime": round(seconds, 4), "eval_samples_per_second": round(len(data) / seconds, 3),
        "eval_samples": len(data), "dataset": config["DATASET_NAME"],
        "adapter": str((output_dir / "adapter").resolve()), "precision": precision,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print_metrics(metrics)
    write_json(output_dir / "eval_metrics.json", metrics)  # never metrics.json: that one describes the training
    report = write_report(output_dir / "eval_report.html", metrics, found, labels, data["text"], names, threshold)
    log.info(f"Done: accuracy {metrics['eval_accuracy']:.4f} on {len(data)} rows | "
             f"eval_metrics: {output_dir / 'eval_metrics.json'} | report: {report}")
    return metrics


def run_export_onnx(config: dict) -> Path:
    """--export-onnx: write OUTPUT_DIR/onnx/ from the saved adapter: fp32 and int8 models, tokenizer, config."""
    need_package("onnx", "onnxruntime")
    repair_outputs(Path(config["OUTPUT_DIR"]))
    model, tokenizer = load_adapter(Path(config["OUTPUT_DIR"]) / "adapter")
    texts = calibration_texts(config)
    target = Path(config["OUTPUT_DIR"]) / "onnx"
    write_dir(target, lambda tmp: export_onnx(model.merge_and_unload().cpu(), tokenizer, Path(tmp), texts))
    log.info(f"Done: exported to {target} (model.onnx, model_int8.onnx); use it with --runtime onnx-int8")
    return target


def calibration_texts(config: dict) -> list[str]:
    """CALIBRATION_TEXTS training reviews, drawn with SEED: int8's activation ranges are measured on them."""
    try:
        train = prepare_data(load_raw_data(config["DATASET_NAME"]), config["TEXT_COLUMN"], config["LABEL_COLUMN"],
                             config["SEED"])["train"]
    except InputError as error:
        raise InputError(f"the int8 model is calibrated on training reviews: {error}") from error
    return train.shuffle(seed=config["SEED"]).select(range(min(CALIBRATION_TEXTS, len(train))))["text"]


def export_onnx(model, tokenizer, folder: Path, calibration: list[str]) -> None:
    """Write model.onnx (fp32, dynamic batch and length), model_int8.onnx (int8, calibrated on the calibration
    texts), the tokenizer and config.json."""
    import torch

    folder.mkdir(exist_ok=True)
    sample = pad(encode(tokenizer, ["a review", "a longer review than that"]), tokenizer.pad_token_id)
    inputs = list(sample)  # input_ids, attention_mask (and token_type_ids): the order forward() takes them in
    model.config.return_dict = False  # a tuple out, so the graph's one output is the logits
    model.set_attn_implementation("eager")  # plain MatMuls and Softmax: smaller than sdpa's graph, faster in int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes, about what we do not use
        torch.onnx.export(model.eval(), tuple(torch.from_numpy(sample[k]) for k in inputs), str(folder / "model.onnx"),
                          input_names=inputs, output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "tokens"} for k in inputs} | {"logits": {0: "batch"}})
    quantize_int8(folder / "model.onnx", folder / "model_int8.onnx", tokenizer, calibration)
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "config.json", {
        "id2label": model.config.id2label, "max_length": tokenizer.model_max_length, "inputs": inputs,
        "truncation": tokenizer.init_kwargs.get("review_truncation", "head"), "pad_token_id": tokenizer.pad_token_id,
        "threshold": threshold_of(tokenizer), "stride": tokenizer.init_kwargs.get("review_stride"),
        "base_model": model.config.name_or_path, "int8": f"static, calibrated on {len(calibration)} training reviews",
        "date": time.strftime("%Y-%m-%d")})


def quantize_int8(source: Path, target: Path, tokenizer, texts: list[str]) -> None:
    """Static int8 (ONNX QDQ): each weight MatMul gets int8 weights per output channel and uint8 inputs whose
    range was measured once, on texts. A review's score is then its own: dynamic quantization took each batch's
    range, and a label could flip with the reviews batched beside it. The MatMuls between two activations
    (attention) and the outputs stay float, so ONNX Runtime runs MatMulIntegerToFloat; 7-bit weights, as CPUs
    without VNNI add pairs of uint8 x int8 products in 16 bits, where 8-bit weights can saturate: with 7 they
    cannot, so every x86 class gives the same answer."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source)).graph
    weights = {t.name for t in graph.initializer}
    between_activations = [n.name for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]
    batches = iter([pad(encode(tokenizer, texts[i:i + 16]), tokenizer.pad_token_id) for i in range(0, len(texts), 16)])
    reader = type("Reader", (CalibrationDataReader,), {"get_next": lambda self: next(batches, None)})()
    logging.disable(logging.WARNING)  # the quantizer's advice, on the root logger, about steps that measured slower
    try:
        quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=between_activations,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    finally:
        logging.disable(logging.NOTSET)


def eval_batch_size(config: dict) -> int:
    """Inference batches: twice the training batch, as in the Trainer's evaluation."""
    return 2 * (config["BATCH_SIZE"] or PRESETS["cpu"]["BATCH_SIZE"])


# The machinery: flags, logging, processes, precision, sources, files ------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then train (default), search, evaluate or export; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    elsewhere = inference_command(argv)
    if elsewhere:
        print(f"error: {elsewhere}", file=sys.stderr)
        return 2
    config, args = parse_args(argv)
    state = None
    try:
        modes = [flag for flag, on in (("--eval-only", args.eval_only), ("--export-onnx", args.export_onnx),
                                       ("--search", args.search)) if on]
        if modes and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise InputError(f"{modes[0]} runs in one process; run it with python, not torchrun")
        if len(modes) > 1:
            raise InputError(f"{' and '.join(modes)} are separate modes; run one at a time")
        state = None if args.eval_only or args.export_onnx else join_processes()
        setup_logging(args.quiet, state is None or state.is_main_process,
                      transformers=not (args.eval_only and config["RUNTIME"] != "torch"))
        run_mode(config, args, state)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except InputError as error:
        if args.debug:
            raise
        if state is None or state.is_main_process:  # one message: the other processes meet the same input
            print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_mode(config: dict, args: argparse.Namespace, state) -> None:
    """Run the one mode asked for, or train."""
    if args.eval_only:
        run_eval_only(config, args.quiet)
    elif args.export_onnx:
        run_export_onnx(config)
    elif args.search:
        run_search(config, args, state, args.search)
    else:
        with waits_said(state):
            run_training(config, args, state)
            leave_processes(state)


def parse_args(argv: list[str]) -> tuple[dict, argparse.Namespace]:
    """One flag per setting of the constants block, and the mode flags; return (settings, run options)."""
    parser = settings_parser(sys.modules[__name__], usage="%(prog)s [--SETTING VALUE ...] [--eval-only | "
                             "--export-onnx | --search N] (see --help)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate OUTPUT_DIR/adapter on DATASET_NAME (its "
                        "test split, or a whole data file) into OUTPUT_DIR/eval_metrics.json, without training")
    parser.add_argument("--export-onnx", action="store_true", help="export OUTPUT_DIR/adapter to OUTPUT_DIR/onnx/ "
                        "(model.onnx, model_int8.onnx, tokenizer) for --runtime onnx and onnx-int8, or onnxruntime")
    parser.add_argument("--search", type=int, metavar="N", help="try N settings from SEARCH_SPACE (Optuna), each "
                        "scored on the validation split, then train the best; OUTPUT_DIR/search.db resumes it")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run; start over")
    args = parser.parse_args(argv)
    args.argv = argv  # --search prints the command that reproduces its best
    return {name: getattr(args, name) for name in SETTINGS}, args


def inference_command(argv: list[str]) -> str | None:
    """Where argv holds one of predict_sentiment.py's mode flags, a line naming the command to run instead."""
    flag = next((a.split("=")[0] for a in argv if a.split("=")[0] in INFERENCE_FLAGS), None)
    if flag is None:
        return None
    known, keep, kept = inference.build_parser()._option_string_actions, False, []
    for arg in argv:
        if arg.startswith("--"):
            keep = arg.split("=")[0] in known  # its value (or values) follow it
        if keep:
            kept.append(arg)
    return f"{flag} is predict_sentiment.py's: python predict_sentiment.py {shlex.join(kept)}"


def apply_preset(config: dict, has_gpu: bool) -> str:
    """Fill the settings left at None from the hardware preset; return the preset's name."""
    preset = "gpu" if has_gpu else "cpu"
    for name, value in PRESETS[preset].items():
        if config[name] is None:
            config[name] = value
    return preset


def setup_logging(quiet: bool, main_process: bool = True, transformers: bool = True) -> None:
    """Our messages go to stderr plainly; the libraries' routine chatter is turned down at the source."""
    import datasets

    logging.basicConfig(format="%(message)s", stream=sys.stderr, force=True)
    quiet = quiet or not main_process  # under torchrun only the main process reports; the others show only errors
    log.setLevel(logging.ERROR if not main_process else logging.WARNING if quiet else logging.INFO)
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
    if metrics.get("argmax"):  # a saved threshold: the metrics above are at it
        plain = metrics["argmax"]
        print(f"threshold: {metrics['threshold']:.4f} (at argmax: accuracy {plain['eval_accuracy']:.4f}, "
              f"F1 {plain['eval_f1']:.4f})")
    if len(metrics["confusion_matrix"]) == 2:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        print(f"confusion_matrix: [[tn={tn}, fp={fp}], [fn={fn}, tp={tp}]]")
    else:  # rows are the true classes, columns the predicted ones, both in class order
        print(f"per_class_f1: {json.dumps(metrics['per_class_f1'])}")
        print(f"confusion_matrix: {json.dumps(metrics['confusion_matrix'])}")


def resolve_precision(state, requested: str, has_gpu: bool, width: int) -> tuple[str, float | None]:
    """Choose PRECISION for this hardware; where a CPU's bf16 speed needs measuring, the main process measures it and
    shares the number, so every process decides alike. Return (precision, measured bf16 speedup or None)."""
    from accelerate.utils import broadcast_object_list

    speedup = None
    if inference.bf16_probe_needed(requested, has_gpu):
        speedup = broadcast_object_list([inference.bf16_speedup(width) if state.is_main_process else None])[0]
    return inference.settle_precision(requested, has_gpu, speedup), speedup


def join_processes():
    """accelerate's PartialState; under torchrun it joins the process group (NCCL on GPUs, gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextmanager
def waits_said(state):
    """A process that waits for the others in vain ends with exit code 1: after one line where it timed out; quietly
    where another one failed, which has printed why (torchrun then ends the rest)."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as error:  # from gloo or NCCL: some are DistErrors, a lost peer's is a plain RuntimeError
        if not (isinstance(error, dist.DistError) or re.search(r"\bgloo\b|\bnccl\b", str(error), re.I)):
            raise
        if re.search(r"time[d ]?\s?out", str(error), re.I):
            print(f"error: process {state.process_index} timed out waiting for the other processes "
                  f"({one_line(error)}); one of them is stuck or stopped without an error", file=sys.stderr)
        raise SystemExit(1) from None


def leave_processes(state) -> None:
    """Under torchrun, wait for every process (the main one saves last), then close the process group: a process
    that exits while the others still use the group can abort in its teardown."""
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()


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
    import tempfile

    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # exclusive: no link
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_dir(path: Path, write) -> None:
    """Fill a new, uniquely named folder beside path with write(tmp), then swap it in for path; the old copy goes
    only after. A swap that a hard kill cut short is repaired first."""
    import tempfile

    repair_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(str(tmp))
    except BaseException:  # a failed or interrupted write leaves the old folder, and no half one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{time.time_ns()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)  # between the two renames only the old copy has a name: repair_dir puts it back
    shutil.rmtree(old, ignore_errors=True)


def repair_outputs(output_dir: Path) -> None:
    """Put back the saved folders whose swap a hard kill cut short."""
    for name in ("adapter", "merged", "onnx"):
        repair_dir(output_dir / name)


def repair_dir(path: Path) -> None:
    """Where a write_dir swap was cut short (path gone, its old copy kept), put the old copy back."""
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds and not path.exists():
        olds.pop().rename(path)
        log.warning(f"warning: {path} was being replaced when the run stopped; restored the previous one")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
