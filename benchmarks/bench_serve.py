"""Load test of `gpt2kit serve` against `transformers serve`, the same OpenAI API on the same random weights.

Each server runs as its own process on 127.0.0.1; --clients concurrent clients send --requests completions
(prompts cut from a bundled text, greedy, --max-tokens each) and wait for each answer before sending the
next. Reported per server: errors, requests/s, generated tokens/s, latency p50/p90/p99 (and time to first
token with --stream), then ratios against gpt2kit's batched server. Servers:

- gpt2kit          `gpt2kit serve` with continuous batching (--max-batch-size, default 16)
- transformers-cb  `transformers serve --continuous-batching` (paged attention): the batching peer
- gpt2kit-b1       the same gpt2kit server with --max-batch-size 1: requests decoded one at a time
- transformers     `transformers serve` without continuous batching (one request at a time)

The default run compares the first two (a few minutes on 2 busy cores); the unbatched servers are 3-5x
slower, so add them with fewer requests:

    python benchmarks/bench_serve.py                                        # gpt2-tiny, 200 requests x 16 clients
    python benchmarks/bench_serve.py --servers all --requests 48            # all four servers
    python benchmarks/bench_serve.py --preset gpt2 --requests 64            # GPT-2 small shape
    python benchmarks/bench_serve.py --servers gpt2kit --requests 1000 --stream

The run fails (exit 1) if any gpt2kit request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

TEXT = Path(__file__).resolve().parents[1] / "examples" / "data" / "the-verdict" / "the-verdict.txt"
SERVERS = ("gpt2kit", "transformers-cb", "gpt2kit-b1", "transformers")
DEFAULT_SERVERS = "gpt2kit,transformers-cb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, model_dir: Path, port: int, batch: int) -> list[str]:
    if name.startswith("gpt2kit"):
        return [sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--port", str(port),
                "--max-batch-size", str(1 if name == "gpt2kit-b1" else batch), "--max-queue", "1024",
                "--log-level", "warning"]
    command = ["transformers", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]
    return command + (["--continuous-batching"] if name == "transformers-cb" else [])


def make_prompts(tokenizer: GPT2Tokenizer, count: int, seed: int = 0) -> list[str]:
    """Slices of 8-64 tokens from the bundled text."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        length = int(rng.integers(8, 65))
        start = int(rng.integers(0, len(ids) - length))
        prompts.append(tokenizer.decode(ids[start:start + length]))
    return prompts


async def one_request(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[float, float | None, int]:
    """(latency s, time to first token s or None, completion tokens); raises on any failure."""
    start = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, None, response.json()["usage"]["completion_tokens"]
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or time.perf_counter() - start
                tokens += 1  # one streamed chunk per token (approximately: held-back text merges chunks)
    return time.perf_counter() - start, first, tokens


async def load_test(url: str, model: str, prompts: list[str], clients: int, max_tokens: int, stream: bool) -> dict:
    queue = list(enumerate(prompts))
    results, errors = [], []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            _, prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            try:
                results.append(await one_request(client, body, stream))
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(err).__name__}: {err}")

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    latency = np.array([r[0] for r in results]) if results else np.array([float("nan")])
    ttft = np.array([r[1] for r in results if r[1] is not None])
    return {"requests": len(results), "errors": errors, "wall": wall, "req_s": len(results) / wall,
            "tok_s": sum(r[2] for r in results) / wall,
            **{f"p{q}": float(np.percentile(latency, q)) for q in (50, 90, 99)},
            "ttft_p50": float(np.percentile(ttft, 50)) if len(ttft) else None}


def run_server(name: str, model_dir: Path, prompts: list[str], *, clients: int, max_tokens: int,
               max_batch_size: int, stream: bool) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(server_command(name, model_dir, port, max_batch_size),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    model = model_dir.name if name.startswith("gpt2kit") else str(model_dir)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within 300 s")
            time.sleep(0.5)
        warm = httpx.post(f"{url}/v1/completions", timeout=600,
                          json={"model": model, "prompt": prompts[0], "max_tokens": max_tokens, "temperature": 0})
        warm.raise_for_status()
        result = asyncio.run(load_test(url, model, prompts, clients, max_tokens, stream))
        result["first_text"] = warm.json()["choices"][0]["text"]
        return result
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def table_header(stream: bool) -> str:
    header = f"{'server':<16}{'ok':>6}{'errors':>8}{'req/s':>9}{'tok/s':>9}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}"
    return header + (f"{'ttft p50':>10}" if stream else "")


def table_row(name: str, r: dict, stream: bool) -> str:
    line = (f"{name:<16}{r['requests']:>6}{len(r['errors']):>8}{r['req_s']:>9.2f}{r['tok_s']:>9.1f}"
            f"{r['p50']:>9.3f}{r['p90']:>9.3f}{r['p99']:>9.3f}")
    return line + (f"{r['ttft_p50']:>10.3f}" if stream and r["ttft_p50"] is not None else "")


def run(servers: list[str], *, preset: str = "gpt2-tiny", model: str | None = None, requests: int = 200,
        clients: int = 16, max_tokens: int = 32, max_batch_size: int = 16, stream: bool = False) -> dict[str, dict]:
    """Load-test each server in turn; {server name: result} (a server that fails to run is reported and left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        if model:
            model_dir = Path(model)
        else:
            model_dir = Path(tmp) / preset
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config.from_name(preset)).save_pretrained(model_dir)
            GPT2Tokenizer.gpt2().save_pretrained(model_dir)  # transformers serve needs the vocabulary beside it
        tokenizer = GPT2Tokenizer.from_file(model_dir) if model else GPT2Tokenizer.gpt2()
        prompts = make_prompts(tokenizer, requests)
        print(f"model {model or preset}: {requests} requests, {clients} concurrent clients, "
              f"max_tokens {max_tokens}, greedy, {'streamed' if stream else 'not streamed'}; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        results = {}
        for name in servers:
            print(f"running {name} ...", flush=True)
            try:
                results[name] = run_server(name, model_dir, prompts, clients=clients, max_tokens=max_tokens,
                                           max_batch_size=max_batch_size, stream=stream)
                print(table_row(name, results[name], stream), flush=True)
            except Exception as err:  # noqa: BLE001 - a peer that fails to run is reported, not fatal
                print(f"  {name} failed: {err}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-tiny", help="random-weight model shape (default: gpt2-tiny)")
    parser.add_argument("--model", default=None, help="serve this HF-format directory instead of a random preset")
    parser.add_argument("--servers", default=DEFAULT_SERVERS, help=f"comma-separated subset of {SERVERS}, or all "
                        "(default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--stream", action="store_true",
                        help="stream every completion; also report time to first token")
    args = parser.parse_args()
    # On SIGTERM (e.g. `timeout`), unwind normally so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers = list(SERVERS) if args.servers == "all" else args.servers.split(",")
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")

    results = run(servers, preset=args.preset, model=args.model, requests=args.requests, clients=args.clients,
                  max_tokens=args.max_tokens, max_batch_size=args.max_batch_size, stream=args.stream)
    print("\n" + table_header(args.stream))
    for name, r in results.items():
        print(table_row(name, r, args.stream))
    base = results.get("gpt2kit")
    if base:
        print("\nratios (gpt2kit / other): throughput >1 and latency <1 favour gpt2kit")
        for name, r in results.items():
            if name != "gpt2kit":
                same = base["first_text"] == r["first_text"]
                print(f"  vs {name:<16} req/s x{base['req_s'] / r['req_s']:.2f}   p50 x{base['p50'] / r['p50']:.2f}"
                      f"   p99 x{base['p99'] / r['p99']:.2f}   same greedy text: {same}")
    failed = [n for n, r in results.items() if n.startswith("gpt2kit") and r["errors"]]
    for name in failed:
        print(f"{name} errors (first 3): {results[name]['errors'][:3]}")
    missing = [n for n in servers if n.startswith("gpt2kit") and n not in results]
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
