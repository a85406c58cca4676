"""How a trained model is judged, how it decides and how it is described: metrics, calibration, the decision
threshold, the report, the model card.

Plain numpy over logits and labels, so it is the same for training's evaluation, --eval-only and any runtime's
logits; the pictures are inline SVG, so OUTPUT_DIR/report.html opens anywhere, offline. Imports no project file but
the inference file's softmax and decide (the one way every runtime turns probabilities into a label).
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

import numpy as np

from predict_sentiment import InputError, decide, softmax

BINS = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
MISTAKES = 20  # the report lists this many of the most confident wrong answers


# Metrics ---------------------------------------------------------------------------------------------------------


def metrics_from(logits: np.ndarray, labels: np.ndarray, names: list[str], threshold: float | None = None) -> dict:
    """The eval_* metrics and the confusion matrix of logits against labels, deciding as the saved model does
    (threshold: on the positive class's probability; None: argmax); per-class F1 with 3+ classes. With a threshold,
    "argmax" holds the same metrics for the plain argmax decision."""
    matrix = confusion_matrix(labels, decide(softmax(logits), threshold), len(names))
    found = scores(matrix)
    metrics = {f"eval_{k}": round(found[k], 4) for k in ("accuracy", "f1", "precision", "recall")}
    metrics["eval_loss"] = round(cross_entropy(logits, labels), 4)
    metrics["per_class_recall"] = dict(zip(names, found["per_class_recall"]))  # what class weights are for
    if len(names) > 2:  # two classes keep exactly the fields they always had
        metrics |= {"average": "macro", "per_class_f1": dict(zip(names, found["per_class_f1"]))}
    metrics |= {"confusion_matrix": matrix, "threshold": "argmax" if threshold is None else threshold}
    if threshold is not None:
        plain = metrics_from(logits, labels, names)
        metrics["argmax"] = {k: plain[k] for k in plain if k not in ("eval_loss", "threshold")}
    return metrics


def compute_metrics(eval_pred) -> dict:
    """The Trainer's per-evaluation metrics: scores() of the confusion matrix, scalars only."""
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    metrics = scores(confusion_matrix(labels, predictions, logits.shape[-1]))
    metrics["predicted_classes"] = len(np.unique(predictions))  # 1: collapsed (--search prunes such a trial)
    for key in ("per_class_f1", "per_class_recall", "per_class_precision"):
        del metrics[key]  # the Trainer logs scalars; metrics_from has the lists
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
            "per_class_precision": [round(float(x), 4) for x in precision],
            "per_class_recall": [round(float(x), 4) for x in recall]}


# Calibration -----------------------------------------------------------------------------------------------------


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-probability of the true classes (NLL)."""
    return float(-np.log(np.maximum(softmax(logits)[np.arange(len(labels)), labels], 1e-12)).mean())


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


def confidence_bins(logits: np.ndarray, labels: np.ndarray, bins: int = BINS):
    """Each row's confidence, whether its argmax is right (0/1), and its equal-width confidence bin."""
    probabilities = softmax(logits)
    confidence, right = probabilities.max(-1), (probabilities.argmax(-1) == labels).astype(float)
    return confidence, right, np.minimum((confidence * bins).astype(int), bins - 1)


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = BINS):
    """Per equal-width confidence bin: its rows, mean confidence and accuracy (bins without rows are left out)."""
    confidence, right, which = confidence_bins(logits, labels, bins)
    rows = np.bincount(which, minlength=bins)
    kept = rows > 0
    mean = lambda x: np.bincount(which, weights=x, minlength=bins)[kept] / rows[kept]  # noqa: E731
    return rows[kept], mean(confidence), mean(right)


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by its rows."""
    rows, confidence, accuracy = reliability(logits, labels, bins)
    return float(np.sum(rows * np.abs(accuracy - confidence)) / len(labels))


def ece_interval(logits: np.ndarray, labels: np.ndarray, draws: int = 1000, seed: int = 0) -> list[float]:
    """A bootstrap 90% interval of the ECE: the rows drawn again with replacement, draws times (seeded)."""
    confidence, right, which = confidence_bins(logits, labels)
    rng, n, found = np.random.default_rng(seed), len(labels), []
    for _ in range(draws):
        rows = rng.integers(0, n, n)
        gap = np.bincount(which[rows], weights=right[rows] - confidence[rows], minlength=BINS)
        found.append(np.abs(gap).sum() / n)  # per bin |sum(right - confidence)| / n = rows/n x |acc - conf|
    return [round(float(x), 4) for x in np.percentile(found, [5, 95])]


def calibration_report(temperature: float, held_logits, held_labels, test_logits, test_labels) -> dict:
    """The temperature, NLL (validation, test) and ECE (test, with its bootstrap 90% interval) before and after it;
    the test logits are the calibrated model's."""
    t = temperature
    report = {"temperature": t, "bins": BINS,
              "validation_nll_before": cross_entropy(held_logits, held_labels),
              "validation_nll_after": cross_entropy(held_logits / t, held_labels),
              "test_ece_before": ece(test_logits * t, test_labels),
              "test_ece_after": ece(test_logits, test_labels),
              "test_nll_before": cross_entropy(test_logits * t, test_labels),
              "test_nll_after": cross_entropy(test_logits, test_labels)}
    report = {k: round(v, 4) for k, v in report.items()}
    return report | {"test_ece_before_90": ece_interval(test_logits * t, test_labels),
                     "test_ece_after_90": ece_interval(test_logits, test_labels)}


# The decision threshold ------------------------------------------------------------------------------------------


def parse_threshold(spec: str) -> tuple[str, float | None]:
    """THRESHOLD as (kind, value): argmax, fixed (a probability), f1, precision or recall (a target in (0, 1])."""
    spec = str(spec).strip().lower()
    kind, _, value = spec.partition("=")
    if spec in ("argmax", "f1"):
        return spec, None
    try:
        number = float(value if kind in ("precision", "recall") else spec)
    except ValueError:
        number = None
    if number is None or not 0 < number <= 1 or (kind not in ("precision", "recall") and number == 1):
        raise InputError(f"THRESHOLD {spec!r} is not one of: argmax, a probability between 0 and 1 (0.7), f1, "
                         f"precision=P or recall=R (P, R above 0, at most 1)")
    return (kind, number) if kind in ("precision", "recall") else ("fixed", number)


def choose_threshold(spec: str, logits: np.ndarray, labels: np.ndarray) -> tuple[float | None, dict]:
    """The threshold on the positive class's probability that THRESHOLD asks for, tuned on (validation) logits and
    labels, and what it gives there. f1: the best macro F1; precision=P: the best recall among thresholds of
    precision >= P; recall=R: the best precision among those of recall >= R. Not reachable: argmax, and why."""
    kind, target = parse_threshold(spec)
    if kind == "argmax":
        return None, {"threshold": "argmax"}
    if kind == "fixed":
        return target, {"threshold": target, "asked": spec}
    cut = curve_points(softmax(logits)[:, 1], labels)
    if kind == "f1":
        best = int(np.argmax(cut["macro_f1"]))
    else:
        reached = np.flatnonzero(cut[kind] >= target - 1e-12)
        if not len(reached):
            return None, {"threshold": "argmax", "asked": spec, "status": f"no threshold reaches {kind} {target} on "
                          f"validation (at most {cut[kind].max():.4f}): argmax kept"}
        other = "recall" if kind == "precision" else "precision"
        best = int(reached[np.argmax(cut[other][reached])])  # the first of equals: the highest such threshold
    found = {k: round(float(cut[k][best]), 4) for k in ("precision", "recall", "macro_f1")}
    threshold = float(cut["threshold"][best])  # exact: rounded up, it would drop the row that defines it
    return threshold, {"threshold": threshold, "asked": spec, "validation": found}


def curve_points(positive: np.ndarray, labels: np.ndarray) -> dict:
    """For every distinct probability t (highest first), what 'positive if p >= t' gives: precision and recall of
    the positive class, the false-positive rate, macro F1."""
    order = np.argsort(-positive, kind="stable")
    p, y = positive[order], (labels[order] == 1).astype(float)
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the last row of each run of equal probabilities
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    positives, negatives = y.sum(), len(y) - y.sum()
    fn, tn = positives - tp, negatives - fp
    f1_positive, f1_negative = 2 * tp / np.maximum(2 * tp + fp + fn, 1), 2 * tn / np.maximum(2 * tn + fn + fp, 1)
    return {"threshold": p[last], "precision": tp / np.maximum(tp + fp, 1), "recall": tp / max(positives, 1),
            "fpr": fp / max(negatives, 1), "macro_f1": (f1_positive + f1_negative) / 2}


# The report: OUTPUT_DIR/report.html ------------------------------------------------------------------------------


def write_report(path: Path, metrics: dict, logits: np.ndarray, labels: np.ndarray, texts: list[str],
                 names: list[str], threshold: float | None, temperature: float | None = None) -> Path:
    """A self-contained page (inline SVG, no network): metrics, the confusion matrix, per-class scores, the
    reliability diagram (before and after calibration), precision-recall and ROC curves with the threshold marked,
    and the most confident mistakes."""
    labels = np.asarray(labels)
    probabilities = softmax(logits)
    found = scores(metrics["confusion_matrix"])
    calibration = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else {}
    sections = [metrics_table(metrics), matrix_table(metrics["confusion_matrix"], names),
                table("per-class", "Per class", ["class", "precision", "recall", "F1", "rows"],
                      [[n, found["per_class_precision"][i], found["per_class_recall"][i], found["per_class_f1"][i],
                        int(np.sum(labels == i))] for i, n in enumerate(names)]),
                reliability_figure(logits, labels, temperature, calibration)]
    sections += curve_figures(probabilities, labels, names, threshold)
    sections.append(mistakes_table(probabilities, labels, texts, names, threshold))
    source = metrics.get("dataset") or metrics.get("config", {}).get("DATASET_NAME", "")
    title = f"Sentiment model report: {html.escape(str(source))}"
    page = PAGE.format(title=title, date=time.strftime("%Y-%m-%d %H:%M"), rows=len(labels), body="\n".join(sections))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td.text{{text-align:left;max-width:560px}}figure{{display:inline-block;margin:0 1em 1em 0}}
figcaption{{font-size:12px;color:#555;max-width:340px}}</style></head>
<body><h1>{title}</h1><p>{rows} test rows, written {date}.</p>
{body}
</body></html>
"""


def table(key: str, caption: str, header: list[str], rows: list[list], raw: bool = False) -> str:
    """An HTML table, cells escaped (raw: the first column is HTML already)."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i == 0 else ""}">'
                                    f'{row[0] if raw and i == 0 else cell(v)}</td>' for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return (f'<h2>{caption}</h2><table id="{key}"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + f"</tr>{body}</table>")


def metrics_table(metrics: dict) -> str:
    """Accuracy, F1, precision, recall at the saved decision, and at argmax when a threshold is saved."""
    keys, plain = ("accuracy", "f1", "precision", "recall"), metrics.get("argmax")
    header = ["metric", f"at threshold {metrics['threshold']}" if plain else "value"] + (["at argmax"] if plain else [])
    rows = [[k, metrics[f"eval_{k}"]] + ([plain[f"eval_{k}"]] if plain else []) for k in keys]
    return table("metrics", "Metrics", header, rows + [["loss (NLL)", metrics["eval_loss"]] + ([""] if plain else [])])


def matrix_table(matrix: list[list[int]], names: list[str]) -> str:
    """The confusion matrix: rows are the true classes, columns the predicted ones."""
    return table("confusion", "Confusion matrix (rows: true, columns: predicted)", ["true \\ predicted", *names],
                 [[n, *row] for n, row in zip(names, matrix)])


def mistakes_table(probabilities, labels, texts, names, threshold) -> str:
    """The most confident wrong answers: the first thing to read when looking for label noise."""
    predicted = decide(probabilities, threshold)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")[:MISTAKES]]
    rows = [[html.escape(texts[i] if len(texts[i]) <= 600 else texts[i][:597] + "..."), names[labels[i]],
             names[predicted[i]], float(probabilities[i, predicted[i]])] for i in worst]
    return table("mistakes", f"The {len(rows)} most confident mistakes (of {len(wrong)})",
                 ["text", "true", "predicted", "score"], rows, raw=True)


def reliability_figure(logits, labels, temperature: float | None, calibration: dict) -> str:
    """Accuracy against confidence per bin, before calibration (logits x T) and as saved; the diagonal is perfect."""
    series = [] if not temperature or temperature == 1 else [("before (red)", logits * temperature, "#d62728")]
    lines, legend = [], []
    known = {"before (red)": calibration.get("test_ece_before_90"),
             "as saved (blue)": calibration.get("test_ece_after_90")}
    for name, values, color in series + [("as saved (blue)", logits, "#1f77b4")]:
        _, confidence, accuracy = reliability(values, labels)
        interval = known[name] or ece_interval(values, labels)  # training's, else drawn here
        lines.append((confidence, accuracy, color))
        legend.append(f"{name}: ECE {ece(values, labels):.4f} (90% {interval[0]:.4f}-{interval[1]:.4f})")
    low = min(min(c.min() for c, _, _ in lines), 1 / max(len(np.unique(labels)), 2))
    caption = "; ".join(legend) + (f"; temperature {temperature:.3f}" if temperature else "")
    return figure("reliability", "Reliability", svg(lines, "confidence", "accuracy", (low, 1), (0, 1), diagonal=True),
                  caption)


def curve_figures(probabilities, labels, names, threshold) -> list[str]:
    """Precision-recall and ROC curves of each class against the rest (two classes: the positive one), with the
    saved threshold (or 0.5, argmax's) marked."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    classes = [1] if len(names) == 2 else range(len(names))
    pr, roc, captions = [], [], []
    for k in classes:
        cut = curve_points(probabilities[:, k], (labels == k).astype(int))
        color = colors[k % len(colors)]
        recall, precision = np.r_[0, cut["recall"]], np.r_[cut["precision"][0], cut["precision"]]
        fpr, tpr = np.r_[0, cut["fpr"]], np.r_[0, cut["recall"]]
        pr.append((recall, precision, color))
        roc.append((fpr, tpr, color))
        captions.append(f"{names[k]}: average precision {np.sum(np.diff(recall) * precision[1:]):.4f}, "
                        f"ROC AUC {np.trapezoid(tpr, fpr) if hasattr(np, 'trapezoid') else np.trapz(tpr, fpr):.4f}")
    marks = ([], [])
    if len(names) == 2:
        at = 0.5 if threshold is None else threshold
        cut = curve_points(probabilities[:, 1], labels)
        i = int(np.searchsorted(-cut["threshold"], -at, side="right")) - 1  # the last t >= at
        if i >= 0:
            marks = ([(cut["recall"][i], cut["precision"][i])], [(cut["fpr"][i], cut["recall"][i])])
            captions.append(f"marked: the threshold {at:g}" + (" (argmax)" if threshold is None else ""))
    return [figure("pr", "Precision-recall", svg(pr, "recall", "precision", (0, 1), (0, 1), marks=marks[0]),
                   "; ".join(captions)),
            figure("roc", "ROC", svg(roc, "false-positive rate", "true-positive rate", (0, 1), (0, 1),
                                     diagonal=True, marks=marks[1]), "; ".join(captions))]


def figure(key: str, title: str, drawing: str, caption: str) -> str:
    return f'<figure id="{key}"><h3>{title}</h3>{drawing}<figcaption>{html.escape(caption)}</figcaption></figure>'


def svg(lines, xlabel: str, ylabel: str, xs: tuple, ys: tuple, diagonal: bool = False, marks=()) -> str:
    """A 320x280 line chart: lines of (x values, y values, colour), in the box xs x ys, with marked points."""
    width, height, left, bottom = 320, 280, 44, 36
    x = lambda v: left + (v - xs[0]) / (xs[1] - xs[0] or 1) * (width - left - 8)  # noqa: E731
    y = lambda v: height - bottom - (v - ys[0]) / (ys[1] - ys[0] or 1) * (height - bottom - 8)  # noqa: E731
    parts = [f'<rect x="{left}" y="8" width="{width - left - 8}" height="{height - bottom - 8}" fill="none" '
             f'stroke="#999"/>']
    for t in np.linspace(0, 1, 6):
        parts.append(f'<text x="{x(xs[0] + t * (xs[1] - xs[0])):.1f}" y="{height - bottom + 14}" font-size="10" '
                     f'text-anchor="middle">{xs[0] + t * (xs[1] - xs[0]):.2g}</text>'
                     f'<text x="{left - 4}" y="{y(ys[0] + t * (ys[1] - ys[0])) + 3:.1f}" font-size="10" '
                     f'text-anchor="end">{ys[0] + t * (ys[1] - ys[0]):.2g}</text>')
    if diagonal:
        low, high = max(xs[0], ys[0]), min(xs[1], ys[1])
        parts.append(f'<line x1="{x(low):.1f}" y1="{y(low):.1f}" x2="{x(high):.1f}" y2="{y(high):.1f}" '
                     f'stroke="#bbb" stroke-dasharray="4"/>')
    for xv, yv, color in lines:
        step = max(1, len(xv) // 400)  # at most ~400 points a line
        points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xv[::step], yv[::step]))
        parts.append(f'<polyline class="line" points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    for a, b in marks:
        parts.append(f'<circle class="mark" cx="{x(a):.1f}" cy="{y(b):.1f}" r="5" fill="#000"/>')
    parts.append(f'<text x="{(left + width) / 2}" y="{height - 4}" font-size="12" text-anchor="middle">{xlabel}'
                 f'</text><text x="12" y="{(height - bottom) / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(height - bottom) / 2})">{ylabel}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(parts)}</svg>'


def save_plot(history: list, matrix: list, names: list[str], path: Path, log=None) -> Path | None:
    """Plot train/eval loss and eval accuracy per step next to the confusion matrix (training.png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        if log:
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


# The model card ----------------------------------------------------------------------------------------------


CARD = """---
{header}
---

# LoRA sentiment adapter for `{model}`

Trained by `fine_tune_sentiment.py` on {date}: a LoRA adapter plus a fully trained classification head{merged}.

- **Labels:** {labels}
- **Data:** `{dataset}`, {train_samples:,} training and {eval_samples:,} evaluation rows; reviews longer than \
{max_length} tokens cut as `{truncation}`
- **LoRA:** r={r}, alpha={alpha}, dropout={dropout}, targets {targets}{layers}; {trainable:,} of {total:,} parameters trained
- **Training:** {epochs} epoch(s), batch size {batch_size} x {processes} process(es), learning rate {learning_rate}, \
precision {precision}, on {device}
- **Probabilities:** {confidence}
- **Decision:** {decision}

## Evaluation ({eval_samples:,} rows, {date})

| metric | value |
|---|---|
{rows}

## How to use

```python
from transformers import pipeline
labels = {label_maps!r}
{load}
classify("This movie was fantastic!")
```

`pipeline()` cuts reviews longer than {max_length} tokens at the head only; `predict_sentiment.py
--predict` cuts them as training did (`{truncation}`).
"""
LOAD = {"peft": """classify = pipeline("text-classification", model="{where}", model_kwargs=labels)
# or, with peft's own class:
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
model = AutoPeftModelForSequenceClassification.from_pretrained("{where}", **labels)
classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{where}"))""",
        "transformers": 'classify = pipeline("text-classification", model="{where}")'}  # how the card loads it


def write_card(folder: Path, where: Path, metrics: dict, library: str) -> None:
    """Replace peft's empty template in folder (to become where) with CARD, filled, and hub metadata."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config, names = metrics["config"], list(metrics["labels"])
    results = [EvalResult(task_type="text-classification", task_name="Text Classification", dataset_split="test",
                          dataset_type=config["DATASET_NAME"], dataset_name=config["DATASET_NAME"], metric_type=kind,
                          metric_value=metrics[f"eval_{kind}"], metric_args=args)
               for kind, args in (("accuracy", None), ("f1", {"average": "macro"} if len(names) > 2 else None))]
    header = ModelCardData(base_model=config["MODEL_NAME"], library_name=library, pipeline_tag="text-classification",
                           tags=["sentiment-analysis", "lora", "fine_tune_sentiment"], eval_results=results,
                           model_name=f"{config['MODEL_NAME']} LoRA sentiment")
    found = metrics["calibration"]
    fields = dict(
        header=header.to_yaml(), model=config["MODEL_NAME"], date=metrics["date"], dataset=config["DATASET_NAME"],
        merged=", here merged into the base weights (no peft needed)" if library == "transformers" else "",
        labels=", ".join(f"{i} = {name}" for i, name in enumerate(names)), train_samples=metrics["train_samples"],
        eval_samples=metrics["eval_samples"], max_length=config["MAX_LENGTH"], truncation=config["TRUNCATION"],
        r=config["LORA_R"], alpha=config["LORA_ALPHA"], dropout=config["LORA_DROPOUT"],
        targets=metrics["lora_targets"], layers=f" in the encoder's last {config['LORA_LAYERS']} layers" if config.get(
            "LORA_LAYERS") else "", trainable=metrics["trainable_params"], total=metrics["total_params"],
        epochs=config["EPOCHS"], batch_size=config["BATCH_SIZE"], processes=metrics["world_size"],
        learning_rate=config["LEARNING_RATE"], precision=metrics["precision"], device=metrics["device"],
        confidence=found if isinstance(found, str) else (  # metrics.json: "off", "skipped: ...", or the report
            f"calibrated by temperature scaling (T = {found['temperature']}, folded into the classifier); test ECE "
            f"{found['test_ece_before']} before, {found['test_ece_after']} after"),
        decision="the most probable class (argmax)" if metrics["threshold"] == "argmax" else (
            f"{names[1]} where its probability is at least {metrics['threshold']} (THRESHOLD {config['THRESHOLD']}, "
            f"saved in tokenizer_config.json as decision_threshold); pipeline() takes argmax, so compare the scores"),
        rows="\n".join(f"| {k.removeprefix('eval_')} | {metrics[k]:.4f} |" for k in
                       ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "eval_loss")),
        label_maps={"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}},
        load=LOAD[library].format(where=where))
    ModelCard(CARD.format(**fields)).save(folder / "README.md")
