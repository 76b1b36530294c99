"""`preprocess`: text corpora -> token shards, in parallel worker processes, streaming, written atomically.

Output directory (all little-endian; see docs/data.md):
  meta.json                tokenizer, dtype, counts, sources with sha256
  {split}-{k:05d}.bin      token ids, uint16 (uint32 if the vocabulary has more than 65,536 ids)
  {split}.idx              int64 start offset of every document in the split's token stream, then its total
  tokenizer/               a copy of the vocabulary (unless it is the bundled GPT-2 one)
The directory appears only when complete: it is built as a hidden sibling `.NAME.tmp-PID` and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..files import atomic_write_text, make_directories, remove_abandoned, replace_directory, replaced_directory
from ..tokenizer import GPT2Tokenizer, TokenizerError
from .datasets import FORMAT_NAME, META_FILE, read_meta
from .readers import (Chunk, DataError, Source, check_reading_options, chunk_pieces, current_inputs, file_stamp,
                      iter_chunks, resolve_inputs)

# What a preprocess output's meta.json records as "version": raised whenever the same input and settings give other
# tokens than before (2: a byte-order mark and the blank lines a file starts with are no longer tokens of the text),
# so that an older output is rebuilt rather than reused.
OUTPUT_VERSION = 2
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: ~0.1 s of tokenizing, so IPC is cheap and 2+ workers stay busy
DEFAULT_SHARD_TOKENS = 1 << 30  # 2 GiB shards of uint16
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # one vocabulary, bundled with gpt2kit


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- worker side --------------------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(tokenizer: GPT2Tokenizer, dtype: str, append_eos: bool, text_key: str, errors: str,
                 in_pool: bool) -> None:
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
        exit_with_parent()
    _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype), append_eos=append_eos, text_key=text_key,
                   errors=errors)


def exit_with_parent() -> None:
    """End this (pool worker) process within a second of its parent's death: a killed parent cannot stop its
    pool, whose workers would otherwise wait for work forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(tokens, token count per piece, piece ends its document, empty records skipped)."""
    texts, ends, skipped = chunk_pieces(chunk, text_key=_worker["text_key"], errors=_worker["errors"])
    encode, eos = _worker["tokenizer"].encode, _worker["tokenizer"].eos_token_id
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, (text, end) in enumerate(zip(texts, ends)):
        before = len(ids)
        ids += encode(text)  # "<|endoftext|>" in a corpus is text, never a control token
        if end and _worker["append_eos"]:
            ids.append(eos)
        lengths[i] = len(ids) - before
    return np.array(ids, dtype=_worker["dtype"]), lengths, np.array(ends, dtype=bool), skipped


def _encoded_chunks(chunks: Iterator[tuple[Any, Chunk]], workers: int, init_args: tuple) -> Iterator[tuple[Any, tuple]]:
    """(tag, _encode_chunk(chunk)) for (tag, chunk) in input order. At most 2 chunks per worker are in flight, so memory
    stays bounded however large the corpus (Pool.imap would read the whole input ahead)."""
    if workers == 1:
        _init_worker(*init_args, in_pool=False)
        for tag, chunk in chunks:
            yield tag, _encode_chunk(chunk)
        return
    import multiprocessing
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(*init_args, True))
    pending: deque = deque()
    try:
        while True:
            try:
                tag, chunk = next(chunks)
            except StopIteration:
                break
            except Exception:
                # A read error comes after the errors of the chunks read before it, as with one worker.
                for _, future in pending:
                    future.result()
                raise
            pending.append((tag, pool.submit(_encode_chunk, chunk)))
            if len(pending) >= 2 * workers:
                tag, future = pending.popleft()
                yield tag, future.result()
        while pending:
            tag, future = pending.popleft()
            yield tag, future.result()
    except BrokenProcessPool:
        raise ChildProcessError("a tokenizing worker process died (killed, or out of memory?); nothing was "
                                "written") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- writing ------------------------------------------------------------------------------------------------
class _SplitWriter:
    """Token shards and the document index of one split."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0
        self._file = None
        self._index = open(directory / f"{split}.idx", "wb")

    def add_documents(self, starts: np.ndarray) -> None:
        """Start offsets (in this split's stream) of documents that begin in the tokens written next."""
        self._index.write(starts.astype("<i8").tobytes())
        self.documents += len(starts)

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)
            if self.shards[-1]["tokens"] == self.shard_tokens:
                self._file.close()
                self._file = None

    def close(self) -> dict[str, Any]:
        self._index.write(np.array([self.tokens], dtype="<i8").tobytes())
        self.close_files()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards,
                "index": f"{self.split}.idx"}

    def close_files(self) -> None:
        """Close the open shard and the index (also on failure, before the staging directory goes)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._index.close()


def is_validation(document_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Document i goes to "val" when floor((i+1) f) > floor(i f): exactly floor(n f) of the first n documents,
    evenly spread, decided by position alone."""
    # 0.57 is 0.56999... as a float, and 100 x 0.57 would floor to 56: products a rounding error below an integer
    # are lifted to it (a decimal's exact product is never that close below one).
    def floor(x: np.ndarray) -> np.ndarray:
        return np.floor(x * (1 + 1e-12))

    ids = document_ids.astype(np.float64)
    return floor((ids + 1) * fraction) > floor(ids * fraction)


class _Router:
    """Sends each chunk's pieces to the split of the document they belong to."""

    def __init__(self, writers: dict[str, _SplitWriter], val_fraction: float) -> None:
        self.writers, self.val_fraction = writers, val_fraction
        self.next_document = 0  # documents started so far, over all inputs
        self.open = False  # whether the last piece routed left its document unfinished

    def route(self, tokens: np.ndarray, lengths: np.ndarray, ends: np.ndarray) -> int:
        """Returns how many documents started in this chunk."""
        if not len(lengths):
            return 0
        starts = np.concatenate([[not self.open], ends[:-1]])
        document = self.next_document - 1 + np.cumsum(starts)
        to_val = (is_validation(document, self.val_fraction) if self.val_fraction
                  else np.zeros(len(lengths), dtype=bool))
        piece_offsets = np.concatenate([[0], np.cumsum(lengths)])
        for split, in_split in (("train", ~to_val), ("val", to_val)):
            if not in_split.any():
                continue
            writer = self.writers[split]
            split_lengths = np.where(in_split, lengths, 0)
            offsets_in_split = writer.tokens + np.concatenate([[0], np.cumsum(split_lengths)[:-1]])
            writer.add_documents(offsets_in_split[starts & in_split])
            if in_split.all():
                writer.write(tokens)
            else:  # runs of consecutive pieces of this split
                edges = np.flatnonzero(np.diff(np.concatenate([[False], in_split, [False]]).astype(np.int8)))
                for a, b in zip(edges[::2], edges[1::2]):
                    writer.write(tokens[piece_offsets[a]:piece_offsets[b]])
        self.next_document += int(starts.sum())
        self.open = not bool(ends[-1])
        return int(starts.sum())


# ---- output directory -----------------------------------------------------------------------------------------
def _prepare_output(output: Path, overwrite: bool) -> Path:
    """Check that `output` may be (re)placed; remove staging directories of dead runs; return a new staging dir."""
    if output.exists():
        if not output.is_dir():
            raise DataError(f"{output}: exists and is not a directory")
        if any(output.iterdir()):
            if not (output / META_FILE).is_file():
                raise DataError(f"{output}: exists, is not empty and is not a preprocess output; not touching it")
            if not overwrite:
                raise DataError(f"{output}: already holds a preprocess output; pass overwrite=True (--overwrite)"
                                " to replace it")
    make_directories(output.parent, DataError)
    # Staging directories of interrupted runs (they never became the output), and old outputs an interrupted
    # replacement moved aside (files.replace_directory names them .NAME.old-PID-...).
    remove_abandoned(output, ("tmp", "old"))
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _tokenizer_spec(tokenizer: str | os.PathLike, loaded: GPT2Tokenizer, staging: Path) -> dict[str, Any]:
    """How `load_tokenizer` rebuilds it: the bundled GPT-2 by name, anything else from a copy in the output."""
    spec: dict[str, Any] = {"source": str(tokenizer), "vocab_size": loaded.vocab_size,
                            "eos_token_id": loaded.eos_token_id, "eos_token": loaded.eos_token,
                            "fingerprint": loaded.fingerprint()}
    if not Path(tokenizer).exists() and str(tokenizer).removeprefix("openai-community/") in GPT2_NAMES:
        return {"name": "gpt2", **spec}
    try:
        loaded.save_pretrained(staging / "tokenizer")
    except TokenizerError as err:  # a rank file whose tokens are not all merges of lower-ranked ones
        raise TokenizerError(f"{tokenizer}: cannot be copied into the output ({err})") from None
    # Read back as the directory, with its tokenizer_config.json: the roles (EOS ends every document) are there.
    return {"name": "file", "file": "tokenizer", **spec}


# ---- the pipeline ---------------------------------------------------------------------------------------------
def preprocess(inputs: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
               format: str = "auto", text_key: str = "text", tokenizer: str | os.PathLike = "gpt2",
               append_eos: bool = True, workers: int | None = None, val_fraction: float = 0.0,
               errors: str = "strict", overwrite: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Tokenize text corpora into token shards; returns a summary (also printed as one line if `progress`).

    inputs: files, directories or globs (.txt, .tokens/.raw WikiText, .jsonl, each optionally .zst).
    format: "auto" (by suffix), "text", "paragraphs", "wikitext" or "jsonl" (see gpt2kit.data.readers).
    append_eos: end every document with the tokenizer's EOS id.
    val_fraction: the share of documents (chosen by position, see `is_validation`) written to split "val".
    errors: "strict" (invalid UTF-8 is an error naming file, line and byte) or "replace" (U+FFFD).
    The result is byte-identical for any number of workers and any chunk_bytes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = available_cpus() if workers is None else workers
    for name, value in (("workers", workers), ("chunk_bytes", chunk_bytes), ("shard_tokens", shard_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    output = replaced_directory(output_dir)  # before any work
    if output.exists() and not output.is_dir():  # an input file given as output, too: "no input outside" else
        raise DataError(f"{output}: exists and is not a directory")
    sources = resolve_inputs(inputs, format, exclude=output)
    check_reading_options(sources, text_key, errors)
    stamps = [file_stamp(s.path) for s in sources]  # before reading: an edit while it runs makes the output stale
    tok = GPT2Tokenizer.from_pretrained(tokenizer)
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")
    staging = _prepare_output(output, overwrite)
    started = time.perf_counter()
    writers: dict[str, _SplitWriter] = {}
    try:
        tokenizer_spec = _tokenizer_spec(tokenizer, tok, staging)  # before the work: saving it can fail
        splits = ("train", "val") if val_fraction else ("train",)
        for split in splits:
            writers[split] = _SplitWriter(staging, split, dtype, shard_tokens)
        router, skipped = _Router(writers, val_fraction), 0
        total_bytes = sum(s.path.stat().st_size for s in sources if s.path.is_file())
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", disable=not progress,
                   dynamic_ncols=True)

        # Added tokens ("New York") are matched in the text: no cut between two chunks may split one.
        protect = sorted(t.encode("utf-8") for t in tok.ordinary_added_tokens)

        def chunks() -> Iterator[tuple[tuple[Source, int], Chunk]]:
            finished = 0  # bytes of the sources read to the end
            for source in sources:
                for chunk in iter_chunks(source, chunk_bytes, protect=protect):
                    yield (source, finished + source.bytes), chunk  # bytes read so far, for the bar
                finished += source.bytes

        init_args = (tok, dtype.str, append_eos, text_key, errors)
        with bar:
            for (source, read), (tokens, lengths, ends, empty) in _encoded_chunks(chunks(), workers, init_args):
                source.documents += router.route(tokens, lengths, ends)
                source.tokens += len(tokens)
                skipped += empty
                bar.update(read - bar.n)
                n_tokens = sum(w.tokens for w in writers.values())
                bar.set_postfix_str(f"{n_tokens / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.2f}M tok/s",
                                    refresh=False)
        results = {split: writer.close() for split, writer in writers.items()}
        seconds = time.perf_counter() - started
        n_docs, n_tokens = router.next_document, sum(r["tokens"] for r in results.values())
        if n_tokens == 0:
            raise DataError(f"no text in the input ({len(sources)} file(s) read, {skipped} empty record(s))")
        if val_fraction and results["val"]["documents"] == 0:
            raise DataError(f"val_fraction={val_fraction} puts none of the {n_docs} document(s) in 'val'; "
                            "give more documents (with format 'text' each file is one; 'paragraphs' splits "
                            "at blank lines) or use a larger fraction")
        meta = {
            "format": FORMAT_NAME, "version": OUTPUT_VERSION, "dtype": dtype.name, "byteorder": "little",
            "tokenizer": tokenizer_spec, "append_eos": append_eos,
            "input_format": format, "text_key": text_key, "val_fraction": val_fraction, "errors": errors,
            "documents": n_docs, "tokens": n_tokens, "skipped_empty_records": skipped,
            "splits": results,
            "sources": [{"path": str(s.path), "format": s.format, "bytes": s.bytes, "sha256": s.sha256,
                         "mtime_ns": stamp["mtime_ns"], "documents": s.documents, "tokens": s.tokens}
                        for s, stamp in zip(sources, stamps)],
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # Every file reaches the disk (fsync) before the rename publishes the directory.
        replace_directory(staging, output)  # an old output was checked by _prepare_output
    except BaseException:
        for writer in writers.values():
            writer.close_files()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    in_bytes = sum(s.bytes for s in sources)
    summary = {
        "output": str(output), "files": len(sources), "bytes": in_bytes, "documents": n_docs, "tokens": n_tokens,
        "splits": {split: {"documents": r["documents"], "tokens": r["tokens"]} for split, r in results.items()},
        "skipped_empty_records": skipped, "seconds": seconds, "workers": workers,
        "mb_per_s": in_bytes / 1e6 / seconds, "tokens_per_s": n_tokens / seconds,
    }
    if progress:
        print(format_summary(summary))
    return summary


def output_is_current(output_dir: str | os.PathLike, inputs: str | os.PathLike | Sequence[str | os.PathLike], *,
                      format: str = "auto", text_key: str = "text", tokenizer: str | os.PathLike = "gpt2",
                      append_eos: bool = True, val_fraction: float = 0.0, errors: str = "strict") -> bool:
    """Whether `output_dir` holds what `preprocess` would write for these arguments now: the same settings, the
    same tokenizer (by the contents of its files, see GPT2Tokenizer.fingerprint) and the same input files (paths,
    sizes, and modification times or else contents, see inputs_unchanged), written by this version of the
    pipeline (OUTPUT_VERSION), so a cached output may be reused."""
    try:
        meta = read_meta(output_dir)
        if meta.get("version") != OUTPUT_VERSION:
            return False
        sources = resolve_inputs(inputs, format, exclude=output_dir)
        fingerprint = GPT2Tokenizer.from_pretrained(tokenizer).fingerprint()
        settings = {"input_format": format, "text_key": text_key, "append_eos": append_eos,
                    "val_fraction": val_fraction, "errors": errors}
        if not (all(meta.get(key) == value for key, value in settings.items())
                and meta["tokenizer"].get("source") == str(tokenizer)
                and meta["tokenizer"].get("fingerprint") == fingerprint):
            return False
        records = current_inputs(meta["sources"], sources)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # DataError and TokenizerError are
        return False  # ValueErrors; the others: a meta.json without the records it should have
    if records is not None and records != meta["sources"]:
        with contextlib.suppress(OSError):  # a read-only output is still current; it is just checked again
            atomic_write_text(Path(output_dir) / META_FILE,
                              json.dumps({**meta, "sources": records}, indent=2, ensure_ascii=False) + "\n")
    return records is not None


def format_summary(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {s['documents']:,} docs / {s['tokens']:,} tokens"
                       for name, s in summary["splits"].items())
    return (f"preprocessed {summary['files']} file(s), {summary['bytes'] / 1e6:,.1f} MB -> {splits} in "
            f"{summary['seconds']:.1f}s ({summary['mb_per_s']:.1f} MB/s, {summary['tokens_per_s'] / 1e6:.2f}M "
            f"tokens/s, {summary['workers']} worker(s)) -> {summary['output']}")
