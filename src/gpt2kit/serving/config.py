"""ServerConfig: where the server listens and the limits it enforces (no web framework imported here, so the
CLI can show its defaults cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Where the server listens and what it accepts. Limits bound the work one request can ask for."""

    host: str = "127.0.0.1"  # loopback only; use 0.0.0.0 (with an API key) to serve other machines
    port: int = 8000
    api_key: str | None = None  # required on every route but /health when set
    model_name: str | None = None  # the id in /v1/models; default: the model directory's name
    max_batch_size: int = 16  # rows (prompt x choice) decoded together in one forward pass
    max_queue: int = 64  # requests waiting for a batch slot; more get 503
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_prompt_tokens: int | None = None  # longer prompts get 400; default: the model's context - 1
    max_tokens: int | None = None  # largest max_tokens accepted; default: the model's context - 1
    max_choices: int = 64  # prompts x n in one request

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_key is not None and not (self.api_key and self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key == self.api_key.strip()):
            # HTTP header values are ASCII in practice; clients send other characters in differing encodings.
            raise ValueError("api_key must be printable ASCII without surrounding spaces")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
