"""LAMBADA (OpenAI's jsonl): can the model predict the last word of a passage, as a whole word?

Definitions (those of lm-evaluation-harness's `lambada_openai` task):
- context = the text before its last space, target = " " + the last space-separated word. Tokens: the target's
  tokens are encode(context + target) minus the leading encode(context) tokens (trailing spaces of the context
  move to the target first), so the word is tokenized as it appears in the passage.
- acc: the fraction of passages where *every* target token is the argmax given the context and the target
  tokens before it — the whole word, however many tokens it has, is the greedy continuation.
- perplexity: exp(-mean over passages of ln p(target word | context)) — per passage, not per token.
- Passages longer than max_length + 1 tokens keep their last tokens (the context is cut on the left).
- acc_stop_word_filter (optional, an approximation of the GPT-2 paper's "stop-word filter"): as acc, but the
  argmax for the target's first token is taken over the vocabulary without stop-word tokens (tokens whose
  text, stripped and lower-cased, is in the stop-word list), so the model may not answer "the" or "him"
  where a content word ends the sentence. The target's own first token always competes (the first token of
  "Allie" is " All"); a target that is itself a stop word always counts as wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..tokenizer import GPT2Tokenizer
from .scoring import (Window, check_limit, exp_or_inf, read_jsonl, resolve_max_length,
                      score_windows)

DEFINITIONS = {
    "acc": "fraction of passages whose whole last word (target = ' ' + text after the last space) is the greedy "
           "continuation: every target token is the argmax given the context and the target tokens before it",
    "perplexity": "exp(-mean over passages of ln p(target word | context)), per passage (lm-evaluation-harness)",
    "target_token_perplexity": "exp(-sum of target-token log-probs / number of target tokens)",
    "acc_stop_word_filter": "as acc, but the first target token is the argmax over tokens that are not stop "
                            "words (stripped, lower-cased token text in the stop-word list); an approximation "
                            "of the GPT-2 paper's stop-word filter",
}


def read_lambada(path: str | os.PathLike) -> list[str]:
    """The passages of OpenAI's LAMBADA jsonl: one {"text": ...} object per line."""
    return [text for _, text in _located_passages(path)]


def _located_passages(path: str | os.PathLike) -> list[tuple[str, str]]:
    """("file:line", passage) for each passage of a LAMBADA jsonl, so errors can point at it."""
    return _checked([(f"{path}:{n}", text) for n, text in read_jsonl(path, "text")])


def _checked(passages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The passages, unless one is not text or has no word to predict: ValueError naming it."""
    for where, text in passages:
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected a passage (str), got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where}: empty passage")
    return passages


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target): the text before the last space, and " " + the word after it."""
    context, _, word = text.rpartition(" ")
    return context, " " + word


def encode_target(tokenizer: GPT2Tokenizer, context: str, target: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids), tokenizing the passage as a whole. Trailing spaces of the context belong to
    the target (GPT-2's BPE attaches a space to the word after it); an empty context becomes the tokenizer's BOS
    (GPT-2's <|endoftext|>), as lm-evaluation-harness prefixes it."""
    stripped = context.rstrip()
    target = context[len(stripped):] + target
    if not stripped:
        return [tokenizer.bos_token_id], tokenizer.encode(target)
    whole = tokenizer.encode(stripped + target)
    context_ids = tokenizer.encode(stripped)
    return whole[:len(context_ids)], whole[len(context_ids):]


def stop_word_tokens(tokenizer: GPT2Tokenizer, stop_words: Iterable[str]) -> Tensor:
    """Boolean mask over the vocabulary: True where a token's text, stripped and lower-cased, is a stop word."""
    words = {w.strip().lower() for w in stop_words}
    unused = set(tokenizer.unused_ids(tokenizer.vocab_size))  # holes between special tokens (cl100k_base)
    return torch.tensor([i not in unused and tokenizer.decode([i]).strip().lower() in words
                         for i in range(tokenizer.vocab_size)])


def default_stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list (318 words, from the Glasgow Information Retrieval Group)."""
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError:
        raise ImportError("the stop-word filter uses scikit-learn's English stop-word list: "
                          "pip install 'gpt2kit[eval]', or pass your own list as stop_words=") from None
    return ENGLISH_STOP_WORDS


def evaluate_lambada(model: nn.Module, tokenizer: GPT2Tokenizer, data: str | os.PathLike | Sequence[str], *,
                     max_length: int | None = None, batch_size: int = 8, stop_word_filter: bool = False,
                     stop_words: Iterable[str] | None = None, limit: int | None = None,
                     compile: bool = False, progress: bool = True) -> dict[str, Any]:
    """Last-word accuracy and target perplexity on LAMBADA passages: a jsonl path or a list of passages.

    stop_word_filter adds `acc_stop_word_filter` (with `stop_words`, default scikit-learn's English list);
    compile: the log-sum-exp over the vocabulary through torch.compile (see score_windows). Returns the metrics
    plus counts and settings."""
    if isinstance(data, (str, os.PathLike)):
        passages = _located_passages(data)
    else:
        passages = _checked([(f"passage {n}", text) for n, text in enumerate(data, 1)])
    check_limit(limit)
    if stop_words is not None and not stop_word_filter:  # it would be silently unused
        raise ValueError("stop_words are the words stop_word_filter=True leaves out; pass that too")
    if limit is not None:
        passages = passages[:limit]
    if not passages:
        raise ValueError(f"{data if isinstance(data, (str, os.PathLike)) else 'data'}: no passages to evaluate")
    tokenizer.check_fits(model.config.vocab_size)
    max_length = resolve_max_length(model, max_length)
    windows, target_words = [], []
    for where, text in passages:
        context, target = split_last_word(text)
        target_words.append(target.strip().lower())
        context_ids, target_ids = encode_target(tokenizer, context, target)
        if not 1 <= len(target_ids) <= max_length:
            raise ValueError(f"{where}: the last word has {len(target_ids)} tokens; "
                             f"1..{max_length} (max_length) are supported")
        windows.append(Window((context_ids + target_ids)[-(max_length + 1):], len(target_ids)))
    disallowed, words = None, frozenset()
    if stop_word_filter:
        words = frozenset(w.strip().lower() for w in (default_stop_words() if stop_words is None else stop_words))
        disallowed = stop_word_tokens(tokenizer, words)
    scores = score_windows(model, windows, vocab_size=tokenizer.vocab_size, batch_size=batch_size,
                           pad_token_id=tokenizer.pad_token_id, greedy=True, disallowed=disallowed, desc="lambada",
                           progress=progress, compile=compile)
    word_logprobs = [float(s.logprobs.sum()) for s in scores]
    correct = sum(bool(s.greedy.all()) for s in scores)
    n_target_tokens = sum(len(s.logprobs) for s in scores)
    results: dict[str, Any] = {
        "acc": correct / len(scores),
        "perplexity": exp_or_inf(-sum(word_logprobs) / len(scores)),
        "target_token_perplexity": exp_or_inf(-sum(word_logprobs) / n_target_tokens),
        "passages": len(scores), "correct": correct, "target_tokens": n_target_tokens,
        "max_length": max_length,
    }
    if stop_word_filter:
        # The restriction applies to the first target token; later tokens continue the same word. A target whose
        # first token is a stop word's ("All" of "Allie") still competes; a stop-word target is always wrong.
        filtered = sum(bool(s.restricted_greedy[0] and s.greedy[1:].all()) and word not in words
                       for s, word in zip(scores, target_words))
        results.update(acc_stop_word_filter=filtered / len(scores), correct_stop_word_filter=filtered)
    return results
