"""The chat transcript: how a conversation becomes text a GPT-2 model continues.

GPT-2 has no chat template, so `gpt2kit chat`, the server's /v1/chat/completions and the pipeline's chat input
all write a conversation the same way: one line per turn, "User: ..." and "Assistant: ...", a system message as
plain text, ending with "Assistant:" for the model to continue. A reply ends where the model starts the next
user line (REPLY_STOP) and is shown without its leading space (GenerationConfig.skip_leading_space), where its
stop strings are not looked for.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "developer", "user", "assistant")  # OpenAI's message roles that carry text
SPEAKERS = {"user": "User:", "assistant": "Assistant:"}
REPLY_STOP = "\nUser:"  # the model starting the next user turn ends a reply


def reply_stops(stop: Sequence[str] | None) -> list[str]:
    """The stop strings that end a reply: the model starting the next user turn, then the caller's own."""
    return [REPLY_STOP, *(stop or [])]


def format_turn(role: str, content: str) -> str:
    """One turn: "User: ..." or "Assistant: ..." on a line of its own; a system (or developer) message is
    written as it is, without a speaker."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    speaker = SPEAKERS.get(role)
    return f"{speaker} {content}\n" if speaker else f"{content}\n"


def transcript(turns: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> str:
    """A conversation of (role, content) turns as the text the model continues, ending with "Assistant:" (unless
    add_generation_prompt is False: then it ends after the last turn's line)."""
    text = "".join(format_turn(role, content) for role, content in turns)
    return text + SPEAKERS["assistant"] if add_generation_prompt else text


def turns_of(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(role, content) turns of OpenAI/transformers-style messages; ValueError naming the first bad one."""
    turns = []
    for m, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"message {m}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}, got "
                             f"{message!r}")
        turns.append((message["role"], message["content"]))
    return turns
