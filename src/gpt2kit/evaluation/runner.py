"""`gpt2kit eval`: load a model directory, run one task on one data file, write and return the report."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import gpt2kit

from ..checkpoint import is_saved_model_file
from ..files import check_output_file, require_file, sha256_file
from ..pipeline import load_classifier_and_tokenizer, load_model_and_tokenizer
from . import classification, lambada, perplexity
from .report import summary_line, write_report

TASKS = ("wikitext", "perplexity", "lambada", "classification")


def evaluate(task: str, model: str | os.PathLike, data: str | os.PathLike, *,
             tokenizer: str | os.PathLike | None = None, max_length: int | None = None,
             stride: int | None = None, batch_size: int = 8, format: str = "auto", detokenize: bool | None = None,
             stop_word_filter: bool = False, limit: int | None = None, output: str | os.PathLike | None = None,
             device: str = "cpu", dtype: torch.dtype | str | None = None, random_init: bool = False,
             quantize: str | None = None, pack_weights: bool = False, compile: bool = False,
             text_key: str | None = None, text_pair_key: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `task` (wikitext | perplexity | lambada | classification) and return its report (written to
    `output` as JSON when given). `wikitext` is `perplexity` with WikiText's article split and detokenizer.
    The tokenizer is `tokenizer` if given, else the model directory's vocabulary files, else GPT-2's;
    `random_init` evaluates a preset with seeded random weights (for smoke tests and benchmarks). `text_key`: a
    JSON-lines document's field (default "text"), or a classification file's text column (default: found by
    name); `text_pair_key`: the column of a sentence pair's second sentence."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    # A setting the task has no use for is a mistake to point out, not to drop silently.
    ignored = {"stride": stride is not None and task not in ("wikitext", "perplexity"),
               "detokenize": detokenize is not None and task not in ("wikitext", "perplexity"),
               "format": format != "auto" and task == "lambada",
               "stop_word_filter": stop_word_filter and task != "lambada",
               "compile": compile and task == "classification",
               "text_key": text_key is not None and task == "lambada",
               "text_pair_key": text_pair_key is not None and task != "classification"}
    for name, given in ignored.items():
        if given:
            raise ValueError(f"{name} does not apply to the {task} task")
    require_file(data, "data file")
    if output is not None and check_output_file(output).resolve() == Path(data).resolve():
        raise ValueError(f"output {output} is the data file: the report would replace it")
    in_model_dir = isinstance(model, (str, os.PathLike)) and output is not None and \
        Path(output).resolve().parent == Path(model).resolve()
    if in_model_dir and is_saved_model_file(Path(output).name):
        raise ValueError(f"output {output} is a file of the model being evaluated: the report would replace it")
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    if task == "classification":
        if random_init or quantize or pack_weights:
            raise ValueError("random_init, quantize and pack_weights are for language-model tasks; classification "
                             "loads a finetuned classifier as it is")
        net, tok = load_classifier_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype, device=device)
    else:
        net, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype, device=device,
                                            random_init=random_init, quantize=quantize,
                                            pack_weights=pack_weights)
    if task in ("wikitext", "perplexity"):
        if task == "wikitext":
            # WikiText's article split, or one article per JSON line; its detokenizer either way (whatever
            # --format says: the task's definition).
            if format == "auto":
                format = perplexity.wikitext_format(Path(data))
            detokenize = True if detokenize is None else detokenize
        settings = {"format": perplexity.resolve_format(Path(data), format)}
        if text_key is not None and settings["format"] != "jsonl":
            raise ValueError(f"text_key names the field of JSON lines data; {data} is read as {settings['format']}")
        results = perplexity.evaluate_perplexity(net, tok, data, max_length=max_length, stride=stride,
                                                 batch_size=batch_size, format=format, detokenize=detokenize,
                                                 text_key=text_key or "text", limit=limit, compile=compile,
                                                 progress=progress)
        definitions = perplexity.DEFINITIONS
    elif task == "lambada":
        settings = {"stop_word_filter": stop_word_filter}
        results = lambada.evaluate_lambada(net, tok, data, max_length=max_length, batch_size=batch_size,
                                           stop_word_filter=stop_word_filter, limit=limit, compile=compile,
                                           progress=progress)
        definitions = lambada.DEFINITIONS
    else:
        columns = [c for c in (text_key, text_pair_key) if c is not None] or None
        if text_pair_key is not None and text_key is None:
            raise ValueError("text_pair_key needs text_key: the column of the pair's first sentence")
        settings = {"format": format, "text_columns": columns}
        results = classification.evaluate_classification(net, tok, data, format=format, max_length=max_length,
                                                         batch_size=batch_size, limit=limit, text_columns=columns,
                                                         progress=progress)
        definitions = classification.DEFINITIONS
    settings.update(batch_size=batch_size, limit=limit, device=device, compile=compile,
                    dtype=str(next(net.parameters()).dtype).removeprefix("torch."), quantize=quantize,
                    pack_weights=pack_weights, random_init=random_init)
    report = {
        "task": task,
        "results": results,
        "definitions": {k: v for k, v in definitions.items() if k in results},
        "model": {"path": str(model), "parameters": type(net).count_parameters(net.config),  # int8 ones too
                  "n_layer": net.config.n_layer,
                  "n_embd": net.config.n_embd, "n_positions": net.config.n_positions,
                  "vocab_size": net.config.vocab_size},
        "tokenizer": {"given": None if tokenizer is None else str(tokenizer), "encoding": tok.encoding.name,
                      "vocab_size": tok.vocab_size},
        "data": {"path": str(data), "sha256": sha256_file(data), "bytes": Path(data).stat().st_size},
        "settings": settings,
        "gpt2kit_version": gpt2kit.__version__, "torch_version": torch.__version__,
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 3),
    }
    report["summary"] = summary_line(report)
    if output is not None:
        write_report(report, output)
    return report
