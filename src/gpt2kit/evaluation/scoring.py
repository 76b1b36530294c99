"""Score token windows with a causal LM: log-probability of chosen targets and whether each is the argmax.

Every evaluation reduces to the same question — given a window of tokens, how likely is each of its last
`n_scored` tokens under the model, and would greedy decoding have produced it? Perplexity windows score up
to a full context; a LAMBADA example is one window that scores the target word's tokens.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..cpu_matmul import mm
from ..files import read_utf8, require_file
from ..losses import padded_vocab_size, scratch_buffer
from ..model import GPT2LMHeadModel, eval_mode, is_plain, plain_head_weight
from ..quantization import PackedLinear


# Scored positions whose logits exist at once, at most: 1024 x 50257 float32 = 206 MB, written into one scratch
# block reused chunk after chunk (fresh blocks that large are page-faulted in on every chunk, which cost as much as
# the log-sum-exp). On a CPU whose last-level cache is known the block is sized to fit in it (see rows_per_chunk).
ROWS_PER_CHUNK = 1024
FEWEST_ROWS_PER_CHUNK = 64  # a matmul of fewer rows runs below the GEMM kernels' speed


@functools.cache
def last_level_cache_bytes() -> int | None:
    """The size of CPU 0's largest cache, from Linux's sysfs (None where it cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        number, unit = text.rstrip("KMG"), text[len(text.rstrip("KMG")):]
        if number.isdigit():
            sizes.append(int(number) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[unit])
    return max(sizes, default=None)


def rows_per_chunk(columns: int, device: torch.device) -> int:
    """Rows of float32 logits scored at once: on a CPU the most (a power of two, FEWEST_ROWS_PER_CHUNK to
    ROWS_PER_CHUNK) whose block fits in the last-level cache, so that the LM head's product writes into the cache
    and the reductions after it read from there. The Zen 4 EPYC of the benchmarks (32 MB L3) evaluates 1.1x faster
    at 128 rows (25 MB) than at 1024 (206 MB); GPT-2 small's wider product, no slower."""
    cache = last_level_cache_bytes() if device.type == "cpu" else None
    if cache is None:
        return ROWS_PER_CHUNK
    fitting = max(1, cache // (4 * columns))
    return min(ROWS_PER_CHUNK, max(FEWEST_ROWS_PER_CHUNK, 2 ** (fitting.bit_length() - 1)))


@dataclass(frozen=True)
class Window:
    """`tokens[:-1]` go into the model and `tokens[1:]` are their targets; only the last `n_scored` count."""

    tokens: list[int]
    n_scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_scored <= len(self.tokens) - 1:
            raise ValueError(f"a window of {len(self.tokens)} tokens can score 1..{len(self.tokens) - 1} "
                             f"targets, not {self.n_scored}")


@dataclass
class WindowScore:
    logprobs: Tensor  # (n_scored,) float64: log p(target | its left context), natural log
    greedy: Tensor | None = None  # (n_scored,) bool: the target is the argmax over the vocabulary
    restricted_greedy: Tensor | None = None  # (n_scored,) bool: target logit >= every allowed token's


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_max_length(model: nn.Module, max_length: int | None) -> int:
    """`max_length`, or the model's context when None; never more than the context."""
    context = model.config.n_positions
    if max_length is not None and not (type(max_length) is int and 1 <= max_length <= context):
        raise ValueError(f"max_length must be an integer between 1 and the model's context ({context}), got "
                         f"{max_length!r}")
    return max_length or context


def exp_or_inf(x: float) -> float:
    """exp, inf past float's range (a random model's perplexity per whitespace word of Chinese text, say)."""
    try:
        return math.exp(x)  # nan stays nan
    except OverflowError:
        return math.inf


def check_limit(limit: int | None) -> None:
    if limit is not None and not (type(limit) is int and limit >= 0):
        raise ValueError(f"limit must be an integer >= 0 (the first N items), got {limit!r}")


def read_jsonl(path: str | os.PathLike, key: str) -> list[tuple[int, str]]:
    """(line number, text under `key`) for each non-blank line of a JSON-lines file."""
    path = require_file(path, "data file")
    rows = []
    # "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085, which JSON strings may hold raw.
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:  # bad JSON, or an integer past Python's limit on digits
            reason = err.msg if isinstance(err, json.JSONDecodeError) else err
            raise ValueError(f"{path}:{n}: not valid JSON ({reason})") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ValueError(f"{path}:{n}: expected an object with a string field {key!r}")
        rows.append((n, record[key]))
    return rows


def scoring_head(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """For a GPT2LMHeadModel, the function that turns hidden states into logits (see _lm_head), so the model runs
    without its head and the head runs on the scored positions only: with a stride smaller than the window most
    positions are context, and the LM head (a vocab-wide matmul) is most of a small model's work. None for
    other models, and for a GPT-2 sharded by FSDP (its root module gathers the weights in its own forward) or
    tensor parallelism (DTensor weights): they return logits for every position."""
    if type(model) is GPT2LMHeadModel and all(map(is_plain, model.parameters())):
        return _lm_head(model)
    return None


def _lm_head(model: GPT2LMHeadModel) -> Callable[[Tensor], Tensor]:
    """hidden rows -> logits. A plain LM head's product (see plain_head_weight) runs on the padded vocabulary
    (the extra columns are 0; _score_rows masks them) and goes into a scratch block (see rows_per_chunk), so the
    logits it returns are valid until the next call. A head packed by pack_weights still has its float weight in
    the tied embedding; any other head (int8, an untied packed one, a DTensor) runs as its own module."""
    head = model.lm_head
    weight = plain_head_weight(head)
    if isinstance(head, PackedLinear) and model.config.tie_word_embeddings:
        weight = model.transformer.wte.weight
    if weight is None:
        return head

    # The product runs on the vocabulary padded with zero rows (as the fused training loss does): MKL's float32
    # GEMM ran 1024 x 256 x 50257 at 106 GFLOP/s on the benchmark CPU and 50304 columns at 181.
    extra = padded_vocab_size(len(weight)) - len(weight)
    padded = nn.functional.pad(weight, (0, 0, 0, extra)) if extra else weight

    chunk = rows_per_chunk(len(padded), weight.device)

    def logits(rows: Tensor) -> Tensor:
        # One block of a whole chunk's rows serves every chunk, the last one too (untouched pages cost nothing).
        block = scratch_buffer("logits", (max(len(rows), chunk), len(padded)), weight.dtype, weight.device)
        return mm(rows, padded.T, out=block[:len(rows)])

    return logits


def _log_sum_exp_in_place(logits: Tensor) -> Tensor:
    """log sum exp over each row, as torch.logsumexp computes it, overwriting `logits` (a chunk's logits are not
    read again, and temporaries that size are page-faulted in afresh). Not F.cross_entropy: on CPU its float32
    log-softmax loses the vocabulary's small terms to the large ones (about 1e-6 nats per token of bias on
    peaked distributions at GPT-2's 50257)."""
    peak = logits.amax(-1, keepdim=True)
    return logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))


def _log_sum_exp_float64_sum(logits: Tensor) -> Tensor:
    """log sum exp over each row in float64: float32 exponentials summed in float64. As one compiled kernel it
    reads each row from memory once (the second pass finds it in cache) and writes nothing: 2.5x faster than
    _log_sum_exp_in_place's four passes over memory. Summed in float32, inductor's kernel loses the small terms
    as log-softmax does; float64 keeps them."""
    peak = logits.amax(-1, keepdim=True)
    return (logits - peak).exp().double().sum(-1).log() + peak.squeeze(-1)


@functools.cache
def _compiled_log_sum_exp() -> Callable[[Tensor], Tensor]:
    """Made on first use (torch.compile's import costs about 1 s); it compiles on its first call (3-12 s), then
    again only for a new dtype or device: row and vocabulary counts are dynamic."""
    return torch.compile(_log_sum_exp_float64_sum, dynamic=True)


def _score_rows(rows: Tensor, head: Callable, targets: Tensor, *, vocab_size: int, greedy: bool,
                disallowed: Tensor | None, compile: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per scored row: log p(target) (float64), whether it is the argmax, and the restricted argmax — computed
    a chunk of rows at a time (see rows_per_chunk) so the (rows, vocab) logits stay bounded in memory. `compile`:
    the log-sum-exp runs as one compiled kernel (see _log_sum_exp_float64_sum)."""
    logprobs, hits, restricted = [], [], []
    chunk = rows_per_chunk(padded_vocab_size(vocab_size), rows.device)
    for start in range(0, len(rows), chunk):
        logits = head(rows[start:start + chunk]).float()
        if logits.shape[-1] > vocab_size:
            # Columns past the tokenizer's vocabulary (the model's own or the head's padding) get probability 0
            # in place: the reductions below then run on whole contiguous rows, not a strided slice of them.
            logits[:, vocab_size:] = float("-inf")
            if disallowed is not None and len(disallowed) < logits.shape[-1]:
                disallowed = nn.functional.pad(disallowed, (0, logits.shape[-1] - len(disallowed)), value=True)
        target = targets[start:start + chunk]
        chosen = logits.gather(-1, target[:, None]).squeeze(-1)
        if greedy:
            hits.append(logits.argmax(-1) == target)
        if disallowed is not None:  # the target competes even if disallowed (its word may not be; see lambada)
            restricted.append(chosen >= logits.masked_fill(disallowed, float("-inf")).amax(-1))
        logprobs.append(chosen - (_compiled_log_sum_exp()(logits) if compile else _log_sum_exp_in_place(logits)))
    return (torch.cat(logprobs).double().cpu(), torch.cat(hits).cpu() if greedy else None,
            torch.cat(restricted).cpu() if disallowed is not None else None)


@torch.inference_mode()
def score_windows(model: nn.Module, windows: Sequence[Window], *, vocab_size: int, batch_size: int = 8,
                  pad_token_id: int = 0, greedy: bool = False, disallowed: Tensor | None = None,
                  desc: str = "scoring", progress: bool = True, compile: bool = False) -> list[WindowScore]:
    """Score each window; the result is in the order of `windows` and does not depend on `batch_size`.

    Logits past `vocab_size` (the tokenizer's) are masked out, so vocabulary padding added for speed is never a
    candidate. `greedy=True` also reports whether each target is the argmax; `disallowed` (bool, vocab_size)
    yields `restricted_greedy`: whether the target is the argmax once the other disallowed tokens are removed.

    Rows are right-padded and the model is called without an attention mask: in a causal model a real token
    never attends to the padding after it, so padded rows give the logits each window gives alone, on SDPA's
    fused causal path. Padding positions are never scored.

    `compile=True` runs the log-sum-exp over the vocabulary through torch.compile: it compiles for 3-12 s on
    first use, then scores up to 1.15x faster where the vocabulary dominates (a small model on CPU), and sums
    each row in float64.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    if disallowed is not None:
        disallowed = disallowed.to(device)
    # Longest first: batches hold windows of similar length, so little compute goes to padding.
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    scores: list[WindowScore | None] = [None] * len(windows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    head = scoring_head(model)  # once: it pads the head's weight
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            inputs = torch.full((len(batch), len(windows[batch[0]].tokens) - 1), pad_token_id, dtype=torch.long)
            spans, targets = [], []
            for row, i in enumerate(batch):
                tokens, n = windows[i].tokens, windows[i].n_scored
                inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
                spans.append((len(tokens) - 1 - n, len(tokens) - 1))
                targets += tokens[-n:]
            inputs = inputs.to(device)
            out = model(inputs).logits if head is None else model.transformer(inputs).last_hidden_state
            rows = torch.cat([out[row, start:end] for row, (start, end) in enumerate(spans)])
            logprobs, hits, restricted = _score_rows(
                rows, head or nn.Identity(), torch.tensor(targets, device=device), vocab_size=vocab_size,
                greedy=greedy, disallowed=disallowed, compile=compile)
            offset = 0
            for i in batch:
                own = slice(offset, offset + windows[i].n_scored)
                scores[i] = WindowScore(logprobs[own], None if hits is None else hits[own],
                                        None if restricted is None else restricted[own])
                offset = own.stop
    return scores  # type: ignore[return-value]
