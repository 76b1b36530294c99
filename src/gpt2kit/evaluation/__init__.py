"""Evaluation: WikiText / text perplexity, LAMBADA last-word accuracy, classification accuracy, JSON reports.

Every metric states its definition (each module's DEFINITIONS, copied into the report); with stride =
max_length the perplexity and LAMBADA numbers are those of lm-evaluation-harness's `wikitext` and
`lambada_openai` tasks.
"""

from .classification import classification_metrics, evaluate_classification
from .lambada import evaluate_lambada
from .perplexity import evaluate_perplexity, wikitext_detokenize
from .report import format_report, summary_line, write_report
from .runner import TASKS, evaluate

__all__ = ["TASKS", "classification_metrics", "evaluate", "evaluate_classification", "evaluate_lambada",
           "evaluate_perplexity", "format_report", "summary_line", "wikitext_detokenize", "write_report"]
