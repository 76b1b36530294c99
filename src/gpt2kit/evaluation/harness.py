"""Cross-check: run lm-evaluation-harness's own `wikitext` and `lambada_openai` tasks on local files.

lm-evaluation-harness (`pip install "lm-eval[hf]"`) reads its data sets from the HuggingFace hub; here its
task files are included unchanged and only the data source is overridden with local JSON lines, so its
detokenizer, word/byte counts, rolling windows and metrics run exactly as published, offline, through its
HuggingFace-transformers backend. WikiText is given as the articles `split_wikitext_articles` cuts (the
layout of `EleutherAI/wikitext_document_level`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import read_utf8
from .perplexity import read_documents, wikitext_format

# Task name here -> (lm-eval's task file, its metrics).
TASKS = {
    "wikitext": ("wikitext/wikitext.yaml", ("word_perplexity", "byte_perplexity", "bits_per_byte")),
    "lambada": ("lambada/lambada_openai.yaml", ("acc", "perplexity")),
}


def _write_task(workdir: Path, task: str, data: Path, limit: int | None) -> str:
    """A task file that includes lm-eval's own and reads the first `limit` documents of a local copy."""
    import lm_eval

    base_yaml, _ = TASKS[task]
    if task == "wikitext":  # WikiText's articles, or one article per JSON line, as `gpt2kit eval` reads them
        rows = [json.dumps({"page": page}) for page in read_documents(data, format=wikitext_format(data))]
    else:
        rows = [line for line in read_utf8(data).split("\n") if line.strip()]  # as read_jsonl splits
    name = f"gpt2kit_local_{task}"
    copy = workdir / f"{name}.jsonl"
    if copy.resolve() == data.resolve():  # writing the copy would cut the user's file to `limit` rows
        raise ValueError(f"{data}: the comparison writes its copy of the data there; move the file or use another "
                         "working directory")
    copy.write_text("".join(row + "\n" for row in rows[:limit]), encoding="utf-8")
    spec = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / base_yaml),
        "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(copy.resolve())},
                           "cache_dir": str(workdir / "datasets-cache")},
        "training_split": None, "validation_split": None, "test_split": "test",
    }
    (workdir / f"{name}.yaml").write_text(json.dumps(spec, indent=2))  # JSON is YAML
    return name


def local_tasks(data: dict[str, str | os.PathLike], workdir: str | os.PathLike, *,
                limits: dict[str, int] | None = None):
    """(TaskManager, {task: lm-eval task name}) for `data` ({"wikitext": path, "lambada": path}); `limits`:
    the first N documents / passages of a task."""
    # Everything is local: HF hub and datasets must not try the network (and wait for its timeouts).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError('the comparison needs lm-evaluation-harness: pip install "lm-eval[hf]"') from None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    limits = limits or {}
    names = {task: _write_task(workdir, task, Path(path), limits.get(task)) for task, path in data.items()}
    # include_defaults=False: indexing lm-eval's thousands of built-in task files would take half a minute.
    return TaskManager(include_path=str(workdir), include_defaults=False), names


def run_lm_eval(model: Any, data: dict[str, str | os.PathLike], workdir: str | os.PathLike, *,
                limits: dict[str, int] | None = None, batch_size: int = 8,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """lm-eval's numbers for `data` on `model`: an HF-format directory (config.json + weights + tokenizer
    files) or an already loaded `lm_eval.models.huggingface.HFLM`."""
    task_manager, names = local_tasks(data, workdir, limits=limits)
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM

    if not isinstance(model, LM):
        model = HFLM(pretrained=str(model), dtype="float32", device=device, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=model, tasks=list(names.values()), task_manager=task_manager,
                                  log_samples=False, bootstrap_iters=0)
    return {task: {metric: out["results"][name][f"{metric},none"] for metric in TASKS[task][1]}
            for task, name in names.items()}
