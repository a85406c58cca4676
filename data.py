"""The reviews a run trains and is scored on: from the hub, a local dataset folder, one data file or the Stanford
aclImdb/ folder; clean rows, class ids and names (two classes or more, in any spelling), seeded subsets.

datasets is imported where it is used, so importing this file stays instant. Imports no project file but the
inference file's errors.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from predict_sentiment import ID2LABEL, InputError, one_line

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

log = logging.getLogger("sentiment")

SENTIMENT_NAMES = {"neg": "negative", "negative": "negative", "neu": "neutral", "neutral": "neutral",
                   "pos": "positive", "positive": "positive"}  # string labels read as these, case-insensitively
SENTIMENT_ORDER = ["negative", "neutral", "positive"]  # their class order; other names follow, sorted
MAX_CLASSES = 100  # more is probably the wrong column
DATA_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
    data, feature = clean(data, text_column, label_column)
    if names is None:
        names, label_map = class_names(data, feature, label_column)  # from the cleaned rows: every class has text
    else:
        label_map = adapter_label_map(data["test"], feature, names, label_column)
    data = data.map(lambda b: {"labels": [label_map[label_key(l, feature)] for l in b["labels"]]}, batched=True,
                    desc="Labelling", features=Features(next(iter(data.values())).features | {
                        "labels": ClassLabel(names=names)}))
    if eval_split is None and "train" in data:
        log.info("No test split: holding out a seeded, stratified 20% of train for evaluation")
        try:
            data = data["train"].train_test_split(test_size=0.2, seed=seed, stratify_by_column="labels")
        except ValueError as error:  # a class with a single row cannot be split both ways
            raise InputError(f"cannot hold out a stratified 20% for evaluation: {one_line(error)}") from error
    elif "train" in data and eval_split != "test":  # training on data whose only held-out split is validation
        data["test"] = data.pop(eval_split)
    return data


def clean(data: DatasetDict, text_column: str, label_column: str):
    """The text and label columns only, named text and labels, without the rows whose text is empty or that have no
    label; return (data, the label column's feature)."""
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
    return data, feature


def adapter_label_map(test: Dataset, feature, names: list[str], label_column: str) -> dict:
    """--eval-only: each raw label of test as the class id of a trained adapter's names; unknown labels refused."""
    label_map = {label_key(name, None): i for i, name in enumerate(names)} | (
        {0: 0, 1: 1} if names == list(ID2LABEL.values()) else {})  # binary data may say 0/1 or neg/pos
    unknown = {label_key(v, feature) for v in test.unique("labels")} - set(label_map)
    if unknown:
        raise InputError(f"column {label_column!r} has labels the adapter does not know: "
                         f"{sorted(map(str, unknown))[:10]}; it knows {names}")
    return label_map


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
