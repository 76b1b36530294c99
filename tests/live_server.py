"""Helpers for the serving tests: a tiny model with its own vocabulary, and a live uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from gpt2kit.pipeline import load_model_and_tokenizer
from gpt2kit.serving import ServerConfig, create_app



class LiveServer:
    """create_app(...) served by uvicorn on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, model_dir: Path, **options) -> None:
        self.model, self.tokenizer = load_model_and_tokenizer(model_dir)
        self.config = ServerConfig(port=0, **options)
        self.app = create_app(self.model, self.tokenizer, self.config, model_name="tiny")
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def scheduler(self):
        return self.app.state.service.scheduler

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
