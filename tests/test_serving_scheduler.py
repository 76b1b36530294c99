"""The continuous-batching scheduler, driven step by step: rows that join, leave and mix options mid-flight
generate exactly what each would generate alone."""

import asyncio

import pytest
import torch

from gpt2kit.generation import GenerationConfig, TextStreamDecoder, generate
from gpt2kit.pipeline import load_model_and_tokenizer
from gpt2kit.serving.scheduler import BatchScheduler, FinishEvent, Job, QueueFull, TokenEvent

from .conftest import save_tiny_text_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load_model_and_tokenizer(save_tiny_text_model(tmp_path_factory.mktemp("sched") / "model"))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def events(loop, job):
    """The events the worker has sent to `job` so far."""
    loop.run_until_complete(asyncio.sleep(0))
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


# (prompt length, options): greedy and sampled rows, one with a repetition penalty (it reads the row's history).
ROWS = [
    (3, dict(max_new_tokens=12)),
    (11, dict(max_new_tokens=7, do_sample=True, temperature=0.9, top_p=0.8, seed=5)),
    (5, dict(max_new_tokens=15, repetition_penalty=1.5)),
    (14, dict(max_new_tokens=9, do_sample=True, temperature=1.3, top_k=40, seed=11)),
    (2, dict(max_new_tokens=6)),
]


def make_job(loop, model, tokenizer, prompt, options, index=0):
    job = Job(loop)
    config = GenerationConfig(eos_token_id=[], **options)  # no EOS: every row runs its full length
    job.add(index, prompt, config, TextStreamDecoder(tokenizer))
    return job


def alone(model, prompt, options):
    return generate(model, torch.tensor([prompt]), eos_token_id=[], **options)[0, len(prompt):].tolist()


def test_rows_joining_and_leaving_mid_flight_generate_as_alone(model_and_tokenizer, loop):
    model, tokenizer = model_and_tokenizer
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n, _ in ROWS]
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=8)
    jobs = []
    # Join at different moments: a longer prompt than the batch's history (the batch shifts right), shorter
    # ones (they are left-padded), and one after earlier rows have left (their padding is trimmed).
    for (_, options), prompt, steps_after in zip(ROWS, prompts, [3, 2, 4, 8, 0]):
        jobs.append(make_job(loop, model, tokenizer, prompt, options))
        scheduler.submit(jobs[-1])
        for _ in range(steps_after):
            scheduler.step()
            if scheduler.rows:  # no column is padding in every row: dead positions are trimmed at once
                assert int((scheduler.mask.cumsum(1) == 0).sum(1).min()) == 0
    while scheduler.rows:
        scheduler.step()
    assert scheduler.max_rows_seen >= 3
    for job, prompt, (_, options) in zip(jobs, prompts, ROWS):
        got = events(loop, job)
        tokens = [e.token_id for e in got if isinstance(e, TokenEvent)]
        assert tokens == alone(model, prompt, options), options
        assert isinstance(got[-1], FinishEvent) and got[-1].reason == "length"
        assert got[-1].completion_tokens == options["max_new_tokens"]


def test_batch_size_limit_and_cancelled_rows(model_and_tokenizer, loop):
    model, tokenizer = model_and_tokenizer
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=2)
    prompts = [[5, 6, 7], [9, 10], [40, 41, 42, 43], [100]]
    jobs = [make_job(loop, model, tokenizer, p, dict(max_new_tokens=10)) for p in prompts]
    for job in jobs:
        scheduler.submit(job)
    scheduler.step()
    assert len(scheduler.rows) == 2 and scheduler.queued_requests == 2
    jobs[1].cancel()  # the client went away: its row leaves at the next step, a queued one takes the slot
    scheduler.step()
    assert [r.job for r in scheduler.rows] == [jobs[0], jobs[2]]
    while scheduler.rows or scheduler.queued_requests:
        scheduler.step()
    assert scheduler.max_rows_seen == 2
    for i in (0, 2, 3):
        tokens = [e.token_id for e in events(loop, jobs[i]) if isinstance(e, TokenEvent)]
        assert tokens == alone(model, prompts[i], dict(max_new_tokens=10))
    assert not any(isinstance(e, FinishEvent) for e in events(loop, jobs[1]))


def test_full_queue_is_refused(model_and_tokenizer, loop):
    model, tokenizer = model_and_tokenizer
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=1, max_queue=2)
    for _ in range(2):
        scheduler.submit(make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3)))
    with pytest.raises(QueueFull, match="2 requests are already queued"):
        scheduler.submit(make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3)))
    scheduler.step()  # one request moves into the batch: there is room again
    scheduler.submit(make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3)))
