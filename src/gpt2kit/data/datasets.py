"""Datasets for training: language-model windows over token shards, classification, instructions.

`PretrainingDataset` reads the output of `gpt2kit preprocess` (see docs/data.md for the layout) through
memory maps, so an item costs one slice however large the corpus. `ResumableSampler` gives the order: its
whole state is (seed, epoch, position), which is what exact resume after an interruption needs.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..conversation import ChatFormat, turns_of
from ..files import read_json, read_utf8, require_file
from ..tokenizer import GPT2Tokenizer
from .readers import DataError, parse_json

META_FILE = "meta.json"
FORMAT_NAME = "gpt2kit-tokens"


# ---- pretraining ---------------------------------------------------------------------------------------------
def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of a preprocessed directory, checked to be one."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE}; expected a directory written by `gpt2kit preprocess`")
    meta = read_json(meta_path, error=DataError)
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    return meta


def load_tokenizer(path: str | os.PathLike) -> GPT2Tokenizer:
    """The tokenizer a preprocessed directory was made with (bundled GPT-2, or the copy saved inside it)."""
    spec = read_meta(path)["tokenizer"]
    if spec["name"] == "gpt2":
        return GPT2Tokenizer.gpt2()
    return GPT2Tokenizer.from_file(Path(path) / spec["file"])


class PretrainingDataset(Dataset):
    """Windows of `seq_len + 1` tokens with stride `seq_len` over one split of a preprocessed directory.

    Item i covers tokens [i*seq_len, (i+1)*seq_len]; `input_ids` is its first seq_len tokens and `targets`
    its last seq_len (already aligned: targets[t] follows input_ids[t]), so every token after the first is a
    target at most once (all but the last (n - 1) mod seq_len, which fill no whole window). Windows run across
    document boundaries (the EOS between documents is in the stream).
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, split: str = "train") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.path = Path(path)
        self.meta = read_meta(path)
        if split not in self.meta["splits"]:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(self.meta['splits'])})")
        self.split, self.seq_len = split, seq_len
        info = self.meta["splits"][split]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._files = [self.path / shard["file"] for shard in info["shards"]]
        for file, shard in zip(self._files, info["shards"]):  # a truncated copy would give short windows
            size = file.stat().st_size if file.is_file() else None
            if size != shard["tokens"] * self.dtype.itemsize:
                found = "missing" if size is None else f"{size} bytes"
                raise DataError(f"{file}: {found}, but meta.json records {shard['tokens']} tokens "
                                f"({shard['tokens'] * self.dtype.itemsize} bytes); copy the whole directory again")
        self._starts = [0]  # token offset at which each shard starts
        for shard in info["shards"]:
            self._starts.append(self._starts[-1] + shard["tokens"])
        self.n_tokens = self._starts[-1]
        if self.n_tokens < seq_len + 1:
            raise DataError(f"{path}: split {split!r} has {self.n_tokens} tokens, fewer than one window of "
                               f"seq_len + 1 = {seq_len + 1}")
        self._shards: list[np.ndarray] | None = None

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    def _open(self) -> list[np.ndarray]:
        if self._shards is None:  # opened lazily so that DataLoader workers each map the files themselves
            self._shards = [np.memmap(f, dtype=self.dtype, mode="r") for f in self._files]
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would copy the whole shard into every worker; reopen the files instead.
        return {**self.__dict__, "_shards": None}

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) out of range for the {self.n_tokens} tokens of split "
                             f"{self.split!r}")
        shards, parts = self._open(), []
        k = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            end = min(stop, self._starts[k + 1])
            parts.append(shards[k][start - self._starts[k]:end - self._starts[k]])
            start, k = end, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def document_offsets(self) -> np.ndarray:
        """Start offset of every document in the split's token stream, then the total (int64, length docs+1)."""
        return np.memmap(self.path / self.meta["splits"][self.split]["index"], dtype="<i8", mode="r")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens(start, start + self.seq_len + 1).astype(np.int64))
        return {"input_ids": window[:-1], "targets": window[1:]}


def examples_fingerprint(dataset: Dataset, samples: int = 16) -> str:
    """sha256 of `samples` examples spread evenly over `dataset` (dicts of tensors or lists, or tensors): what a
    checkpoint records to tell other data of the same size from the data it was trained on."""
    digest, n = hashlib.sha256(), len(dataset)
    for i in sorted({k * (n - 1) // max(samples - 1, 1) for k in range(samples)} if n else ()):
        example = dataset[i]
        for key, value in sorted(example.items()) if isinstance(example, dict) else [("", example)]:
            digest.update(f"{i}:{key}:".encode() + torch.as_tensor(value).numpy().tobytes())
    return digest.hexdigest()


class ResumableSampler(Sampler[int]):
    """Deterministic order over `num_samples` items whose whole state is (seed, epoch, position).

    The permutation of an epoch depends only on (seed, epoch). An epoch uses its first floor(n / B) x B items,
    B = `batch_size`, the global batch of one optimizer step (a multiple of `world_size`): steps never straddle
    two epochs, so any number of ranks puts the same items in each step. With `world_size` ranks, rank r takes
    positions r, r + W, r + 2W, ... of those, so ranks are disjoint and equally long. `position` counts this
    rank's samples already consumed; the trainer reports them with `advance(n)` because DataLoader prefetching
    means the sampler cannot tell what was consumed from what was merely fetched.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        batch_size = world_size if batch_size is None else batch_size
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size ({world_size}), got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples are fewer than one batch of {batch_size}")
        self.num_samples, self.shuffle, self.rank, self.world_size = num_samples, shuffle, rank, world_size
        self.per_rank = num_samples // batch_size * batch_size // world_size
        self.seed, self.epoch, self.position = seed, 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"position {position} outside 0..{self.per_rank}")
        self.epoch, self.position = epoch, position

    def advance(self, n: int) -> None:
        """Mark n more samples of this rank as consumed."""
        if n < 0 or self.position + n > self.per_rank:
            raise ValueError(f"cannot advance by {n} from position {self.position}: the epoch has {self.per_rank}"
                             " samples per rank; call set_epoch for the next epoch")
        self.position += n

    def indices(self) -> np.ndarray:
        """This rank's full order for the current epoch."""
        if self.shuffle:  # a (seed, epoch) pair seeds the generator: no collisions between e.g. (0, 1) and (1, 0)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[:self.per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.position:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.position

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), int(state["position"]))


# ---- classification -----------------------------------------------------------------------------------------
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
CLASSIFICATION_FORMATS = ("sst2", "cola", "agnews", "csv")
INSTRUCTION_FORMATS = ("alpaca", "chat")  # InstructionDataset's records, ChatDataset's conversations
_KNOWN_NAMES = {"sst2": ("negative", "positive"), "cola": ("unacceptable", "acceptable"), "agnews": AG_NEWS_CLASSES}
_TEXT_COLUMNS = ("text", "sentence", "review", "content", "document")
# GLUE's pair tasks name theirs Quality (MRPC), is_duplicate (QQP) and gold_label (MNLI, SNLI).
_LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "quality", "is_duplicate", "gold_label")


def _sniff_format(path: Path, text: str) -> str:
    """sst2 / cola / agnews / csv from the suffix and the first line of the file's `text`."""
    first = text.splitlines()[0] if text else ""
    if path.suffix.lower() == ".tsv":
        fields = first.rstrip("\r\n").split("\t")
        if len(fields) == 4 and fields[1] in ("0", "1"):
            return "cola"
        return "sst2"
    row = next(csv.reader([first]), [])
    if len(row) == 3 and row[0].strip() in ("1", "2", "3", "4"):
        return "agnews"
    return "csv"


def _pick_column(header: list[str], wanted: Sequence[str], what: str, path: Path) -> int:
    """The first of the `wanted` column names in the header, in any case."""
    lowered = [h.strip().lower() for h in header]
    for name in wanted:
        if name.strip().lower() in lowered:
            return lowered.index(name.strip().lower())
    raise DataError(f"{path}:1: no {what} column in header {header}; expected one of {', '.join(wanted)}")


_CSV_LIMIT_LOCK = threading.Lock()


def _read_examples(path: Path, fmt: str, text: str, columns: Sequence[str] | None) -> list[tuple[int, str, str]]:
    """(line number, text, raw label) per example of the file's `text`; `columns` names the text column, or the
    two of a sentence pair, of a file with a header."""
    # The csv module refuses fields above 128 KiB by default (a long document's text): no field is longer than
    # the file, so that is the limit while this file is read.
    # The limit is process-wide: readers in other threads take turns.
    with _CSV_LIMIT_LOCK:
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, min(len(text), 2 ** 31 - 1)))
        try:
            return _parse_examples(path, fmt, text, columns)
        except csv.Error as err:  # not a ValueError
            raise DataError(f"{path}: not readable as {fmt} ({err})") from None
        finally:
            csv.field_size_limit(limit)


def _parse_examples(path: Path, fmt: str, text: str, columns: Sequence[str] | None) -> list[tuple[int, str, str]]:
    if columns and fmt not in ("sst2", "csv"):
        raise DataError(f"{path}: text columns are chosen in a file with a header (csv, or a tsv with one), not in "
                        f"{fmt}'s fixed columns")
    examples = []
    with io.StringIO(text, newline="") as f:
        if fmt in ("sst2", "cola"):
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            rows = csv.reader(f)
        if fmt in ("sst2", "csv"):
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: empty file; expected a header line")
            text_cols = ([_pick_column(header, (name,), "text", path) for name in columns] if columns
                         else [_pick_column(header, _TEXT_COLUMNS, "text", path)])
            label_col = _pick_column(header, _LABEL_COLUMNS, "label", path)
            width = len(header)
        else:
            width = 4 if fmt == "cola" else 3
        end = rows.line_num
        for row in rows:
            line, end = end + 1, rows.line_num  # a record's first line (a quoted field may span several)
            if not row:
                continue
            if len(row) != width:
                kind = "tab-separated" if fmt in ("sst2", "cola") else "comma-separated"
                raise DataError(f"{path}:{line}: expected {width} {kind} columns ({fmt} format), got {len(row)}")
            if fmt == "cola":  # source, label, original mark, sentence
                examples.append((line, row[3].strip(), row[1]))
            elif fmt == "agnews":  # class 1-4, title, description
                examples.append((line, f"{row[1].strip()} {row[2].strip()}", row[0]))
            else:  # a sentence pair is one text, its sentences on lines of their own
                joined = row[text_cols[0]] if len(text_cols) == 1 else "\n".join(row[c].strip() for c in text_cols)
                examples.append((line, joined, row[label_col]))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def unnamed_classes(names: Sequence[str]) -> bool:
    """Class names that name nothing: "0", "1", ... (gpt2kit's default) or "LABEL_0", "LABEL_1", ...
    (transformers' for three or more classes)."""
    names = list(names)
    return names in ([str(i) for i in range(len(names))], [f"LABEL_{i}" for i in range(len(names))])


def _ids_by_name(ids: list[int], classes: list[str], names: list[str], where: str) -> list[int]:
    """Ids of `classes` (a format's fixed classes, in its numbering) as positions among `names` (a model's classes,
    in its output order), matched by name ignoring case (transformers' models often write NEGATIVE/POSITIVE);
    -1 stays -1 (out of range, reported by the caller)."""
    position = {name.casefold(): i for i, name in enumerate(names)}
    order = [position.get(name.casefold()) for name in classes]
    if None in order:
        raise DataError(f"{where} labels its classes {', '.join(classes)}; the model (or label_names) names "
                        f"{', '.join(names)}: rename the model's classes (config.json id2label) to match")
    return [order[i] if 0 <= i < len(order) else -1 for i in ids]


class ClassificationDataset(Dataset):
    """Sentence classification examples: `{"input_ids": LongTensor[L], "labels": int}`.

    Formats: "sst2" (tsv, header `sentence\\tlabel`), "cola" (tsv, no header: source, label, mark, sentence),
    "agnews" (csv, no header: class 1-4, title, description; labels become 0-3 and the text is
    "title description"), "csv" (header with a text column and a label column, e.g. IMDB's review,sentiment).
    In a file with a header, `text_columns` names the text column, or the two columns of a sentence pair (GLUE's
    sentence1, sentence2), joined by a newline; by default the first of text, sentence, review, content, document.
    Integer labels are used as ids; string labels map to ids through `label_names` (their order), or sorted.
    `num_labels`: with integer labels and no names, the number of classes (a model's outputs; default the
    largest label + 1, which a file lacking the last class would undercount).
    """

    def __init__(self, path: str | os.PathLike, tokenizer: GPT2Tokenizer, *, format: str = "auto",
                 max_length: int | None = None, label_names: Sequence[str] | None = None,
                 num_labels: int | None = None, text_columns: Sequence[str] | None = None) -> None:
        path = require_file(path, "classification file")
        if text_columns is not None and not 1 <= len(text_columns) <= 2:
            raise ValueError(f"text_columns: one column, or the two of a sentence pair, got {list(text_columns)}")
        text = read_utf8(path, error=DataError, newlines=False)  # the csv module reads quoted newlines itself
        fmt = _sniff_format(path, text) if format == "auto" else format
        if fmt not in CLASSIFICATION_FORMATS:
            raise ValueError(f"format must be auto or one of {', '.join(CLASSIFICATION_FORMATS)}, got {format!r}")
        self.path, self.format = path, fmt
        examples = _read_examples(path, fmt, text, text_columns)
        raw_labels = [label.strip() for _, _, label in examples]
        for (line, _, _), label in zip(examples, raw_labels):
            if not label:  # would otherwise make the labels strings and renumber every class
                raise DataError(f"{path}:{line}: empty label")
        integers = [re.fullmatch(r"-?[0-9]+", label) is not None for label in raw_labels]
        numeric = all(integers)
        names = list(label_names) if label_names is not None else None
        offset = 1 if fmt == "agnews" else 0  # AG News numbers its classes from 1
        known = _KNOWN_NAMES.get(fmt)
        if fmt == "agnews":
            classes = path.with_name("classes.txt")
            known = ([c.strip() for c in read_utf8(classes, error=DataError).splitlines() if c.strip()]
                     if classes.is_file() else list(AG_NEWS_CLASSES))
        if fmt == "sst2" and not set(raw_labels) <= {"0", "1"} and (numeric or not any(integers)):
            known = None  # another headered TSV: its own labels (more classes, or names), like a CSV's
        default_names = label_names is not None and unnamed_classes(label_names)
        if known and label_names is not None and len(label_names) != len(known) and not default_names:
            # A format with fixed classes read for other named ones (e.g. a 4-class AG News model on SST-2). Names
            # 0, 1, 2, ... are another headered TSV's classes, of which a small dev set may lack some.
            raise DataError(f"{path}: {fmt} has {len(known)} classes ({', '.join(known)}), but it is read for "
                            f"{len(label_names)} ({', '.join(map(str, label_names))}: the model's labels, or "
                            f"label_names)")
        if not (known or numeric or names) and any(integers):  # sorted as words, "10" would come before "2"
            line, label = next((line, label) for (line, _, _), label, is_int in zip(examples, raw_labels, integers)
                               if not is_int)
            raise DataError(f"{path}:{line}: label {label!r} is not an integer, but other labels are")
        if known or numeric:  # integer labels are ids (in SST-2/CoLA/AG News a word among them is an error below)
            ids = [int(label) - offset if is_int else -1 for label, is_int in zip(raw_labels, integers)]
            if known and names and not default_names:  # the format's classes, mapped onto the model's by name
                expected = f"an integer in {offset}..{len(known) - 1 + offset}"
                ids = _ids_by_name(ids, list(known), names, f"{path}: {fmt}")
            else:
                names = names or list(known or []) or [str(i) for i in range(num_labels or max(ids) + 1)]
                expected = f"an integer in {offset}..{len(names) - 1 + offset}"
        else:  # string labels map to ids by their position in label_names, else sorted
            names = names or sorted(set(raw_labels))
            lookup = {name: i for i, name in enumerate(names)}
            ids = [lookup.get(label, -1) for label in raw_labels]
            expected = f"one of {names}"
        for (line, _, label), label_id in zip(examples, ids):
            if not 0 <= label_id < len(names):
                raise DataError(f"{path}:{line}: label {label!r} is not {expected}")
        for line, text, _ in examples:
            if not text.strip():
                raise DataError(f"{path}:{line}: empty text")
        self.id2label = dict(enumerate(names))
        self.label2id = {name: i for i, name in self.id2label.items()}
        self.num_labels = len(names)
        self.labels = ids
        # Whether the ids follow class names (string labels, or a format's fixed classes such as SST-2's), not
        # bare integers: read for a model that orders the same classes otherwise, they would be scored wrongly.
        self.named_classes = bool(known) or not numeric
        self.input_ids = encode_classification_texts(tokenizer, [text for _, text, _ in examples], max_length)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": torch.tensor(self.input_ids[index], dtype=torch.long), "labels": self.labels[index]}


def encode_classification_texts(tokenizer: GPT2Tokenizer, texts: Sequence[str], max_length: int | None
                                ) -> list[list[int]]:
    """How a classification text becomes ids, in training and prediction alike: stripped (SST-2 sentences end
    with a space, which would be the token the classifier pools), encoded, cut to `max_length` tokens."""
    texts = [text.strip() for text in texts]
    empty = next((i for i, text in enumerate(texts) if not text), None)
    if empty is not None:  # nothing to pool: the classifier reads the last real token
        raise ValueError(f"text {empty} is empty (only whitespace); a classifier needs at least one token")
    rows = tokenizer.encode_batch(texts)
    return rows if max_length is None else [row[:max_length] for row in rows]


# ---- instructions -------------------------------------------------------------------------------------------
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (Taori et al. 2023) that precedes the response."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(parse_json(text), dict)
    except ValueError:
        return False


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) from a JSON list or JSON lines."""
    text = read_utf8(path, error=DataError)
    if text.lstrip().startswith("["):
        try:
            records = parse_json(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
        located = [(f"{path}: record {i}", r) for i, r in enumerate(records)]
    else:
        located = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    located.append((f"{path}:{n}", parse_json(line)))
                except json.JSONDecodeError as err:
                    if _is_one_object(text):
                        raise DataError(f"{path}: one JSON object; expected a JSON list of records or JSON lines "
                                        f"(one object per line)") from None
                    raise DataError(f"{path}:{n}: malformed JSON: {err.msg} (column {err.colno})") from None
    if not located:
        raise DataError(f"{path}: no records")
    return located


class _ResponseExamples(Dataset):
    """Token sequences of which only some tokens are learned (responses), returned shifted: `input_ids` =
    sequence[:-1], `targets` = sequence[1:] with -100 at every token not learned. Sequences longer than
    `max_length + 1` tokens are cut at the end; one left with nothing to learn is left out (counted in
    `.skipped`)."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.examples: list[tuple[list[int], list[bool]]] = []  # (token ids, learned)
        self.skipped = 0

    def _add(self, ids: list[int], learned: list[bool]) -> None:
        """One example: its token ids and which of them are learned."""
        ids, learned = ids[:self.max_length + 1], learned[:self.max_length + 1]
        if not any(learned[1:]):  # the first token is never a target
            self.skipped += 1
            return
        self.examples.append((ids, learned))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, learned = self.examples[index]
        sequence = torch.tensor(ids, dtype=torch.long)
        targets = sequence[1:].masked_fill(~torch.tensor(learned[1:]), -100)  # targets[t] is token t+1
        return {"input_ids": sequence[:-1], "targets": targets}


class InstructionDataset(_ResponseExamples):
    """Alpaca-style instruction data (json list or jsonl of {instruction, input, output}).

    Each example is prompt + output + EOS; the loss covers the response and its EOS only (see
    _ResponseExamples: an example whose prompt alone is longer than `max_length` is left out).
    """

    def __init__(self, path: str | os.PathLike, tokenizer: GPT2Tokenizer, *, max_length: int) -> None:
        super().__init__(max_length)
        path = require_file(path, "instruction file")
        for where, record in _read_records(path):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object with instruction/input/output")
            for key in ("instruction", "output"):
                if not isinstance(record.get(key), str):
                    raise DataError(f"{where}: missing or non-string {key!r} (keys: {', '.join(record)})")
            if not isinstance(record.get("input", ""), str):
                raise DataError(f"{where}: 'input' must be a string")
            prompt = tokenizer.encode(alpaca_prompt(record["instruction"], record.get("input", "")))
            response = tokenizer.encode(record["output"]) + [tokenizer.eos_token_id]
            self._add(prompt + response, [False] * len(prompt) + [True] * len(response))


class ChatDataset(_ResponseExamples):
    """Conversations (json list or jsonl of {"messages": [{"role", "content"}, ...]}, OpenAI's and transformers'
    chat format) written in the tokenizer's chat format (gpt2kit.conversation: its chat_template, else the plain
    transcript), as chat, the server and apply_chat_template write them; the loss covers the assistant's
    messages only.

    An assistant message's text is what the template's {% generation %} tag marks, as transformers' assistant
    mask has it; without the tag, what the conversation up to that message adds to the one before it rendered
    with the generation prompt: its content and whatever the template closes it with (an end-of-turn token, a
    newline), so the model learns to end its turns as the template does. A token is learned when any of its text
    lies in such a span. A conversation ending with the assistant's message also learns EOS after it, unless the
    template closes turns with a token of its own (ChatFormat.end_of_turn, where chat stops). It is tokenized
    whole (a template's special tokens as their ids), as chat tokenizes the history it continues. A template that
    renders an earlier part of a conversation other than as the start of the whole cannot be learned without the
    tag: a DataError naming the record.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: GPT2Tokenizer, *, max_length: int) -> None:
        super().__init__(max_length)
        path = require_file(path, "chat file")
        chat = tokenizer.chat_format()
        for where, record in _read_records(path):
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: expected an object with a non-empty 'messages' list (got {keys})")
            try:
                turns = turns_of(messages)
                whole, replies = _assistant_spans(chat, turns)
            except ValueError as err:
                raise DataError(f"{where}: {err}") from None
            if not replies:
                raise DataError(f"{where}: no assistant message to learn")
            ids, learned = chat.encode_marked(tokenizer, whole, replies)
            if turns[-1][0] == "assistant" and not chat.end_of_turn and ids[-1:] != [tokenizer.eos_token_id]:
                ids, learned = ids + [tokenizer.eos_token_id], learned + [True]
            self._add(ids, learned)


def _assistant_spans(chat: ChatFormat, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """A conversation's text and the character spans of what the assistant writes in it (see ChatDataset)."""
    if chat.generation_spans is not None:
        return chat.generation_spans(turns, False)
    whole = chat.transcript(turns, add_generation_prompt=False)
    replies: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        prompt = chat.transcript(turns[:i], add_generation_prompt=True)
        upto = chat.transcript(turns[:i + 1], add_generation_prompt=False)
        after = replies[-1][1] if replies else 0
        if not (upto.startswith(prompt) and whole.startswith(upto) and len(prompt) >= after):
            raise ValueError(f"the chat template does not write the conversation up to message {i} as the start "
                             "of the whole, so its replies cannot be told apart (a {% generation %} tag would)")
        replies.append((len(prompt), len(upto)))
    return whole, replies


# ---- batching -----------------------------------------------------------------------------------------------
def collate(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of items into a batch: input_ids (pad id), attention_mask, targets (-100), labels.
    Items in transformers' causal-LM form work too: `labels` a sequence aligned with input_ids (-100 where
    ignored) becomes targets shifted by one, and an item's own attention_mask (0 at its padding) is kept."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    lm_labels = "targets" not in batch[0] and "labels" in batch[0] and torch.as_tensor(batch[0]["labels"]).dim() == 1
    if "targets" in batch[0] or lm_labels:
        out["targets"] = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[i, :n] = torch.as_tensor(item["input_ids"])
        attention_mask[i, :n] = torch.as_tensor(item["attention_mask"]) if "attention_mask" in item else 1
        if lm_labels:  # targets[t] = labels[t + 1]: the token after position t
            out["targets"][i, :n - 1] = torch.as_tensor(item["labels"])[1:n]
        elif "targets" in out:
            out["targets"][i, :n] = torch.as_tensor(item["targets"])
    if "labels" in batch[0] and not lm_labels:
        out["labels"] = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
    return out
