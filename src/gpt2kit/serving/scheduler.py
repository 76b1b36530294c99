"""Continuous batching: concurrent requests are decoded together, one batched forward pass per step.

A single worker thread owns the model. Each step it admits queued sequences (up to `max_batch_size` rows),
prefills the new ones together, and then advances every running row by one token in one forward pass. Rows
are right-aligned in a shared KV cache: a row that joins with a shorter history is left-padded and masked,
exactly as a left-padded batch is in `gpt2kit.generation`, so every row computes what it would compute alone up
to float rounding: products over another batch shape may round differently, which moves log-probabilities in
their last bits (a few 1e-6) and can change a chosen token only where two candidates are that close to a tie.
Each row has its own `Sampler` (options and random generator), so no request's parameters reach another.

Results go back as events on each request's asyncio queue; the worker never waits for a client, so a slow
reader only delays itself. Finished and cancelled rows leave the batch at once and the padding column they
leave behind is trimmed away.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation import (
    GenerationConfig,
    Sampler,
    TextStreamDecoder,
    left_pad,
    model_placement,
)
from ..model import GPT2LMHeadModel, KVCache
from ..tokenizer import GPT2Tokenizer

logger = logging.getLogger(__name__)

CACHE_HEADROOM = 64  # positions allocated beyond the current need, so the cache rarely grows
PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose logits exist at once when echoing logprobs


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


# ---- events sent to the request handler ---------------------------------------------------------------------
ScoredToken = tuple[int, float, list[tuple[int, float]]]  # token id, its log-probability, the top alternatives


@dataclass
class TokenEvent:
    """A generated token of choice `index` and the text it completed ("" while text is held back). `scored`:
    the log-probabilities (when asked for) of the tokens whose text has now begun to show: a token's entry waits
    with its text, and tokens that only spelled a stop string never get one."""
    index: int
    token_id: int
    text: str
    scored: list[ScoredToken] = field(default_factory=list)


# The log-probabilities of a prompt's tokens and their top alternatives (the first token has neither).
PromptScores = tuple[list[float | None], list[list[tuple[int, float]] | None]]


@dataclass
class PromptLogprobsEvent:
    """Log-probabilities of the prompt's tokens (echo with logprobs); the first token has none."""
    index: int
    token_ids: list[int]
    logprobs: list[float | None]  # these lists are shared by the events of one prompt's choices: never modified
    top: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    """Choice `index` is complete: `text` is what was still held back (with the `scored` tokens that spelled it),
    `reason` "stop" or "length"."""
    index: int
    reason: str
    text: str
    completion_tokens: int
    scored: list[ScoredToken] = field(default_factory=list)
    mean_logprob: float | None = None  # of the generated tokens, EOS included (when the sequence was ranked)


@dataclass
class ErrorEvent:
    message: str
    status: int = 500  # the HTTP status a request that has not started streaming gets


Event = TokenEvent | PromptLogprobsEvent | FinishEvent | ErrorEvent


# ---- requests and their sequences ---------------------------------------------------------------------------
class Job:
    """One HTTP request: its sequences (prompt x n choices) and the queue their events arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.cancelled = False  # set by the handler (client gone); the worker drops the rows
        self.completion_tokens = 0  # counted by the handler as choices finish
        self.mean_logprobs: dict[int, float] = {}  # of ranked choices (best_of), kept by the handler
        # (prompt, number of alternatives) -> its scores, kept by the worker: the n choices of an echoed prompt
        # share one scoring, also when they join the batch in different prefills.
        self.prompt_scores: dict[tuple[tuple[int, ...], int | None], PromptScores] = {}

    def add(self, index: int, prompt: list[int], config: GenerationConfig, decoder: TextStreamDecoder, *,
            logprobs: int | None = None, prompt_logprobs: bool = False, ranked: bool = False) -> None:
        """Queue choice `index`: `prompt` continued under `config`, its text cut by `decoder`; `ranked` adds up
        its tokens' log-probabilities for the FinishEvent (best_of)."""
        self.sequences.append(Sequence(self, index, prompt, config, decoder, logprobs, prompt_logprobs, ranked))

    def emit(self, event: Event) -> None:
        """Thread-safe: hand an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Sequence:
    """One row of the batch: one choice for one prompt."""
    job: Job
    index: int
    prompt: list[int]
    config: GenerationConfig
    decoder: TextStreamDecoder
    logprobs: int | None  # None: no logprobs; k: the chosen token's and the top k
    prompt_logprobs: bool
    ranked: bool = False  # sum the generated tokens' log-probabilities (best_of picks by their mean)
    logprob_sum: float = 0.0
    generated: list[int] = field(default_factory=list)
    sampler: Sampler | None = None  # made by the worker when the row joins the batch
    history: Tensor | None = None  # prompt + generated, for processors that look back (repetition penalty)
    pending: list[tuple[int, ScoredToken]] = field(default_factory=list)  # (where its text starts, entry)

    def release_scored(self, *, final: bool = False) -> list[ScoredToken]:
        """The pending log-probability entries whose token's text has begun to show (all of them when the
        whole text has been sent); the others wait, and are dropped if a stop string cuts the text first."""
        if final:
            ready, self.pending = [entry for _, entry in self.pending], []
            return ready
        shown = self.decoder.released
        ready = [entry for start, entry in self.pending if start < shown]
        self.pending = [(start, entry) for start, entry in self.pending if start >= shown]
        return ready

    @property
    def max_tokens(self) -> int:
        return self.config.max_new_tokens


def _leading_padding(mask: Tensor) -> int:
    """How many leading positions are padding in every row of a (rows, positions) 0/1 mask."""
    return int((mask.cumsum(1) == 0).sum(1).min())




# ---- the scheduler ------------------------------------------------------------------------------------------
class BatchScheduler:
    """Owns the model on a worker thread; `submit` queues a Job's sequences (QueueFull when `max_queue`
    requests already wait), `start`/`stop` run the worker."""

    def __init__(self, model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, *, max_batch_size: int = 16,
                 max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.device, self.dtype = model_placement(model)
        # Ids the tokenizer has no text for (a vocabulary padded to 50304, cl100k's gaps) are never generated and
        # cannot be named, so they are left out of the alternatives a request's logprobs list.
        self.textless_ids = torch.tensor(tokenizer.unused_ids(self.config.vocab_size), dtype=torch.long,
                                         device=self.device)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._pending: deque[Sequence] = deque()
        self._waiting_jobs: dict[Job, int] = {}  # job -> its sequences not yet admitted
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch: rows, their shared cache, the mask over cached positions, each row's last token.
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None
        self.mask: Tensor | None = None
        self.last_tokens: Tensor | None = None
        self.max_rows_seen = 0  # the most sequences in flight at once so far (for tests and metrics)

    def _top(self, logprobs: Tensor, k: int) -> list[tuple[int, float]]:
        """The k most likely ids that have text, with their log-probabilities."""
        if len(self.textless_ids):
            logprobs = logprobs.index_fill(-1, self.textless_ids, -math.inf)
        values, ids = logprobs.topk(k)
        return list(zip(ids.tolist(), values.tolist(), strict=True))

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2kit-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (after its current step) and end every request in flight or queued with the shutdown
        error. Safe to call twice, also at once from two threads (the exit signal's and the app's shutdown)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        with self._wake:
            for seq in [*self.rows, *self._pending]:
                seq.job.emit(ErrorEvent("the server is shutting down", status=503))
            self._reset()
            self._pending.clear()
            self._waiting_jobs.clear()

    @property
    def stopping(self) -> bool:
        """Whether stop() has been called (the server is shutting down)."""
        return self._stopping

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a batch slot, not counting those whose clients left."""
        with self._wake:  # the worker admits (and removes) jobs meanwhile
            return sum(not job.cancelled for job in self._waiting_jobs)

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting_jobs) >= self.max_queue:  # requests whose clients left make room first
                self._pending = deque(s for s in self._pending if not s.job.cancelled)
                self._waiting_jobs = dict(Counter(s.job for s in self._pending))
            if len(self._waiting_jobs) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests are already queued")
            self._waiting_jobs[job] = len(job.sequences)
            self._pending.extend(job.sequences)
            self._wake.notify()

    # ---- the worker ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self.rows:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One round: admit queued sequences, prefill them together, advance every row by one token. The
        worker thread runs this in a loop; without `start()`, a caller can drive the batch step by step."""
        admitted = []
        try:
            self._drop_cancelled()
            with self._wake:
                admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self.rows:
                self._decode_step()
        except Exception as err:  # a bug must not kill the worker: fail the requests involved, go on
            for job in {id(s.job): s.job for s in [*admitted, *self.rows]}.values():
                self._fail(job, err)
            self._reset()

    @staticmethod
    def _fail(job: Job, err: Exception) -> None:
        logger.error("generation failed", exc_info=err)
        job.emit(ErrorEvent(f"generation failed: {type(err).__name__}: {err}"))
        job.cancel()

    def _admit(self) -> list[Sequence]:
        """Queued sequences that fit into the batch (called with the lock held)."""
        admitted = []
        while self._pending and len(self.rows) + len(admitted) < self.max_batch_size:
            seq = self._pending.popleft()
            self._waiting_jobs[seq.job] -= 1
            if not self._waiting_jobs[seq.job]:
                del self._waiting_jobs[seq.job]
            if not seq.job.cancelled:
                admitted.append(seq)
        return admitted

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.last_tokens = [], None, None, None

    # ---- prefill: new rows join ------------------------------------------------------------------------
    def _prefill(self, seqs: list[Sequence]) -> None:
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows) + len(seqs))
        width = max(len(s.prompt) for s in seqs)
        ids, mask = left_pad([s.prompt for s in seqs], self.tokenizer.pad_token_id, self.device)
        cache = KVCache(self.config, len(seqs), width, dtype=self.dtype, device=self.device)
        # The LM head runs on the last position of every row, and on the prompt of a row that echoes its
        # log-probabilities only, a chunk at a time: (rows x prompt x vocabulary) logits would be gigabytes.
        hidden = self.model.transformer(ids, mask, past_key_values=cache).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])
        joining = []
        for row, seq in enumerate(seqs):
            try:  # options that fail (a sampler that cannot be built, say) fail their own request only
                seq.sampler = Sampler(seq.config, self.config, device=self.device)
                seq.history = torch.empty(1, len(seq.prompt) + seq.max_tokens, dtype=torch.long, device=self.device)
                seq.history[0, :len(seq.prompt)] = ids[row, width - len(seq.prompt):]
                if seq.prompt_logprobs:
                    self._emit_prompt_logprobs(seq, hidden[row, width - len(seq.prompt):])
                if seq.max_tokens == 0:
                    seq.job.emit(FinishEvent(seq.index, "length", seq.decoder.flush(), 0))
                elif not self._advance(seq, logits[row]):
                    joining.append(row)
            except Exception as err:
                self._fail(seq.job, err)
        if joining:
            self._join([seqs[r] for r in joining], cache, mask, torch.tensor(joining, device=self.device))

    def _emit_prompt_logprobs(self, seq: Sequence, hidden: Tensor) -> None:
        key = (tuple(seq.prompt), seq.logprobs)
        if key not in seq.job.prompt_scores:
            seq.job.prompt_scores[key] = self._score_prompt(seq, hidden)
        seq.job.emit(PromptLogprobsEvent(seq.index, seq.prompt, *seq.job.prompt_scores[key]))

    def _score_prompt(self, seq: Sequence, hidden: Tensor) -> PromptScores:
        """The log-probabilities (and top alternatives) of seq's prompt tokens, from the prompt's hidden states."""
        chosen, top = [], []
        targets = torch.tensor(seq.prompt[1:], device=hidden.device)
        for start in range(0, len(targets), PROMPT_LOGPROBS_CHUNK):  # position j predicts prompt token j + 1
            rows = slice(start, start + PROMPT_LOGPROBS_CHUNK)
            logprobs = self.model.lm_head(hidden[:-1][rows]).float().log_softmax(-1)
            chosen += logprobs.gather(1, targets[rows, None]).squeeze(1).tolist()
            top += [self._top(row, seq.logprobs) if seq.logprobs else [] for row in logprobs]
        return [None, *chosen], [None, *top]

    def _join(self, seqs: list[Sequence], cache: KVCache, mask: Tensor, rows: Tensor) -> None:
        """Add prefilled rows to the batch, right-aligning old and new histories in one cache. Leading positions
        that are padding in every joining row (the prefill was as wide as a prompt that has already finished)
        are left out."""
        lead = _leading_padding(mask[rows])
        new_mask, new_len = mask[rows, lead:], cache.length - lead
        old_len = self.cache.length if self.cache is not None else 0
        length = max(old_len, new_len)
        B_old, B_new = len(self.rows), len(seqs)
        merged = KVCache(self.config, B_old + B_new, min(length + CACHE_HEADROOM, self.config.n_positions),
                         dtype=self.dtype, device=self.device)
        merged_mask = torch.zeros(B_old + B_new, length, dtype=torch.long, device=self.device)
        if B_old:
            merged.keys[:, :B_old, :, length - old_len:length] = self.cache.keys[:, :, :, :old_len]
            merged.values[:, :B_old, :, length - old_len:length] = self.cache.values[:, :, :, :old_len]
            merged_mask[:B_old, length - old_len:] = self.mask
        merged.keys[:, B_old:, :, length - new_len:length] = cache.keys[:, rows, :, lead:cache.length]
        merged.values[:, B_old:, :, length - new_len:length] = cache.values[:, rows, :, lead:cache.length]
        merged_mask[B_old:, length - new_len:] = new_mask
        merged.length = length
        new_last = torch.tensor([s.generated[-1] for s in seqs], device=self.device)
        self.last_tokens = new_last if not B_old else torch.cat([self.last_tokens, new_last])
        self.rows = self.rows + seqs
        self.cache, self.mask = merged, merged_mask
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))

    # ---- decode: every row advances one token ----------------------------------------------------------
    def _decode_step(self) -> None:
        B = len(self.rows)
        self._ensure_capacity(self.cache.length + 1)
        self.mask = torch.cat([self.mask, torch.ones(B, 1, dtype=torch.long, device=self.device)], 1)
        positions = self.mask.sum(1, keepdim=True) - 1
        logits = self.model(self.last_tokens[:, None], self.mask, positions, past_key_values=self.cache,
                            logits_to_keep=1).logits[:, -1]
        finished = [self._advance_or_fail(seq, logits[row]) for row, seq in enumerate(self.rows)]
        self.last_tokens = torch.tensor([s.generated[-1] for s in self.rows], device=self.device)
        self._keep([row for row, done in enumerate(finished) if not done])

    def _advance_or_fail(self, seq: Sequence, logits: Tensor) -> bool:
        """_advance, failing only seq's request if its options break its step."""
        try:
            return self._advance(seq, logits)
        except Exception as err:
            self._fail(seq.job, err)
            return True

    def _advance(self, seq: Sequence, logits: Tensor) -> bool:
        """Choose seq's next token from its logits (V,), send the events; True when the sequence is done."""
        step = len(seq.generated)
        history = seq.history[:, :len(seq.prompt) + step]
        token = int(seq.sampler(logits[None], history, step)[0])
        seq.generated.append(token)
        seq.history[0, len(seq.prompt) + step] = token
        logprobs = logits.float().log_softmax(-1) if seq.logprobs is not None or seq.ranked else None
        if seq.ranked:
            seq.logprob_sum += float(logprobs[token])
        mean = seq.logprob_sum / len(seq.generated) if seq.ranked else None
        if token in seq.sampler.eos:
            text = seq.decoder.flush()
            seq.job.emit(FinishEvent(seq.index, "stop", text, len(seq.generated), seq.release_scored(final=True),
                                     mean))
            return True
        if seq.logprobs is not None:
            top = self._top(logprobs, seq.logprobs) if seq.logprobs else []
            seq.pending.append((seq.decoder.decoded, (token, float(logprobs[token]), top)))
        text = seq.decoder.push(token)
        seq.job.emit(TokenEvent(seq.index, token, text, seq.release_scored()))
        if seq.decoder.stopped:  # the tokens still pending only spelled the stop string
            seq.job.emit(FinishEvent(seq.index, "stop", "", len(seq.generated), mean_logprob=mean))
            return True
        if len(seq.generated) == seq.max_tokens:
            text = seq.decoder.flush()  # its last character may complete a stop string
            seq.job.emit(FinishEvent(seq.index, "stop" if seq.decoder.stopped else "length", text,
                                     len(seq.generated), seq.release_scored(final=True), mean))
            return True
        return False

    def _drop_cancelled(self) -> None:
        if any(s.job.cancelled for s in self.rows):
            self._keep([row for row, s in enumerate(self.rows) if not s.job.cancelled])

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows, then drop the leading cache positions that are padding in every row."""
        if len(rows) == len(self.rows):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, device=self.device)
        self.rows = [self.rows[r] for r in rows]
        self.cache.reorder(index)
        self.mask, self.last_tokens = self.mask[index], self.last_tokens[index]
        lead = _leading_padding(self.mask)
        if lead:
            self._move_cache(start=lead, capacity=self.cache.max_length - lead)

    def _ensure_capacity(self, needed: int) -> None:
        if needed > self.cache.max_length:
            self._move_cache(start=0, capacity=min(needed + CACHE_HEADROOM, self.config.n_positions))

    def _move_cache(self, start: int, capacity: int) -> None:
        """Copy cached positions [start, length) to the front of a cache of `capacity` positions."""
        old = self.cache
        length = old.length - start
        self.cache = KVCache(self.config, len(self.rows), capacity, dtype=self.dtype, device=self.device)
        self.cache.keys[:, :, :, :length] = old.keys[:, :, :, start:old.length]
        self.cache.values[:, :, :, :length] = old.values[:, :, :, start:old.length]
        self.cache.length = length
        self.mask = self.mask[:, start:]
