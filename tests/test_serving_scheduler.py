"""The continuous-batching scheduler, driven step by step: rows that join, leave and mix options mid-flight
generate exactly what each would generate alone."""

import asyncio

import pytest
import torch

from gpt2kit.generation import GenerationConfig, TextStreamDecoder, generate
from gpt2kit.pipeline import load_model_and_tokenizer
from gpt2kit.serving import scheduler as scheduler_module
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


def test_queued_requests_whose_clients_left_make_room(model_and_tokenizer, loop):
    model, tokenizer = model_and_tokenizer
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=1, max_queue=1)
    gone = make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3))
    scheduler.submit(gone)
    gone.cancel()
    scheduler.submit(make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3)))
    assert scheduler.queued_requests == 1


def test_queued_requests_whose_clients_left_are_not_counted(model_and_tokenizer, loop):
    """/health reports queued_requests: requests whose clients had left still counted until they reached the batch."""
    model, tokenizer = model_and_tokenizer
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=1)
    jobs = [make_job(loop, model, tokenizer, [1, 2], dict(max_new_tokens=3)) for _ in range(3)]
    for job in jobs:
        scheduler.submit(job)
    jobs[1].cancel()
    assert scheduler.queued_requests == 2
    scheduler.step()  # the first request runs; the cancelled one still waits in the queue, uncounted
    assert scheduler.queued_requests == 1


def test_the_choices_of_an_echoed_prompt_share_one_scoring_of_it(model_and_tokenizer, loop):
    """Echo with logprobs and n choices ran the LM head over the whole prompt once per choice, on the worker
    that every request waits for (n=64 with 250 prompt tokens held the others about 15 s); now once per prompt,
    also for choices that join in a later prefill, and every choice gets the same result."""
    model, tokenizer = model_and_tokenizer
    prompt = torch.randint(1, 512, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=2)  # the 4 choices are prefilled 2 at a time
    job = Job(loop)
    for index in range(4):
        job.add(index, prompt, GenerationConfig(max_new_tokens=0), TextStreamDecoder(tokenizer), logprobs=2,
                prompt_logprobs=True)
    scheduler.submit(job)
    head_rows = []  # positions the LM head runs on, per call
    hook = model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[:-1]))
    try:
        while scheduler.queued_requests:
            scheduler.step()
    finally:
        hook.remove()
    # Each prefill's last position of its 2 rows; the prompt's 11 positions that predict a token once, not 4 times.
    assert head_rows == [(2,), (11,), (2,)]
    scored = [e for e in events(loop, job) if not isinstance(e, FinishEvent)]
    assert [e.index for e in scored] == [0, 1, 2, 3]
    assert all((e.token_ids, e.logprobs, e.top) == (prompt, scored[0].logprobs, scored[0].top) for e in scored)
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    expected = reference[torch.arange(11), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(scored[0].logprobs[1:]), expected, rtol=0, atol=1e-5)


def test_a_request_whose_sampling_fails_does_not_fail_the_others(model_and_tokenizer, loop):
    """Every token suppressed leaves nothing to draw and the draw fails: that request gets an error, the row
    decoded beside it goes on as alone."""
    model, tokenizer = model_and_tokenizer
    scheduler = BatchScheduler(model, tokenizer)
    good = make_job(loop, model, tokenizer, [5, 6, 7], dict(max_new_tokens=10))
    bad = make_job(loop, model, tokenizer, [5, 6, 7, 8], dict(max_new_tokens=10, do_sample=True,
                                                              suppress_tokens=list(range(model.config.vocab_size))))
    scheduler.submit(good)
    scheduler.step()
    scheduler.submit(bad)
    while scheduler.rows or scheduler.queued_requests:
        scheduler.step()
    assert [type(e).__name__ for e in events(loop, bad)] == ["ErrorEvent"]
    tokens = [e.token_id for e in events(loop, good) if isinstance(e, TokenEvent)]
    assert tokens == alone(model, [5, 6, 7], dict(max_new_tokens=10))


def test_rows_joining_beside_a_finished_longer_prompt_keep_to_the_context(model_and_tokenizer, loop):
    """A prompt that only asks for its log-probabilities ends in the prefill; the short row prefilled with it must
    not keep the long one's padding, or it would run past the model's context."""
    model, tokenizer = model_and_tokenizer
    context = model.config.n_positions
    scheduler = BatchScheduler(model, tokenizer)
    scoring = Job(loop)
    scoring.add(0, [5] * (context - 8), GenerationConfig(max_new_tokens=0), TextStreamDecoder(tokenizer),
                prompt_logprobs=True)
    short = make_job(loop, model, tokenizer, [9, 10], dict(max_new_tokens=context - 2))
    scheduler.submit(scoring)
    scheduler.submit(short)
    while scheduler.rows or scheduler.queued_requests:
        scheduler.step()
    tokens = [e.token_id for e in events(loop, short) if isinstance(e, TokenEvent)]
    assert tokens == alone(model, [9, 10], dict(max_new_tokens=context - 2))


def test_prompt_logprobs_computed_in_chunks_equal_a_plain_forward(model_and_tokenizer, loop, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGPROBS_CHUNK", 3)  # 11 positions: chunks of 3, 3, 3, 2
    prompt = torch.randint(1, 512, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    scheduler = BatchScheduler(model, tokenizer)
    jobs = []
    for logprobs in (0, 2):
        jobs.append(Job(loop))
        jobs[-1].add(0, prompt, GenerationConfig(max_new_tokens=0), TextStreamDecoder(tokenizer),
                     logprobs=logprobs, prompt_logprobs=True)
        scheduler.submit(jobs[-1])
    scheduler.step()
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for job, k in zip(jobs, (0, 2)):
        (scored, _) = events(loop, job)
        assert scored.logprobs[0] is None and scored.top[0] is None
        expected = reference[torch.arange(11), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(scored.logprobs[1:]), expected, rtol=0, atol=1e-5)
        assert all(len(top) == k for top in scored.top[1:])
        if k:
            assert [ids for ids, _ in (zip(*top) for top in scored.top[1:])] == [
                tuple(row.topk(2).indices.tolist()) for row in reference[:11]]
