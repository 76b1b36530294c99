"""Beam search, as transformers' `generate(num_beams=...)` runs it (tested token for token against it).

Each prompt keeps `num_beams` running hypotheses in the rows of one TokenGenerator (KV cache included). A step
adds every beam's next-token log-probabilities (after the logits processors) to its running score and keeps the
2 x num_beams best continuations of each prompt (more with several EOS ids): those ending in EOS, or at the last
position, are offered to the prompt's `num_beams` finished hypotheses, scored by log-probability / (new tokens
** length_penalty); the best others run on, and the cache rows follow them. A prompt is done when no running
beam can beat its finished ones (`early_stopping`: False uses the current length for that bound, "never" the
longest possible one with a positive length_penalty, True stops once num_beams hypotheses are finished).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .generation import GenerationConfig, TokenGenerator, check_prompts
from .model import GPT2LMHeadModel, eval_mode

_NEVER = -1.0e9  # the score of what must not be chosen (transformers' value, so that ties break alike)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values (B, N, ...) at beams index (B, M) -> (B, M, ...)."""
    return values.gather(1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(
        *index.shape, *values.shape[2:]))


def beam_search(model: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor | None,
                config: GenerationConfig) -> Tensor:
    """The best `num_return_sequences` hypotheses of each prompt, best first: (B * num_return_sequences,
    prompt_len + the longest one's new tokens), shorter ones filled with pad_token_id after their EOS."""
    attention_mask = check_prompts(input_ids, attention_mask, model.config.vocab_size)  # before repeating them
    beams, batch, prompt_len = config.num_beams, input_ids.shape[0], input_ids.shape[1]
    config = config.for_prompt(prompt_len)
    rows = input_ids.repeat_interleave(beams, 0)
    mask = attention_mask.repeat_interleave(beams, 0) if attention_mask is not None else None
    run = TokenGenerator(model, rows, mask, config.replace(num_beams=1, num_return_sequences=1))
    device, eos, max_length = run.tokens.device, run.eos, prompt_len + config.max_new_tokens
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * beams  # enough continuations that num_beams stay open if the best ones end
    offered = torch.arange(keep, device=device) < beams  # only the best num_beams may become finished
    offsets = torch.arange(batch, device=device)[:, None] * beams

    # The generator's rows hold the running beams, each prompt's `beams` rows together; after its last token a
    # hypothesis is padding.
    run.tokens[:, prompt_len:] = run.pad
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEVER  # the beams start as copies: only the first may expand at step 0
    finished = run.tokens.view(batch, beams, max_length).clone()
    finished_scores = torch.full((batch, beams), _NEVER, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    with eval_mode(model), torch.no_grad():
        for step in range(config.max_new_tokens):
            cur = prompt_len + step
            log_probs = run.sampler.process(run.next_logits(cur).float().log_softmax(-1), run.history[:, :cur],
                                            step)
            vocab = log_probs.shape[-1]
            scores = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
            top_scores, top_index = scores.topk(keep)
            source, tokens = top_index // vocab, top_index % vocab
            candidates = _gather(run.tokens.view(batch, beams, max_length), source)
            candidates[:, :, cur] = tokens
            ends = torch.isin(tokens, eos_ids) | (cur + 1 >= max_length)

            # The best candidates that do not end run on.
            open_scores = top_scores + ends.float() * _NEVER
            best_open = open_scores.topk(beams).indices
            running_scores = _gather(open_scores, best_open)
            run.reorder((_gather(source, best_open) + offsets).view(-1))  # rows (and cache) follow their beams
            run.tokens[:, cur] = _gather(tokens, best_open).view(-1)
            if run.history is not run.tokens:
                run.history[:, cur] = run.tokens[:, cur]

            # Candidates that end join the finished hypotheses if they score among the best.
            just_finished = ends & offered
            normalized = top_scores / ((step + 1) ** config.length_penalty)
            full = is_finished.all(-1, keepdim=True) & (config.early_stopping is True)
            normalized = normalized + (full | ~improvable | ~just_finished).float() * _NEVER
            best = torch.cat([finished_scores, normalized], 1).topk(beams).indices
            finished = _gather(torch.cat([finished, candidates], 1), best)
            finished_scores = _gather(torch.cat([finished_scores, normalized], 1), best)
            lengths = torch.full_like(tokens, step + 1)
            finished_lengths = _gather(torch.cat([finished_lengths, lengths], 1), best)
            is_finished = _gather(torch.cat([is_finished, just_finished], 1), best)

            # Could a running beam still beat the worst finished one?
            bound = max_length - prompt_len if config.early_stopping == "never" and config.length_penalty > 0 \
                else step + 1
            best_running = running_scores[:, :1] / (bound ** config.length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, _NEVER)
            improvable &= (best_running > worst_finished).any(-1, keepdim=True)
            # (Every candidate ends only at the last position: `keep` leaves non-EOS continuations.)
            done = ~improvable.any() | (is_finished.all() if config.early_stopping is True else False)
            if bool(done):  # one host sync per step
                break
    n = config.num_return_sequences
    lengths = finished_lengths[:, :n].reshape(-1)
    return finished[:, :n].reshape(batch * n, max_length)[:, :prompt_len + int(lengths.max())]
