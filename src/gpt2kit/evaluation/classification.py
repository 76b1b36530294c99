"""Accuracy, per-class counts and Matthews correlation of a `GPT2ForSequenceClassification` on labelled text
(GLUE SST-2 and CoLA, AG News, or a csv), read by `gpt2kit.data.ClassificationDataset`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import ClassificationDataset, collate
from ..data.datasets import unnamed_classes
from ..model import eval_mode
from ..tokenizer import GPT2Tokenizer
from .scoring import check_limit, model_device, resolve_max_length

DEFINITIONS = {
    "accuracy": "correct predictions / examples; prediction = argmax of the classifier's logits, read at each "
                "text's last token (texts longer than max_length keep their first max_length tokens)",
    "matthews_correlation": "Matthews correlation of predictions and labels (GLUE's CoLA metric); with more than "
                            "two classes the multi-class form R_K of Gorodkin (2004), as "
                            "sklearn.metrics.matthews_corrcoef; 0 when every label or every prediction is "
                            "one class",
    "per_class": "for each label: support (examples with that label), predicted (examples predicted as it), "
                 "correct, recall = correct / support, precision = correct / predicted",
    "confusion_matrix": "confusion_matrix[true label][predicted label] = number of examples",
}


def matthews_correlation(confusion: Sequence[Sequence[int]]) -> float:
    """Multi-class Matthews correlation from a confusion matrix (rows: true labels, columns: predictions)."""
    k = len(confusion)
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(k))
    true = [sum(row) for row in confusion]
    predicted = [sum(confusion[i][j] for i in range(k)) for j in range(k)]
    covariance = correct * total - sum(t * p for t, p in zip(true, predicted))
    spread = (total ** 2 - sum(p * p for p in predicted)) * (total ** 2 - sum(t * t for t in true))
    return covariance / math.sqrt(spread) if spread else 0.0


def classification_metrics(labels: Sequence[int], predictions: Sequence[int],
                           label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, Matthews correlation, per-class counts and the confusion matrix of fixed predictions."""
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"need as many predictions as labels (> 0), got {len(predictions)} and {len(labels)}")
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for label, prediction in zip(labels, predictions):
        confusion[label][prediction] += 1
    per_class = {}
    for i, name in enumerate(label_names):
        support, predicted, correct = sum(confusion[i]), sum(row[i] for row in confusion), confusion[i][i]
        per_class[name] = {"support": support, "predicted": predicted, "correct": correct,
                           "recall": correct / support if support else None,
                           "precision": correct / predicted if predicted else None}
    correct = sum(confusion[i][i] for i in range(k))
    return {"accuracy": correct / len(labels), "matthews_correlation": matthews_correlation(confusion),
            "examples": len(labels), "correct": correct, "per_class": per_class, "confusion_matrix": confusion,
            "labels": list(label_names)}


@torch.inference_mode()
def classify(model: nn.Module, tokenizer: GPT2Tokenizer, texts: Sequence[str], *, max_length: int | None = None,
             batch_size: int = 8) -> torch.Tensor:
    """The classifier's logits (len(texts), num_labels) in float32, each text encoded as in training (stripped,
    cut to max_length tokens, by default the model's context) and read at its last token."""
    from ..data.datasets import encode_classification_texts

    tokenizer.check_fits(model.config.vocab_size)
    rows = encode_classification_texts(tokenizer, texts, resolve_max_length(model, max_length))
    device = model_device(model)
    out = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": row} for row in rows[start:start + batch_size]], tokenizer.pad_token_id)
            out.append(model(batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.num_labels)


@torch.inference_mode()
def evaluate_classification(model: nn.Module, tokenizer: GPT2Tokenizer,
                            data: str | os.PathLike | ClassificationDataset, *, format: str = "auto",
                            max_length: int | None = None, batch_size: int = 8, limit: int | None = None,
                            label_names: Sequence[str] | None = None, text_columns: Sequence[str] | None = None,
                            progress: bool = True) -> dict[str, Any]:
    """Classify every example of `data` (a file ClassificationDataset reads, or the dataset itself) and score
    the predictions with `classification_metrics`. max_length defaults to the model's context; `text_columns`
    names a headered file's text column (or a sentence pair's two)."""
    tokenizer.check_fits(model.config.vocab_size)
    check_limit(limit)
    max_length = resolve_max_length(model, max_length)
    names = [model.config.id2label[i] for i in sorted(model.config.id2label or {})]
    if label_names is None and not unnamed_classes(names):
        label_names = names  # the classes the model was trained on, in its output order
    if not isinstance(data, ClassificationDataset):
        data = ClassificationDataset(data, tokenizer, format=format, max_length=max_length,
                                     label_names=label_names, num_labels=model.config.num_labels,
                                     text_columns=text_columns)
    elif (label_names is not None and data.named_classes
          and [data.id2label[i].casefold() for i in range(data.num_labels)] != [n.casefold() for n in label_names]):
        # Named classes numbered by the dataset: under the model's other numbers every prediction would be scored
        # wrongly. Read with the model's names, the file's labels map onto them by name.
        raise ValueError(f"{data.path}: the dataset numbers its classes {list(data.id2label.values())}, the model "
                         f"{list(label_names)}; read it with label_names={list(label_names)}")
    if data.num_labels != model.config.num_labels:
        raise ValueError(f"{data.path}: {data.num_labels} classes ({', '.join(data.id2label.values())}) but the "
                         f"model has {model.config.num_labels} outputs (config.num_labels)")
    examples = Subset(data, range(min(limit, len(data)))) if limit is not None else data
    if not len(examples):
        raise ValueError(f"{data.path}: no examples to evaluate")
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    device = model_device(model)
    labels, predictions = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="classification", unit="batch", disable=not progress):
            input_ids = batch["input_ids"][:, :max_length].to(device)
            attention_mask = batch["attention_mask"][:, :max_length].to(device)
            logits = model(input_ids, attention_mask=attention_mask).logits
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    results = classification_metrics(labels, predictions, [data.id2label[i] for i in range(data.num_labels)])
    return {**results, "format": data.format, "max_length": max_length}
