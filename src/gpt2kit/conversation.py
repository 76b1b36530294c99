"""Chat formats: how a conversation becomes text a GPT-2 model continues, and where its reply ends.

GPT-2 has no chat template of its own. `gpt2kit chat`, the server's /v1/chat/completions, the pipeline's chat
input and `apply_chat_template` all write a conversation in the format of the tokenizer's `chat_template`
(chat_template.jinja or tokenizer_config.json, where transformers keeps it):

- "plain" (no template): one line per turn, "User: ..." and "Assistant: ...", a system message as plain text,
  ending with "Assistant:" for the model to continue. A reply ends where the model starts the next user line and
  is shown without its leading space (GenerationConfig.skip_leading_space), where stop strings are not looked for.
- "alpaca": the instruction format gpt2kit's instruction finetunes train on (data.format: alpaca), which saves it
  as the model's template: a single question is exactly the training prompt, and the reply ends at EOS.
- any other Jinja template a model directory brings, rendered as transformers renders it; the reply ends at EOS.

Each known format is also written out as a Jinja template (`ChatFormat.template`): what the tokenizer saves, and
what a GGUF file carries for llama.cpp, rendering to the same text (tested).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tokenizer import GPT2Tokenizer

ROLES = ("system", "developer", "user", "assistant")  # OpenAI's message roles that carry text
Turns = Sequence[tuple[str, str]]  # (role, content)
Spans = list[tuple[int, int]]  # character ranges of a rendered text

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


def _plain(turns: Turns, add_generation_prompt: bool) -> str:
    speakers = {"user": "User: ", "assistant": "Assistant: "}
    text = "".join(f"{speakers.get(role, '')}{content}\n" for role, content in turns)
    return text + "Assistant:" if add_generation_prompt else text


def _alpaca(turns: Turns, add_generation_prompt: bool) -> str:
    # A system (or developer) message takes the preamble's place; each exchange is an instruction and a response.
    preamble = next((content for role, content in reversed(turns) if role in ("system", "developer")),
                    ALPACA_PREAMBLE)
    headers = {"user": "### Instruction:\n", "assistant": "### Response:\n"}
    text = preamble + "\n\n" + "".join(f"{headers[role]}{content}\n\n" for role, content in turns if role in headers)
    return text + "### Response:\n" if add_generation_prompt else text


_PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_ALPACA_TEMPLATE = (
    "{% set ns = namespace(preamble='" + ALPACA_PREAMBLE + "') %}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{% set ns.preamble = message['content'] %}{% endif %}"
    "{% endfor %}"
    "{{ ns.preamble + '\\n\\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A way to write conversations: `render` makes the text, `template` is the same as Jinja, `stops` end a
    reply besides EOS, and with `skip_leading_space` the reply begins after a space the format leaves open.
    `end_of_turn`: the text a model's own template closes an assistant message with ("<|im_end|>"), one of the
    stops; `generation_spans`, for a template with transformers' {% generation %} tag, renders a conversation
    (with the generation prompt if asked) with the character spans the tag marks."""

    name: str
    template: str
    render: Callable[[Turns, bool], str]
    stops: tuple[str, ...] = ()
    skip_leading_space: bool = False
    writes_special_tokens: bool = False  # a model's own template may write eos_token and the like as text
    end_of_turn: str = ""
    generation_spans: Callable[[Turns, bool], tuple[str, Spans]] | None = None

    def encode(self, tokenizer: GPT2Tokenizer, text: str) -> list[int]:
        """Token ids of a transcript. A model's own template writes special tokens (its eos_token, ...) as text,
        which become their ids, as transformers tokenizes a rendered template; gpt2kit's formats write none, so
        "<|endoftext|>" typed in a message stays text. An empty transcript starts from end-of-text."""
        ids = tokenizer.encode(text, allowed_special="all" if self.writes_special_tokens else ())
        return ids or [tokenizer.eos_token_id]

    def encode_marked(self, tokenizer: GPT2Tokenizer, text: str, spans: Spans) -> tuple[list[int], list[bool]]:
        """`encode(text)` and, per token, whether any of its text lies in one of the character `spans`:
        transformers' assistant-token mask (a span cut by truncation keeps its remaining tokens)."""
        ids = self.encode(tokenizer, text)
        # Each token's characters: all those any of its bytes belong to (byte tokens split a character, and each
        # such token covers the whole character, as transformers' offsets do).
        # surrogatepass: a lone surrogate, which the tokenizer encodes as U+FFFD, is 3 bytes too.
        char_of = [i for i, char in enumerate(text) for _ in range(len(char.encode("utf-8", "surrogatepass")))]
        ranges, at = [], 0
        for piece in tokenizer.encoding.decode_tokens_bytes(ids) if text else [b""]:
            ranges.append((char_of[at], char_of[at + len(piece) - 1] + 1) if piece else (0, 0))
            at += len(piece)
        return ids, [any(start < end and begin < stop for begin, end in spans) for start, stop in ranges]

    def transcript(self, turns: Turns, *, add_generation_prompt: bool = True,
                   continue_final_message: bool = False) -> str:
        """The text the model continues: after the last turn, the opening of the assistant's reply (unless
        add_generation_prompt is False); with continue_final_message, the text ends where the last (assistant)
        message ends, for the model to carry it on (transformers' rule: cut after that message's content)."""
        if not continue_final_message:
            return self.render(turns, add_generation_prompt)
        # transformers' rule: a tag after the message's content marks where it ends; a template that trims the
        # content trims the tag's space too, and the text then ends without trailing whitespace.
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        (role, content) = turns[-1]
        text = self.render([*turns[:-1], (role, content + tag)], False)
        if content.strip() not in text or tag.strip() not in text:
            raise ValueError("continue_final_message: the chat template does not show the last message")
        at = text.rindex(tag.strip())
        return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()

    def reply_stops(self, stop: Sequence[str] | None) -> list[str]:
        """The stop strings that end a reply: the format's own, then the caller's."""
        return [*self.stops, *(stop or [])]


PLAIN = ChatFormat("plain", _PLAIN_TEMPLATE, _plain, stops=("\nUser:",), skip_leading_space=True)
ALPACA = ChatFormat("alpaca", _ALPACA_TEMPLATE, _alpaca, stops=("### Instruction:",))
CHAT_FORMATS = {f.name: f for f in (PLAIN, ALPACA)}


@functools.lru_cache(maxsize=16)  # compiling a template (and finding its end of turn) is the costly part
def chat_format(template: str | None, **special_tokens: str) -> ChatFormat:
    """The format of a tokenizer's chat_template: plain without one, a known format by its template, else the
    template itself, rendered with Jinja (`special_tokens`, such as eos_token, are its variables too)."""
    if template is None:
        return PLAIN
    known = next((f for f in CHAT_FORMATS.values() if f.template == template), None)
    if known:
        return known
    render, generation_spans = _jinja_renderer(template, special_tokens)
    end_of_turn = _end_of_turn(render, special_tokens.get("eos_token"))
    return ChatFormat("jinja", template, render, stops=(end_of_turn,) if end_of_turn else (),
                      writes_special_tokens=True, end_of_turn=end_of_turn, generation_spans=generation_spans)


def _end_of_turn(render: Callable[[Turns, bool], str], eos_token: str | None) -> str:
    """What a template writes after an assistant message's content ("<|im_end|>"), whitespace trimmed: what
    follows a reply whether the conversation ends there or goes on (Phi-3 ends a whole conversation with EOS
    after it); "" when that is only whitespace or the template cannot render such conversations."""
    probe = "GPT2KIT-REPLY-PROBE"
    exchange = [("user", "Hi"), ("assistant", probe)]
    try:
        last, followed = render(exchange, False), render(exchange * 2, False)
    except ValueError:
        return ""
    if probe not in last or probe not in followed:
        return ""
    ending, going_on = last[last.rindex(probe) + len(probe):].rstrip(), followed[followed.index(probe) + len(probe):]
    if eos_token and ending.endswith(eos_token) and not going_on.startswith(ending):
        ending = ending[:-len(eos_token)]  # the conversation's end, not the turn's
    return ending.strip() if going_on.startswith(ending) else ""


def _jinja_renderer(template: str, variables: dict[str, str]
                    ) -> tuple[Callable[[Turns, bool], str], Callable[[Turns, bool], tuple[str, Spans]] | None]:
    """Render a model's own chat template as transformers does: a sandboxed Jinja environment that trims blocks,
    with its `raise_exception` and `strftime_now`, a `tojson` that keeps text as it is, and its
    `{% generation %}` tag, which marks the assistant's text: with the tag, also a function rendering a
    conversation with the character spans it marked (transformers' assistant-token mask)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tracked = threading.local()  # while generation_spans renders: the output so far and the marked spans
    tags: list[int] = []  # line of each {% generation %} tag the template holds (found as Jinja parses it)

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            tags.append(lineno)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generated"), [], [], body).set_lineno(lineno)

        def _generated(self, caller: Callable[[], str]) -> str:
            text = caller()
            if getattr(tracked, "pieces", None) is not None:
                start = sum(map(len, tracked.pieces))  # rendered before this block (streamed, see below)
                tracked.spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as err:
        raise ValueError(f"chat_template is not a valid Jinja template: {err}") from None

    def arguments(turns: Turns, add_generation_prompt: bool) -> dict[str, Any]:
        return dict(messages=[{"role": role, "content": content} for role, content in turns],
                    add_generation_prompt=add_generation_prompt, tools=None, documents=None, **variables)

    def render(turns: Turns, add_generation_prompt: bool) -> str:
        try:
            return compiled.render(**arguments(turns, add_generation_prompt))
        except Exception as err:  # the template is code: any failure of it is the template's, not a crash
            raise ValueError(f"chat_template: {err}") from None

    def generation_spans(turns: Turns, add_generation_prompt: bool = False) -> tuple[str, Spans]:
        # Streamed, as transformers renders it for its assistant mask: what precedes a tag is out when it runs.
        tracked.pieces, tracked.spans = [], []
        try:
            for piece in compiled.generate(**arguments(turns, add_generation_prompt)):
                tracked.pieces.append(piece)
            return "".join(tracked.pieces), tracked.spans
        except Exception as err:
            raise ValueError(f"chat_template: {err}") from None
        finally:
            tracked.pieces = None

    return render, generation_spans if tags else None


def turns_of(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(role, content) turns of OpenAI/transformers-style messages; ValueError naming the first bad one."""
    turns = []
    for m, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"message {m}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}, got "
                             f"{message!r}")
        turns.append((message["role"], message["content"]))
    return turns
