"""The OpenAI completions wire format: the request schema, error bodies and the pieces of a response."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..tokenizer import GPT2Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGIT_BIAS = 300  # tokens in one request's logit_bias
MAX_LOGPROBS = 5  # as OpenAI's completions endpoint
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint


class APIError(Exception):
    """An error the client caused (or a full queue), answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. OpenAI's fields, plus top_k and repetition_penalty (as vLLM offers them).
    Fields gpt2kit cannot honour are accepted only at their neutral value, so no option is silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: Any = Field(...)  # checked by _check_prompt for a clear message
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None  # checked by _check_stop
    seed: int | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Any = None  # checked by _check_logit_bias: token id (a string, as JSON keys are) -> bias
    # Accepted for compatibility at their neutral values only.
    best_of: int | None = None
    suffix: str | None = None

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

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: Any) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            return None
        if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and s for s in stops)):
            raise ValueError(f"expected a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
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
        return {int(t): float(b) for t, b in bias.items()} or None

    @model_validator(mode="after")
    def _neutral_only(self) -> CompletionRequest:
        unsupported = [
            ("best_of", self.best_of not in (None, self.n or 1), "best_of must equal n (it is not supported)"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported"),
        ]
        for param, bad, message in unsupported:
            if bad:
                raise APIError(400, message, param=param)
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of texts or of token lists."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and type(p[0]) is int) else p


def parse_request(data: Any) -> CompletionRequest:
    """Validate a decoded JSON body; the first problem becomes one 400 error naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif first["type"] == "missing":
            message = f"you must provide a {param!r} parameter"
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
    """The legacy completions `logprobs` object of one choice: tokens, their log-probabilities, the top
    alternatives and each token's character offset in the choice's text."""

    def __init__(self, tokenizer: GPT2Tokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict[str, list]:
        """Append one token; returns the object for just this token (a streamed chunk's logprobs)."""
        text = token_text(self.tokenizer, token_id)
        if top is not None and logprob is not None:
            top = [*top, (token_id, logprob)]  # as OpenAI: the chosen token is always among the alternatives
        entry = {"tokens": [text], "token_logprobs": [logprob],
                 "top_logprobs": [None if top is None else {token_text(self.tokenizer, t): lp for t, lp in top}],
                 "text_offset": [self.offset]}
        self.offset += len(text)
        for key, values in entry.items():
            getattr(self, key).extend(values)
        return entry

    def to_dict(self) -> dict[str, list]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}
