"""OpenAI-compatible HTTP serving with continuous batching, and the playground page.

`ServerConfig` is importable without FastAPI; `create_app`, `serve` and `BatchScheduler` load it on first use.
"""

from typing import Any

from .config import ServerConfig

__all__ = ["BatchScheduler", "ServerConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from . import app
        return getattr(app, name)
    if name == "BatchScheduler":
        from .scheduler import BatchScheduler
        return BatchScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
