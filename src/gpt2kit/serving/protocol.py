"""The OpenAI completions wire format: the request schema, error bodies and the pieces of a response."""

from __future__ import annotations

import codecs
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..conversation import ROLES, ChatFormat as ConversationFormat
from ..generation import GREEDY_TEMPERATURE
from ..tokenizer import GPT2Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string: the text held back while it might be one stays short
MAX_LOGIT_BIAS = 300  # tokens in one request's logit_bias
MAX_LOGPROBS = 5  # as OpenAI's completions endpoint
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat completions endpoint
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint


RequestT = TypeVar("RequestT", bound="SamplingRequest")


class APIError(Exception):
    """An error the client caused (or a full queue), answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: OpenAI's, plus top_k, min_p and
    repetition_penalty (as vLLM offers them). Unknown fields are refused, so no option is silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None  # checked by _check_stop
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None  # what torch.Generator takes (plus n - 1)
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1 (vLLM's "off"): every token
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None  # beyond: scores overflow
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Any = None  # checked by _check_logit_bias: token id (a string, as JSON keys are) -> bias

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return self

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, top_k: int | None) -> int | None:
        return None if top_k in (0, -1) else top_k

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: Any) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            return None
        if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
            raise ValueError(f"expected a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                             f"each at most {MAX_STOP_LENGTH} characters")
        return stops or None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not (isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS
                and all(isinstance(t, str) and t.isascii() and t.isdecimal() and type(b) in (int, float)
                        and -100 <= b <= 100 for t, b in bias.items())):
            raise ValueError(f"expected an object of at most {MAX_LOGIT_BIAS} token ids (as strings, e.g. "
                             '"50256") mapped to biases from -100 to 100')
        ids = {int(t): float(b) for t, b in bias.items()}
        if len(ids) < len(bias):
            raise ValueError("a token id is given twice (e.g. as \"5\" and \"05\")")
        return ids or None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. Fields gpt2kit cannot honour are accepted only at their neutral value."""

    prompt: Any = Field(...)  # checked by _check_prompt for a clear message
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None  # sample this many per prompt, return the n best
    # Accepted for compatibility at its neutral value only.
    suffix: str | None = None
    # Set by a chat request made into a completion: what errors call its fields, and that an unset max_tokens
    # means whatever fits in the context (OpenAI's chat default) rather than DEFAULT_MAX_TOKENS.
    _prompt_param: str = PrivateAttr("prompt")
    _max_tokens_param: str = PrivateAttr("max_tokens")
    _max_tokens_fill_context: bool = PrivateAttr(False)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> str | list[str] | list[int] | list[list[int]]:
        def token_list(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)

        if isinstance(prompt, str) or token_list(prompt):
            return prompt
        if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                    or all(token_list(p) for p in prompt)):
            return prompt
        raise ValueError("expected a string, a non-empty list of strings, a non-empty list of token ids, or a "
                         "non-empty list of non-empty lists of token ids")

    @model_validator(mode="after")
    def _neutral_only(self) -> CompletionRequest:
        unsupported = [
            ("best_of", self.best_of is not None and self.best_of < (self.n or 1), "best_of must be at least n"),
            ("best_of", bool(self.stream) and self.candidates() > (self.n or 1),
             "best_of greater than n cannot be streamed: the best choices are known only at the end"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported"),
        ]
        for param, bad, message in unsupported:
            if bad:
                raise APIError(400, message, param=param)
        return self

    def candidates(self) -> int:
        """Sequences generated per prompt: best_of, which is at least n; just n under greedy decoding (temperature
        0, or below GREEDY_TEMPERATURE), where every candidate would be the same sequence."""
        greedy = self.temperature is not None and self.temperature < GREEDY_TEMPERATURE
        return self.n or 1 if greedy else max(self.n or 1, self.best_of or 1)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of texts or of token lists."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and type(p[0]) is int) else p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: Any  # checked by _check_content: text, or a list of {"type": "text", "text": ...} parts
    name: str | None = None  # accepted and ignored, as `user` is

    @field_validator("role")
    @classmethod
    def _check_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"expected one of {', '.join(map(repr, ROLES))}")
        return role

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
                isinstance(part, dict) and part.keys() == {"type", "text"} and part["type"] == "text"
                and isinstance(part["text"], str) for part in content):
            return "".join(part["text"] for part in content)
        raise ValueError('expected a string or a list of {"type": "text", "text": "..."} parts (only text)')


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. The messages become the transcript `gpt2kit chat` writes (the tokenizer's chat
    format: "User: ... / Assistant: ..." unless the model has a chat_template), which the model continues; the
    reply ends at EOS, where the format ends a reply (the model starting the next user turn), or at a stop
    string."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # A reply of at least one token, as OpenAI requires (0 is for scoring a completion's echoed prompt).
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(400, "give max_completion_tokens or its older name max_tokens, not both",
                           param="max_completion_tokens")
        return self

    def to_completion(self, chat_format: ConversationFormat, tokenizer: GPT2Tokenizer) -> CompletionRequest:
        """The same request as a completion of the transcript's token ids (already validated: built without
        checks)."""
        shared = {name: getattr(self, name) for name in SamplingRequest.model_fields}
        if self.max_completion_tokens is not None:
            shared["max_tokens"] = self.max_completion_tokens
        shared["stop"] = chat_format.reply_stops(self.stop)
        try:
            text = chat_format.transcript([(m.role, m.content) for m in self.messages])
        except ValueError as err:  # a model's own Jinja template may refuse a conversation
            raise APIError(400, str(err), param="messages") from None
        prompt = chat_format.encode(tokenizer, text)
        completion = CompletionRequest.model_construct(
            **shared, prompt=prompt, echo=False, logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        completion._prompt_param = "messages"
        completion._max_tokens_param = "max_tokens" if self.max_tokens is not None else "max_completion_tokens"
        completion._max_tokens_fill_context = True
        return completion


def parse_request(data: Any, schema: type[RequestT] = CompletionRequest) -> RequestT:
    """Validate a decoded JSON body against `schema`; the first problem becomes one 400 error naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif first["type"] == "missing":
            message = f"you must provide a {param!r} parameter"
        elif param is None:  # about the body itself (a field name pydantic cannot read as text)
            message = f"invalid request body: {message}"
        else:
            message = f"invalid value for {param!r}: {message}"
        raise APIError(400, message, param=param) from None


def token_text(tokenizer: GPT2Tokenizer, token_id: int) -> str:
    """A token as text; a token that is not valid UTF-8 alone shows its bytes, as OpenAI does ("bytes:\\xe2")."""
    data = tokenizer.decode_bytes([token_id])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class LogprobsBuilder:
    """The legacy completions `logprobs` object of one choice, a token at a time: tokens, their
    log-probabilities, the top alternatives and each token's character offset in the choice's text."""

    def __init__(self, tokenizer: GPT2Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0  # characters of the choice's text before the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict[str, list]:
        """One token's part of the object (a streamed chunk's logprobs); the parts concatenate to the whole.
        `text_offset` counts characters of the text, so a character split over tokens moves it once."""
        if top is not None and logprob is not None:
            top = [*top, (token_id, logprob)]  # as OpenAI: the chosen token is always among the alternatives
        data = self.tokenizer.decode_bytes([token_id])
        entry = {"tokens": [token_text(self.tokenizer, token_id)], "token_logprobs": [logprob],
                 "top_logprobs": [None if top is None else {token_text(self.tokenizer, t): lp for t, lp in top}],
                 "text_offset": [self.offset + self._pending_characters(data[:1])]}
        self.offset += len(self._utf8.decode(data))
        return entry

    def end_text(self) -> None:
        """The text decoded so far ends here (an echoed prompt, decoded on its own): bytes still pending are its
        U+FFFD, and the next token starts a new character."""
        self.offset += len(self._utf8.decode(b"", final=True))

    def _pending_characters(self, first_byte: bytes) -> int:
        """Characters that bytes still pending from earlier tokens become before this token: none when its first
        byte continues their character (an "é" split over two tokens starts before the second), else their
        replacement characters (a lone b"\xf0" is one "\ufffd", and the next token starts after it)."""
        pending = self._utf8.getstate()
        if not pending[0]:  # the usual case: every earlier byte is part of a character already counted
            return 0
        joined = codecs.getincrementaldecoder("utf-8")(errors="replace")
        joined.setstate(pending)
        alone = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return max(0, len(joined.decode(first_byte)) - len(alone.decode(first_byte)))


class ChatLogprobsBuilder:
    """The chat `logprobs` object of one choice: {"content": [one entry per token, with its top alternatives]}."""

    def __init__(self, tokenizer: GPT2Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _token(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        return {"token": token_text(self.tokenizer, token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.decode_bytes([token_id]))}

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict[str, list]:
        """One token's entry, as the object of a streamed chunk."""
        return {"content": [{**self._token(token_id, logprob),
                             "top_logprobs": [self._token(t, lp) for t, lp in top or ()]}]}


class CompletionFormat:
    """How /v1/completions writes a response: `text` choices, the legacy logprobs object."""

    id_prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"
    logprobs_builder = LogprobsBuilder
    no_logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}  # asked, no token

    def choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}

    chunk_choice = choice


class ChatFormat:
    """How /v1/chat/completions writes a response: an assistant `message` per choice (`delta`s when streamed,
    the first one naming the role). The reply is what the model wrote after "Assistant:", without the leading
    space, as `gpt2kit chat` shows it (the decoder drops it). One instance per response: it remembers which
    replies have been announced."""

    id_prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"
    logprobs_builder = ChatLogprobsBuilder
    no_logprobs = {"content": []}

    def __init__(self) -> None:
        self.announced: set[int] = set()  # choices whose first chunk (with the role) was written

    def choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        delta: dict[str, str] = {"content": text} if text or index not in self.announced else {}
        if index not in self.announced:
            self.announced.add(index)
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
