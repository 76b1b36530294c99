"""Interactive chat with a GPT-2 model: the conversation's transcript (gpt2kit.conversation), streamed replies,
history trimmed to the context window, and /reset, /set, /help, /quit commands. Works the same on a pipe."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import torch

from .generation import GenerationConfig, model_placement, parse_logit_bias, stream_generate
from .model import GPT2LMHeadModel
from .pipeline import load_assistant, load_model_and_tokenizer, text_options
from .tokenizer import GPT2Tokenizer

CHAT_DEFAULTS = {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95}
HELP = ("commands: /reset (forget the conversation), /set NAME VALUE (e.g. /set temperature 0.7; /set alone "
        "lists settings), /help, /quit; Ctrl-C stops a reply")


def _parse_bool(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "on", "yes")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.lower() == "none" else parse(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


SETTINGS: dict[str, Callable[[str], Any]] = {
    "temperature": _number, "top_k": _optional(_integer), "top_p": _optional(_number),
    "min_p": _optional(_number), "typical_p": _optional(_number), "epsilon_cutoff": _optional(_number),
    "eta_cutoff": _optional(_number), "repetition_penalty": _number, "no_repeat_ngram_size": _integer,
    "frequency_penalty": _number, "presence_penalty": _number, "logit_bias": _optional(parse_logit_bias),
    "max_new_tokens": _integer, "min_new_tokens": _integer, "do_sample": _parse_bool, "seed": _optional(_integer),
}


def shared_context(model: GPT2LMHeadModel, assistant_model: GPT2LMHeadModel | None) -> int:
    """Positions the conversation may fill: the shorter context of the model and its assistant."""
    return min(m.config.n_positions for m in (model, assistant_model) if m is not None)


class ChatSession:
    """The conversation so far as (role, content) turns, written in the tokenizer's chat format; each reply sees as
    many recent exchanges as fit."""

    def __init__(self, model: GPT2LMHeadModel, tokenizer: GPT2Tokenizer, config: GenerationConfig, *,
                 assistant_model: GPT2LMHeadModel | None = None) -> None:
        self.model, self.tokenizer, self.assistant_model = model, tokenizer, assistant_model
        self.context = shared_context(model, assistant_model)
        self.format = tokenizer.chat_format()
        self.turns: list[tuple[str, str]] = []
        self.config = config
        self.set_config(config, reseed=True)

    def set_config(self, config: GenerationConfig, reseed: bool = False) -> None:
        """Use `config` for the following replies; the random stream restarts with a new seed, or with `reseed`."""
        if config.max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens ({config.max_new_tokens}) leaves no room for the conversation in "
                             f"the context of {self.context} positions")
        config.check_vocabulary(self.model.config.vocab_size)
        # One generator for the whole conversation: a seed makes the conversation reproducible (GenerationConfig
        # has checked that torch takes it), and changing another setting must not rewind it to the first draws.
        if reseed or config.seed != self.config.seed:
            device, _ = model_placement(self.model)  # sampling draws on the logits' device
            self.generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
        self.config = config

    def set(self, name: str, value: str) -> None:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; settable: {', '.join(SETTINGS)}")
        try:
            parsed = SETTINGS[name](value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self.set_config(self.config.replace(**{name: parsed}), reseed=name == "seed")

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, message: str) -> list[int]:
        """The transcript of the leading system messages, the most recent exchanges and this message that leaves
        room for the reply (without exchanges, cut to its newest tokens, if even that does not)."""
        budget = self.context - self.config.max_new_tokens
        n_head = next((i for i, (role, _) in enumerate(self.turns) if role not in ("system", "developer")),
                      len(self.turns))
        head, history = self.turns[:n_head], self.turns[n_head:]
        ids = self.format.encode(self.tokenizer, self.format.transcript([*head, ("user", message)]))[-budget:]
        for start in range(len(history) - 1, -1, -1):
            if history[start][0] == "assistant":  # whole exchanges only: a history never opens with a reply
                continue
            turns = [*head, *history[start:], ("user", message)]
            longer = self.format.encode(self.tokenizer, self.format.transcript(turns))
            if len(longer) > budget:
                break
            ids = longer
        return ids

    def reply(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply; the exchange joins the history when the reply is complete."""
        pieces = []
        # A plain transcript's reply (and the search for stop strings) starts after the space after "Assistant:".
        config = self.config.replace(seed=None, stop=self.format.reply_stops(self.config.stop),
                                     skip_leading_space=self.format.skip_leading_space)
        for piece in stream_generate(self.model, self.tokenizer, self.prompt_ids(message), config,
                                     generator=self.generator, assistant_model=self.assistant_model):
            pieces.append(piece)
            yield piece
        self.turns += [("user", message), ("assistant", "".join(pieces))]


def _read_lines(stdin: TextIO, interactive: bool) -> Iterator[str]:
    if interactive:
        try:
            importlib.import_module("readline")  # loaded, it gives input() line editing and history
        except ImportError:  # not on every platform
            pass
    while True:
        if interactive:
            try:
                yield input("> ")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the session
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
            yield line.rstrip("\r\n")


def chat(model: str | os.PathLike | GPT2LMHeadModel, *, tokenizer: str | os.PathLike | GPT2Tokenizer | None = None,
         dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu", random_init: bool = False,
         quantize: str | None = None, pack_weights: bool = False, stdin: TextIO | None = None,
         stdout: TextIO | None = None, assistant_model: str | os.PathLike | GPT2LMHeadModel | None = None,
         **options) -> None:
    """Read messages (one per line) until /quit or end of input; stream each reply. `options` are
    GenerationConfig fields over the chat defaults (sampling, temperature 0.7, top-k 50, top-p 0.95);
    `assistant_model` decodes speculatively (gpt2kit.speculative)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if stdin is None:  # started with standard input closed
        raise ValueError("no standard input to read messages from")
    if stdin is sys.stdin and hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # a line of bad bytes becomes U+FFFD instead of ending the session
    if "max_length" in options:  # the conversation grows: each reply's length is what bounds it
        raise ValueError("chat bounds each reply by max_new_tokens; max_length (prompt + reply) does not apply")
    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, dtype=dtype, device=device,
                                       random_init=random_init, quantize=quantize,
                                       pack_weights=pack_weights)
    assistant = load_assistant(assistant_model, lm, tok, random_init=random_init)
    # The model's generation_config.json over chat's defaults, as in transformers, except what a chat cannot
    # follow: it streams one reply at a time, bounded by max_new_tokens.
    own = dict(getattr(lm, "generation_config", None) or {})
    own.pop("max_length", None)
    for name in ("num_beams", "num_return_sequences"):
        if own.pop(name, 1) != 1:
            warnings.warn(f"the model's generation_config.json sets {name}; chat streams one reply at a time and "
                          f"leaves it out", stacklevel=2)
    # A small model's context (the demo's is 128) keeps half of it for the conversation.
    reply_tokens = min(own.pop("max_new_tokens", CHAT_DEFAULTS["max_new_tokens"]),
                       shared_context(lm, assistant) // 2)
    options = text_options(tok, lm.config.vocab_size,
                           {**CHAT_DEFAULTS, **own, "max_new_tokens": reply_tokens, **options})
    session = ChatSession(lm, tok, GenerationConfig().replace(**options), assistant_model=assistant)
    interactive = stdin.isatty() and stdin is sys.stdin
    if interactive:
        print(f"chatting with {model} ({HELP})", file=stdout)
    for line in _read_lines(stdin, interactive):
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command, *args = message.split(maxsplit=2)
            if command == "/quit":
                return
            if command == "/reset":
                session.reset()
                print("[history cleared]", file=stdout)
            elif command == "/set" and len(args) == 2:
                try:
                    session.set(*args)
                    print(f"[{args[0]} = {getattr(session.config, args[0])}]", file=stdout)
                except ValueError as err:
                    print(f"[error: {err}]", file=stdout)
            elif command == "/set" and not args:
                print("[" + ", ".join(f"{k} = {getattr(session.config, k)}" for k in SETTINGS) + "]", file=stdout)
            else:
                print(f"[{HELP}]", file=stdout)
            stdout.flush()
            continue
        reply = session.reply(message)
        try:
            for piece in reply:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
            reply.close()
            stdout.write(" [stopped: this exchange is not kept]")
        stdout.write("\n")
        stdout.flush()
