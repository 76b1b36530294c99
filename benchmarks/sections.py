"""What `python -m benchmarks` runs for each section, and how: every benchmark call in a fresh process
(`measure`), so that no measurement depends on the state earlier ones left behind."""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from gpt2kit import GPT2Tokenizer
from gpt2kit.allocator import allocator_in_use
from gpt2kit.data.preprocess import exit_with_parent
from gpt2kit.training.logging import measure_matmul_peak, synchronize
from gpt2kit.training.trainer import enable_tf32

from . import bench_preprocess, bench_serve
from .devices import PeakMemory

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def measure(rows: list[dict], device: torch.device, fn, /, *args, **kwargs):
    """Run one benchmark call, whose work runs on `device`, in a fresh process; the rows it returns all get the
    call's peak memory and the allocator it ran with. A fresh process per call keeps each measurement
    independent of the ones before it: the peers' step times moved by up to 1.7x with the allocator state
    earlier sections left behind (both sides of a row still share one process and take turns)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=configure_process,
                             initargs=(torch.get_num_threads(), device)) as pool:
        result, peak, allocator = pool.submit(_run_measured, device, fn, args, kwargs).result()
    for row in _as_rows(result):
        row["peak_mem_mb"], row["memory"] = peak / 1e6, "cuda" if device.type == "cuda" else "rss"
        row["allocator"] = allocator
        rows.append(row)
    return result


def configure_process(threads: int, device: torch.device) -> None:
    """What main sets for the whole run, set again in a measuring process (which ends with a killed run)."""
    import transformers

    exit_with_parent()

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # keep the peers' notices and progress bars out of the table
    transformers.logging.disable_progress_bar()


def _run_measured(device: torch.device, fn, args: tuple, kwargs: dict):
    with PeakMemory(device) as memory:
        result = fn(*args, **kwargs)
    return result, memory.peak, allocator_in_use()


def _as_rows(result) -> list[dict]:
    return result if isinstance(result, list) else [result]


# ---- hardware --------------------------------------------------------------------------------------------------
def memory_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a large tensor copy on `device` (read + write counted), the bound of weight-streaming
    decode."""
    src = torch.ones(megabytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def hardware(device: torch.device, bf16: bool = True) -> dict:
    """Matmul peaks (bf16's only with `bf16`: emulated bf16 takes minutes to time) and memory bandwidth of
    `device`; a GPU needs larger matmuls to reach its peak. The float32 peak is the one training runs at: TF32 on
    a GPU, as the Trainer (and bench_train) set it. Decoding and evaluation rows run in true float32."""
    enable_tf32(device)
    size = 8192 if device.type == "cuda" else 2048
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
    return {"section": "hardware", "device": device.type,
            **{f"{name}_flops": max(measure_matmul_peak(dtype, size=size, device=device) for _ in range(3))
               for name, dtype in dtypes.items()},
            "bandwidth": memory_bandwidth(device)}


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def tokenizer_speed(repeats: int = 3) -> dict:
    """MB/s encoding the tiny-Shakespeare and WikiText-2 test paragraphs (documents of a corpus, as a data
    pipeline feeds them), one thread each: gpt2kit one `encode` per paragraph, transformers' fast tokenizer one
    batch call (its fastest use; a whole corpus as one string is slower for it). The ids must agree."""
    from transformers import GPT2TokenizerFast

    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    text += (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    documents = [part for part in re.split(r"\n\s*\n", text) if part.strip()]  # paragraphs: blank-line separated
    ours = GPT2Tokenizer.gpt2()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = GPT2TokenizerFast.from_pretrained(tmp)
    os.environ["RAYON_NUM_THREADS"] = "1"
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    sides = (("ours", lambda docs: [ours.encode(d) for d in docs]), ("peer", lambda docs: theirs(docs)["input_ids"]))
    for _ in range(repeats):  # alternate the sides
        for side, encode in sides:
            start = time.perf_counter()
            ids = encode(documents)
            times[side].append(time.perf_counter() - start)
            if side == "ours":
                reference = ids
            elif ids != reference:
                raise SystemExit("gpt2kit and GPT2TokenizerFast disagree on the tokenizer benchmark text")
    size = sum(len(d.encode("utf-8")) for d in documents)
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
    return {"section": "tokenizer", "bytes": size, "documents": len(documents), "ours_mb_s": size / 1e6 / ours_s,
            "peer_mb_s": size / 1e6 / peer_s, "ratio": peer_s / ours_s}


# ---- preprocessing and serving -----------------------------------------------------------------------------------
def preprocess_scaling(mb: float) -> dict:
    return {"section": "preprocess", "rows": bench_preprocess.run(mb=mb, workers=(1, 2))}


def serving(full: bool) -> list[dict]:
    """The served results, and a skip row for each server that failed to run (its error is printed)."""
    servers = ["gpt2kit", "transformers-cb"]
    results = bench_serve.run(servers, preset="gpt2" if full else "gpt2-tiny", requests=64 if full else 32,
                              clients=8, max_tokens=16)
    return [{"section": "serve", "results": results},
            *({"section": "serve", "skipped": f"{name} failed to run (its error is printed above)"}
              for name in servers if name not in results)]
