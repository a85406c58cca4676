"""The baseline: the Hugging Face text-classification guide's recipe plus LoRA, untuned.

Plain Trainer, tokenization with truncation, DataCollatorWithPadding, fp32, evaluation each epoch.
Run by bench/run.py with the same settings as fine_tune_sentiment.py; writes OUT/metrics.json.
With --full it fine-tunes every weight instead (no LoRA): bench/run.py's accuracy anchor.

    python bench/baseline.py --model PATH --data FOLDER --out FOLDER --epochs 1 --max-length 128 ...
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag, kind in (("--model", str), ("--data", str), ("--out", str), ("--epochs", int), ("--max-length", int),
                       ("--batch-size", int), ("--learning-rate", float), ("--lora-r", int), ("--lora-alpha", int),
                       ("--lora-dropout", float), ("--seed", int)):
        parser.add_argument(flag, type=kind, required=True)
    parser.add_argument("--target-modules", nargs="+", required=True)
    parser.add_argument("--full", action="store_true", help="full fine-tuning: train every weight, no LoRA")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the hardware is fast at it)")
    parser.add_argument("--grouped", action="store_true", help="length-grouped batches, as ours (a speed lever)")
    args = parser.parse_args()

    data = load_dataset(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenized = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    if not args.full:
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout,
                                                 target_modules=args.target_modules))

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        return {"accuracy": float((np.argmax(predictions, axis=1) == labels).mean())}

    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"), learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs, weight_decay=0.01, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, report_to="none", seed=args.seed, disable_tqdm=True, bf16=args.bf16,
        use_cpu=args.bf16 and not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if args.grouped else "random")
    pick_on = "validation" if "validation" in tokenized else "test"  # a validation split: test is scored once, last
    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized["train"],
                      eval_dataset=tokenized[pick_on], processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer=tokenizer), compute_metrics=compute_metrics)
    train_metrics = trainer.train().metrics
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    best = max(evals, key=lambda h: h["eval_accuracy"])
    metrics = {"eval_accuracy": best["eval_accuracy"], "eval_loss": best["eval_loss"],
               "eval_samples_per_second": best["eval_samples_per_second"],
               "train_samples_per_second": train_metrics["train_samples_per_second"],
               "train_seconds": train_metrics["train_runtime"], "train_samples": len(tokenized["train"]),
               "epoch_accuracies": [h["eval_accuracy"] for h in evals], "selected_on": pick_on}
    if pick_on == "validation":  # the best epoch's model is loaded: score the test split once
        test = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
        metrics |= {"validation_accuracy": best["eval_accuracy"], "eval_accuracy": test["test_accuracy"],
                    "eval_loss": test["test_loss"]}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
