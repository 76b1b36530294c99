"""Speculative decoding: guess the next few tokens cheaply, then check all the guesses in one pass of the model.

The two ways of guessing transformers' `generate` offers (its "assisted decoding"):
- an assistant model (a smaller GPT-2 with the same vocabulary) decodes up to `num_assistant_tokens` ahead,
  stopping early once its chosen token's probability falls below `assistant_confidence_threshold`;
- prompt lookup (`prompt_lookup_num_tokens`, no second model): the tokens that followed the first earlier
  occurrence of the sequence's last n-gram (`max_matching_ngram_size` tokens down to 1). It pays off when the
  output copies from its input (summaries, extraction, code edits, a model that repeats itself).
The model then scores every guess in one forward pass over the KV cache. Guesses are kept up to the first one the
model would not have chosen, and the model's own token at that position follows, so every pass adds at least one
token. Greedy output is the model's own greedy output, up to the rounding of a several-token pass against
one-token passes, which may turn a near-tie (seldom in float32, often somewhere in a long bf16 or int8 text).
Sampled output follows the model's distribution exactly: a guess is kept with probability min(1, p/q), p and q
the model's and the assistant's processed probabilities of it, and after a rejection the token is drawn from
max(0, p - q) renormalised (Leviathan et al., 2023; Chen et al., 2023);
a prompt-lookup guess (no q) is kept when a draw from p equals it. The KV caches roll back by their length.
One sequence at a time, as in transformers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

from .generation import GenerationConfig, Sampler, TokenGenerator, default_config, model_placement
from .model import GPT2LMHeadModel, KVCache, inference
from .tokenizer import GPT2Tokenizer

# num_assistant_tokens_schedule="heuristic" keeps each assistant's guess length from one call to the next.
_guess_lengths: weakref.WeakKeyDictionary[GPT2LMHeadModel, int] = weakref.WeakKeyDictionary()


def prompt_lookup(sequence: Tensor, max_ngram: int, count: int) -> Tensor:
    """Up to `count` tokens that followed the first earlier occurrence of the last n-gram of `sequence` (L,), n
    from `max_ngram` down to 1; empty when none occurs earlier."""
    length = sequence.shape[0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        # Windows starting before length - n: each is followed by at least one token of the sequence.
        windows = sequence[:length - 1].unfold(0, n, 1)
        found = (windows == sequence[length - n:]).all(1).nonzero()
        if len(found):
            start = int(found[0]) + n
            return sequence[start:start + count]
    return sequence[:0]


class SpeculativeGenerator(TokenGenerator):
    """A TokenGenerator (same arguments and options, one unpadded prompt) that guesses ahead with
    `assistant_model` or, when `config.prompt_lookup_num_tokens` is set, by prompt lookup; it still yields one
    token at a time. `accepted` / `guessed` count the guesses kept and made."""

    def __init__(self, model: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                 config: GenerationConfig | None = None, *, assistant_model: GPT2LMHeadModel | None = None,
                 tokenizer: GPT2Tokenizer | None = None, generator: torch.Generator | None = None,
                 output_scores: bool = False, output_logits: bool = False, **options) -> None:
        config = (config or default_config(model)).replace(**options)
        if config.compile or not config.use_cache:  # before TokenGenerator sets up a compiled step's cache
            raise ValueError("speculative decoding runs the cached eager step: it takes neither compile=True nor "
                             "use_cache=False")
        super().__init__(model, input_ids, attention_mask, config, tokenizer=tokenizer, generator=generator,
                         output_scores=output_scores, output_logits=output_logits)
        config = self.config
        if (assistant_model is None) == (config.prompt_lookup_num_tokens is None):
            raise ValueError("speculative decoding guesses with assistant_model or prompt_lookup_num_tokens: give "
                             "one of the two")
        if self.tokens.shape[0] != 1 or self.attention_mask is not None:
            raise ValueError("speculative decoding (assistant_model, prompt_lookup_num_tokens) generates one "
                             "sequence at a time: one prompt without padding and num_return_sequences=1")
        if not isinstance(model, GPT2LMHeadModel):
            raise ValueError(f"speculative decoding scores several tokens per cached pass, which needs a "
                             f"GPT2LMHeadModel, not {type(model).__name__}")
        self.assistant = assistant_model
        self.accepted = self.guessed = 0
        if assistant_model is None:
            self.guess_length = config.prompt_lookup_num_tokens
            return
        if not isinstance(assistant_model, GPT2LMHeadModel):
            raise ValueError(f"assistant_model must be a GPT2LMHeadModel, not {type(assistant_model).__name__}")
        if assistant_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"assistant_model has {assistant_model.config.vocab_size} token ids, the model "
                             f"{model.config.vocab_size}: speculative decoding needs the same vocabulary")
        device, dtype = model_placement(assistant_model)
        if device != self.tokens.device:
            raise ValueError(f"assistant_model is on {device}, the model on {self.tokens.device}: put both on one "
                             "device")
        # The assistant reads at most up to the second-to-last token: the last guess and the last token are never
        # fed to it.
        needed = self.prompt_len + config.max_new_tokens - 2
        if needed > assistant_model.config.n_positions:
            raise ValueError(f"prompt of {self.prompt_len} tokens + max_new_tokens {config.max_new_tokens} needs "
                             f"{needed} positions of the assistant model, beyond its context of "
                             f"{assistant_model.config.n_positions} (n_positions)")
        self.assistant_cache = KVCache(assistant_model.config, 1, self.cache.max_length, dtype=dtype, device=device)
        # The assistant's guesses go through the same processors; its draws come from the same random stream.
        self.assistant_sampler = Sampler(config.replace(seed=None), model.config, self.sampler.generator, device)
        self.guess_length = config.num_assistant_tokens
        if config.num_assistant_tokens_schedule == "heuristic":
            self.guess_length = _guess_lengths.get(assistant_model, self.guess_length)

    @torch.no_grad()
    def _decode(self) -> Iterator[Tensor]:
        config, generated = self.config, 0
        eos = set(self.eos)
        while generated < config.max_new_tokens:
            end = self.prompt_len + generated  # tokens so far; the model's cache holds all but the last one
            # Room is left for the model's own token after the guesses.
            guesses, guess_probs = self._guess(end, generated, min(self.guess_length,
                                                                  config.max_new_tokens - generated - 1))
            new, kept, scores, logits = self._check(end, generated, guesses, guess_probs)
            self.accepted += kept
            self.guessed += len(guesses)
            self._adapt(kept, len(guesses))
            # The caches keep what was kept: the tokens before the model's own token.
            self.cache.length = end + kept
            if self.assistant is not None:
                self.assistant_cache.length = min(self.assistant_cache.length, end + kept)
            for i, token in enumerate(new):
                self.tokens[0, end + i] = token
                if self.scores is not None:
                    self.scores.append(scores[i:i + 1])
                if self.logits is not None:
                    self.logits.append(logits[i:i + 1])
                generated += 1
                self.steps = generated
                yield self.tokens[:, end + i].clone()
                if token in eos or (self.stop_matcher is not None and self.stop_matcher.matches([token])):
                    return

    def _guess(self, end: int, generated: int, count: int) -> tuple[list[int], list[Tensor] | None]:
        """Up to `count` guessed tokens after position end - 1, written into the token buffer, and (sampling with an
        assistant) the assistant's processed probabilities each was drawn from."""
        if count <= 0:
            return [], None
        if self.assistant is None:
            guesses = prompt_lookup(self.tokens[0, :end], self.config.max_matching_ngram_size, count)
            self.tokens[0, end:end + len(guesses)] = guesses
            return guesses.tolist(), None
        sampler, cache = self.assistant_sampler, self.assistant_cache
        threshold = self.config.assistant_confidence_threshold
        guesses, probs = [], [] if sampler.sampling else None
        for j in range(count):
            with inference(self.assistant):
                out = self.assistant(self.tokens[:, cache.length:end + j], past_key_values=cache, logits_to_keep=1)
            scores = sampler.process(out.logits[:, -1].float(), self.history[:, :end + j], generated + j)
            p = scores.softmax(-1)
            token = int(sampler.pick(scores))
            if probs is not None:
                probs.append(p[0])
            self.tokens[0, end + j] = token
            guesses.append(token)
            if float(p[0, token]) < threshold:  # unsure: let the model decide from here
                break
        return guesses, probs

    def _check(self, end: int, generated: int, guesses: list[int], guess_probs: list[Tensor] | None
               ) -> tuple[list[int], int, Tensor | None, Tensor]:
        """One pass of the model over the last token and the guesses: the tokens it adds (the guesses kept, then its
        own), how many guesses it kept, and the processed scores (when output_scores asks for them) and raw logits
        (float32) of each added token."""
        with inference(self.model):
            out = self.model(self.tokens[:, self.cache.length:end + len(guesses)], past_key_values=self.cache,
                             logits_to_keep=len(guesses) + 1)
        logits = out.logits[0].float()
        sampler = self.sampler
        new: list[int] = []
        all_scores = []
        for i in range(len(guesses) + 1):
            scores = sampler.process(logits[i:i + 1], self.history[:, :end + i], generated + i)
            all_scores.append(scores)
            if i == len(guesses):  # every guess kept: the model's token after them
                new.append(int(sampler.pick(scores)))
                break
            guess = guesses[i]
            if not sampler.sampling:
                token = int(scores.argmax(-1))
            elif guess_probs is None:
                token = int(sampler.pick(scores))
            else:
                p, q = scores[0].softmax(-1), guess_probs[i]
                draw = torch.rand((), generator=sampler.generator, device=p.device)
                if float(draw) * float(q[guess]) < float(p[guess]):  # kept with probability min(1, p/q)
                    new.append(guess)
                    continue
                residual = (p - q).clamp_min_(0)
                token = int(torch.multinomial(residual if float(residual.sum()) > 0 else p, 1,
                                              generator=sampler.generator))
                new.append(token)
                break
            new.append(token)
            if token != guess:
                break
        kept = len(new) - 1
        return new, kept, torch.cat(all_scores) if self.scores is not None else None, logits[:len(new)]

    def _adapt(self, kept: int, guessed: int) -> None:
        """transformers' heuristic schedules: two more guesses after a round that kept all, one fewer otherwise."""
        schedule = self.config.num_assistant_tokens_schedule
        if self.assistant is None or schedule == "constant" or not guessed:
            return
        self.guess_length = self.guess_length + 2 if kept == guessed else max(1, self.guess_length - 1)
        if schedule == "heuristic":
            _guess_lengths[self.assistant] = self.guess_length
