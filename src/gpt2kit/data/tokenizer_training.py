"""`train_tokenizer`: a byte-level BPE vocabulary for a corpus (e.g. Chinese text, which GPT-2's vocabulary
spends 2-3 tokens per character on), read with the same readers as `preprocess`."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..tokenizer import TOKENIZER_FILES, GPT2Tokenizer, check_training_sizes, train_bpe
from ..files import atomic_write_text, make_directories, sha256_file
from .readers import DataError, check_reading_options, current_inputs, file_stamp, iter_texts, resolve_inputs

CHECK_BYTES = 1 << 20  # text re-encoded with both engines after training
RECORD_FILE = "tokenizer_training.json"  # what tokenizer.json was trained with, beside it


def train_tokenizer(inputs: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                    vocab_size: int, format: str = "auto", text_key: str = "text", min_frequency: int = 2,
                    errors: str = "strict", progress: bool = True) -> GPT2Tokenizer:
    """Train byte-level BPE (GPT-2's pre-tokenizer, `<|endoftext|>` as id 0) with HF `tokenizers` on the
    documents of `inputs` (files, directories, globs; formats as in `preprocess`) and write
    `output_dir/tokenizer.json`, loadable with `GPT2Tokenizer.from_file`.

    gpt2kit runs the result on tiktoken; as a guard, the first MiB of the corpus is encoded with both engines
    and any difference is an error."""
    from tokenizers import Tokenizer

    check_training_sizes(vocab_size, min_frequency)  # before anything is written
    output = Path(output_dir)
    sources = _inputs(inputs, format, output)
    check_reading_options(sources, text_key, errors)
    stamps = [file_stamp(s.path) for s in sources]  # before reading: an edit meanwhile makes the record stale
    started = time.perf_counter()
    stream = iter_texts(sources, text_key=text_key, errors=errors)
    first = next(stream, None)
    if first is None:  # checked before training so that nothing is written
        raise DataError(f"no text in the input ({len(sources)} file(s))")
    documents = 0

    def texts():
        nonlocal documents
        for text, ends_document in itertools.chain([first], stream):
            documents += ends_document  # a long document comes in several pieces
            yield text

    # Trained and checked in a hidden folder: only a vocabulary that passed the check becomes tokenizer.json
    # (a run that reuses an existing one must never find a rejected or half-written file).
    created = not output.exists()
    make_directories(output, DataError)
    try:
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=output) as staging:
            trained = train_bpe([], vocab_size, staging, min_frequency=min_frequency, texts=texts(), progress=progress)
            reference = Tokenizer.from_file(str(Path(staging) / "tokenizer.json"))
            reference.encode_special_tokens = True  # gpt2kit's encode treats "<|endoftext|>" in text as text too
            checked = 0
            for text, _ in iter_texts(_inputs(inputs, format, output), text_key=text_key, errors=errors):
                if checked >= CHECK_BYTES:
                    break
                checked += len(text.encode("utf-8"))
                if trained.encode(text) != reference.encode(text).ids:
                    raise DataError(f"{output}/tokenizer.json: tiktoken and HF tokenizers disagree on {text[:60]!r}; "
                                    "please report this with the corpus (nothing was written)")
            # Recorded before tokenizer.json is replaced, with the new file's hash: a crash in between leaves a record
            # naming another file, which only makes the next run retrain (a tokenizer.json without a record would
            # count as the user's own). Each source's SHA-256 was taken as training read it.
            record = {**_settings(vocab_size, format, text_key, min_frequency, errors),
                      "tokenizer_sha256": sha256_file(Path(staging) / "tokenizer.json"),
                      "inputs": [{**stamp, "sha256": source.sha256} for source, stamp in zip(sources, stamps)]}
            atomic_write_text(output / RECORD_FILE, json.dumps(record, indent=2) + "\n")
            # A tokenizer saved here before leaves files that loading the directory would apply to the new vocabulary
            # (its roles, chat template, added tokens): they go.
            for name in TOKENIZER_FILES:
                if name != "tokenizer.json":
                    with contextlib.suppress(FileNotFoundError):
                        (output / name).unlink()
            os.replace(Path(staging) / "tokenizer.json", output / "tokenizer.json")
    except BaseException:
        if created:  # a failed run leaves no empty directory behind
            with contextlib.suppress(OSError):
                output.rmdir()
        raise
    tokenizer = GPT2Tokenizer.from_file(output / "tokenizer.json")
    if progress:
        n_bytes = sum(s.bytes for s in sources)
        print(f"trained a byte-level BPE vocabulary of {tokenizer.vocab_size:,} tokens on {len(sources)} file(s), "
              f"{n_bytes / 1e6:,.1f} MB, {documents:,} documents in {time.perf_counter() - started:.1f}s "
              f"-> {Path(output_dir) / 'tokenizer.json'}")
    return tokenizer


def tokenizer_is_current(output_dir: str | os.PathLike, inputs: str | os.PathLike | Sequence[str | os.PathLike], *,
                         vocab_size: int, format: str = "auto", text_key: str = "text", min_frequency: int = 2,
                         errors: str = "strict") -> bool:
    """Whether `output_dir/tokenizer.json` is what `train_tokenizer` would train with these arguments now
    (same settings; same input paths, sizes, and modification times or else contents). A tokenizer.json that
    `train_tokenizer` did not write (no record beside it) is the user's own and counts as current."""
    output = Path(output_dir)
    if not (output / "tokenizer.json").is_file():
        return False
    if not (output / RECORD_FILE).is_file():
        return True
    try:
        recorded = json.loads((output / RECORD_FILE).read_text(encoding="utf-8"))
        settings = _settings(vocab_size, format, text_key, min_frequency, errors)
        if not (isinstance(recorded, dict) and all(recorded.get(key) == value for key, value in settings.items())
                and isinstance(recorded.get("inputs"), list)):
            return False
        # The record must be of this tokenizer.json (records of older versions carry no hash).
        if "tokenizer_sha256" in recorded and recorded["tokenizer_sha256"] != sha256_file(output / "tokenizer.json"):
            return False
        # Records of an older version are [path, size] pairs: compared as such, then written back with hashes.
        known = [{"path": r[0], "bytes": r[1]} if isinstance(r, list) and len(r) == 2 else r
                 for r in recorded["inputs"]]
        if not all(isinstance(r, dict) for r in known):
            return False
        records = current_inputs(known, _inputs(inputs, format, output))
    except (OSError, ValueError):
        return False
    if records is not None and records != recorded["inputs"]:
        with contextlib.suppress(OSError):
            atomic_write_text(output / RECORD_FILE, json.dumps({**recorded, "inputs": records}, indent=2) + "\n")
    return records is not None


def _inputs(inputs, format: str, output: Path) -> list:
    """The input files, less this tokenizer's own (an output directory may sit among the inputs, or be one)."""
    own = {(output / name).resolve() for name in ("tokenizer.json", RECORD_FILE)}
    return [s for s in resolve_inputs(inputs, format) if s.path.resolve() not in own]


def _settings(vocab_size: int, format: str, text_key: str, min_frequency: int, errors: str) -> dict:
    return {"vocab_size": vocab_size, "min_frequency": min_frequency, "format": format, "text_key": text_key,
            "errors": errors}
