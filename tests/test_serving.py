"""`gpt2kit serve` end to end: the official OpenAI client against a live server on loopback."""

import asyncio
import base64
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.chat import ChatSession
from gpt2kit.cli import main
from gpt2kit.conversation import ALPACA, turns_of
from gpt2kit.data.datasets import alpaca_prompt
from gpt2kit.generation import GenerationConfig, TextStreamDecoder, generate, truncate_at_stop
from gpt2kit.pipeline import TextGenerationPipeline, load_model_and_tokenizer
from gpt2kit.serving import ServerConfig, create_app
from gpt2kit.serving.app import _sse, default_model_name
from gpt2kit.serving.protocol import CompletionFormat, LogprobsBuilder, parse_request
from gpt2kit.serving.scheduler import FinishEvent, Job, TokenEvent
from gpt2kit.tokenizer import GPT2Tokenizer

from .conftest import save_tiny_text_model
from .live_server import LiveServer

PROMPTS = ["I had always thought", "Jack", "The fact is, it was a very", "", "It was not", "Mrs. Gisburn said"]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with LiveServer(model_dir, max_batch_size=8, max_prompt_tokens=100, max_body_bytes=20_000,
                    max_choices=8) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipe(server):
    """The library's own generation on the same model: the reference the server must reproduce."""
    return TextGenerationPipeline(server.model, server.tokenizer)


class Gate:
    """Holds the batching worker before its next prefill until opened: lets a test line requests up."""

    def __init__(self, scheduler):
        self.scheduler, self.opened, self.waiting = scheduler, threading.Event(), threading.Event()
        self.prefill = scheduler._prefill
        self.held = 0  # sequences in the prefill being held (requests that arrived together share one)

    def __enter__(self):
        def gated(seqs):
            self.held, self.seqs = len(seqs), seqs
            self.waiting.set()
            self.opened.wait(timeout=60)
            return self.prefill(seqs)
        self.scheduler._prefill = gated
        return self

    def __exit__(self, *exc):
        self.opened.set()
        self.scheduler._prefill = self.prefill


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def greedy(pipe, prompt, max_tokens, **options):
    return pipe(prompt, max_new_tokens=max_tokens, return_full_text=False, **options)[0]["generated_text"]


# ---- completions --------------------------------------------------------------------------------------------
def test_completion_equals_library_generation_with_usage(client, pipe, server):
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == "tiny" and response.id.startswith("cmpl-")
    assert choice.text == greedy(pipe, PROMPTS[0], 20)
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    prompt_tokens = len(server.tokenizer.encode(PROMPTS[0]))
    assert response.usage.prompt_tokens == prompt_tokens
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 20
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_seeded_sampling_equals_library_sampling(client, pipe):
    response = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=25, temperature=0.9,
                                         top_p=0.9, seed=7)
    assert response.choices[0].text == greedy(pipe, PROMPTS[1], 25, do_sample=True, temperature=0.9, top_p=0.9,
                                              seed=7)
    min_p = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=25, temperature=1.5, seed=7,
                                      extra_body={"min_p": 0.5})
    assert min_p.choices[0].text == greedy(pipe, PROMPTS[1], 25, do_sample=True, temperature=1.5, min_p=0.5, seed=7)


def test_penalties_and_logit_bias_equal_library_generation(client, pipe):
    response = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0,
                                         frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"11": 4, "13": -100})
    expected = greedy(pipe, PROMPTS[2], 20, frequency_penalty=1.5, presence_penalty=0.5,
                      logit_bias={11: 4.0, 13: -100.0})
    assert response.choices[0].text == expected
    assert expected != greedy(pipe, PROMPTS[2], 20)


def test_best_of_returns_the_candidates_of_highest_mean_logprob(client, pipe, server):
    tok, model = server.tokenizer, server.model
    ids = tok.encode(PROMPTS[1])
    response = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=3, n=2,
                                         best_of=4)
    candidates, tokens = [], 0
    for j in range(4):  # the library's samples with the seeds the server gives candidates 0-3
        out = generate(model, torch.tensor([ids]), max_new_tokens=8, do_sample=True, seed=3 + j,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        new = out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
        with torch.no_grad():
            logp = model(torch.tensor([ids + new])).logits[0].float().log_softmax(-1)
        mean = float(logp[torch.arange(len(ids) - 1, len(ids) - 1 + len(new)), new].mean())
        candidates.append((-mean, j, tok.decode([t for t in new if t != tok.eos_token_id])))
        tokens += len(new)
    best = sorted(candidates)[:2]
    assert best[0][0] < best[1][0] - 1e-4  # a clear ranking
    assert [(c.index, c.text) for c in response.choices] == [(0, best[0][2]), (1, best[1][2])]
    assert response.usage.completion_tokens == tokens  # every candidate was generated
    # Greedy candidates would all be the same sequence: only n are generated.
    greedy_best = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0, best_of=4)
    assert [c.text for c in greedy_best.choices] == [greedy(pipe, PROMPTS[1], 8)]
    assert greedy_best.usage.completion_tokens == len(tok.encode(greedy_best.choices[0].text))


def test_token_prompts_and_prompt_lists(client, pipe, server):
    ids = server.tokenizer.encode(PROMPTS[2])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == greedy(pipe, PROMPTS[2], 10)
    listed = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=10, temperature=0)
    assert [c.index for c in listed.choices] == [0, 1, 2]
    assert [c.text for c in listed.choices] == [greedy(pipe, p, 10) for p in PROMPTS[:3]]
    assert listed.usage.prompt_tokens == sum(len(server.tokenizer.encode(p)) for p in PROMPTS[:3])


def test_streaming_equals_the_completion(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 3  # token by token, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_event_stream_format(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        chunk = json.loads(event.removeprefix("data: "))
        assert chunk["object"] == "text_completion" and chunk["choices"][0]["index"] == 0


def test_stop_strings_cut_the_text(client, pipe):
    text = greedy(pipe, PROMPTS[0], 40, eos_token_id=[])
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a string the model is known to produce
    expected = text[:text.index(stop)]
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_the_last_unfinished_character_completes_ends_with_stop(client, server, stream):
    """Two lead bytes of a 3-byte character: the first decodes as U+FFFD (held as a possible stop), the last as
    U+FFFD only at the end; that completes the stop, which was reported as "length" with the held text shown."""
    lead = server.tokenizer.encoding.encode_single_token(b"\xe2")
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2, temperature=0,
                                         logit_bias={str(lead): 100}, stop=["\ufffd\ufffd"], stream=stream)
    chunks = list(response) if stream else [response]
    assert "".join(c.choices[0].text for c in chunks) == "" and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_cover_the_returned_text_only(client, pipe, stream):
    """Tokens that only spelled a stop string are not listed; every listed token's text begins in the text."""
    text = greedy(pipe, PROMPTS[0], 40, eos_token_id=[])
    inside = next(text[i:i + 3] for i in range(1, len(text)) if text.index(text[i:i + 3]) > 0)
    options = dict(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, logprobs=1)
    for stops, expected in ((None, text), ([inside], text[:text.index(inside)]), ([text[:3]], "")):
        response = client.completions.create(**options, stop=stops, stream=stream)
        chunks = list(response) if stream else [response]
        tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
        offsets = [o for c in chunks for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
        spelled = "".join(tokens)
        if not expected:  # the stop string starts the text: no token shows, an empty object when whole (not null)
            assert tokens == []
            if not stream:
                assert response.choices[0].logprobs.model_dump() == {
                    "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                chat = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=3,
                                                      logprobs=True, logit_bias={"0": 100})
                assert chat.choices[0].message.content == "" and chat.choices[0].logprobs.content == []
        elif stops is None:
            assert spelled == expected and len(tokens) == 40
        else:  # the last listed token starts before the cut
            assert spelled.startswith(expected) and len(spelled) - len(tokens[-1]) < len(expected)


def test_n_choices_each_with_its_own_seed(client):
    response = client.completions.create(model="tiny", prompt=["Jack", "It"], max_tokens=12, temperature=1.0, n=3,
                                         seed=100)
    assert [c.index for c in response.choices] == list(range(6))
    texts = [c.text for c in response.choices]
    assert len(set(texts[:3])) > 1  # different samples
    # Choice j draws from seed + j, so each equals a single request with that seed.
    for j in range(3):
        alone = client.completions.create(model="tiny", prompt="It", max_tokens=12, temperature=1.0, seed=100 + j)
        assert texts[3 + j] == alone.choices[0].text
    full_length = sum(c.finish_reason == "length" for c in response.choices)
    assert 12 * full_length <= response.usage.completion_tokens <= 12 * 6


def test_echo_and_logprobs_match_the_model(client, server):
    prompt = PROMPTS[1]
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                         logprobs=2)
    choice = response.choices[0]
    assert choice.text.startswith(prompt)
    prompt_ids = server.tokenizer.encode(prompt)
    lp = choice.logprobs
    generated = len(lp.tokens) - len(prompt_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # Recompute every log-probability with a plain forward pass over prompt + generated tokens.
    ids = prompt_ids + [server.tokenizer.encode(t)[0] if len(server.tokenizer.encode(t)) == 1 else None
                        for t in lp.tokens[len(prompt_ids):]]
    assert None not in ids and generated >= 1
    with torch.no_grad():
        reference = server.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-4)
        assert 2 <= len(lp.top_logprobs[i]) <= 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(reference[i - 1].max()), abs=1e-4)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    # The choices of one echoed prompt share one scoring of it: every choice is the single one.
    three = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                      logprobs=2, n=3)
    assert [c.text for c in three.choices] == [choice.text] * 3
    scored = [c.logprobs.token_logprobs[:len(prompt_ids)] for c in three.choices]
    assert scored == [scored[0]] * 3 and scored[0][1:] == pytest.approx(lp.token_logprobs[1:len(prompt_ids)],
                                                                        abs=1e-5)


def test_text_offsets_count_characters_not_token_strings():
    """A character split over byte tokens moves the offset once, when it is complete."""
    tok = GPT2Tokenizer.gpt2()
    ids = [tok.encoding.encode_single_token(bytes([b])) for b in "é!".encode()]
    builder = LogprobsBuilder(tok)
    entries = [builder.add(i, -1.0, None) for i in ids]
    assert [e["text_offset"][0] for e in entries] == [0, 0, 1]
    assert entries[0]["tokens"] == ["bytes:\\xc3"]
    # A byte that never becomes a character is a U+FFFD before the next token, which starts after it.
    builder = LogprobsBuilder(tok)
    ids = [tok.encoding.encode_single_token(b"\xf0"), *tok.encode("ing"), tok.encoding.encode_single_token(b"\xe2"),
           *tok.encode("€!")]
    offsets = [builder.add(i, -1.0, None)["text_offset"][0] for i in ids]
    assert tok.decode(ids) == "\ufffding\ufffd€!" and len(ids) == 5
    assert offsets == [0, 1, 4, 5, 6]  # were [0, 0, 4, 4, 6]: each token after a lone byte started on its U+FFFD


def test_an_echo_is_the_prompt_as_the_model_read_it(client, server):
    """The echoed text and the logprobs' tokens agree: an empty prompt is <|endoftext|>, a lone surrogate (valid
    JSON, not valid Unicode) is U+FFFD."""
    eos = server.tokenizer.decode([server.tokenizer.eos_token_id])
    response = client.completions.create(model="tiny", prompt="", max_tokens=2, echo=True, logprobs=0)
    lp = response.choices[0].logprobs
    assert response.choices[0].text.startswith(eos) and lp.tokens[0] == eos and lp.text_offset[1] == len(eos)
    raw = b'{"model": "tiny", "prompt": "Jack \\ud800", "max_tokens": 2, "echo": true}'
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers=JSON, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith("Jack \ufffd")
    streamed = httpx.post(f"{server.url}/v1/completions", content=raw[:-1] + b', "stream": true}', headers=JSON,
                          timeout=60)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


def test_an_echo_ending_inside_a_character_keeps_offsets_on_the_text(client, server):
    """A token prompt ending with the first byte of "é" is echoed with U+FFFD (decoded on its own, as the
    continuation is): the offsets joined that byte with the generated one, [0, 1, 1, 2] for 'J' + 3 x U+FFFD."""
    tok = server.tokenizer
    byte = {b: tok.encoding.encode_single_token(b) for b in (b"J", b"\xc3", b"\xa9")}
    response = client.completions.create(model="tiny", prompt=[byte[b"J"], byte[b"\xc3"]], max_tokens=2,
                                         temperature=0, echo=True, logprobs=0, logit_bias={str(byte[b"\xa9"]): 100})
    choice = response.choices[0]
    assert choice.text == "J\ufffd\ufffd\ufffd"
    assert choice.logprobs.text_offset == [0, 1, 2, 3]


def test_max_tokens_zero_with_echo_scores_the_prompt(client):
    response = client.completions.create(model="tiny", prompt="Jack was", max_tokens=0, echo=True, logprobs=0)
    assert response.choices[0].text == "Jack was" and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 0


def test_a_temperature_too_small_to_divide_by_is_greedy(client, pipe):
    response = client.completions.create(model="tiny", prompt="Jack", max_tokens=8, temperature=1e-40, seed=3)
    assert response.choices[0].text == greedy(pipe, "Jack", 8)


def test_a_padded_model_vocabulary_never_reaches_the_text(model_dir, tmp_path):
    """A model with 8 ids past its 512-token tokenizer: prompts may not name them, and sampling never picks them
    (a bias of +100 would otherwise make every token one)."""
    padded = tmp_path / "padded"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=520)).save_pretrained(padded)
    shutil.copy(model_dir / "tokenizer.json", padded / "tokenizer.json")
    with LiveServer(padded) as live:
        url = f"{live.url}/v1/completions"
        refused = httpx.post(url, json={"prompt": [1, 515], "max_tokens": 2}, timeout=60)
        assert refused.status_code == 400 and "no text for" in refused.json()["error"]["message"]
        body = {"prompt": "Jack", "max_tokens": 6, "seed": 1, "logit_bias": {"515": 100}, "logprobs": 0}
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200
        assert all(t is not None for t in response.json()["choices"][0]["logprobs"]["token_logprobs"])
        # The alternatives a request's logprobs list leave them out too: naming one was a 500 (a cut stream).
        body = {"prompt": "I had always thought Jack Gisburn rather a cheap genius", "max_tokens": 40, "logprobs": 5,
                "echo": True, "temperature": 0}
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200
        top = [alternatives for alternatives in response.json()["choices"][0]["logprobs"]["top_logprobs"][1:]]
        assert len(top) > 40 and all(len(alternatives) >= 5 for alternatives in top)
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "logprobs": True,
                "top_logprobs": 20, "seed": 3, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=chat, timeout=60) as streamed:
            events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        entries = [entry for e in events[:-1] for choice in json.loads(e)["choices"] if choice["logprobs"]
                   for entry in choice["logprobs"]["content"]]
        assert len(entries) > 20 and all(len(entry["top_logprobs"]) == 20 for entry in entries)
        live.scheduler.stop()  # the batching worker is gone: the health check says so
        health = httpx.get(f"{live.url}/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "error"


def test_a_non_streamed_request_whose_client_left_stops_generating(model_dir):
    with LiveServer(model_dir) as live, Gate(live.scheduler) as gate:
        service, ended = live.app.state.service, threading.Event()
        complete = service.complete

        async def watched_complete(*args):
            try:
                return await complete(*args)
            finally:
                ended.set()

        service.complete = watched_complete
        body = json.dumps({"prompt": "Jack", "max_tokens": 120, "temperature": 0})
        with socket.create_connection(("127.0.0.1", live.port)) as conn:
            conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            gate.waiting.wait(timeout=30)  # the worker holds the request before its prefill
        (seq,) = gate.seqs
        wait_for(lambda: seq.job.cancelled)  # the client is gone
        gate.opened.set()
        wait_for(lambda: not live.scheduler.rows)
        assert len(seq.generated) <= 1  # the prefill's token at most, not 120
        assert ended.wait(timeout=30)  # and its handler is gone too, not waiting for events that never come


# ---- chat completions ---------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "A conversation."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": [{"type": "text", "text": "How are "}, {"type": "text", "text": "you?"}]},
]
TRANSCRIPT = "A conversation.\nUser: Hello there\nAssistant: Hi.\nUser: How are you?\nAssistant:"
CONVERSATION_TEXT = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list)
                     else m for m in CONVERSATION]  # the pipeline's messages hold text


def test_chat_completion_continues_the_chat_transcript(client, pipe, server):
    response = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=20, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(pipe, TRANSCRIPT, 20, stop=["\nUser:"]).lstrip()
    assert response.usage.prompt_tokens == len(server.tokenizer.encode(TRANSCRIPT))
    # The same reply as `gpt2kit chat` gives to a first message.
    session = ChatSession(server.model, server.tokenizer, GenerationConfig(
        max_new_tokens=12, eos_token_id=server.tokenizer.eos_token_id, pad_token_id=server.tokenizer.pad_token_id))
    first = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                           max_completion_tokens=12, temperature=0)
    assert first.choices[0].message.content == "".join(session.reply("Hello there"))


@pytest.mark.parametrize("stop", [" ", "\n", ["\n", " a"]])
def test_chat_stop_strings_apply_to_the_reply_shown(client, pipe, server, stop):
    """The reply drops the space after "Assistant:"; a stop string starting with whitespace matched that hidden
    space and cut every reply to "". Server (whole and streamed), pipeline and `gpt2kit chat` alike."""
    stops = [stop] if isinstance(stop, str) else stop
    sampled = dict(max_new_tokens=20, do_sample=True, temperature=1.0, stop=["\nUser:"], return_full_text=False)
    # A seed whose raw continuation starts with whitespace, the case that broke.
    seed, raw = next((seed, raw) for seed in range(200)
                     if (raw := pipe(TRANSCRIPT, seed=seed, **sampled)[0]["generated_text"])[:1].isspace()
                     and truncate_at_stop(raw.lstrip(), stops)[0])
    expected = truncate_at_stop(raw.lstrip(), stops)[0]
    options = dict(model="tiny", messages=CONVERSATION, max_tokens=20, temperature=1.0, seed=seed, stop=stop)
    assert client.chat.completions.create(**options).choices[0].message.content == expected
    chunks = list(client.chat.completions.create(**options, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    reply = pipe(CONVERSATION_TEXT, **{**sampled, "seed": seed, "stop": stop})[0]["generated_text"]
    assert reply == expected
    session = ChatSession(server.model, server.tokenizer, GenerationConfig(
        max_new_tokens=20, do_sample=True, eos_token_id=server.tokenizer.eos_token_id,
        pad_token_id=server.tokenizer.pad_token_id, seed=seed, stop=stop))
    session.turns = turns_of(CONVERSATION_TEXT[:-1])
    assert "".join(session.reply("How are you?")) == expected


def test_chat_streaming_equals_the_chat_completion(client):
    options = dict(model="tiny", messages=CONVERSATION, max_tokens=25, temperature=0.8, seed=5, n=2)
    full = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == full.choices[index].message.content
        assert mine[-1].finish_reason == full.choices[index].finish_reason
        assert all(c.finish_reason is None for c in mine[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.choices[0].message.content != full.choices[1].message.content  # seeds 5 and 6


def test_chat_logprobs_name_tokens_and_their_alternatives(client, server):
    response = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        best = entry.top_logprobs[0]  # greedy: the chosen token is the most likely one
        assert (best.token, best.bytes) == (entry.token, entry.bytes) and best.logprob == entry.logprob <= 0
        assert entry.logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    text = bytes(b for entry in entries for b in entry.bytes).decode("utf-8", errors="replace")
    assert text.lstrip().startswith(response.choices[0].message.content)
    assert "\nUser:" not in text  # the tokens of the next turn's start are not listed


BAD_CHAT = {
    "no messages": (dict(messages=[]), "messages"),
    "unknown role": (dict(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    "content not text": (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                         "messages.0.content"),
    "content missing": (dict(messages=[{"role": "user"}]), "messages.0.content"),
    "both token limits": (dict(max_completion_tokens=4), "max_completion_tokens"),
    "max_completion_tokens over the limit": (dict(max_tokens=None, max_completion_tokens=10_000),
                                             "max_completion_tokens"),
    "conversation too long": (dict(messages=[{"role": "user", "content": "word " * 200}]), "messages"),
    "top_logprobs without logprobs": (dict(top_logprobs=2), "top_logprobs"),
    "too many top_logprobs": (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    "logit_bias beyond the vocabulary": (dict(logit_bias={"512": 1}), "logit_bias"),
    "tools": (dict(tools=[]), "tools"),
    "no reply tokens": (dict(max_tokens=None, max_completion_tokens=0), "max_completion_tokens"),  # as OpenAI
    "no reply tokens by the older name": (dict(max_tokens=0), "max_tokens"),
}


@pytest.mark.parametrize("name", list(BAD_CHAT))
def test_bad_chat_requests_get_openai_errors(server, name):
    fields, param = BAD_CHAT[name]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert "prompt" not in error["message"] and (param == "max_tokens" or "max_tokens" not in error["message"].replace(
        "max_tokens, not both", ""))  # the client's names, not the completion's they are turned into


def test_chat_reply_may_fill_the_context_by_default(client, server):
    """No token limit: like OpenAI's chat endpoint, the reply may use what the conversation leaves (16 tokens is
    the completions endpoint's default)."""
    long = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          temperature=0, logit_bias={str(server.tokenizer.eos_token_id): -100},
                                          stop=None, frequency_penalty=-2)
    assert long.usage.completion_tokens > 16
    assert long.usage.prompt_tokens + long.usage.completion_tokens <= server.model.config.n_positions


# ---- concurrency --------------------------------------------------------------------------------------------
REQUESTS = [dict(prompt=p, max_tokens=8 + 5 * i, temperature=0) for i, p in enumerate(PROMPTS[:-1])] + [
    dict(prompt=PROMPTS[-1], max_tokens=12, temperature=0, frequency_penalty=2, logit_bias={"11": 3}),
    dict(prompt="Jack", max_tokens=20, temperature=1.2, top_p=0.7, seed=3),
    dict(prompt="It was", max_tokens=15, temperature=0.5, seed=4, stop=["e"]),
]


def test_concurrent_clients_equal_sequential_runs(client, server):
    sequential = [client.completions.create(model="tiny", **r).choices[0].text for r in REQUESTS]
    server.scheduler.max_rows_seen = 0
    with Gate(server.scheduler) as gate, ThreadPoolExecutor(len(REQUESTS)) as pool:
        # The first request is held in its prefill while the others line up behind it. It is one that runs
        # for several steps: a request that stops at its first token would leave the batch before the rest join.
        futures = [pool.submit(client.completions.create, model="tiny", **REQUESTS[0])]
        gate.waiting.wait(timeout=30)
        futures += [pool.submit(client.completions.create, model="tiny", **r) for r in REQUESTS[1:]]
        wait_for(lambda: server.scheduler.queued_requests + gate.held == len(REQUESTS))
        gate.opened.set()
        concurrent = [f.result().choices[0].text for f in futures]
    assert concurrent == sequential
    assert server.scheduler.max_rows_seen == len(REQUESTS)  # all decoded in one batch


def test_a_stream_nobody_reads_does_not_hold_up_others(client, server):
    body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as slow:
        # The slow client reads nothing. Other requests complete, and so does the slow one's generation.
        for prompt in PROMPTS[:3]:
            assert client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0).choices
        wait_for(lambda: not server.scheduler.rows)
        chunks = [json.loads(line[6:]) for line in slow.iter_lines() if line.startswith("data: {")]
    expected = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=100, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.choices[0].text


def test_full_queue_answers_503(model_dir):
    with LiveServer(model_dir, max_batch_size=1, max_queue=1) as live, Gate(live.scheduler) as gate:
        body = {"prompt": "Jack", "max_tokens": 5, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60)
            gate.waiting.wait(timeout=30)  # the worker holds the first request
            second = pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60)
            wait_for(lambda: live.scheduler.queued_requests == 1)
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model="tiny", prompt="Jack", max_tokens=5)
            assert err.value.status_code == 503 and err.value.body["code"] == "server_overloaded"
            assert err.value.response.headers["retry-after"] == "1"
            gate.opened.set()
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_a_request_without_max_tokens_gets_the_default_the_server_allows(model_dir):
    """The default of 16 was checked as if asked for: a server allowing 8 refused requests that named no limit."""
    with LiveServer(model_dir, max_tokens=8) as live:
        no_eos = {str(live.tokenizer.eos_token_id): -100}
        response = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Jack", "temperature": 0,
                                                                   "logit_bias": no_eos}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
        too_many = httpx.post(f"{live.url}/v1/completions", json={"prompt": "Jack", "max_tokens": 9}, timeout=60)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"


def test_top_k_zero_or_minus_one_keeps_every_token(client, pipe):
    """vLLM's clients send -1 for "off"."""
    expected = greedy(pipe, PROMPTS[1], 12, do_sample=True, temperature=1.0, seed=4)
    for off in (0, -1):
        response = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                             seed=4, extra_body={"top_k": off})
        assert response.choices[0].text == expected


def test_a_stream_lets_the_event_loop_run_between_chunks(server):
    """Events already queued were written in one burst, the event loop never running between the writes: a client
    that had closed the connection was noticed only after several writes to it, each logged by asyncio as
    "socket.send() raised exception."."""
    service = server.app.state.service

    async def loop_turns_at_each_chunk() -> list[int]:
        job = Job(asyncio.get_running_loop())
        job.add(0, [1], GenerationConfig(), TextStreamDecoder(server.tokenizer))
        for event in (TokenEvent(0, 1, "a"), TokenEvent(0, 1, "b"), FinishEvent(0, "length", "c", 3)):
            job.events.put_nowait(event)  # all there before the stream starts, as when the worker is ahead
        turns = 0

        async def count_turns():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count_turns())
        await asyncio.sleep(0)
        seen = [turns async for _ in service.stream(parse_request({"prompt": "x", "stream": True}), job, [[1]],
                                                     [""], CompletionFormat())]
        counter.cancel()
        return seen

    seen = asyncio.run(loop_turns_at_each_chunk())
    assert len(seen) == 4  # three chunks and [DONE]
    assert all(before < after for before, after in zip(seen, seen[1:])), seen


def test_events_escape_what_line_readers_take_for_line_breaks():
    """Raw U+2028 in a streamed text made httpx's iter_lines cut the event's JSON in two."""
    payload = {"choices": [{"text": "a\u2028b\u2029c\x85d \u4e2d\\\u2028"}]}
    event = _sse(payload)
    assert event.splitlines() == [event.removesuffix("\n\n"), ""]  # one line, then the blank line ending it
    assert json.loads(event.removeprefix("data: ")) == payload and "\u4e2d" in event  # other text stays as is


# ---- bad requests -------------------------------------------------------------------------------------------
BAD = {
    "wrong type": (dict(max_tokens="3"), 400, "max_tokens"),
    "float for an integer": (dict(n=1.5), 400, "n"),
    "prompt of the wrong shape": (dict(prompt=[["a"]]), 400, "prompt"),
    "empty prompt list": (dict(prompt=[]), 400, "prompt"),
    "negative max_tokens": (dict(max_tokens=-1), 400, "max_tokens"),
    "max_tokens over the limit": (dict(max_tokens=10_000), 400, "max_tokens"),
    "prompt + max_tokens over the context": (dict(prompt=[1] * 100, max_tokens=100), 400, "max_tokens"),
    "prompt over the limit": (dict(prompt=[1] * 101, max_tokens=1), 400, "prompt"),
    "token id outside the vocabulary": (dict(prompt=[1, 512]), 400, "prompt"),
    "temperature too high": (dict(temperature=2.5), 400, "temperature"),
    "top_p zero": (dict(top_p=0), 400, "top_p"),
    "n zero": (dict(n=0), 400, "n"),
    "too many choices": (dict(n=5, prompt=["a", "b"]), 400, "n"),
    "empty stop string": (dict(stop=[""]), 400, "stop"),
    "five stop strings": (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "stop string too long": (dict(stop=["ab" * 129]), 400, "stop"),
    "seed beyond 64 bits": (dict(seed=2**64), 400, "seed"),
    "repetition_penalty that overflows": (dict(extra_body={"repetition_penalty": 1e-40}), 400, "repetition_penalty"),
    "logprobs too many": (dict(logprobs=6), 400, "logprobs"),
    "frequency_penalty out of range": (dict(frequency_penalty=2.5), 400, "frequency_penalty"),
    "presence_penalty out of range": (dict(presence_penalty=-3), 400, "presence_penalty"),
    "logit_bias key not a token id": (dict(logit_bias={"x": 1}), 400, "logit_bias"),
    "logit_bias value out of range": (dict(logit_bias={"5": 101}), 400, "logit_bias"),
    "logit_bias beyond the vocabulary": (dict(logit_bias={"512": 1}), 400, "logit_bias"),
    "logit_bias too long": (dict(logit_bias={str(t): 1 for t in range(301)}), 400, "logit_bias"),
    "logit_bias id twice": (dict(logit_bias={"5": 1, "05": -100}), 400, "logit_bias"),
    "min_p out of range": (dict(extra_body={"min_p": 1.5}), 400, "min_p"),
    "unsupported suffix": (dict(suffix="x"), 400, "suffix"),
    "best_of below n": (dict(n=2, best_of=1), 400, "best_of"),
    "best_of streamed": (dict(best_of=2, stream=True), 400, "best_of"),
    "best_of over the choice limit": (dict(best_of=9), 400, "best_of"),
    "unknown model": (dict(model="gpt-4"), 404, "model"),
    "stream_options without a stream": (dict(stream_options={"include_usage": True}), 400, "stream_options"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_openai_errors(client, name):
    fields, status, param = BAD[name]
    request = {"model": "tiny", "prompt": "Jack", "max_tokens": 4, **fields}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**request)
    assert err.value.status_code == status
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"]


def test_unknown_fields_are_named(client):
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument supplied: top_q"):
        client.completions.create(model="tiny", prompt="Jack", extra_body={"top_q": 1})


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"\xff\xfe\x00", 400),
    (b"[1, 2]", 400),
    (b"[" * 50_000, 413),
    (b"[" * 10_000 + b"]" * 10_000, 400),  # nesting deeper than the parser's recursion limit
    (json.dumps({"prompt": "x" * 30_000}).encode(), 413),
    (b"{}", 400),  # no prompt
])
def test_malformed_bodies_never_500(server, body, status):
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=JSON, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_a_field_name_that_is_not_text_is_named_as_the_body(server):
    body = b'{"prompt": "x", "\\ud800": 1}'  # a lone surrogate as a field name
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=JSON, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("invalid request body: ")  # was "invalid value for None"


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(30):
            yield b" " * 1000
    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=JSON, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_post_bodies_must_be_declared_json(server, path):
    """Any web page could make a loopback server without a key generate: an HTML form may POST a text/plain body
    that parses as JSON, and browsers send such forms to any site without asking it. A cross-site request with
    application/json needs a CORS preflight, which the server never grants."""
    url = f"{server.url}{path}"
    fields = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Jack"}
    body = json.dumps({**fields, "max_tokens": 2, "user": "="})  # what a form field named '{"prompt": ...' sends
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/jsonp", None):
        headers = {"Origin": "http://elsewhere.example", **({"Content-Type": content_type} if content_type else {})}
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code == 415, content_type
        error = response.json()["error"]
        assert error["code"] == "unsupported_media_type" and error["type"] == "invalid_request_error"
        assert error["param"] is None and "Content-Type: application/json" in error["message"]
    preflight = httpx.options(url, headers={"Origin": "http://elsewhere.example",
                                            "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
        response = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)
        assert response.status_code == 200, (content_type, response.text)
    # The body is UTF-8 JSON: another declared charset is refused, not read as UTF-8 (it was: "é" in Latin-1 gave
    # "not valid JSON"), and UTF-16 or a byte-order mark, which json.loads would guess, is not JSON here.
    response = httpx.post(url, content=body.encode("latin-1"),
                          headers={"Content-Type": "application/json; charset=ISO-8859-1"}, timeout=60)
    assert response.status_code == 415 and "charset=iso-8859-1" in response.json()["error"]["message"]
    for encoded in (body.encode("utf-16"), b"\xef\xbb\xbf" + body.encode()):
        response = httpx.post(url, content=encoded, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_other_routes(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    head = httpx.head(f"{server.url}/health")  # what many probes send: it was a 405
    assert head.status_code == 200 and head.content == b""
    models = httpx.get(f"{server.url}/v1/models").json()
    card = models["data"][0]
    assert card["id"] == "tiny" and card["gpt2kit"]["n_layer"] == 2 and card["gpt2kit"]["vocab_size"] == 512
    assert httpx.get(f"{server.url}/v1/models/tiny").json() == card
    for method, path, status in [("GET", "/v1/models/gpt2", 404), ("GET", "/v1/completions", 405),
                                 ("GET", "/../../etc/passwd", 404), ("GET", "/static/../app.py", 404),
                                 ("GET", "/docs", 404), ("GET", "/openapi.json", 404),
                                 # no redirect to the route without the slash (a 307 before)
                                 ("POST", "/v1/completions/", 404), ("GET", "/health/", 404)]:
        response = httpx.request(method, f"{server.url}{path}")
        assert response.status_code == status and "error" in response.json(), (method, path)
        if path != "/v1/models/gpt2":  # an unknown model is model_not_found; a route or method is OpenAI's words
            error = response.json()["error"]
            assert error["message"].startswith("Invalid URL (") and error["code"] is None, (method, path)


def test_a_client_leaving_mid_upload_is_no_server_error(server, caplog):
    """It was answered as an internal error, with two tracebacks logged at ERROR level."""
    with caplog.at_level(logging.ERROR):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"prompt\":")
            time.sleep(0.3)
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


# ---- authentication -----------------------------------------------------------------------------------------
def test_api_key_is_required_everywhere_but_health(model_dir):
    with LiveServer(model_dir, api_key="s3cret") as live:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).completions.create(
                model="tiny", prompt="Jack", max_tokens=2)
        ok = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="Jack", max_tokens=2).choices
        assert [m.id for m in ok.models.list()] == ["tiny"]
        assert httpx.get(f"{live.url}/health").status_code == 200
        for path in ["/v1/models", "/", "/nope"]:
            response = httpx.get(f"{live.url}{path}")
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert "Basic" in httpx.get(f"{live.url}/").headers["www-authenticate"]  # the browser asks for it
        basic = "Basic " + base64.b64encode(b"user:s3cret").decode()
        assert httpx.get(f"{live.url}/", headers={"Authorization": basic}).status_code == 200
        assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401


def test_the_loaded_server_is_out_of_the_garbage_collectors_sight(model_dir):
    """Python's full collections walked every object of the loaded model and app (about 343 000 with GPT-2's
    tokenizer), and a body of many small JSON lists sets several off, rejected or not: each such request froze
    the event loop, and every stream, for up to a second. The app's startup freezes what is loaded by then."""
    gc.unfreeze()
    with LiveServer(model_dir) as live:
        assert gc.get_freeze_count() > 0
        service = live.app.state.service
        assert not any(o is service for o in gc.get_objects())  # in the frozen generation, never walked
        many_lists = json.dumps({"prompt": [[1]] * 2000}).encode()
        response = httpx.post(f"{live.url}/v1/completions", content=many_lists, headers=JSON, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_server_limits_are_checked_when_the_app_is_made(model_dir):
    with pytest.raises(ValueError, match="api_key must be printable ASCII"):
        ServerConfig(api_key="cl\u00e9")
    with pytest.raises(ValueError, match="api_key must be printable ASCII"):
        ServerConfig(api_key="")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    context = model.config.n_positions
    with pytest.raises(ValueError, match=f"max_prompt_tokens is {context}; the model's context holds {context} "
                                         f"tokens, so at most {context - 1}"):
        create_app(model, tokenizer, ServerConfig(max_prompt_tokens=context))
    with pytest.raises(ValueError, match=f"max_tokens is {context + 5}"):
        create_app(model, tokenizer, ServerConfig(max_tokens=context + 5))


# ---- the command --------------------------------------------------------------------------------------------
def test_a_port_in_use_is_one_error_before_the_model_loads(tmp_path, capsys):
    """uvicorn reported it (exit 3) after the whole model had loaded."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        missing = tmp_path / "no-model"  # never loaded: the port is checked first
        assert main(["serve", "--model", str(missing), "--port", str(port)]) == 2
    assert f"gpt2kit serve: error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_the_default_model_id_is_the_directory_name_however_it_is_written(tmp_path, monkeypatch):
    """`--model .` served the id ".", which the openai client refuses in a path and HTTP clients collapse."""
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    for written in (".", "./", str(tmp_path / "my-model"), "../my-model/"):
        assert default_model_name(written) == "my-model", written
    assert default_model_name("gpt2-tiny") == "gpt2-tiny"  # a preset
    assert default_model_name("/") == "gpt2kit"


def test_serve_command_binds_loopback_and_reads_the_key_from_the_environment(model_dir):
    env = {**os.environ, "GPT2KIT_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--port", "0"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            match = re.search(r"Uvicorn running on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"})
        assert response.json()["data"][0]["id"] == model_dir.name
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_stopping_the_server_ends_requests_in_flight_with_the_shutdown_error(tmp_path):
    """Ctrl-C used to let uvicorn cancel the connections mid-reply (a cut stream, a plain-text 500) while the
    worker went on generating; now the worker stops first and every reply ends properly."""
    model_dir = save_tiny_text_model(tmp_path / "long", n_positions=2048)
    process = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--port", "0"],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = next(m.group(1) for line in process.stderr
                   if (m := re.search(r"Uvicorn running on (http://\S+)", line)))
        body = {"prompt": "The", "max_tokens": 2000, "stream": True, "logit_bias": {"0": -100}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["message"] == "the server is shutting down"
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_a_stream_that_fails_inside_ends_with_an_error_event(model_dir):
    """An unexpected error after the stream started cut the connection (no error event, no [DONE])."""
    with LiveServer(model_dir) as live:
        async def broken(*args):
            yield 0, "Hello", None, None
            raise RuntimeError("a bug")

        live.app.state.service.updates = broken
        body = {"prompt": "Jack", "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == "Hello" and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "internal server error"


def test_requests_in_flight_at_shutdown_get_503(model_dir):
    """A non-streamed request running or queued when the server stops gets 503, as one arriving after (was 500)."""
    with LiveServer(model_dir) as live, Gate(live.scheduler) as gate, ThreadPoolExecutor(2) as pool:
        body = {"prompt": "Jack", "max_tokens": 50, "n": 2}
        replies = [pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
        gate.waiting.wait(timeout=30)
        wait_for(lambda: len(live.scheduler._pending) + gate.held == 4)  # both requests arrived
        stopping = threading.Thread(target=live.scheduler.stop)
        stopping.start()
        wait_for(lambda: live.scheduler.stopping)
        gate.opened.set()
        stopping.join(timeout=30)
        for reply in replies:
            response = reply.result(timeout=30)
            assert response.status_code == 503
            assert response.json()["error"] == {"message": "the server is shutting down", "type": "server_error",
                                                "param": None, "code": None}


def test_an_app_served_without_its_lifespan_answers_503(model_dir):
    from fastapi.testclient import TestClient

    model, tokenizer = load_model_and_tokenizer(model_dir)
    client = TestClient(create_app(model, tokenizer))  # outside a with block: no lifespan, no worker
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 503 and "lifespan" in response.json()["error"]["message"]  # it hung
    app = create_app(model, tokenizer)
    with TestClient(app) as client:
        app.state.service.scheduler.stop()  # what the exit signal does first
        response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert response.status_code == 503 and response.json()["error"]["message"] == "the server is shutting down"


def test_chat_completions_use_the_models_chat_format(model_dir):
    """A model whose tokenizer records the Alpaca format (an instruction finetune) is prompted with it, and its
    reply keeps its first character (no "Assistant:" space to drop)."""
    from fastapi.testclient import TestClient

    model, tokenizer = load_model_and_tokenizer(model_dir)
    tokenizer.chat_template = ALPACA.template
    messages = [{"role": "user", "content": "Name a color."}]
    with TestClient(create_app(model, tokenizer)) as http:
        response = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    expected = TextGenerationPipeline(model, tokenizer)(alpaca_prompt("Name a color."), max_new_tokens=12,
                                                        stop=["### Instruction:"], return_full_text=False)
    assert response.json()["choices"][0]["message"]["content"] == expected[0]["generated_text"]
