"""Reading corpora as a stream of byte chunks, and turning a chunk into document pieces.

Formats (one document per ...):
  text        file                 (.txt and anything unknown)
  paragraphs  block of lines ended by one or more blank lines (the blank lines stay with the block before)
  wikitext    article: starts at a level-1 heading line ` = Title = ` (.tokens, .raw)
  jsonl       JSON object per line, text under `text_key` (.jsonl, .json)
Any of them may be zstandard-compressed (`.zst` suffix). Concatenating the pieces of a file gives back its text.

The main process only cuts files into chunks of about `chunk_bytes`; decoding, parsing and tokenizing happen
in `chunk_pieces` (in worker processes). Cuts depend only on the file's bytes, never on the worker count. A cut
falls on a document boundary when one is near, else inside a document at a point where GPT-2's and cl100k's
pre-tokenizers split anyway (see `safe_cut`), so encoding the pieces gives the tokens of the whole document.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import zstandard

from ..files import read_json, sha256_file

FORMATS = ("text", "paragraphs", "wikitext", "jsonl")
_SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".tokens": "wikitext", ".raw": "wikitext", ".jsonl": "jsonl",
                   ".json": "jsonl"}
# Document boundaries, as byte patterns so the main process (cutting) and workers (splitting) agree exactly.
_WIKITEXT_TITLE = re.compile(rb"^(?= = [^=\n][^\n]* = *\r?\n)", re.MULTILINE)  # at the start of ` = Title = `
_BLANK = b" \t\n\r\f\v"  # the whitespace of the paragraph rule (not str.strip's: a no-break space is text)
_PARAGRAPH_END = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+(?=[ \t\r\f\v]*[^ \t\n\r\f\v])")  # boundary at the match end
_SPACE_BETWEEN_LETTERS = re.compile(rb"(?<=[A-Za-z]) (?=[A-Za-z])")
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: a JSON "\ud800" escape alone decodes to one
MAX_SEARCH_BYTES = 1 << 26  # a document with no safe cut in 64 MiB is cut anyway (tokens may differ there)
_CUT_LOOKAHEAD = 16  # bytes past a position that decide whether it is a cut (two characters: see is_safe_cut)
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which some editors and exports write first: not text


class DataError(ValueError):
    """Input that cannot be preprocessed; the message names the file and line or byte offset."""


@dataclass(frozen=True)
class Chunk:
    """A run of bytes of one input file, cut so that it can be processed on its own."""
    source: str  # the file, for messages
    format: str
    data: bytes
    offset: int  # byte offset of `data` in the (decompressed) file
    line: int  # line number of the first byte of `data`
    starts_doc: bool  # False: the first piece continues the document of the previous chunk
    ends_doc: bool  # False: the last piece continues in the next chunk
    compressed: bool


@dataclass
class Source:
    """An input file and what reading it found."""
    path: Path
    format: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    tokens: int = 0
    _hash: Any = field(default_factory=hashlib.sha256, repr=False)


# ---- which files ----------------------------------------------------------------------------------------------
# Tables: read as text, their headers, delimiters and quoting would be trained on (and parquet's bytes fail).
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".feather")
# Compressed files other than zstandard: read as text, their bytes would be tokenized (with errors='replace').
_OTHER_COMPRESSION = (".gz", ".gzip", ".xz", ".lzma", ".bz2", ".lz4", ".zip", ".7z", ".br", ".tgz")


def detect_format(path: Path) -> str:
    suffix = Path(path.name.lower().removesuffix(".zst")).suffix
    if suffix in _TABLE_SUFFIXES:
        raise DataError(f"{path}: a {suffix} table is not read as text here: write its text column as JSON lines "
                        "(one {\"text\": ...} object per line, .jsonl), or give --format text (data.format: text) "
                        "to read the file as plain text, header and separators included")
    return _SUFFIX_FORMATS.get(suffix, "text")


def _known_suffix(path: Path) -> bool:
    return Path(path.name.lower().removesuffix(".zst")).suffix in _SUFFIX_FORMATS


def _is_token_meta(path: Path) -> bool:
    """Whether `path` is the meta.json of a preprocessed output (gpt2kit-tokens): its directory holds token
    shards, never text to read, and its pretty-printed meta.json would read as a malformed JSON line."""
    from .datasets import FORMAT_NAME, META_FILE

    if path.name != META_FILE:
        return False
    try:
        return read_json(path).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False  # not an output of preprocess: an input like any other


def resolve_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], format: str = "auto", *,
                   exclude: str | os.PathLike | None = None) -> list[Source]:
    """Files from paths, directories (recursively, sorted) and globs, in the order given, without repeats (a
    file named twice, by any path, is read once).

    In a directory, format "auto" takes only files with a known suffix (.txt .text .tokens .raw .jsonl .json,
    optionally .zst); an explicit format takes every file. Hidden files and folders are skipped, and so are
    preprocessed outputs found there and everything under `exclude` (an output directory inside an input
    directory)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, got {format!r}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise FileNotFoundError("no input given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            visible = [p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            outputs = {p.parent for p in visible if _is_token_meta(p)}
            if path in outputs:
                raise DataError(f"{path}: already preprocessed (token shards and their meta.json), not text to "
                                "read: train on it as data.train")
            found = sorted(p for p in visible if not any(parent in outputs for parent in p.parents)
                           and (format != "auto" or _known_suffix(p)))
            if not found:
                raise FileNotFoundError(f"{path}: directory has no input files"
                                        + (" (.txt .text .tokens .raw .jsonl .json, or .zst of them)"
                                           if format == "auto" else ""))
            files.extend(found)
        elif path.exists() or os.path.islink(path):
            files.append(path)  # a broken link fails later, when opened, with the reason
        elif glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"{item}: no file matches")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    unique: dict[Path, Path] = {}
    excluded = Path(exclude).resolve() if exclude is not None else None
    for path in files:
        real = path.resolve()
        if excluded is None or (real != excluded and excluded not in real.parents):
            unique.setdefault(real, path)
    if files and not unique:
        raise FileNotFoundError(f"{', '.join(map(str, inputs))}: no input files outside the output {exclude}")
    for path in unique.values():
        if path.suffix.lower() in _OTHER_COMPRESSION:
            raise DataError(f"{path}: {path.suffix} compression is not read here: decompress the file, or "
                            "recompress it with zstandard (.zst), which is read as it streams")
    return [Source(p, detect_format(p) if format == "auto" else format) for p in unique.values()]


def file_stamp(path: Path) -> dict[str, Any]:
    """{"path", "bytes", "mtime_ns"} of an input file as it is now (None for one that cannot be read): what an
    output built from it records, to be rebuilt when it changes (see inputs_unchanged)."""
    try:
        info = path.stat()
    except OSError:
        return {"path": str(path), "bytes": None, "mtime_ns": None}
    return {"path": str(path), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def current_inputs(recorded: Sequence[dict[str, Any]], sources: Sequence[Source]) -> list[dict[str, Any]] | None:
    """The records of `sources` when they are the input files `recorded` (dicts with path and bytes, and
    mtime_ns and sha256 where known), else None: the same paths and sizes, and each either not modified since
    or, when its time moved (an edit of the same size, a copy, a touch), still of the recorded SHA-256. Those
    come back with the new time (and a record of an older version, path and size only, with its hash): the caller
    writes them back, so the next check hashes nothing. OSError when a file cannot be read."""
    now = [file_stamp(s.path) for s in sources]
    if [[r.get("path"), r.get("bytes")] for r in recorded] != [[n["path"], n["bytes"]] for n in now]:
        return None
    records = []
    for record, stamp in zip(recorded, now):
        if record.get("mtime_ns") != stamp["mtime_ns"]:
            digest = sha256_file(stamp["path"])
            if "sha256" in record and record["sha256"] != digest:
                return None
            record = {**record, "mtime_ns": stamp["mtime_ns"], "sha256": digest}
        records.append(record)
    return records


# ---- cutting files into chunks --------------------------------------------------------------------------------
def _char_at(buf: bytes, p: int) -> str | None:
    """The character starting at byte p, or None (end of buffer, or not valid UTF-8)."""
    if p >= len(buf):
        return None
    lead = buf[p]
    size = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    try:
        return buf[p:p + size].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _char_before(buf: bytes, p: int) -> str | None:
    """The character ending just before byte p, or None."""
    start = p - 1
    while start > 0 and p - start < 4 and 0x80 <= buf[start] < 0xC0:  # UTF-8 continuation bytes
        start -= 1
    return _char_at(buf, start) if start >= 0 else None


def is_safe_cut(buf: bytes, p: int) -> bool:
    """True if the GPT-2 and cl100k pre-tokenizers split the text at byte p whatever follows or precedes
    the two sides, so that encode(a + b) == encode(a) + encode(b). Three shapes qualify:
      "x\\ny" : after a single newline between two non-space characters;
      "\\n x" : after a newline followed by one space and a non-space character;
      "a b"   : before a space between two ASCII letters.
    (In each, the regex match before p ends at p and the one after starts at p in the whole text too.)"""
    if 0 < p < len(buf) and buf[p] == 0x20 and _SPACE_BETWEEN_LETTERS.match(buf, p):
        return True
    if p < 1 or buf[p - 1] != 0x0A:
        return False
    nxt = _char_at(buf, p)
    if nxt is None:
        return False
    if nxt == " ":
        after = _char_at(buf, p + 1)
        return after is not None and not after.isspace()
    if nxt.isspace():
        return False
    prev = _char_before(buf, p - 1) if p >= 2 else "x"  # a newline at the file start has nothing before it
    return prev is not None and not prev.isspace()


def safe_cut(buf: bytes, start: int, *, avoid_line: bytes = b"") -> int | None:
    """The first safe cut at or after `start` (see `is_safe_cut`), not in or just before a line that starts
    with `avoid_line` (WikiText passes b" =": a cut there could hide a title line from the worker that sees
    only one side of it)."""
    i = buf.find(b"\n", max(start - 1, 0))
    while i >= 0:
        p = i + 1
        if is_safe_cut(buf, p) and not (avoid_line and buf.startswith(avoid_line[:len(buf) - p], p)):
            return p
        i = buf.find(b"\n", p)
    for m in _SPACE_BETWEEN_LETTERS.finditer(buf, start):
        line_start = buf.rfind(b"\n", 0, m.start()) + 1
        if not avoid_line or (line_start > 0 and not buf.startswith(avoid_line, line_start)):
            return m.start()
    return None


def document_boundaries(data: bytes, fmt: str) -> list[int]:
    """Byte positions strictly inside `data` where a new document starts."""
    if fmt == "wikitext":
        positions = [m.start() for m in _WIKITEXT_TITLE.finditer(data)]
    elif fmt == "paragraphs":
        positions = [m.end() for m in _PARAGRAPH_END.finditer(data)]
    else:
        return []
    return [p for p in positions if 0 < p < len(data)]


def _find_cut(buf: bytes, fmt: str, start: int) -> tuple[int | None, bool]:
    """(cut position >= start, whether it is a document boundary)."""
    if fmt == "jsonl":
        i = buf.find(b"\n", start - 1)
        return (i + 1, True) if i >= 0 else (None, True)
    if fmt == "wikitext":
        m = _WIKITEXT_TITLE.search(buf, start)
        if m and m.start() > 0:
            return m.start(), True
        return safe_cut(buf, start, avoid_line=b" ="), False
    if fmt == "paragraphs":
        # Search from the start of the whitespace run around `start`, so that a blank-line run that begins
        # before it is still seen as a boundary rather than offered as a plain cut.
        run_start = start
        while run_start > 1 and buf[run_start - 1] in b" \t\n\r\f\v":
            run_start -= 1
        m = _PARAGRAPH_END.search(buf, run_start - 1)
        if m:
            return m.end(), True
    return safe_cut(buf, start), False


def _search_resume(buf: bytes, fmt: str) -> int:
    """Where to search `buf` for a cut again once it has grown, after a search found none in it: a cut's rules
    look at most _CUT_LOOKAHEAD bytes ahead, except a WikiText title, which needs its whole line; the last line
    is searched again from its start while it may still become one."""
    resume = max(len(buf) - _CUT_LOOKAHEAD, 0)
    if fmt == "wikitext":
        line_start = buf.rfind(b"\n", 0, resume) + 1
        if line_start and buf[line_start:line_start + 3] == b" = "[:len(buf) - line_start]:
            return line_start
    return resume


def _char_boundary(buf: bytes, p: int) -> int:
    while p > 0 and 0x80 <= buf[p] < 0xC0:
        p -= 1
    return p


class _HashingReader:
    """A binary file that hashes and counts what is read from it (the compressed bytes, for .zst)."""

    def __init__(self, raw, source: Source) -> None:
        self.raw, self.source = raw, source

    def read(self, n: int = -1) -> bytes:
        block = self.raw.read(n)
        self.source._hash.update(block)
        self.source.bytes += len(block)
        return block

    def readinto(self, buffer) -> int:
        block = self.read(len(buffer))
        buffer[:len(block)] = block
        return len(block)


class _ZstdFrames:
    """Decompresses a file of concatenated zstandard frames. Unlike zstandard's stream_reader, a file that ends
    inside a frame (a truncated download) is an error instead of a silently shorter text."""

    def __init__(self, raw: _HashingReader, path: Path) -> None:
        self.raw, self.path = raw, path
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False  # some of the current frame's bytes have been fed
        self.pending, self.at = b"", 0  # decompressed bytes not yet returned: a block can expand a lot
        self.error: zstandard.ZstdError | None = None  # met after `pending`: raised once that has been read

    def read(self, n: int) -> bytes:
        """Up to n decompressed bytes; b"" only at the end of the file."""
        if self.at == len(self.pending):
            self.pending, self.at = self._decompress_block(n), 0
        data = self.pending[self.at:self.at + n]
        self.at += len(data)
        return data

    def _decompress_block(self, n: int) -> bytes:
        if self.error is not None:
            raise self.error
        while True:
            block = self.raw.read(max(n // 4, 1 << 16))  # text compresses about 4x
            if not block:
                if self.in_frame:
                    raise DataError(f"{self.path}: the zstandard stream ends inside a frame (a truncated file?)")
                return b""
            data, self.in_frame = self.frame.decompress(block), True
            while self.frame.eof:  # a frame ended: the rest of the block starts the next one
                rest, self.frame = self.frame.unused_data, zstandard.ZstdDecompressor().decompressobj()
                self.in_frame = bool(rest)
                if rest:
                    try:
                        data += self.frame.decompress(rest)
                    except zstandard.ZstdError as err:  # after good data: the error's offset is past it
                        if not data:
                            raise
                        self.error = err
                        return data
            if data:
                return data


def _splits_one_of(buf: bytes, cut: int, strings: Sequence[bytes]) -> bool:
    """Whether an occurrence of one of `strings` in buf spans byte `cut`."""
    for s in strings:
        i = buf.find(s, max(cut - len(s) + 1, 0), cut + len(s) - 1)  # the occurrences that could span it
        while 0 <= i < cut:
            if i + len(s) > cut:
                return True
            i = buf.find(s, i + 1, cut + len(s) - 1)
    return False


def iter_chunks(source: Source, chunk_bytes: int, *, protect: Sequence[bytes] = ()) -> Iterator[Chunk]:
    """Cut one file into chunks of `chunk_bytes` to 2x that, longer only where no cut point is near (a JSON
    line is never cut; other text is searched up to MAX_SEARCH_BYTES for a safe cut). No cut inside a document
    splits one of the `protect` strings (a tokenizer's added tokens, which it matches in the text).

    Also fills `source.bytes` / `source.sha256` (of the bytes on disk). Read errors become DataError."""
    path, fmt = source.path, source.format
    compressed = path.name.lower().endswith(".zst")
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with raw:
        hashed = _HashingReader(raw, source)
        reader = _ZstdFrames(hashed, path) if compressed else hashed
        buf, offset, line, starts_doc, eof, want = bytearray(), 0, 1, True, False, 2 * chunk_bytes
        searched = 0  # where the next search for a cut may start: before it, the last one found none
        longest = max(map(len, protect), default=0)
        while True:
            try:
                while not eof and len(buf) < want:
                    block = reader.read(max(chunk_bytes, want - len(buf)))
                    eof = not block
                    buf += block
            except zstandard.ZstdError as err:
                raise DataError(f"{path}: not a valid zstandard stream at or after decompressed byte "
                                f"{offset + len(buf)} ({err})") from None
            except OSError as err:
                raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
            if not buf:
                break
            start = chunk_bytes
            if offset == 0:
                # The blank lines a file starts with (after a byte-order mark) belong to its first document: a
                # cut among or right after them would tokenize them apart from it.
                lead = len(buf) - len(buf[len(_BOM) if buf.startswith(_BOM) else 0:].lstrip(_BLANK))
                if lead == len(buf) and not eof:
                    want = 2 * len(buf)
                    continue
                start = max(start, lead + 1)
            if eof and len(buf) <= start:
                cut, boundary = len(buf), True
            else:
                cut, boundary = _find_cut(buf, fmt, max(start, searched))
                # A cut must not split a protected string, nor be taken before the bytes that could show one.
                while cut is not None and not boundary and (_splits_one_of(buf, cut, protect) or (
                        not eof and len(buf) - cut < longest - 1)):
                    cut, boundary = _find_cut(buf, fmt, cut + 1)
                if cut is None:
                    if eof:
                        cut, boundary = len(buf), True
                    elif fmt == "jsonl" or len(buf) < MAX_SEARCH_BYTES:  # read on (a JSON line must be whole)
                        # The next search starts where more bytes could change its answer, not at `start` again:
                        # that made long runs without a cut (CJK text with CRLF endings or none) quadratic.
                        searched = _search_resume(buf, fmt)
                        want = 2 * len(buf)  # doubling: a long line is read in linear, not quadratic, time
                        continue
                    else:  # pathological: 64 MiB without a newline or a space between letters
                        cut, boundary = _char_boundary(buf, len(buf) - 1) or len(buf), False
            data, buf, searched = bytes(buf[:cut]), buf[cut:], 0
            ends_doc = boundary or (eof and not buf)
            yield Chunk(str(path), fmt, data, offset, line, starts_doc, ends_doc, compressed)
            offset, line, starts_doc, want = offset + cut, line + data.count(b"\n"), ends_doc, 2 * chunk_bytes
    source.sha256 = source._hash.hexdigest()


# ---- chunk -> document pieces (in workers) ------------------------------------------------------------------
def _decode(chunk: Chunk, data: bytes, start: int, errors: str) -> str:
    """Text of data (which starts at byte `start` of the chunk); strict errors name file, byte and line."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        at = start + err.start
        line = chunk.line + chunk.data.count(b"\n", 0, at)
        where = "decompressed byte" if chunk.compressed else "byte"
        raise DataError(f"{chunk.source}:{line}: invalid UTF-8 at {where} "
                        f"offset {chunk.offset + at} ({chunk.data[at:at + 4]!r}...); the file must be UTF-8, or "
                        "pass errors='replace' (preprocess --errors replace; training data.errors: replace) to "
                        "substitute U+FFFD") from None


def chunk_pieces(chunk: Chunk, *, text_key: str = "text", errors: str = "strict") -> tuple[list[str], list[bool], int]:
    """(texts, ends_doc flags, empty records skipped): the document pieces of a chunk, in order.

    Each piece is a whole document or part of one; ends_doc[i] says whether the document ends with piece i."""
    if chunk.format == "jsonl":
        return _jsonl_pieces(chunk, text_key, errors)
    first = len(_BOM) if chunk.offset == 0 and chunk.data.startswith(_BOM) else 0
    cuts = [first, *(p for p in document_boundaries(chunk.data, chunk.format) if p > first), len(chunk.data)]
    texts = [_decode(chunk, chunk.data[a:b], a, errors) for a, b in zip(cuts, cuts[1:]) if b > a]
    if chunk.offset == 0 and len(texts) > 1 and not texts[0].strip(_BLANK.decode()):
        texts[:2] = [texts[0] + texts[1]]  # blank lines before a file's first title/paragraph join it
    ends = [True] * len(texts)
    if texts and not chunk.ends_doc:
        ends[-1] = False
    return texts, ends, 0


def parse_json(text: str) -> Any:
    """json.loads, but a record with an integer longer than Python converts to int (4300 digits by default) reads
    its integers as Decimal: it is valid JSON, the integer most likely in a field nobody reads."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:
        return json.loads(text, parse_int=Decimal)


def _jsonl_pieces(chunk: Chunk, text_key: str, errors: str) -> tuple[list[str], list[bool], int]:
    texts, skipped = [], 0
    data = chunk.data[len(_BOM):] if chunk.offset == 0 and chunk.data.startswith(_BOM) else chunk.data
    try:
        lines, bad_utf8 = data.decode("utf-8", errors=errors).split("\n"), False
    except UnicodeDecodeError as err:
        # The lines before the bad byte are read first: the file's first bad line is the error, whatever chunk
        # size cut it.
        lines, bad_utf8 = data[:data.rfind(b"\n", 0, err.start) + 1].decode("utf-8").split("\n"), True
    for n, line in enumerate(lines):
        if not line.strip(" \t\r"):  # JSON's whitespace: a line of other spaces is malformed, not blank
            continue
        where = f"{chunk.source}:{chunk.line + n}"
        try:
            record = parse_json(line)
        except json.JSONDecodeError as err:
            hint = ("; this reader expects JSON Lines (one object per line), not a JSON array"
                    if line.lstrip().startswith("[") else "")
            raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno}){hint}") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a {text_key!r} field, got {type(record).__name__}")
        if text_key not in record:
            raise DataError(f"{where}: no {text_key!r} field (fields: {', '.join(record) or 'none'}); "
                            "choose the field with text_key (--text-key)")
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_key!r} is {type(text).__name__}, expected a string")
        if "\\u" in line and _SURROGATE.search(text):
            # A lone surrogate escape ("\ud800") is no character: U+FFFD, as tiktoken encodes it (the tokenizers
            # library, which trains vocabularies, cannot take it at all).
            text = _SURROGATE.sub("\ufffd", text)
        if text:
            texts.append(text)
        else:
            skipped += 1
    if bad_utf8:
        _decode(chunk, chunk.data, 0, errors)  # the error, naming the bad byte
    return texts, [True] * len(texts), skipped


def check_reading_options(sources: Sequence[Source], text_key: str, errors: str) -> None:
    """ValueError for reading options these sources would not use as asked: an unknown `errors`, or a
    `text_key` with no JSON lines among them (it would be silently unused)."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if text_key != "text" and not any(s.format == "jsonl" for s in sources):
        raise ValueError(f"text_key {text_key!r} names the field of JSON lines input; none of the inputs is read as "
                         f"jsonl ({', '.join(sorted({s.format for s in sources}))})")


def iter_texts(sources: Sequence[Source], *, chunk_bytes: int = 1 << 22, text_key: str = "text",
               errors: str = "strict") -> Iterator[tuple[str, bool]]:
    """(piece, whether its document ends with it) for the document pieces of all sources in order, in this
    process (e.g. to train a tokenizer)."""
    for source in sources:
        for chunk in iter_chunks(source, chunk_bytes):
            texts, ends, _ = chunk_pieces(chunk, text_key=text_key, errors=errors)
            yield from zip(texts, ends)
