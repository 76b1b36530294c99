"""The HTTP server: OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models, /health, and the
playground page at /.

Every route but /health needs the API key when one is set: `Authorization: Bearer KEY` (what OpenAI clients
send) or HTTP Basic auth with KEY as the password (what a browser sends after asking for it on /). Bodies are
capped before they are read; every bad request gets a 4xx with an OpenAI-style error body; a full queue
gets 503. No route touches the filesystem: the page is read from the package once, at startup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..generation import GenerationConfig, TextStreamDecoder, encode_prompt
from ..model import GPT2LMHeadModel
from ..pipeline import text_options
from ..quantization import describe_weights
from ..tokenizer import GPT2Tokenizer
from .config import ServerConfig
from .protocol import (
    DEFAULT_MAX_TOKENS, APIError, ChatCompletionRequest, ChatFormat, CompletionFormat, CompletionRequest, error_body,
    parse_request,
)
from .scheduler import BatchScheduler, ErrorEvent, FinishEvent, Job, PromptLogprobsEvent, QueueFull, TokenEvent

ResponseFormat = CompletionFormat | ChatFormat
logger = logging.getLogger("gpt2kit.serving")

API_KEY_ENV = "GPT2KIT_API_KEY"
OPEN_PATHS = frozenset({"/health"})
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there
RETRY_AFTER_SECONDS = "1"  # what a full queue's 503 asks clients to wait (OpenAI's clients honour it)
PLAYGROUND_PATH = "/"
# The page is self-contained: the policy lets it load nothing from anywhere else.
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'"}


def _json_error(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware run before any route: checks the API key and caps the request body."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "basic":
            try:
                credentials = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(credentials.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            # The page asks the browser for the key (Basic auth); API clients get OpenAI's error.
            challenge = {"WWW-Authenticate": 'Basic realm="gpt2kit", charset="UTF-8"'} \
                if scope["path"] == PLAYGROUND_PATH else None
            body = error_body("Incorrect or missing API key: send `Authorization: Bearer KEY`",
                              code="invalid_api_key")
            return await _json_error(401, body, challenge)(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _json_error(413, self._too_large())(scope, receive, send)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # chunked uploads have no Content-Length to check up front
                raise APIError(413, self._too_large()["error"]["message"], code="request_too_large")
            return message

        await self.app(scope, capped_receive, send)

    def _too_large(self) -> dict:
        return error_body(f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")


class CompletionService:
    """Turns validated requests into scheduler jobs and scheduler events into OpenAI responses."""

    def __init__(self, model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, config: ServerConfig, model_name: str):
        self.model, self.tokenizer, self.config, self.model_name = model, tokenizer, config, model_name
        self.context = model.config.n_positions
        for name in ("max_prompt_tokens", "max_tokens"):
            if (getattr(config, name) or 0) >= self.context:
                raise ValueError(f"{name} is {getattr(config, name)}; the model's context holds {self.context} "
                                 f"tokens, so at most {self.context - 1}")
        self.max_prompt_tokens = config.max_prompt_tokens or self.context - 1
        self.max_tokens = config.max_tokens or self.context - 1
        self.vocab = model.config.vocab_size  # load_model_and_tokenizer refuses a tokenizer with more ids
        self.text_options = text_options(tokenizer, self.vocab)  # EOS, padding, ids without text suppressed
        self.chat_format = tokenizer.chat_format()  # how /v1/chat/completions writes a conversation
        self.unused = frozenset(self.text_options["suppress_tokens"] or ())
        self.scheduler = BatchScheduler(model, tokenizer, max_batch_size=config.max_batch_size,
                                        max_queue=config.max_queue)
        self.card = self._model_card(int(time.time()))

    def _model_card(self, created: int) -> dict[str, Any]:
        """The /v1/models entry, built once: the model does not change while it is served."""
        c = self.model.config
        with torch.device("meta"):  # the architecture's count, whatever the weights' storage (int8 included)
            n_params = GPT2LMHeadModel(c).num_parameters()
        return {"id": self.model_name, "object": "model", "created": created, "owned_by": "gpt2kit",
                "gpt2kit": {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
                            "n_positions": c.n_positions, "vocab_size": c.vocab_size, "parameters": n_params,
                            "dtype": describe_weights(self.model)}}

    # ---- request -> job -----------------------------------------------------------------------------------
    def _prompt_ids(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompts[0], str):
            return [encode_prompt(self.tokenizer, p) for p in prompts]
        for i, ids in enumerate(prompts):
            bad = next((t for t in ids if not 0 <= t < self.vocab or t in self.unused), None)
            if bad is not None:
                why = ("which the tokenizer has no text for" if 0 <= bad < self.vocab
                       else f"outside the vocabulary [0, {self.vocab})")
                raise APIError(400, f"prompt {i} holds token id {bad}, {why}", param="prompt")
        return prompts

    async def submit(self, req: CompletionRequest) -> tuple[Job, list[list[int]], list[str]]:
        if req.model not in (None, self.model_name):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        k = req.candidates()  # sequences per prompt: n, or best_of to choose the n best from
        prompts = req.prompts()
        if len(prompts) * k > self.config.max_choices:
            what, param = (f"best_of={k}", "best_of") if k > (req.n or 1) else (f"n={k}", "n")
            raise APIError(400, f"{len(prompts)} prompt(s) x {what} asks for {len(prompts) * k} completions; at "
                           f"most {self.config.max_choices} per request", param=param)
        max_tokens, max_tokens_param = req.max_tokens, req._max_tokens_param
        if max_tokens is None and not req._max_tokens_fill_context:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens)  # a default is never refused
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(400, f"{max_tokens_param} is {max_tokens}; this server allows at most {self.max_tokens}",
                           param=max_tokens_param)
        # Tokenizing a large body takes a while: keep the event loop free.
        ids = await run_in_threadpool(self._prompt_ids, prompts)
        chat = req._prompt_param == "messages"
        for i, prompt in enumerate(ids):
            what = "the conversation (as a transcript)" if chat else f"prompt {i}"
            if len(prompt) > self.max_prompt_tokens:
                raise APIError(400, f"{what} has {len(prompt)} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens}", param=req._prompt_param, code="context_length_exceeded")
            if max_tokens is None:  # a chat reply may use what the conversation leaves of the context
                max_tokens = min(self.max_tokens, self.context - len(prompt))
            if len(prompt) + max_tokens > self.context:
                raise APIError(400, f"this model's maximum context length is {self.context} tokens, however you "
                               f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in {what}; "
                               f"{max_tokens} for the completion); shorten the {req._prompt_param} or lower "
                               f"{max_tokens_param}", param=max_tokens_param, code="context_length_exceeded")
        # An echo is the prompt as the model read it, so its text and its tokens' logprobs agree (an empty prompt
        # is <|endoftext|>, a lone surrogate U+FFFD).
        texts = [self.tokenizer.decode(p) if req.echo else "" for p in ids]
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            base = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                                    top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                    repetition_penalty=req.repetition_penalty or 1.0,
                                    frequency_penalty=req.frequency_penalty or 0.0,
                                    presence_penalty=req.presence_penalty or 0.0, logit_bias=req.logit_bias,
                                    **self.text_options)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        try:
            base.check_vocabulary(self.vocab)
        except ValueError as err:
            raise APIError(400, str(err), param="logit_bias") from None
        job = Job(asyncio.get_running_loop())
        for p, prompt in enumerate(ids):
            for j in range(k):
                # Choice j of every prompt draws from seed + j: a prompt's result does not depend on the others.
                seed = None if req.seed is None else req.seed + j
                # A plain chat reply (and its search for stop strings) starts after the space after "Assistant:".
                decoder = TextStreamDecoder(self.tokenizer, req.stop,
                                            skip_leading_space=chat and self.chat_format.skip_leading_space)
                job.add(p * k + j, prompt, base.replace(seed=seed), decoder,
                        logprobs=req.logprobs, prompt_logprobs=bool(req.echo) and req.logprobs is not None,
                        ranked=k > (req.n or 1))
        if not self.scheduler.running:  # shutting down, or an ASGI host that skipped the app's lifespan
            raise APIError(503, "the server is shutting down" if self.scheduler.stopping else
                           "the batching worker is not running (the app's lifespan was not started)",
                           type="server_error")
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(503, str(err), type="server_error", code="server_overloaded",
                           headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        return job, ids, texts

    # ---- job events -> choice updates ---------------------------------------------------------------------
    async def updates(self, req: CompletionRequest, job: Job, texts: list[str], form: ResponseFormat
                      ) -> AsyncIterator[tuple[int, str, dict | None, str | None]]:
        """(choice index, new text, logprobs of the new tokens or None, finish reason or None) until every
        choice has finished; the echoed prompt comes first. `form` shapes the text and the logprobs."""
        k = req.candidates()
        builders = ({s.index: form.logprobs_builder(self.tokenizer) for s in job.sequences}
                    if req.logprobs is not None else {})
        if req.echo and req.logprobs is None:
            for seq in job.sequences:
                yield seq.index, texts[seq.index // k], None, None
        remaining = len(job.sequences)
        while remaining:
            event = await job.events.get()
            if isinstance(event, ErrorEvent):
                raise APIError(event.status, event.message, type="server_error")
            if isinstance(event, PromptLogprobsEvent):
                scored = zip(event.token_ids, event.logprobs, event.top, strict=True)
                delta = _logprobs(builders, event.index, scored)
                builders[event.index].end_text()  # as the echo was decoded: on its own
                yield event.index, texts[event.index // k], delta, None
            elif isinstance(event, TokenEvent):
                delta = _logprobs(builders, event.index, event.scored)
                if event.text or delta:
                    yield event.index, event.text, delta, None
            elif isinstance(event, FinishEvent):
                job.completion_tokens += event.completion_tokens
                if event.mean_logprob is not None:
                    job.mean_logprobs[event.index] = event.mean_logprob
                remaining -= 1
                delta = _logprobs(builders, event.index, event.scored)
                yield event.index, event.text, delta, event.reason

    def usage(self, job: Job, ids: list[list[int]]) -> dict[str, int]:
        prompt_tokens = sum(map(len, ids))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": job.completion_tokens,
                "total_tokens": prompt_tokens + job.completion_tokens}

    def _envelope(self, completion_id: str, created: int, object: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": completion_id, "object": object, "created": created, "model": self.model_name,
                "choices": choices}

    async def complete(self, req: CompletionRequest, job: Job, ids: list[list[int]], texts: list[str],
                       form: ResponseFormat) -> dict:
        parts: dict[int, list[str]] = {s.index: [] for s in job.sequences}
        logprobs: dict[int, list[dict]] = {}
        finished: dict[int, str] = {}
        async for index, text, delta, finish in self.updates(req, job, texts, form):
            parts[index].append(text)
            if delta:
                logprobs.setdefault(index, []).append(delta)
            if finish:
                finished[index] = finish
        order, k, n = sorted(parts), req.candidates(), req.n or 1
        if k > n:  # best_of: each prompt's n candidates of highest mean log-probability per token, best first
            order = [i for start in range(0, len(order), k)
                     for i in sorted(range(start, start + k), key=lambda i: -job.mean_logprobs.get(i, 0.0))[:n]]
        # Asked-for logprobs of a choice without tokens (an empty reply) are the empty object, not null.
        unscored = None if req.logprobs is None else form.no_logprobs
        choices = [form.choice(c, "".join(parts[i]), _merge(logprobs[i]) if i in logprobs else unscored,
                               finished.get(i)) for c, i in enumerate(order)]
        body = self._envelope(f"{form.id_prefix}{uuid.uuid4().hex}", int(time.time()), form.object, choices)
        body["usage"] = self.usage(job, ids)
        return body

    async def stream(self, req: CompletionRequest, job: Job, ids: list[list[int]], texts: list[str],
                     form: ResponseFormat) -> AsyncIterator[str]:
        """Server-Sent Events in OpenAI's format, ending with `data: [DONE]`."""
        completion_id, created = f"{form.id_prefix}{uuid.uuid4().hex}", int(time.time())
        usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            try:
                async for index, text, delta, finish in self.updates(req, job, texts, form):
                    choice = form.chunk_choice(index, text, delta, finish)
                    chunk = self._envelope(completion_id, created, form.chunk_object, [choice])
                    yield _sse({**chunk, "usage": None} if usage else chunk)  # as OpenAI's chunks carry it
                    # Queued events come without a pause: let the loop run between two writes, so that a closed
                    # connection is seen before the next one (asyncio warns of writes to a lost socket).
                    await asyncio.sleep(0)
                if usage:
                    yield _sse({**self._envelope(completion_id, created, form.chunk_object, []),
                                "usage": self.usage(job, ids)})
            except APIError as err:
                yield _sse(err.body())
            except Exception:  # a bug: the client still gets an error event and the end of the stream
                logger.exception("unhandled error in a stream")
                yield _sse(error_body("internal server error", type="server_error"))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client left early (or we are done): free its rows


async def _json_body(request: Request) -> Any:
    # JSON only: an HTML form on any web site may POST text/plain (browsers send it without asking) whose body
    # parses as JSON; a cross-site application/json request needs a CORS preflight, which this server never grants.
    media_type, _, parameters = request.headers.get("content-type", "").partition(";")
    media_type = media_type.strip().lower()
    if media_type != "application/json":
        sent = f"Content-Type {media_type}" if media_type else "no Content-Type"
        raise APIError(415, f"send the body as JSON with `Content-Type: application/json` (this request has {sent})",
                       code="unsupported_media_type")
    charsets = [value.strip().strip('"').lower() for name, _, value in
                (p.partition("=") for p in parameters.split(";")) if name.strip().lower() == "charset"]
    if any(charset not in ("utf-8", "utf8") for charset in charsets):
        raise APIError(415, f"send the body as UTF-8 JSON (this request declares charset={charsets[0]})",
                       code="unsupported_media_type")
    try:
        # Decoded as UTF-8 here: json.loads of bytes would also take UTF-16 or a byte-order mark.
        return json.loads((await request.body()).decode("utf-8"))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting or numbers
        raise APIError(400, "the request body is not valid JSON") from None
    except ClientDisconnect:  # it left mid-upload: no one reads the answer, and it is no server error
        raise APIError(499, "the client closed the connection before sending the whole request") from None


def _logprobs(builders: dict, index: int, scored: Iterable[tuple]) -> dict | None:
    """The logprobs object for these (token id, log-probability, top alternatives) of choice `index`; None when
    the request asked for none or there are none."""
    deltas = [builders[index].add(*entry) for entry in scored] if builders else []
    return _merge(deltas) if deltas else None


def _merge(deltas: list[dict]) -> dict:
    return {key: [v for d in deltas for v in d[key]] for key in deltas[0]} if deltas else {}


# Escaped in events: many line readers (str.splitlines, httpx's iter_lines) also break lines at these, which would
# cut an event's JSON in two. In JSON they occur only inside strings, where the escapes mean the same.
_LINE_BREAKS_TO_ESCAPE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS_TO_ESCAPE)}\n\n"


def _playground_html() -> bytes:
    return resources.files("gpt2kit.serving").joinpath("static/playground.html").read_bytes()


def create_app(model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, config: ServerConfig | None = None, *,
               model_name: str = "gpt2kit") -> FastAPI:
    """The FastAPI app serving `model`; its batching worker runs while the app is started (lifespan)."""
    config = config or ServerConfig()
    service = CompletionService(model, tokenizer, config, config.model_name or model_name)
    page = _playground_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # What is loaded now (model, tokenizer, app) lives as long as the server: out of the collector's sight, or
        # every full collection (a body of many small JSON lists sets some off) walks all of it on the event loop.
        gc.collect()
        gc.freeze()
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()
            gc.unfreeze()  # a program that embeds the app collects its objects again once it stops

    # No /docs, /redoc or /openapi.json: every route is listed in docs/serving.md, and each would be one more
    # route to guard.
    # No redirect from "/v1/completions/" to the route: the routes below are the only paths served.
    app = FastAPI(title="gpt2kit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _json_error(err.status, err.body(), err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _json_error(400, error_body(f"invalid request: {err.errors()[0]['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # As OpenAI words an unknown route or method: "Invalid URL (GET /v2/foo)", no code.
        message = (f"Invalid URL ({request.method} {request.url.path})" if err.status_code in (404, 405)
                   else str(err.detail))
        return _json_error(err.status_code, error_body(message), err.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _json_error(500, error_body("internal server error", type="server_error"))

    @app.api_route("/health", methods=["GET", "HEAD"])  # probes often ask with HEAD
    async def health() -> JSONResponse:
        alive = service.scheduler.running  # the batching worker: without it no request would ever finish
        return JSONResponse({"status": "ok" if alive else "error",
                             "queued_requests": service.scheduler.queued_requests,
                             "running_rows": len(service.scheduler.rows)}, status_code=200 if alive else 503)

    @app.get(PLAYGROUND_PATH, response_class=HTMLResponse)
    async def playground() -> Response:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return service.card

    async def respond(request: Request, req: CompletionRequest, form: ResponseFormat) -> Response:
        job, ids, texts = await service.submit(req)
        if req.stream:  # a closed stream cancels the job (see CompletionService.stream)
            return StreamingResponse(service.stream(req, job, ids, texts, form), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        # The job ends when its client leaves, and so does this handler: nothing would read its response.
        completion = asyncio.create_task(service.complete(req, job, ids, texts, form))
        disconnected = asyncio.create_task(_disconnect(request))
        try:
            await asyncio.wait((completion, disconnected), return_when=asyncio.FIRST_COMPLETED)
            if completion.done():
                return JSONResponse(completion.result())
            return Response(status_code=499)  # nginx's "client closed request"
        finally:
            completion.cancel()
            disconnected.cancel()
            job.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, parse_request(await _json_body(request)), CompletionFormat())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_request(await _json_body(request), ChatCompletionRequest)
        # Written and tokenized off the event loop, as completions' prompts are: a long conversation must not
        # pause the streams in progress.
        req = await run_in_threadpool(chat.to_completion, service.chat_format, service.tokenizer)
        return await respond(request, req, ChatFormat())

    app.add_middleware(RequestGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


async def _disconnect(request: Request) -> None:
    """Return once the client of a non-streamed request has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def default_model_name(model: str | os.PathLike) -> str:
    """The id a server gives its model without --model-name: the model directory's name, from its absolute
    path (`--model .` served the id ".", which no client can ask for by path), or the preset's name."""
    return os.path.basename(os.path.abspath(str(model))) or "gpt2kit"


def serve(model: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
          dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu", random_init: bool = False,
          quantize: str | None = None, pack_weights: bool = False, log_level: str = "info", **options) -> None:
    """Load a model and serve it until interrupted (`gpt2kit serve`). `options` are ServerConfig fields; the
    API key defaults to the GPT2KIT_API_KEY environment variable."""
    import uvicorn

    from ..pipeline import load_model_and_tokenizer

    if options.get("api_key") is None:
        options["api_key"] = os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(**options)
    _check_port(config.host, config.port)  # before the model loads: a taken port fails at once
    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype, device=device,
                                       random_init=random_init, quantize=quantize,
                                       pack_weights=pack_weights)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                       config.host)
    app = create_app(lm, tok, config, model_name=default_model_name(model))
    scheduler = app.state.service.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Ctrl-C / SIGTERM: the batching worker stops first, so every request in flight ends with the
            # shutdown error (a JSON 503, or an error event and [DONE] in a stream) while its connection is open;
            # uvicorn would otherwise cancel the connections mid-reply and only then stop the worker. On a thread
            # of its own: this handler may interrupt the event loop's thread inside the scheduler's lock, which
            # stop() (joining the worker, which waits for that lock) must never wait on here.
            threading.Thread(target=scheduler.stop, name="gpt2kit-stop", daemon=True).start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                   timeout_graceful_shutdown=5))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the captured Ctrl-C again once it has stopped
        server.run()


def _check_port(host: str, port: int) -> None:
    """One clear error when host:port cannot be listened on (taken, or not this machine's address). uvicorn
    binds it again right after; it would say so only once the model had loaded, and exit with its own code."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
