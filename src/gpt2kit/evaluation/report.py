"""The JSON report of one evaluation run and its one-line summary.

A report says what was measured (task, model, data file and its sha256, settings), the numbers, what each
number means (definitions), and when and how long it took — enough to reproduce or compare it later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, standard_json

# The numbers each task's summary line leads with, in order.
HEADLINE = {
    "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
    "perplexity": ("token_perplexity", "word_perplexity", "bits_per_byte"),
    "lambada": ("acc", "perplexity", "acc_stop_word_filter"),
    "classification": ("accuracy", "matthews_correlation"),
}
COUNTS = ("documents", "tokens", "passages", "examples")


def summary_line(report: dict[str, Any]) -> str:
    """e.g. `wikitext: word_perplexity 29.41 | byte_perplexity 1.721 | ... (62 documents, 287,644 tokens, 41.2 s)`"""
    results = report["results"]
    numbers = [f"{key} {results[key]:.4g}" for key in HEADLINE[report["task"]] if key in results]
    counts = [f"{results[key]:,} {key}" for key in COUNTS if key in results]
    counts.append(f"{report['seconds']:.1f} s")
    return f"{report['task']}: {' | '.join(numbers)} ({', '.join(counts)})"


def format_report(report: dict[str, Any]) -> str:
    """The report for a terminal: each number with its definition, the counts, and the summary line last."""
    results, definitions = report["results"], report["definitions"]
    lines = [f"{report['task']} on {report['data']['path']} (sha256 {report['data']['sha256'][:12]}), model "
             f"{report['model']['path']} ({report['model']['parameters'] / 1e6:,.1f}M parameters)"]
    for key, value in results.items():
        if isinstance(value, float):
            lines.append(f"  {key:<26}{value:<14.6g}{definitions.get(key, '')}")
    if "per_class" in results:
        lines.append(f"  {'class':<26}{'support':>8}{'predicted':>10}{'correct':>8}{'recall':>8}")
        for name, c in results["per_class"].items():
            recall = "-" if c["recall"] is None else f"{c['recall']:.4f}"
            lines.append(f"  {name:<26}{c['support']:>8}{c['predicted']:>10}{c['correct']:>8}{recall:>8}")
    counts = [f"{key}={value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{key}={value}"
              for key, value in results.items() if isinstance(value, (int, str)) or value is None]
    lines.append("  " + " ".join(counts))
    if "windows" in definitions:
        lines.append(f"  windows: {definitions['windows']}")
    lines.append(report["summary"])
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON atomically (temporary file + rename): a reader never sees half a report.
    Numbers past float's range (a perplexity of inf) are the strings "inf", "-inf" or "nan": JSON has no
    literal for them, and Python's `Infinity` extension breaks other readers."""
    return atomic_write_text(path, json.dumps(standard_json(report), indent=2, allow_nan=False) + "\n")
