"""Perplexity of a causal LM on text: per token, per word and per byte, with disjoint or strided windows.

Definitions (the same as lm-evaluation-harness's `wikitext` task when stride = max_length):
- Each document is scored on its own. Its first token is predicted from `<|endoftext|>` (the EOS/BOS token),
  so every token of the document is scored exactly once.
- Windows: a document longer than `max_length` is cut into chunks of scored tokens — the first chunk holds
  `max_length` tokens, each later one `stride` tokens. A chunk is scored by one window of up to `max_length`
  input tokens that ends right before the chunk's last token, so each scored token sees the most left
  context the window allows (at least max_length - stride + 1 tokens once the document is that long). With
  stride = max_length the chunks are disjoint windows, except that the last, shorter chunk still gets a
  full-length window (as lm-evaluation-harness does). HuggingFace's perplexity guide instead counts the scored
  token inside its max_length (each token sees one token less context), starts windows at multiples of the
  stride and does not score the first token: gpt2kit at max_length L equals the guide at L + 1 on
  `<|endoftext|>` + the text when stride = 1; larger strides also differ in the last window's context.
- NLL is the sum over scored tokens of -ln p(token | context). token_perplexity = exp(NLL / tokens),
  word_perplexity = exp(NLL / words), byte_perplexity = exp(NLL / bytes), bits_per_byte = NLL / bytes / ln 2.
  Words and bytes are counted on each document's source text *before* detokenization (UTF-8 bytes; words as
  len(re.split(r"\\s+", document)), lm-evaluation-harness's count, which includes one empty piece for leading
  and one for trailing whitespace), so word- and byte-level numbers compare across tokenizers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..files import read_utf8, require_file
from ..tokenizer import GPT2Tokenizer
from .scoring import (Window, check_limit, exp_or_inf, read_jsonl, resolve_max_length,
                      score_windows)

FORMATS = ("auto", "wikitext", "text", "jsonl")

DEFINITIONS = {
    "nll": "sum over scored tokens of -ln p(token | its context), in nats",
    "token_perplexity": "exp(NLL / scored tokens); every token of every document scored once, the first from "
                        "<|endoftext|>",
    "word_perplexity": "exp(NLL / words); words = sum over documents of len(re.split(r'\\s+', source document)) "
                       "(lm-evaluation-harness's count, on the text before detokenization)",
    "byte_perplexity": "exp(NLL / bytes); bytes = UTF-8 bytes of the source documents before detokenization",
    "bits_per_byte": "NLL / bytes / ln(2)",
    "windows": "chunks of max_length then stride scored tokens, each scored by a window of up to max_length "
               "tokens ending at the chunk (stride = max_length: disjoint windows, the last one right-aligned "
               "to the document's end, as lm-evaluation-harness's loglikelihood_rolling)",
}


# ---- WikiText -----------------------------------------------------------------------------------------------
def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ ", " , ", "= = Heading = =", ...) with the rules of
    lm-evaluation-harness's `wikitext` task (originally Megatron-LM's), applied in the same order.

    lm-eval also runs `re.sub(r"/' [0-9]/", r"/'[0-9]/", s)`, whose slashes are literal characters: it matches
    no WikiText line, so it is left out here."""
    text = text.replace("s '", "s'")
    # number separators
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    # punctuation
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    # brackets and quotes hug their content
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    # headings, degrees, line edges, numbers, possessives
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ").replace(" 's", "'s")
    return text


def _is_article_title(line: str) -> bool:
    line = line.replace("= = =", "===").replace("= =", "==").strip()
    return line.startswith("= ") and line.endswith(" =")


def split_wikitext_articles(text: str) -> list[str]:
    """Cut a WikiText file into its articles, as the `EleutherAI/wikitext_document_level` data set that
    lm-evaluation-harness scores: a new article starts at each level-1 title line (" = Title = "); lines keep
    their layout (joined with "\\n"), and the blank text before the first title is dropped."""
    articles, lines = [], []
    for line in text.split("\n"):
        if _is_article_title(line):
            article = "\n".join(lines)
            if article.strip():
                articles.append(article)
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return articles


# ---- reading ------------------------------------------------------------------------------------------------
def resolve_format(path: Path, format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format != "auto":
        return format
    suffix = path.suffix.lower()  # as preprocess reads names: WIKI.TEST.RAW is WikiText too
    if suffix in (".tokens", ".raw"):
        return "wikitext"
    return "jsonl" if suffix == ".jsonl" else "text"


def wikitext_format(path: Path) -> str:
    """How the wikitext task reads a file: one article per JSON line, else WikiText's article split."""
    return "jsonl" if resolve_format(path, "auto") == "jsonl" else "wikitext"


def read_documents(path: str | os.PathLike, *, format: str = "auto", text_key: str = "text") -> list[str]:
    """The documents of a file: WikiText articles, one JSON object per line (`text_key`), or the whole file."""
    path = require_file(path, "data file")
    kind = resolve_format(path, format)
    if kind == "wikitext":
        return split_wikitext_articles(read_utf8(path))
    if kind == "text":
        return [read_utf8(path)]
    return [document for _, document in read_jsonl(path, text_key)]


# ---- windows ------------------------------------------------------------------------------------------------
def document_windows(tokens: Sequence[int], *, prefix_token_id: int, max_length: int, stride: int) -> list[Window]:
    """Windows that score every token of a document once (see the module docstring for the rule)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    seq = [prefix_token_id, *tokens]  # seq[j] for j >= 1 is a target, predicted from seq[:j]
    windows, done = [], 0
    while done < len(tokens):
        end = min(done + (max_length if done == 0 else stride), len(tokens))  # score seq[done+1 .. end]
        start = max(0, end - max_length)
        windows.append(Window(seq[start:end + 1], end - done))
        done = end
    return windows


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexity_metrics(nll: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    return {
        "token_perplexity": exp_or_inf(nll / tokens),
        "word_perplexity": exp_or_inf(nll / words),
        "byte_perplexity": exp_or_inf(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
    }


def evaluate_perplexity(model: nn.Module, tokenizer: GPT2Tokenizer,
                        data: str | os.PathLike | Sequence[str], *, max_length: int | None = None,
                        stride: int | None = None, batch_size: int = 8, format: str = "auto",
                        detokenize: bool | None = None, text_key: str = "text", limit: int | None = None,
                        compile: bool = False, progress: bool = True) -> dict[str, Any]:
    """Token, word and byte perplexity of `model` on `data`: a file path (WikiText .raw/.tokens, .jsonl or
    plain text; see `read_documents`) or a list of document strings.

    max_length: window size in tokens (default: the model's context, `config.n_positions`); stride: scored
    tokens per window after the first (default: max_length, i.e. disjoint windows); detokenize: apply
    `wikitext_detokenize` before tokenizing (default: on for WikiText files only); limit: the first N
    documents only; compile: the log-sum-exp over the vocabulary through torch.compile (see score_windows).
    Returns the metrics plus the counts and settings they came from."""
    source = data if isinstance(data, (str, os.PathLike)) else "data"  # what errors name
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        documents = read_documents(path, format=format, text_key=text_key)
        is_wikitext = resolve_format(path, format) == "wikitext"
    else:
        documents, is_wikitext = list(data), format == "wikitext"
    check_limit(limit)
    if stride is not None and not (type(stride) is int and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1 (scored tokens per window), got {stride!r}")
    if limit is not None:
        documents = documents[:limit]
    if not documents:
        raise ValueError(f"{source}: no documents to evaluate")
    detokenize = is_wikitext if detokenize is None else detokenize
    max_length = resolve_max_length(model, max_length)
    stride = stride or max_length

    tokenizer.check_fits(model.config.vocab_size)
    texts = [wikitext_detokenize(d) for d in documents] if detokenize else documents
    token_lists = tokenizer.encode_batch(texts)
    windows = [window for tokens in token_lists
               for window in document_windows(tokens, prefix_token_id=tokenizer.bos_token_id,
                                              max_length=max_length, stride=stride)]
    scores = score_windows(model, windows, vocab_size=tokenizer.vocab_size, batch_size=batch_size,
                           pad_token_id=tokenizer.pad_token_id, desc="perplexity", progress=progress,
                           compile=compile)
    nll = -sum(float(s.logprobs.sum()) for s in scores)
    n_tokens = sum(len(t) for t in token_lists)
    if n_tokens == 0:
        raise ValueError(f"{source}: the documents contain no tokens")
    words = sum(count_words(d) for d in documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return {
        **perplexity_metrics(nll, n_tokens, words, n_bytes),
        "nll": nll, "documents": len(documents), "tokens": n_tokens, "words": words, "bytes": n_bytes,
        "windows": len(windows), "forward_tokens": sum(len(w.tokens) - 1 for w in windows),
        "max_length": max_length, "stride": stride, "detokenize": detokenize,
    }

