"""Text generation: logits processors, sampling, prefill + cached decoding, stop strings and streaming.

One prefill pass fills a preallocated KVCache (sized for prompt + new tokens) and yields the first token's
logits; every further step feeds one token per row. Processors are small functions `(input_ids, scores) ->
scores`, applied in this order: logit and sequence bias, repetition penalty, no-repeat n-grams, bad words,
OpenAI's frequency/presence penalties, suppressed tokens and min-new-tokens EOS suppression, then (sampling only)
temperature, top-k, top-p, min-p, typical-p, epsilon and eta cutoffs. Finished rows keep running with
`pad_token_id` (as transformers does) so the batch and its cache never need reshaping.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import math
import numbers
import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .model import GPT2LMHeadModel, KVCache, ModelOutput, inference, is_plain
from .quantization import PackedLinear
from .tokenizer import GPT2Tokenizer

# Compiled decoding sizes its KV cache in multiples of this many positions (GPT-2's 1024: at most 4 compilations
# per batch size); attending over up to 255 masked positions costs little beside the weights read per token.
COMPILED_CACHE_MULTIPLE = 256

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]
"""(input_ids (B, L) of the tokens so far, with -1 at padding; scores (B, V) float) -> processed scores."""


# ---- logits processors --------------------------------------------------------------------------------------
def scale_temperature(temperature: float) -> LogitsProcessor:
    return lambda input_ids, scores: scores / temperature


def keep_top_k(k: int) -> LogitsProcessor:
    """Keep the k highest scores (and any tied with the k-th); the rest become -inf."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        kth = torch.topk(scores, min(k, scores.shape[-1])).values[:, -1:]
        return scores.masked_fill(scores < kth, float("-inf"))
    return apply


def keep_top_p(p: float) -> LogitsProcessor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass reaches p."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - p
        remove_sorted[:, -1] = False  # the most likely token always stays
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))
    return apply


def keep_min_p(p: float) -> LogitsProcessor:
    """min-p filtering: keep the tokens at least p times as likely as the most likely one."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = scores.softmax(-1)
        # The most likely token always passes (p <= 1), so at least one token stays.
        return scores.masked_fill(probs < p * probs.amax(-1, keepdim=True), float("-inf"))
    return apply


def ban_repeated_ngrams(n: int) -> LogitsProcessor:
    """No n-gram twice: a token that would complete an n-gram already in the row (prompt or generated; padding
    excluded) is made impossible."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] < n:
            return scores
        windows = input_ids.unfold(1, n, 1)  # (B, W, n): every n-gram of the row
        prefix = input_ids[:, input_ids.shape[1] - n + 1:]  # what the next token would follow
        seen = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & (windows >= 0).all(-1) & (prefix >= 0).all(
            -1, keepdim=True)
        rows, at = seen.nonzero(as_tuple=True)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[rows, windows[rows, at, -1]] = True
        return scores.masked_fill(banned, float("-inf"))
    return apply


def penalize_repetition(penalty: float) -> LogitsProcessor:
    """CTRL's repetition penalty: every token already in the row (prompt or generated, padding excluded) has
    its score divided by `penalty` if positive, multiplied if negative."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        # Only the (B, L) seen scores are touched, not all (B, V). Padding (-1) points at the row's largest
        # token, which the row holds too, so repeated indices always write the same value; a row of padding
        # only points at token 0 and writes its score back unchanged.
        if input_ids.shape[1] == 0:
            return scores
        real = input_ids >= 0
        ids = torch.where(real, input_ids, input_ids.amax(1, keepdim=True).clamp(min=0))
        seen = scores.gather(1, ids)
        penalized = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter(1, ids, torch.where(real.any(1, keepdim=True), penalized, seen))
    return apply


def penalize_frequency_presence(frequency: float, presence: float) -> LogitsProcessor:
    """OpenAI's penalties: a token generated c > 0 times so far loses frequency * c + presence from its score.
    As in vLLM, only generated tokens count, not the prompt: the Sampler passes this processor the generated
    tokens alone (it is marked `generated_only`); -1 marks padding."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        real = input_ids >= 0
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids.clamp(min=0), real.to(scores.dtype))
        return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
    apply.generated_only = True
    return apply


def bias_sequences(bias: dict[tuple[int, ...], float]) -> LogitsProcessor:
    """transformers' sequence_bias (OpenAI's logit_bias is its one-token case, bad_words_ids its -inf case): a
    sequence's bias is added to its last token's score when the row ends with the rest of it (padding, -1, never
    does); a one-token sequence's always."""
    groups: dict[int, list[tuple[tuple[int, ...], float]]] = {}  # by the length of the prefix to match
    for sequence, value in bias.items():
        groups.setdefault(len(sequence) - 1, []).append((sequence, value))
    tables = [(torch.tensor([s[:-1] for s, _ in group], dtype=torch.long).view(len(group), n),
               torch.tensor([s[-1] for s, _ in group], dtype=torch.long),
               torch.tensor([v for _, v in group], dtype=torch.float32)) for n, group in groups.items()]

    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        added = torch.zeros_like(scores)
        for prefixes, last, values in tables:
            n = prefixes.shape[1]
            if n > input_ids.shape[1]:
                continue
            values = values.to(scores.device, scores.dtype).expand(scores.shape[0], -1)
            if n:  # (B, sequences): which rows end with each sequence's prefix
                ends = (input_ids[:, None, input_ids.shape[1] - n:] == prefixes.to(input_ids.device)).all(-1)
                values = torch.where(ends, values, torch.zeros((), dtype=scores.dtype, device=scores.device))
            added.index_add_(1, last.to(scores.device), values)
        return scores + added
    return apply


def keep_typical(mass: float) -> LogitsProcessor:
    """Locally typical sampling (Meister et al. 2022, transformers' typical_p): keep the tokens whose surprisal is
    closest to the distribution's entropy until their probability reaches `mass`."""
    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        log_probs = scores.log_softmax(-1)
        entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
        distance, order = (-log_probs - entropy).abs().sort(-1)
        cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
        last = (cumulative < mass).sum(1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        remove_sorted = distance > distance.gather(1, last)
        remove_sorted[:, 0] = False  # the most typical token always stays
        return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    return apply


def cut_below(epsilon: float, eta: bool = False) -> LogitsProcessor:
    """Truncation sampling (Hewitt et al. 2022): drop tokens less likely than epsilon (transformers'
    epsilon_cutoff) or, with `eta`, than min(epsilon, sqrt(epsilon) * exp(-entropy)) (eta_cutoff); the most
    likely token always stays."""
    root = torch.tensor(epsilon, dtype=torch.float32).sqrt()  # in float32, as transformers rounds it

    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = scores.softmax(-1)
        threshold = torch.full_like(probs[:, :1], epsilon)
        if eta:
            entropy = torch.distributions.Categorical(logits=scores).entropy()[:, None]
            threshold = torch.minimum(threshold, root.to(scores.device) * torch.exp(-entropy))
        remove = (probs < threshold) & (scores < scores.amax(-1, keepdim=True))
        return scores.masked_fill(remove, float("-inf"))
    return apply


def suppress_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """Make the given tokens impossible (min_new_tokens uses it on EOS)."""
    index = torch.tensor(list(token_ids), dtype=torch.long)

    def apply(input_ids: Tensor, scores: Tensor) -> Tensor:
        # Out of place, like every processor: the caller's logits may still be read (e.g. for logprobs).
        return scores.index_fill(1, index.to(scores.device), float("-inf"))
    return apply


# ---- options ------------------------------------------------------------------------------------------------
# Sampling below this temperature is greedy decoding (as in vLLM): dividing by a smaller one can overflow the
# scores to infinities, whose softmax is NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class GenerationConfig:
    """Every generation option; `generate(..., **options)` overrides these defaults field by field."""

    max_new_tokens: int = 20
    # prompt + new tokens (the padded prompt's length counts), as transformers' and MindFormers' max_length: when
    # set it takes the place of max_new_tokens. Whichever of the two was given last applies.
    max_length: int | None = None
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens exist (stop strings still apply)
    do_sample: bool = False  # False: greedy (argmax); True: sample from the processed distribution
    temperature: float = 1.0  # sampling only; 0 (or below GREEDY_TEMPERATURE) means greedy
    top_k: int | None = None  # sampling only; None or 0 disables
    top_p: float | None = None  # sampling only; None or 1.0 disables
    min_p: float | None = None  # sampling only: keep tokens at least min_p times the top one's probability
    typical_p: float | None = None  # sampling only: locally typical sampling's mass; None or 1.0 disables
    epsilon_cutoff: float | None = None  # sampling only: drop tokens below this probability; None or 0 disables
    eta_cutoff: float | None = None  # sampling only: eta sampling's epsilon; None or 0 disables
    repetition_penalty: float = 1.0  # 1.0 disables; applies to greedy decoding too
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size appears twice in a row (greedy too)
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]: minus this times a token's count in the generated text
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]: minus this for every token already generated
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias in [-100, 100] added to its score
    # transformers': token-id sequence -> bias added to its last token's score after the rest of it (also given
    # as a list of [sequence, bias] pairs, its JSON form)
    sequence_bias: dict[tuple[int, ...], float] | list | None = None
    bad_words_ids: list[list[int]] | None = None  # transformers': token-id sequences never generated (greedy too)
    suppress_tokens: list[int] | None = None  # never generated (text pipelines: ids their tokenizer cannot decode)
    eos_token_id: int | list[int] | None = None  # None: the model config's; [] never stops at EOS
    pad_token_id: int | None = None  # emitted by finished rows; None: the model config's, else the first EOS
    stop: str | list[str] | None = None  # stop strings (need a tokenizer)
    # The text starts at its first non-space character: leading whitespace is neither shown nor searched for stop
    # strings (a chat reply, after the space that follows "Assistant:").
    skip_leading_space: bool = False
    seed: int | None = None  # seeds a private generator: same seed, same samples
    num_return_sequences: int = 1  # rows per prompt (sampling, or the best beams), returned consecutively
    num_beams: int = 1  # > 1: beam search (deterministic; see gpt2kit.beam_search)
    length_penalty: float = 1.0  # beam search: a finished beam's score is its log-probability / length ** this
    early_stopping: bool | str = False  # beam search: True, False or "never", as in transformers
    use_cache: bool = True  # False recomputes the whole sequence every step (slow; a reference)
    compile: bool = False  # decode steps through torch.compile (static shapes; see _compiled_decode_step)
    # Speculative decoding (gpt2kit.speculative), with transformers' names and defaults: guess this many tokens by
    # prompt lookup, matching n-grams of up to max_matching_ngram_size tokens; or, with generate(...,
    # assistant_model=...), let the assistant guess up to num_assistant_tokens ("constant"; "heuristic" and
    # "heuristic_transient" add 2 after a round that kept every guess, else take 1 off), stopping early where its
    # token's probability is below assistant_confidence_threshold.
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 2
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.sequence_bias, list):  # transformers' JSON form: [[sequence, bias], ...]
            try:
                self.sequence_bias = {tuple(sequence): bias for sequence, bias in self.sequence_bias}
            except (TypeError, ValueError):
                raise ValueError("sequence_bias must map token-id sequences to biases ({(id, ...): bias} or "
                                 "[[ids, bias], ...])") from None

        def number(value: Any) -> bool:  # NumPy scalars too; not bool, not str
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        def integer(value: Any) -> bool:  # NumPy integers too; not bool
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def token_id(value: Any) -> bool:  # an integer, NumPy's or a 0-d torch integer too; not bool (its range is
            try:  # the model's vocabulary, checked where that is known)
                operator.index(value)
            except TypeError:
                return False
            return not isinstance(value, bool)

        eos = self.eos_token_id

        types = [  # first: the value checks below compare and combine these
            (self.do_sample in (True, False), "do_sample must be True or False"),  # a string was truthy
            (self.skip_leading_space in (True, False), "skip_leading_space must be True or False"),
            (integer(self.max_new_tokens), f"max_new_tokens must be an integer, got {self.max_new_tokens!r}"),
            (self.max_length is None or integer(self.max_length),
             f"max_length must be an integer or None, got {self.max_length!r}"),
            (integer(self.min_new_tokens), f"min_new_tokens must be an integer, got {self.min_new_tokens!r}"),
            (integer(self.num_return_sequences),
             f"num_return_sequences must be an integer, got {self.num_return_sequences!r}"),
            (integer(self.num_beams), f"num_beams must be an integer, got {self.num_beams!r}"),
            (number(self.temperature), "temperature must be a number"),
            (self.top_p is None or number(self.top_p), "top_p must be a number or None"),
            (self.stop is None or (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop)),
             "stop must be a string or a list of strings"),
            (eos is None or token_id(eos) or (isinstance(eos, (list, tuple)) and all(map(token_id, eos))),
             f"eos_token_id must be a token id, a list of them or None, got {eos!r}"),
            (self.pad_token_id is None or token_id(self.pad_token_id),
             f"pad_token_id must be a token id or None, got {self.pad_token_id!r}"),
            (self.suppress_tokens is None or isinstance(self.suppress_tokens, (list, tuple)),
             f"suppress_tokens must be a list of token ids, got {self.suppress_tokens!r}"),
            (self.use_cache in (True, False), "use_cache must be True or False"),
            (self.compile in (True, False), "compile must be True or False"),
            (self.seed is None or (integer(self.seed) and -2 ** 63 <= self.seed < 2 ** 64),
             f"seed must be an integer that fits 64 bits (torch.Generator's range), got {self.seed!r}"),
        ]
        for ok, message in types:
            if not ok:
                raise ValueError(message)
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be an integer >= 0"),
            (self.max_length is None or self.max_length >= 1, "max_length must be an integer >= 1"),
            # Above the maximum it only keeps EOS away to the end, as in transformers (a model's file may set it).
            (0 <= self.min_new_tokens, "min_new_tokens must be an integer >= 0"),
            (0 <= self.temperature < math.inf, "temperature must be a finite number >= 0 (0 means greedy)"),
            (self.top_k is None or (integer(self.top_k) and self.top_k >= 0), "top_k must be an integer >= 0"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or (number(self.min_p) and 0 <= self.min_p <= 1),
             "min_p must be in [0, 1] (0 or None disables it)"),
            (integer(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
             "no_repeat_ngram_size must be an integer >= 0 (0 disables it)"),
            (number(self.repetition_penalty) and 1e-3 <= self.repetition_penalty <= 1e3,
             "repetition_penalty must be a number in [0.001, 1000] (1.0 disables it)"),
            (number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be a number in [-2, 2] (0 disables it)"),
            (number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "presence_penalty must be a number in [-2, 2] (0 disables it)"),
            (self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                integer(t) and t >= 0 and number(b) and -100 <= b <= 100
                for t, b in self.logit_bias.items())),
             "logit_bias must map token ids (integers >= 0) to biases in [-100, 100]"),
            (self.suppress_tokens is None or all(integer(t) and t >= 0 for t in self.suppress_tokens),
             "suppress_tokens must be a list of token ids (integers >= 0)"),
            (self.typical_p is None or (number(self.typical_p) and 0 < self.typical_p <= 1),
             "typical_p must be in (0, 1] (None or 1.0 disables it)"),
            *((value is None or (number(value) and 0 <= value < 1), f"{name} must be in [0, 1) (None or 0 disables it)")
              for name, value in (("epsilon_cutoff", self.epsilon_cutoff), ("eta_cutoff", self.eta_cutoff))),
            (self.sequence_bias is None or (isinstance(self.sequence_bias, dict) and all(
                isinstance(s, tuple) and s and all(integer(t) and t >= 0 for t in s) and number(b)
                and not math.isnan(b) for s, b in self.sequence_bias.items())),
             "sequence_bias must map non-empty token-id sequences to numbers"),
            (self.bad_words_ids is None or (isinstance(self.bad_words_ids, (list, tuple)) and all(
                isinstance(s, (list, tuple)) and s and all(integer(t) and t >= 0 for t in s)
                for s in self.bad_words_ids)),
             "bad_words_ids must be a list of non-empty lists of token ids"),
            (self.num_return_sequences >= 1, "num_return_sequences must be an integer >= 1"),
            (self.num_beams >= 1, "num_beams must be an integer >= 1"),
            (self.num_return_sequences == 1 or self.sampling
             or (self.num_beams > 1 and self.num_return_sequences <= self.num_beams),
             "num_return_sequences > 1 needs do_sample=True with temperature > 0 (greedy rows would be identical), "
             "or beam search with num_beams >= num_return_sequences"),
            (self.num_beams == 1 or not self.sampling, "beam search is deterministic here: do_sample=True (beam "
             "sampling) is not supported; use num_beams=1 to sample"),
            (self.num_beams == 1 or not (self.stop or self.compile),
             "beam search supports neither stop strings nor compile=True"),
            (number(self.length_penalty) and math.isfinite(self.length_penalty),
             "length_penalty must be a finite number"),
            (type(self.early_stopping) is bool or self.early_stopping == "never",
             "early_stopping must be True, False or 'never'"),
            (not self.stop or all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.use_cache or not self.compile, "compile=True needs use_cache=True (it compiles the cached step)"),
            (self.prompt_lookup_num_tokens is None or (integer(self.prompt_lookup_num_tokens)
                                                       and self.prompt_lookup_num_tokens >= 1),
             "prompt_lookup_num_tokens must be an integer >= 1, or None (no prompt lookup)"),
            (integer(self.max_matching_ngram_size) and self.max_matching_ngram_size >= 1,
             "max_matching_ngram_size must be an integer >= 1"),
            (integer(self.num_assistant_tokens) and self.num_assistant_tokens >= 1,
             "num_assistant_tokens must be an integer >= 1"),
            (self.num_assistant_tokens_schedule in ("constant", "heuristic", "heuristic_transient"),
             "num_assistant_tokens_schedule must be 'constant', 'heuristic' or 'heuristic_transient'"),
            (number(self.assistant_confidence_threshold) and 0 <= self.assistant_confidence_threshold < 1,
             "assistant_confidence_threshold must be a number in [0, 1) (0: always guess num_assistant_tokens)"),
            (self.prompt_lookup_num_tokens is None or (self.num_beams == 1 and self.num_return_sequences == 1),
             "prompt_lookup_num_tokens (speculative decoding) generates one sequence: num_beams and "
             "num_return_sequences must be 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature >= GREEDY_TEMPERATURE

    def replace(self, **options) -> GenerationConfig:
        """A copy with some fields changed; an unknown name is a ValueError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; expected some of {sorted(known)}")
        if options.get("max_length") is not None and "max_new_tokens" in options:
            raise ValueError("give max_new_tokens or max_length (prompt + new tokens), not both")
        if "max_new_tokens" in options:
            options.setdefault("max_length", None)  # the length given last applies
        return dataclasses.replace(self, **options)

    def for_prompt(self, prompt_len: int) -> GenerationConfig:
        """This config for prompts of `prompt_len` tokens: max_length turned into max_new_tokens."""
        if self.max_length is None:
            return self
        if self.max_length < prompt_len:
            raise ValueError(f"max_length {self.max_length} counts the prompt and new tokens, but the prompt alone "
                             f"has {prompt_len} tokens; raise it, or give max_new_tokens")
        new = self.max_length - prompt_len  # min_new_tokens cannot keep generation past it, as in transformers
        return dataclasses.replace(self, max_new_tokens=new, max_length=None,
                                   min_new_tokens=min(self.min_new_tokens, new))

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError if an option names a token id outside a vocabulary of `vocab_size` ids."""
        named = (("logit_bias", self.logit_bias), ("suppress_tokens", self.suppress_tokens),
                 ("sequence_bias", [t for s in self.sequence_bias or () for t in s]),
                 ("bad_words_ids", [t for s in self.bad_words_ids or () for t in s]))
        for name, ids in named:
            beyond = [t for t in ids or () if t >= vocab_size]
            if beyond:
                raise ValueError(f"{name} names token id {beyond[0]}, beyond the vocabulary of {vocab_size} ids")

    def processors(self, suppress: Sequence[int] = (), eos: Sequence[int] = ()) -> list[LogitsProcessor]:
        """What every step applies to the scores, in order (see the module's docstring); `suppress` lists tokens made
        impossible besides suppress_tokens (EOS during the first min_new_tokens steps). A bad word that is one of
        the `eos` ids alone is left out, as transformers leaves it out."""
        procs = []
        suppress = [*(self.suppress_tokens or ()), *suppress]
        bias = dict(self.sequence_bias or {})
        for token, value in (self.logit_bias or {}).items():
            bias[(token,)] = bias.get((token,), 0.0) + value
        if bias:  # first, as transformers' SequenceBiasLogitsProcessor
            procs.append(bias_sequences(bias))
        if self.repetition_penalty != 1.0:
            procs.append(penalize_repetition(self.repetition_penalty))
        if self.no_repeat_ngram_size:
            procs.append(ban_repeated_ngrams(self.no_repeat_ngram_size))
        bad_words = [s for s in self.bad_words_ids or () if not (len(s) == 1 and s[0] in eos)]
        if bad_words:  # where transformers' NoBadWordsLogitsProcessor runs
            procs.append(bias_sequences({tuple(s): float("-inf") for s in bad_words}))
        if self.frequency_penalty or self.presence_penalty:
            procs.append(penalize_frequency_presence(self.frequency_penalty, self.presence_penalty))
        if suppress:
            procs.append(suppress_tokens(suppress))
        if self.sampling:
            if self.temperature != 1.0:
                procs.append(scale_temperature(self.temperature))
            if self.top_k:
                procs.append(keep_top_k(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(keep_top_p(self.top_p))
            if self.min_p:
                procs.append(keep_min_p(self.min_p))
            if self.typical_p is not None and self.typical_p < 1.0:
                procs.append(keep_typical(self.typical_p))
            if self.epsilon_cutoff:
                procs.append(cut_below(self.epsilon_cutoff))
            if self.eta_cutoff:
                procs.append(cut_below(self.eta_cutoff, eta=True))
        return procs


def parse_logit_bias(text: str) -> dict[int, float]:
    """`logit_bias` written as text (command line, chat): "TOKEN_ID=BIAS[,TOKEN_ID=BIAS...]", e.g. "50256=-100"."""
    bias = {}
    for item in text.split(","):
        token, sep, value = item.partition("=")
        try:
            token_id, token_bias = int(token), float(value)
        except ValueError:
            token_id = token_bias = None
        if not sep or token_id is None:
            raise ValueError(f"logit bias {item.strip()!r}: expected TOKEN_ID=BIAS, e.g. 50256=-100")
        if token_id in bias:
            raise ValueError(f"logit bias: token id {token_id} is given twice")
        bias[token_id] = token_bias
    return bias


def default_config(model: torch.nn.Module) -> GenerationConfig:
    """A model's generation defaults: GenerationConfig's, with its generation_config.json's settings over them
    (model.generation_config, as transformers' generate starts from the model's file)."""
    return GenerationConfig().replace(**getattr(model, "generation_config", None) or {})


def eos_token_ids(config: GenerationConfig, model_config) -> list[int]:
    """The ids that end a row: the config's eos_token_id, else the model config's (none: [])."""
    eos = model_config.eos_token_id if config.eos_token_id is None else config.eos_token_id
    if eos is None:
        return []
    try:
        return [operator.index(eos)]  # one id: an int, a numpy or 0-d torch integer
    except TypeError:
        return [operator.index(t) for t in eos]


# ---- one step's choice ----------------------------------------------------------------------------------------
class Sampler:
    """Chooses each step's next token from the logits: the configured processors, then argmax or a draw from
    its own random generator. TokenGenerator uses one for its whole batch; the server gives every sequence its
    own, so sequences decoded in one batch never share options or random state."""

    def __init__(self, config: GenerationConfig, model_config, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        if config.seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        self.config = config
        self.sampling = config.sampling
        vocab = model_config.vocab_size
        eos = eos_token_ids(config, model_config)
        given = [*(("eos_token_id", t) for t in eos if config.eos_token_id is not None),
                 *([("pad_token_id", config.pad_token_id)] if config.pad_token_id is not None else [])]
        bad = next(((name, t) for name, t in given if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{bad[0]} {bad[1]} is outside the model's vocabulary [0, {vocab})")
        # A model config's ids past its vocabulary (a small test model with GPT-2's 50256, say) can never be
        # generated, and padding with one would fail in the embedding: they are left out.
        self.eos = [t for t in eos if 0 <= t < vocab]
        pad = config.pad_token_id if config.pad_token_id is not None else model_config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < vocab else None
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        if config.seed is not None:
            generator = torch.Generator(device or "cpu").manual_seed(config.seed)
        self.generator = generator
        config.check_vocabulary(vocab)
        self.processors = config.processors(eos=self.eos)
        self.early_processors = (config.processors(suppress=self.eos, eos=self.eos) if config.min_new_tokens
                                 else self.processors)

    def _processors(self, step: int) -> list[LogitsProcessor]:
        return self.early_processors if step < self.config.min_new_tokens else self.processors

    def process(self, scores: Tensor, history: Tensor, step: int) -> Tensor:
        """`scores` (B, V) float after this step's processors; `history` and `step` as for __call__. Processors
        marked `generated_only` see the generated tokens alone."""
        for process in self._processors(step):
            seen = history[:, history.shape[1] - step:] if getattr(process, "generated_only", False) else history
            scores = process(seen, scores)
        return scores

    def __call__(self, logits: Tensor, history: Tensor, step: int) -> Tensor:
        """Next token of each row (B,) from `logits` (B, V), the tokens so far `history` (B, L; -1 at padding)
        and `step`, the number of tokens generated before this one."""
        if not self._processors(step) and not self.sampling:
            return logits.argmax(-1)  # argmax needs no float copy
        return self.pick(self.process(logits.float(), history, step))

    def pick(self, scores: Tensor) -> Tensor:
        """Next token of each row (B,) from processed scores (B, V): a draw when sampling, else the argmax."""
        if self.sampling:
            return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        return scores.argmax(-1)


# ---- stop strings -------------------------------------------------------------------------------------------
def truncate_at_stop(text: str, stop: Sequence[str] | None, skip: int = 0) -> tuple[str, bool]:
    """Text before the stop string that is complete first, and whether one was found. "First" is where
    generation stops: the earliest end (of stops ["abcd", "bc"], "bc" in "abcd"), and of stops ending there the
    longest ("abc" before "bc" in "abc"). The first `skip` characters (leading whitespace) are left out of the
    text; a stop may begin in them ("\nUser:" written at once: an empty reply) but must end after them."""
    found = [(i + len(s), i) for i, s in ((text.find(s, max(0, skip - len(s) + 1)), s) for s in stop or ())
             if i >= 0]
    return (text[skip:max(skip, min(found)[1])], True) if found else (text[skip:], False)


LEADING_SPACE = " \t\n\r\v\f"  # what skip_leading_space drops (ASCII: the same on text and on bytes)


class _StopStringMatcher:
    """Finds, per row, the token that completes a stop string. Works on bytes, so a stop string split across
    tokens (even mid-character) is still seen; keeps only the last few bytes of each row. With
    `skip_leading_space`, a row's text starts at its first non-space byte."""

    def __init__(self, tokenizer: GPT2Tokenizer, stop: Sequence[str], batch_size: int,
                 skip_leading_space: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop]
        self.keep = max(map(len, self.stops)) - 1
        self.tails = [b""] * batch_size
        self.begun = [not skip_leading_space] * batch_size

    def matches(self, tokens: list[int], running: list[bool] | None = None) -> list[int]:
        """The rows whose text now holds a stop string, of those `running` (default: all; a finished row emits
        padding, which a tokenizer may not decode). A stop may begin in a row's skipped leading whitespace but
        must end after it (see truncate_at_stop)."""
        rows = []
        for row, token in enumerate(tokens):
            if running is not None and not running[row]:
                continue
            tail = self.tails[row] + self.tokenizer.decode_bytes([token])
            lead = 0
            if not self.begun[row]:
                body = tail.lstrip(LEADING_SPACE.encode())
                self.begun[row] = bool(body)
                lead = len(tail) - len(body)
            if self.begun[row] and any(s in tail[max(0, lead - len(s) + 1):] for s in self.stops):
                rows.append(row)
            self.tails[row] = tail[-self.keep:] if self.keep else b""
        return rows


# ---- the decode loop ----------------------------------------------------------------------------------------
def model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for the cache and buffers: the weights'. A model whose network runs outside PyTorch
    (gpt2kit.export.OnnxLMHeadModel) has no parameters and names them as attributes."""
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (model.device, model.dtype)


def check_prompts(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> Tensor | None:
    """ValueError unless input_ids is a (batch, length) LongTensor of ids in the vocabulary with a matching,
    left-padding mask; returns the mask as 0/1 longs, or None when nothing is padding."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape (batch, prompt_length)")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (GPT-2 starts texts with its "
                         "<|endoftext|> token)")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(f"input_ids hold token ids outside the model's vocabulary [0, {vocab_size})")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(getattr(attention_mask, 'shape', ()))}, input_ids "
                         f"{tuple(input_ids.shape)}")
    real = attention_mask.bool()
    if bool((real[:, :-1] & ~real[:, 1:]).any()):
        raise ValueError("attention_mask has padding after real tokens: pad prompts on the left for "
                         "generation, e.g. tokenizer(texts, padding=True, padding_side='left')")
    if not bool(real[:, -1].all()):
        raise ValueError("attention_mask has a row without any real token")
    return None if bool(real.all()) else real.long()


class TokenGenerator:
    """Iterate to get each step's new tokens, one per row (B * num_return_sequences,); `sequences()` then
    holds prompt + new tokens. Arguments are checked when it is built, before any model call."""

    def __init__(self, model: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                 config: GenerationConfig | None = None, *, tokenizer: GPT2Tokenizer | None = None,
                 generator: torch.Generator | None = None, output_scores: bool = False, output_logits: bool = False,
                 **options) -> None:
        """`output_scores` / `output_logits`: keep each step's processed scores / raw logits, float32 (B, V), in
        `scores` / `logits` (transformers' generate outputs of those names)."""
        config = (config or default_config(model)).replace(**options)
        model_config = model.config
        device, dtype = model_placement(model)
        attention_mask = check_prompts(input_ids, attention_mask, model_config.vocab_size)
        config = config.for_prompt(input_ids.shape[1])
        if config.compile and not isinstance(model, GPT2LMHeadModel):
            raise ValueError(f"compile=True needs a GPT2LMHeadModel, not {type(model).__name__}")
        if config.compile and any(isinstance(m, PackedLinear) for m in model.modules()):
            raise ValueError("compile=True cannot compile oneDNN-packed weights: use one or the other")
        if config.compile and not all(is_plain(p) for p in model.parameters()):
            raise ValueError("compile=True decodes a model held whole by one process; a sharded (tensor-parallel, "
                             "DTensor) model decodes eagerly")
        if config.stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer: generate(..., stop=[...], tokenizer=tokenizer)")
        if tokenizer is not None:  # its text is read back: ids it cannot decode (a padded vocabulary) never come
            config = with_unused_suppressed(config, tokenizer, model_config.vocab_size)
        if config.num_beams > 1:
            raise ValueError("beam search (num_beams > 1) chooses whole sequences at the end: call generate() or the "
                             "pipeline; it does not stream")
        prompt_len = input_ids.shape[1]
        total = prompt_len + config.max_new_tokens
        if total > model_config.n_positions:
            raise ValueError(f"prompt of {prompt_len} tokens + {config.max_new_tokens} new tokens (max_new_tokens, or "
                             f"max_length less the prompt) = {total} exceeds the model's context of "
                             f"{model_config.n_positions} positions (n_positions); shorten the prompt or lower "
                             "max_new_tokens or max_length")

        n = config.num_return_sequences
        input_ids = input_ids.to(device).repeat_interleave(n, 0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device).repeat_interleave(n, 0)
        batch = input_ids.shape[0]

        self.model, self.config, self.prompt_len = model, config, prompt_len
        self.sampler = Sampler(config, model_config, generator, device)
        self.eos, self.pad = self.sampler.eos, self.sampler.pad
        self.stop_matcher = (_StopStringMatcher(tokenizer, config.stop, batch, config.skip_leading_space)
                             if config.stop else None)

        # Preallocated buffers: the output, the mask over past + current tokens, the next positions.
        self.tokens = torch.empty(batch, total, dtype=torch.long, device=device)
        self.tokens[:, :prompt_len] = input_ids
        self.attention_mask = None
        self.history = self.tokens  # what processors see: padding as -1
        if attention_mask is not None:
            self.attention_mask = torch.ones(batch, total, dtype=torch.long, device=device)
            self.attention_mask[:, :prompt_len] = attention_mask
            self.history = self.tokens.masked_fill(self.attention_mask == 0, -1)
            self.positions = attention_mask.sum(1, keepdim=True)
        cache_length = max(total - 1, prompt_len)
        if config.compile:
            # The compiled step is specialized to the cache length: rounding it up lets prompts of other lengths
            # (a chat's growing history) reuse a compiled step; the extra positions stay masked out.
            cache_length = min(-(-cache_length // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE,
                               max(cache_length, model_config.n_positions))
        self.cache = None
        if config.use_cache:
            self.cache = (_take_spare_cache(model, batch, cache_length, dtype, device) if config.compile
                          else KVCache(model_config, batch, cache_length, dtype=dtype, device=device))
        self.steps = 0
        self.started = False
        self.scores: list[Tensor] | None = [] if output_scores else None
        self.logits: list[Tensor] | None = [] if output_logits else None
        self.compiled_step = None
        if config.compile:
            # Static decoding: attention over the whole cache, this mask marking what each row may see; every
            # step adds its own position. Positions and the write index are tensors, so no step recompiles.
            self.compiled_step = _compiled_decode_step(device.type)
            self.compile_options = _compile_options(model, device.type)
            self.step_mask = torch.zeros(batch, 1, 1, self.cache.max_length, dtype=torch.bool, device=device)
            self.step_mask[:, 0, 0, :prompt_len] = attention_mask.bool() if attention_mask is not None else True
            self.cache_index = torch.zeros(1, dtype=torch.long, device=device)
            if attention_mask is None:
                self.positions = torch.full((batch, 1), prompt_len, device=device)
            if device.type == "cuda":
                # The cache is written in place by the step: a fixed address lets CUDA graphs keep it (and a new
                # generator's cache only re-records the graph, it does not recompile). Not on a CPU: there the
                # step is compiled with freezing, which would make a static cache a constant of the compiled
                # code, so that a later generator's own cache was ignored.
                torch._dynamo.mark_static_address(self.cache.keys)
                torch._dynamo.mark_static_address(self.cache.values)

    def sequences(self) -> Tensor:
        """Prompt + the tokens generated so far, (B * num_return_sequences, prompt_len + steps)."""
        return self.tokens[:, :self.prompt_len + self.steps]

    def next_logits(self, end: int) -> Tensor:
        """Logits (B, V) for the token after position `end - 1`, feeding what the cache has not seen yet, with
        dropout off for this call only (model.inference)."""
        with inference(self.model):
            return self._next_logits(end)

    def _next_logits(self, end: int) -> Tensor:
        mask = self.attention_mask[:, :end] if self.attention_mask is not None else None
        if self.cache is None:
            return self.model(self.tokens[:, :end], mask, logits_to_keep=1).logits[:, -1]
        start = self.cache.length
        if self.compiled_step is not None and start > 0:
            return self._static_logits(start)
        positions = None
        if mask is not None and start > 0:
            positions = self.positions
            self.positions = self.positions + 1
        return self.model(self.tokens[:, start:end], mask, positions, past_key_values=self.cache,
                          logits_to_keep=1).logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Keep (and repeat) rows by index, KV cache included: how beam search moves its beams."""
        aliased = self.history is self.tokens
        self.tokens = self.tokens.index_select(0, rows)
        self.history = self.tokens if aliased else self.history.index_select(0, rows)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.index_select(0, rows)
            self.positions = self.positions.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)

    def _static_logits(self, index: int) -> Tensor:
        """Logits (B, V) after the token at `index`, through the compiled static-shape step."""
        self.step_mask[:, :, :, index] = True
        self.cache_index.fill_(index)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
        with contextlib.ExitStack() as options:  # read when the step (re)compiles, which happens inside this call
            for option in self.compile_options:
                options.enter_context(option)
            # A contiguous copy: the slice's strides depend on the prompt length, and dynamo guards on strides.
            token = self.tokens[:, index:index + 1].clone(memory_format=torch.contiguous_format)
            logits = self.compiled_step(self.model, token, self.positions, self.cache_index, self.step_mask,
                                        self.cache)
        self.cache.length = index + 1
        self.positions = self.positions + 1
        return logits

    def __iter__(self) -> Iterator[Tensor]:
        if self.started:
            raise RuntimeError("a TokenGenerator generates once: build a new one to generate again")
        self.started = True
        between_steps = False  # True when decoding ended or the caller stopped it, not a step's error
        try:
            yield from self._decode()
            between_steps = True
        except GeneratorExit:
            between_steps = True
            raise
        finally:
            if between_steps and self.compiled_step is not None:
                _hand_back_cache(self.model, self.cache)

    @torch.no_grad()
    def _decode(self) -> Iterator[Tensor]:
        config, P = self.config, self.prompt_len
        eos = torch.tensor(self.eos, device=self.tokens.device) if self.eos else None
        done = torch.zeros(self.tokens.shape[0], dtype=torch.bool, device=self.tokens.device)
        for step in range(config.max_new_tokens):
            logits = self.next_logits(P + step)
            if self.logits is not None:
                self.logits.append(logits.float().clone())  # clone: a CUDA graph's output is overwritten next step
            if self.scores is None:
                next_tokens = self.sampler(logits, self.history[:, :P + step], step)
            else:
                scores = self.sampler.process(logits.float(), self.history[:, :P + step], step)
                self.scores.append(scores.clone() if scores is logits else scores)
                next_tokens = self.sampler.pick(scores)
            if step:
                next_tokens.masked_fill_(done, self.pad)  # finished rows emit padding
            self.tokens[:, P + step] = next_tokens
            if self.history is not self.tokens:
                self.history[:, P + step] = next_tokens
            self.steps = step + 1
            yield next_tokens
            # Rows still running before this token (a device sync: only where stop strings are searched).
            running = None if self.stop_matcher is None else (~done).tolist()
            if eos is not None:
                done |= torch.isin(next_tokens, eos)
            if self.stop_matcher is not None:
                done[self.stop_matcher.matches(next_tokens.tolist(), running)] = True
            if bool(done.all()):
                return


# Per model: the KV cache of its last finished compiled generator, zeroed, for the next one to take. Allocating
# and zero-filling a new one (GPT-2 small, 256 positions: 19 MB) is a few ms of the next request's time to first
# token; on a GPU the same address also spares re-recording the CUDA graph.
_spare_caches: weakref.WeakKeyDictionary[GPT2LMHeadModel, KVCache] = weakref.WeakKeyDictionary()


def _take_spare_cache(model: GPT2LMHeadModel, batch: int, length: int, dtype: torch.dtype,
                      device: torch.device) -> KVCache:
    """The model's spare cache if it has this shape, dtype and device (each cache has one user at a time: a
    generator running beside another gets a new one), else a new zeroed cache."""
    cache = _spare_caches.pop(model, None)
    # A cache made under torch.inference_mode holds inference tensors, which can't be written outside it.
    usable_here = cache is not None and (not cache.keys.is_inference() or torch.is_inference_mode_enabled())
    if (usable_here and cache.batch_size == batch and cache.max_length == length
            and cache.keys.dtype == dtype and cache.keys.device == device):
        cache.length = 0
        return cache
    return KVCache(model.config, batch, length, dtype=dtype, device=device)


def _hand_back_cache(model: GPT2LMHeadModel, cache: KVCache) -> None:
    """Keep a finished generator's cache for the model's next one. The compiled step attends over every
    position, unwritten ones masked out; a masked position's weight is 0, but 0 x inf or NaN (from a diverged
    run) is NaN, so the written part is zeroed again (inside inference mode when the cache was made there: a
    generator closed after leaving that block could not write it otherwise)."""
    with torch.inference_mode(cache.keys.is_inference()):
        cache.keys[:, :, :, :cache.length].zero_()
        cache.values[:, :, :, :cache.length].zero_()
    _spare_caches[model] = cache


@functools.cache
def _compiled_decode_step(device_type: str) -> Callable[..., Tensor]:
    """GPT2LMHeadModel.decode_step compiled once per process and device type. The model is an argument: dynamo's
    cache, guarded on the model and the shapes, lets every later generator on the same model and batch size
    reuse the compiled code. On a GPU the step is replayed as a CUDA graph; on a CPU see _compile_options."""
    return torch.compile(GPT2LMHeadModel.decode_step, fullgraph=True, dynamic=False,
                         mode="reduce-overhead" if device_type == "cuda" else None)


# Per model: a fingerprint of its weights when its CPU decode step was compiled with them as constants.
_frozen_weights: weakref.WeakKeyDictionary[GPT2LMHeadModel, tuple] = weakref.WeakKeyDictionary()
# The models whose decode step is compiled, and how many were added: fewer alive than added means one was deleted,
# and dynamo's entries for it (with its frozen weights) would stay, and count toward RECOMPILE_LIMIT, for good.
_compiled_models: weakref.WeakSet[GPT2LMHeadModel] = weakref.WeakSet()
_compiled_models_added = 0
# Compiled entries the one decode-step function may hold: each model, batch size, dtype and cache length is one,
# and dynamo's default of 8 would be a hard error (fullgraph) at the ninth.
RECOMPILE_LIMIT = 64
# "0" skips the autotuning of the compiled CPU decode step: compiling takes about half as long, decoding runs
# slower (short generations, and the test suite, which checks the autotuned step in a few tests only).
AUTOTUNE_ENV = "GPT2KIT_COMPILE_AUTOTUNE"


# Elements per weight that the fingerprint sums: a change of the whole tensor (a reload, an edit through .data)
# reaches them; reading all of GPT-2 small's weights took 150 ms per generate call, this takes about 2 ms.
_FINGERPRINT_SAMPLES = 1024


def _weights_fingerprint(model: torch.nn.Module) -> tuple:
    """What changes when a weight does: its address, dtype and version counter (an in-place update outside
    inference mode), and the sum of evenly spaced elements, for edits that move neither (through `.data`, or
    under inference mode, whose tensors keep no version)."""
    def sample(t: Tensor) -> float:
        # take() reads the elements where they are: reshape(-1) would copy a transposed weight whole (a loaded HF
        # Conv1D weight is one), 100 ms of every generate call's first token at GPT-2 small.
        index = torch.arange(0, t.numel(), max(1, t.numel() // _FINGERPRINT_SAMPLES), device=t.device)
        return float(t.detach().take(index).sum(dtype=torch.float64))

    return tuple((t.data_ptr(), t.dtype, None if t.is_inference() else t._version, sample(t))
                 for t in (*model.parameters(), *model.buffers()))


@functools.cache
def _ignore_autotuning_storage_warning() -> None:
    """Autotuning's own code calls a deprecated storage API: torch's internals, nothing for a user to act on.
    One filter, added once, for that warning from torch._inductor only."""
    warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning, r"torch\._inductor\.")


def _drop_compiled_code() -> None:
    """Forget every compiled function of the process, and free the weights frozen into them: torch._dynamo.reset
    alone leaves inductor's generated modules (whose globals hold those weights) in its module cache and in
    sys.modules for good."""
    torch._dynamo.reset()
    for module in torch._inductor.codecache.PyCodeCache.modules:
        sys.modules.pop(module.__name__, None)
    torch._inductor.codecache.PyCodeCache.cache_clear()


def _compile_options(model: GPT2LMHeadModel, device_type: str) -> list[contextlib.AbstractContextManager]:
    """Inductor settings for compiling the decode step. On a CPU: the weights become constants of the compiled
    step (`freezing`), which lets inductor pre-pack them once and benchmark its own CPU matrix kernels against
    the library ones (`max_autotune`). GPT-2 small, batch 1, on the benchmark CPU: int8 51 -> 129 tokens/s,
    float32 22 -> 55 (either setting alone: about 10 %). The price: a second copy of the weights, about a
    minute of compiling for GPT-2 small (GPT2KIT_COMPILE_AUTOTUNE=0 halves it, without the autotuning), and
    weights changed in place after compiling would not be seen, so such a change (an optimizer step,
    load_state_dict, an edit through .data) is detected here and drops the compiled code."""
    global _compiled_models_added
    if len(_compiled_models) < _compiled_models_added:
        _drop_compiled_code()  # a deleted model's steps; the live models' steps compile again when next used
        _compiled_models_added = len(_compiled_models)
    if model not in _compiled_models:
        _compiled_models.add(model)
        _compiled_models_added += 1
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7
    limit = torch._dynamo.config.patch(**{name: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, name))})
    if device_type != "cpu":
        return [limit]
    fingerprint = _weights_fingerprint(model)
    if _frozen_weights.get(model, fingerprint) != fingerprint:
        _drop_compiled_code()  # frozen copies of the old weights: compile again (dynamo guards on identity only)
    _frozen_weights[model] = fingerprint
    autotune = os.environ.get(AUTOTUNE_ENV, "1")
    if autotune not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {autotune!r}")
    _ignore_autotuning_storage_warning()
    # Autotuning would print a table of its timings to stderr for every matrix product.
    return [limit, torch._inductor.config.patch(freezing=True, max_autotune=autotune == "1",
                                                autotune_num_choices_displayed=0,
                                                max_autotune_report_choices_stats=False)]


def with_unused_suppressed(config: GenerationConfig, tokenizer: GPT2Tokenizer, vocab_size: int) -> GenerationConfig:
    """`config` with the ids below `vocab_size` that `tokenizer` cannot decode among its suppress_tokens."""
    unused = tokenizer.unused_ids(vocab_size)
    if not unused or set(unused) <= set(config.suppress_tokens or ()):
        return config
    return config.replace(suppress_tokens=sorted({*(config.suppress_tokens or ()), *unused}))


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True), as transformers' class of this name: the sequences, and with
    output_scores / output_logits a tuple of one (B, V) float32 tensor per step (the scores after the step's
    processors, which chose the token; the model's raw logits). Reads as transformers' outputs do (ModelOutput)."""
    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None


def compute_transition_scores(sequences: Tensor, scores: Sequence[Tensor], beam_indices: Tensor | None = None,
                              normalize_logits: bool = False) -> Tensor:
    """transformers' model.compute_transition_scores for generate's outputs without beams: each generated token's
    score, (B, steps), gathered from `scores` (output_scores or output_logits); with `normalize_logits`, as
    log-probabilities (log_softmax over the vocabulary first). Rows that had finished score their padding."""
    if beam_indices is not None:
        raise ValueError("beam_indices: beam search keeps no scores here (generate refuses output_scores with beams)")
    steps = torch.stack(list(scores), 1)  # (B, steps, V)
    if normalize_logits:
        steps = steps.log_softmax(-1)
    new = sequences[:, sequences.shape[1] - steps.shape[1]:]
    return steps.gather(2, new.unsqueeze(-1).to(steps.device)).squeeze(-1)


def token_generator(model: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                    config: GenerationConfig | None = None, *, assistant_model: GPT2LMHeadModel | None = None,
                    **kwargs) -> TokenGenerator:
    """A TokenGenerator, or its speculative kind when `assistant_model` or `prompt_lookup_num_tokens` is given."""
    config = config or default_config(model)
    if assistant_model is None and kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) is None:
        return TokenGenerator(model, input_ids, attention_mask, config, **kwargs)
    from .speculative import SpeculativeGenerator  # it builds on TokenGenerator

    return SpeculativeGenerator(model, input_ids, attention_mask, config, assistant_model=assistant_model, **kwargs)


def generate(model: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor | None = None,
             config: GenerationConfig | None = None, *, tokenizer: GPT2Tokenizer | None = None,
             generator: torch.Generator | None = None, streamer: Any = None, return_dict_in_generate: bool = False,
             output_scores: bool = False, output_logits: bool = False, assistant_model: GPT2LMHeadModel | None = None,
             **options) -> Tensor | GenerateDecoderOnlyOutput:
    """Prompt + new tokens, (B * num_return_sequences, prompt_len + steps) with each prompt's rows together.

    Options are GenerationConfig's fields (max_new_tokens or max_length, min_new_tokens, do_sample, temperature, top_k,
    top_p, min_p, repetition_penalty, no_repeat_ngram_size, frequency_penalty, presence_penalty, logit_bias,
    eos_token_id, pad_token_id, stop, skip_leading_space, seed, num_return_sequences, num_beams, length_penalty,
    early_stopping, use_cache, compile).
    Batched prompts must be left-padded with `attention_mask`; each row then generates as it would alone (exactly
    so in float32; in lower precision and with int8 weights, products of another row count round differently and
    a near-tie between two tokens may fall the other way).
    Generation ends when every row has met EOS or a stop string, or after max_new_tokens; finished rows are
    filled with pad_token_id. Stop strings need `tokenizer`; the returned tokens include the one completing
    the stop string (text helpers cut the text before it). num_beams > 1 runs beam search instead.
    `streamer` is transformers' streamer protocol (its TextStreamer, TextIteratorStreamer or an object of your own):
    `put(prompt ids)`, then `put(new ids)` after each step, then `end()`; one sequence only, as there.
    `return_dict_in_generate` returns a GenerateDecoderOnlyOutput, with each step's scores / logits when
    `output_scores` / `output_logits` (not with beam search); `compute_transition_scores` reads them per token.
    `assistant_model` (a smaller GPT-2 with the same vocabulary) or `prompt_lookup_num_tokens` decode
    speculatively, one prompt at a time: the same tokens in fewer passes of the model (gpt2kit.speculative)."""
    config = (config or default_config(model)).replace(**options)
    if (output_scores or output_logits) and not return_dict_in_generate:
        warnings.warn("output_scores and output_logits are returned with return_dict_in_generate=True; returning "
                      "the sequences alone", stacklevel=2)
    if streamer is not None and (len(input_ids) != 1 or config.num_return_sequences != 1 or config.num_beams > 1):
        raise ValueError("streamer= streams one sequence: a batch of one prompt, num_return_sequences=1 and no beam "
                         "search")
    if config.num_beams > 1 and assistant_model is not None:
        raise ValueError("assistant_model (speculative decoding) generates one sequence: use num_beams=1")
    if config.num_beams > 1:
        from .beam_search import beam_search  # it builds on TokenGenerator

        if output_scores or output_logits:
            raise ValueError("output_scores and output_logits are not kept by beam search (num_beams > 1)")
        if tokenizer is not None:
            config = with_unused_suppressed(config, tokenizer, model.config.vocab_size)
        sequences = beam_search(model, input_ids, attention_mask, config)
        return GenerateDecoderOnlyOutput(sequences) if return_dict_in_generate else sequences
    run = token_generator(model, input_ids, attention_mask, config, assistant_model=assistant_model,
                          tokenizer=tokenizer, generator=generator, output_scores=output_scores,
                          output_logits=output_logits)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for tokens in run:
        if streamer is not None:
            streamer.put(tokens.cpu())
    if streamer is not None:
        streamer.end()
    if not return_dict_in_generate:
        return run.sequences()
    return GenerateDecoderOnlyOutput(run.sequences(), None if run.scores is None else tuple(run.scores),
                                     None if run.logits is None else tuple(run.logits))


# ---- streaming ----------------------------------------------------------------------------------------------
class TextStreamDecoder:
    """Token ids in, text pieces out. Bytes of a character split across tokens are held until the character
    is complete; text that may be the start of a stop string is held until it is clear. The pieces concatenate
    to `tokenizer.decode(ids)` cut before the first stop string; with `skip_leading_space`, to that text after
    its leading whitespace (a stop string may begin in that whitespace, see truncate_at_stop)."""

    def __init__(self, tokenizer: GPT2Tokenizer, stop: Sequence[str] | None = None, *,
                 skip_leading_space: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or ())
        self.begun = not skip_leading_space  # a character other than leading whitespace has been decoded
        self._skip = 0  # how many of the held characters are leading whitespace (never shown)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.decoded = 0  # characters decoded so far, held or not: where the next token's text starts
        self.released = 0  # characters returned so far

    def push(self, token_id: int) -> str:
        """The text that became final with this token ("" while a character or a possible stop is pending)."""
        if self.stopped:
            return ""
        return self._emit(self._utf8.decode(self.tokenizer.decode_bytes([token_id])))

    def flush(self) -> str:
        """Everything still held (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        # The last character may release the held text or complete a stop string: what is held is read after it.
        text = self._emit(self._utf8.decode(b"", final=True))
        if self.stopped:
            return text
        held = self._held[self._skip:]
        self.released += len(held)
        self._held, self._skip = "", 0
        return text + held

    def _emit(self, new_text: str) -> str:
        lead = 0
        if not self.begun:  # leading whitespace: held, never shown, as a stop may begin in it (truncate_at_stop)
            body = new_text.lstrip(LEADING_SPACE)
            self.begun, lead = bool(body), len(new_text) - len(body)
        self.decoded += len(new_text) - lead
        text = self._cut(new_text, lead)
        self.released += len(text)
        return text

    def _cut(self, new_text: str, lead: int = 0) -> str:
        """The text of held + new_text that is final: before a stop string, or before what could still become
        one. The first `_skip` + `lead` characters are leading whitespace, searched for stops but never shown."""
        text, skip = self._held + new_text, self._skip + lead
        final, self.stopped = truncate_at_stop(text, self.stop, skip)
        if self.stopped:
            self._held, self._skip = "", 0
            return final
        start = len(text) - held_length(text, self.stop)  # a stop may still begin here
        self._held, self._skip = text[start:], max(0, skip - start)
        return text[skip:max(skip, start)]


def held_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of a stop string (it could still grow into
    one). Only starts ending in text's last character can be one, so each stop string is searched for those
    (rfind) instead of comparing all its starts: long stop strings cost the server's decoder per token and row."""
    best = 0
    for s in stop:
        n = min(len(s) - 1, len(text))
        while n > best:
            n = s.rfind(text[-1], 0, n) + 1  # the longest start of s, up to n characters, ending like text
            if n <= best:
                break
            if text.endswith(s[:n]):
                best = n
                break
            n -= 1
    return best


def encode_prompt(tokenizer: GPT2Tokenizer, prompt: str) -> list[int]:
    """Token ids of a text prompt; an empty prompt starts from <|endoftext|>, as GPT-2's own samples do."""
    return tokenizer.encode(prompt) or [tokenizer.eos_token_id]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token id rows left-padded to the longest, as batched generation wants them: (input_ids, attention_mask)."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def stream_generate(model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, prompt: str | Sequence[int],
                    config: GenerationConfig | None = None, *, generator: torch.Generator | None = None,
                    assistant_model: GPT2LMHeadModel | None = None, **options) -> Iterator[str]:
    """Iterator over the continuation of `prompt` (text or token ids) as text pieces while tokens arrive (one
    sequence). It ends at EOS (not shown), before a stop string, or after max_new_tokens; the pieces join to
    the decoded continuation. Options are checked here, before anything is generated."""
    config = (config or default_config(model)).replace(**options)
    if config.num_return_sequences != 1:
        raise ValueError("stream_generate produces one sequence; use generate for num_return_sequences > 1")
    ids = torch.tensor([encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)])
    # Stop strings are found on the text side here, where the streamer cuts the text.
    run = token_generator(model, ids, config=config.replace(stop=None), assistant_model=assistant_model,
                          tokenizer=tokenizer, generator=generator)
    return _stream_text(run, TextStreamDecoder(tokenizer, config.stop, skip_leading_space=config.skip_leading_space))


def _stream_text(run: TokenGenerator, decoder: TextStreamDecoder) -> Iterator[str]:
    eos = set(run.eos)
    for token in run:
        token_id = int(token[0])
        if token_id in eos:
            break
        piece = decoder.push(token_id)
        if piece:
            yield piece
        if decoder.stopped:
            return
    tail = decoder.flush()
    if tail:
        yield tail


def decode_completions(tokenizer: GPT2Tokenizer, sequences: Tensor, prompt_len: int, eos_ids: Sequence[int],
                       stop: Sequence[str] | None = None, skip_leading_space: bool = False) -> list[str]:
    """Text of each row's new tokens: up to the first EOS, without leading whitespace if `skip_leading_space`,
    cut before the first stop string."""
    eos = set(eos_ids)
    texts = []
    for row in sequences[:, prompt_len:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        text = tokenizer.decode(row[:end])
        lead = len(text) - len(text.lstrip(LEADING_SPACE)) if skip_leading_space else 0
        texts.append(truncate_at_stop(text, stop, lead)[0])
    return texts
