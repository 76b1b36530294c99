"""GPT2Tokenizer: OpenAI's byte-level BPE on the tiktoken engine, from files shipped in the package.

Every vocabulary runs on tiktoken (about 9x faster than HF `tokenizers` for GPT-2 BPE): the bundled GPT-2
files (encoder.json + vocab.bpe), any tiktoken rank file (e.g. cl100k_base.tiktoken), and any byte-level BPE
`tokenizer.json` (HF's, or one trained with `train_bpe`), converted to tiktoken ranks on load.

Special tokens in raw text: `encode` treats text such as "<|endoftext|>" as ordinary characters, so text from
users or corpora can never inject a control token. Pass `allowed_special="all"` to map them to their ids, or
append `eos_token_id` yourself to separate documents. Tokens added as ordinary ones (`add_tokens`, transformers'
call) are matched wherever they occur, as transformers matches them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import regex
import tiktoken

from .conversation import PLAIN, ChatFormat, chat_format, turns_of
from .files import atomic_file, atomic_write_text, read_json, read_utf8, sha256_file

ASSETS = Path(__file__).parent / "assets" / "gpt2"
ENDOFTEXT = "<|endoftext|>"
GPT2_CONTEXT = 1024  # positions of the released GPT-2 models: the tokenizer's default model_max_length
NO_LIMIT = 10 ** 20  # transformers' LARGE_INTEGER: a model_max_length from here on (int(1e30)) means none
# End-of-text tokens of other vocabularies, in the order they are looked for when <|endoftext|> is absent.
EOS_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<|eot_id|>", "<|im_end|>", "<eos>", "<|eos|>")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])
# Special tokens and split patterns of OpenAI's rank files, which (as published) hold only the mergeable ranks.
# Another .tiktoken file gets cl100k_base's pattern and <|endoftext|> after its highest rank.
_TIKTOKEN_SPECIALS = {
    "r50k_base": ({ENDOFTEXT: 50256}, GPT2_PATTERN),
    "p50k_base": ({ENDOFTEXT: 50256}, GPT2_PATTERN),
    "cl100k_base": ({ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                     "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}, CL100K_PATTERN),
    "o200k_base": ({ENDOFTEXT: 199999, "<|endofprompt|>": 200018}, O200K_PATTERN),
}
ROLES = ("eos_token", "bos_token", "unk_token", "pad_token")  # the tokens a tokenizer_config.json names by role
MAX_ID = 2 ** 32  # tiktoken stores ids as unsigned 32-bit integers
_BUNDLED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class TokenizerError(ValueError):
    """A vocabulary file that cannot be used, with the reason."""


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by encoder.json and tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def token_string(data: bytes) -> str:
    """A token's bytes as vocab.json, merges.txt and transformers spell them (" world" is "Ġworld")."""
    to_text = byte_to_unicode()
    return "".join(to_text[b] for b in data)


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _token_bytes(token: str, source: Path) -> bytes:
    to_byte = _unicode_to_byte()  # built once: this runs for every vocabulary entry
    try:
        return bytes(to_byte[c] for c in token)
    except (KeyError, TypeError):
        raise TokenizerError(f"{source}: token {token!r} is not in GPT-2's byte-level alphabet; expected a "
                             "byte-level BPE vocabulary") from None


def portable_pattern(pattern: str) -> str:
    """`pattern` as HF tokenizers' Oniguruma reads it the way tiktoken does: Oniguruma takes cl100k's possessive
    "\\p{N}{1,3}+" for "one or more runs of 1-3 digits"; as a whole alternative, "{1,3}" splits alike in both."""
    return pattern.replace("{1,3}+", "{1,3}")


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that made `token`: its bytes merged, lowest rank first, with the merges ranked below it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        rank, at = min((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1))
        if rank >= limit:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"token {token!r} (id {limit}) is not the merge of two lower-ranked tokens; a "
                             "byte-level BPE whose ids follow merge order is needed")
    return parts[0], parts[1]


def _read_json(path: Path) -> Any:
    try:
        return read_json(path, error=TokenizerError)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None


def _vocab_object(vocab: Any, source: Path, what: str) -> dict[str, int]:
    """`vocab` if it maps token strings to integer ids, else an error naming `source` and `what` holds it."""
    if not (isinstance(vocab, dict) and all(type(i) is int for i in vocab.values())):
        raise TokenizerError(f"{source}: {what} must be a JSON object of token -> integer id")
    return vocab


def _ranks_from_vocab(vocab: dict[str, int], merges: Iterable[str | Sequence[str]], specials: set[str],
                      source: Path, trusted: bool = False) -> tuple[dict[bytes, int], set[bytes]]:
    """tiktoken ranks from a byte-level BPE vocab + merge list. tiktoken merges the pair whose result has the
    lowest rank, so ranks (= ids) must grow in merge order; that holds for GPT-2 and for BPE-trained vocabs.
    `trusted` files (the bundled GPT-2 ones, checked by hash) skip the check that every merge is the one
    tiktoken makes (about 10 microseconds per merge). Returns the ranks and the tokens the merges make."""
    listed = []
    for n, merge in enumerate(merges, 1):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TokenizerError(f"{source}: merge {n} is {merge!r}; expected two tokens (\"a b\" or [\"a\", \"b\"])")
        listed.append(pair)
    # An added token stays a BPE token too when BPE needs it (a single byte, or a merge's result): transformers
    # registers a vocabulary token made special (pad_token "!") under its id.
    needed = {left + right for left, right in listed} if specials & vocab.keys() else set()
    ranks = {_token_bytes(tok, source): i for tok, i in vocab.items()
             if tok not in specials or tok in needed or (len(tok) == 1 and tok in _unicode_to_byte())}
    _require_distinct_ids(ranks, {}, source)  # before the merges: a shared id would pass for merge order
    last = -1
    pairs = []
    for n, pair in enumerate(listed, 1):
        left, right = _token_bytes(pair[0], source), _token_bytes(pair[1], source)
        rank = ranks.get(left + right)
        if rank is None or rank <= last:
            raise TokenizerError(f"{source}: merge {n} ({pair[0]!r} {pair[1]!r}) does not follow the vocabulary's id "
                                 "order; only byte-level BPE vocabularies whose ids follow merge order are supported")
        last = rank
        pairs.append((left, right))
    _require_single_bytes(ranks, f"{source}: the vocabulary")
    made = {left + right for left, right in pairs}
    if trusted:
        return ranks, made
    # transformers joins only listed pairs, tiktoken any adjacent pair whose result is a token (lowest rank
    # first): the two agree when tiktoken, run on a token's own bytes, builds it from its listed merge.
    for n, (left, right) in enumerate(pairs, 1):
        built = _split_in_two(ranks, left + right)
        if built != (left, right):
            shown = [" ".join(token_string(part) for part in pair) for pair in ((left, right), built)]
            raise TokenizerError(f"{source}: merge {n} ({shown[0]!r}) makes a token that tiktoken would build from "
                                 f"{shown[1]!r}; the ids would differ from transformers'")
    return ranks, made


def _stamp(*paths: str) -> tuple:
    """Part of a loaded vocabulary's cache key: a file rewritten since it was read (a tokenizer retrained into
    the same directory) is read again."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)  # the loader reports the missing file
        else:
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


@functools.lru_cache(maxsize=32)
def _gpt2_encoding(encoder_json: str, vocab_bpe: str, verify: bool, stamp: tuple) -> tiktoken.Encoding:
    encoder_path, merges_path = Path(encoder_json), Path(vocab_bpe)
    # The bundled files must be OpenAI's; copies of them (a model directory gpt2kit saved) are trusted alike.
    for path, name in ((encoder_path, "encoder.json"), (merges_path, "vocab.bpe")):
        digest = sha256_file(path) if path.is_file() else None  # a missing file is reported when it is read
        trusted = digest == _BUNDLED_SHA256[name]
        if verify and not trusted:
            raise TokenizerError(f"{path}: sha256 {digest} differs from OpenAI's GPT-2 file; reinstall gpt2kit")
        if not trusted:
            break
    encoder = _vocab_object(_read_json(encoder_path), encoder_path, "the file")
    try:
        merge_lines = merges_path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise TokenizerError(f"{merges_path}: file not found") from None
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{merges_path}: not UTF-8 text ({err})") from None
    # Optional "#version: 0.2" header, skipped as transformers skips it; every other non-empty line is a merge.
    merges = [line for n, line in enumerate(merge_lines) if line and not (n == 0 and line.startswith("#version"))]
    specials = {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {}
    ranks, made = _ranks_from_vocab(encoder, merges, set(specials), merges_path, trusted=trusted)
    if not trusted:  # transformers builds every token of vocab.json + merges.txt from the merges
        _require_merged(ranks, made, GPT2_PATTERN, merges_path, f" (in {encoder_path.name} + {merges_path.name})")
    return _encoding("gpt2", GPT2_PATTERN, ranks, specials, encoder_path)


def _require_single_bytes(ranks: dict[bytes, int], where: str) -> None:
    missing = 256 - sum(len(token) == 1 for token in ranks)
    if missing:
        raise TokenizerError(f"{where} lacks {missing} of the 256 single-byte tokens that byte-level BPE needs to "
                             "encode any text")


def _require_merged(ranks: dict[bytes, int], made: set[bytes], pattern: str, source: Path, context: str) -> None:
    """transformers builds every multi-byte token from the merges; tiktoken takes a piece found in the vocabulary
    whole, so a token no merge makes would be emitted by gpt2kit only. Tokens the split pattern never leaves
    whole (e.g. "<|pad|>", split into "<|", "pad", "|>") cannot be emitted, so they do not count."""
    def one_piece(token: bytes) -> bool:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: it could sit inside any piece
            return True
        return regex.findall(pattern, text) == [text]

    unmerged = [token for token in ranks if len(token) > 1 and token not in made and one_piece(token)]
    if unmerged:
        raise TokenizerError(f"{source}: {len(unmerged)} multi-byte tokens (e.g. {unmerged[0]!r}) are made by no "
                             f"merge{context}; gpt2kit needs every token that text can produce to come from a merge")


def _require_distinct_ids(ranks: dict[bytes, int], specials: dict[str, int], source: Path) -> None:
    """Ids tiktoken can hold: integers in [0, 2**32), no two tokens (ordinary or special) sharing one, except a
    vocabulary token registered as an added token under its id (transformers matches the text of an added token
    that vocab.json spells alike, "!" or "Ġhello", to that token's id)."""
    ids = [*ranks.values(), *specials.values()]
    if not ids or (len(set(ids)) == len(ids) and 0 <= min(ids) and max(ids) < MAX_ID):
        return  # most loads pass here; the loop below finds the token to name, or the shared ids allowed
    owner: dict[int, tuple[str, str]] = {}  # id -> (token as named in errors, as vocab.json spells it)
    for token, i, spelled in [*((repr(t), i, token_string(t)) for t, i in ranks.items()),
                              *((repr(t), i, t) for t, i in specials.items())]:
        if not 0 <= i < MAX_ID:
            raise TokenizerError(f"{source}: token {token} has id {i}; ids must lie in [0, {MAX_ID})")
        if i in owner and owner[i][1] != spelled:
            raise TokenizerError(f"{source}: tokens {owner[i][0]} and {token} share id {i}; ids must be distinct")
        owner[i] = (token, spelled)


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int],
              source: Path) -> tiktoken.Encoding:
    """The tiktoken encoding of checked ranks and special tokens; errors name `source`."""
    _require_distinct_ids(ranks, specials, source)
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as err:  # the split regex does not compile
        raise TokenizerError(f"{source}: split pattern {pattern!r}: {err}") from None


def _pattern_of(pre_tokenizer: dict[str, Any] | None, source: Path) -> str:
    """The split regex of a byte-level pre-tokenizer in tokenizer.json: GPT-2's ByteLevel (its own regex), or one
    Split regex ("Isolated" pieces, as tiktoken finds them) followed by a ByteLevel that only maps bytes. Any
    other step would split the text differently from tiktoken, so it is refused."""
    if pre_tokenizer is None:
        raise TokenizerError(f"{source}: no pre_tokenizer; expected a byte-level BPE tokenizer")
    if not isinstance(pre_tokenizer, dict):
        raise TokenizerError(f"{source}: pre_tokenizer must be an object, got {pre_tokenizer!r}")
    parts = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not (isinstance(parts, list) and all(isinstance(part, dict) for part in parts)):
        raise TokenizerError(f"{source}: pre_tokenizer.pretokenizers must be a list of objects")
    if any(part.get("add_prefix_space") for part in parts):
        raise TokenizerError(f"{source}: pre_tokenizer: add_prefix_space is true (a space before the text); "
                             "gpt2kit runs tokenizers without it")
    kinds = [(part.get("type"), part.get("use_regex", True)) for part in parts]
    if kinds == [("ByteLevel", True)]:
        return GPT2_PATTERN
    split = parts[0]
    if (kinds == [("Split", True), ("ByteLevel", False)] and isinstance(split.get("pattern"), dict)
            and isinstance(split["pattern"].get("Regex"), str) and split.get("behavior") == "Isolated"
            and not split.get("invert", False)):
        return split["pattern"]["Regex"]
    steps = ", ".join(f"{kind}" + ("" if kind != "ByteLevel" else f"(use_regex={regex})") for kind, regex in kinds)
    raise TokenizerError(f"{source}: pre_tokenizer [{steps}] is not a byte-level split gpt2kit can run; expected "
                         "ByteLevel(use_regex=true), or a Split regex (behavior Isolated) then "
                         "ByteLevel(use_regex=false)")


def _adds_tokens(processor: Any) -> bool:
    """Whether a tokenizer.json post_processor puts tokens around an encoded text (BOS, [CLS], ...); a ByteLevel
    one only trims offsets, and transformers saves GPT-2 with a TemplateProcessing of the text alone."""
    if processor is None:
        return False
    kind = processor.get("type") if isinstance(processor, dict) else None
    if kind == "Sequence":
        steps = processor.get("processors")
        return not isinstance(steps, list) or any(_adds_tokens(step) for step in steps)
    if kind == "TemplateProcessing":
        single = processor.get("single")
        return not isinstance(single, list) or any(not (isinstance(piece, dict) and set(piece) == {"Sequence"})
                                                   for piece in single)
    return kind != "ByteLevel"


@functools.lru_cache(maxsize=32)
def _tokenizer_json_encoding(path: str, stamp: tuple) -> tuple[tiktoken.Encoding, frozenset[str]]:
    """The encoding, with every added token among its special tokens, and the added tokens that are not special
    (transformers' add_tokens): those are matched wherever they appear in a text."""
    source = Path(path)
    spec = _read_json(source)
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"{source}: model type {kind!r}; gpt2kit runs byte-level BPE only")
    vocab, merges, added = model.get("vocab"), model.get("merges", []), spec.get("added_tokens") or []
    vocab = _vocab_object(vocab, source, "model.vocab")
    if not isinstance(merges, list):
        raise TokenizerError(f"{source}: model.merges must be a list")
    for n, token in enumerate(added if isinstance(added, list) else [None]):
        if not (isinstance(token, dict) and isinstance(token.get("content"), str) and type(token.get("id")) is int):
            raise TokenizerError(f"{source}: added_tokens[{n}] must be an object with a string content and an id")
    # Settings tiktoken cannot reproduce are refused, not ignored: the ids would differ from transformers'.
    if spec.get("normalizer") is not None:
        normalizer = spec["normalizer"]
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerError(f"{source}: normalizer {kind!r}: gpt2kit runs tokenizers "
                             "without a normalizer")
    if _adds_tokens(spec.get("post_processor")):
        kind = spec["post_processor"].get("type") if isinstance(spec["post_processor"], dict) else None
        raise TokenizerError(f"{source}: post_processor {kind!r} adds tokens around the text; gpt2kit runs "
                             "tokenizers without added tokens")
    plain = frozenset(t["content"] for t in added if not t.get("special", True))
    for token in added:
        flags = [flag for flag in ("lstrip", "rstrip", "single_word") if token.get(flag)]
        if token["content"] in plain and flags:
            raise TokenizerError(f"{source}: added token {token['content']!r} has {', '.join(flags)} set; gpt2kit "
                                 "matches added tokens exactly as written")
    specials = {t["content"]: t["id"] for t in added}
    if len(specials) < len(added):
        twice = next(t["content"] for n, t in enumerate(added) if t["content"] in [u["content"] for u in added[:n]])
        raise TokenizerError(f"{source}: added_tokens lists {twice!r} more than once")
    if ENDOFTEXT in vocab:
        specials.setdefault(ENDOFTEXT, vocab[ENDOFTEXT])  # GPT-2's vocab lists it as a plain entry
    ranks, made = _ranks_from_vocab(vocab, merges, set(specials), source)
    pattern = _pattern_of(spec.get("pre_tokenizer"), source)
    if not model.get("ignore_merges", False):
        _require_merged(ranks, made, pattern, source, " while ignore_merges is false (true takes a piece found whole)")
    return _encoding(source.stem, pattern, ranks, specials, source), plain


@functools.lru_cache(maxsize=32)
def _tiktoken_file_encoding(path: str, stamp: tuple) -> tiktoken.Encoding:
    import base64
    source = Path(path)
    ranks = {}
    try:
        lines = source.read_bytes().splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{source}: file not found") from None
    seen: dict[int, int] = {}  # rank -> line
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:
            raise TokenizerError(f"{source}:{n}: expected 'base64-token rank'") from None
        # tiktoken's Rust core panics on these (an exception no caller catches), or fails on the first encode.
        if rank < 0 or rank in seen or token in ranks:
            what = (f"rank {rank} is negative" if rank < 0 else f"rank {rank} is also on line {seen[rank]}"
                    if rank in seen else f"token {token!r} is listed twice")
            raise TokenizerError(f"{source}:{n}: {what}; ranks are distinct ids >= 0")
        ranks[token], seen[rank] = rank, n
    _require_single_bytes(ranks, str(source))
    specials, pattern = _TIKTOKEN_SPECIALS.get(source.stem, ({ENDOFTEXT: max(ranks.values(), default=-1) + 1},
                                                             CL100K_PATTERN))
    return _encoding(source.stem, pattern, ranks, specials, source)


_BPE_PAIRS = {"vocab.json": "merges.txt", "encoder.json": "vocab.bpe"}  # a vocabulary file -> its merges file
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template (read before the config's)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # transformers 4's file of roles: read, never written
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "tokenizer_config.json",
                   CHAT_TEMPLATE_FILE, "added_tokens.json", SPECIAL_TOKENS_MAP)


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of this name in a model directory is part of a tokenizer (see tokenizer_files)."""
    return name in TOKENIZER_FILES or name.endswith(".tiktoken")


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer files a model directory holds (to copy them along with the model)."""
    directory = Path(directory)
    return [p for p in (*(directory / name for name in TOKENIZER_FILES), *sorted(directory.glob("*.tiktoken")))
            if p.is_file()]


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether a model directory carries its own vocabulary (as `GPT2Tokenizer.from_file(directory)` reads it)."""
    directory = Path(directory)
    return (any((directory / name).exists() for name in ("tokenizer.json", "vocab.json", "encoder.json"))
            or any(directory.glob("*.tiktoken")))


def tokenizer_for(model_dir: str | os.PathLike | None,
                  tokenizer: str | os.PathLike | GPT2Tokenizer | None = None) -> GPT2Tokenizer:
    """A model's tokenizer: `tokenizer` if given (an instance, a GPT-2 name or a path), else the vocabulary
    files in `model_dir`, else GPT-2's bundled one."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return GPT2Tokenizer.from_pretrained(tokenizer)
    if model_dir is not None and has_tokenizer_files(model_dir):
        return GPT2Tokenizer.from_file(model_dir)
    return GPT2Tokenizer.gpt2()


def _role(role: str, of_id: bool) -> property:
    """A role's token (`of_id=False`: its text) or id, read and set as in transformers: setting either moves both
    (`tok.eos_token = "<|im_end|>"` also changes eos_token_id)."""
    if of_id:
        return property(lambda self: self._role_ids[role],
                        lambda self, token_id: self._set_role(role, self.convert_ids_to_tokens(token_id)))
    return property(lambda self: self.convert_ids_to_tokens(self._role_ids[role]),
                    lambda self, token: self._set_role(role, token))


class GPT2Tokenizer:
    """Byte-level BPE tokenizer with a HuggingFace-like call interface.

    `tok("text", return_tensors="pt")` -> BatchEncoding {"input_ids", "attention_mask"} with transformers' padding and
    truncation rules; `encode`/`decode` for plain lists.
    GPT-2 has no pad token: padding uses `pad_token_id` (the EOS id unless set) under attention_mask 0.
    """

    eos_token, eos_token_id = _role("eos_token", of_id=False), _role("eos_token", of_id=True)
    bos_token, bos_token_id = _role("bos_token", of_id=False), _role("bos_token", of_id=True)
    unk_token, unk_token_id = _role("unk_token", of_id=False), _role("unk_token", of_id=True)

    def __init__(self, encoding: tiktoken.Encoding, *, source: tuple[str, ...], eos_token: str = ENDOFTEXT,
                 pad_token_id: int | None = None, text_tokens: frozenset[str] = frozenset()) -> None:
        self.encoding = encoding
        self._source = source  # how to rebuild this tokenizer (pickling into worker processes)
        # Added tokens that are not special (transformers' add_tokens): matched wherever they occur in a text.
        self._text_tokens = text_tokens
        self._added: tuple[tuple[str, bool], ...] = ()  # (token, special) added to the source files, in id order
        self._loaded = 0  # how many of those the directory it was loaded from added (added_tokens.json, roles)
        self._splitters: dict[str | frozenset[str], list[regex.Pattern] | None] = {}  # see _splitters_for
        if eos_token not in encoding.special_tokens_set:
            raise TokenizerError(f"EOS token {eos_token!r} is not a special token of {encoding.name!r}")
        # The EOS, BOS and UNK tokens' ids; `eos_token`, `eos_token_id`, ... read and set them (see _role).
        # GPT-2 uses <|endoftext|> as BOS and UNK too (byte-level BPE never needs an unknown token).
        eos_id = encoding._special_tokens[eos_token]
        self._role_ids = dict.fromkeys(("eos_token", "bos_token", "unk_token"), eos_id)
        self._pad_token_id = pad_token_id  # None: pad with the EOS id, and name no pad token when saving
        self.padding_side = "right"
        self.truncation_side = "right"
        # What truncation=True and padding="max_length" use without a max_length: GPT-2's context, as the
        # tokenizer_config.json that save_pretrained writes (and the Hub's gpt2) says.
        self.model_max_length = GPT2_CONTEXT
        # How conversations are written (gpt2kit.conversation): None is gpt2kit's plain "User: / Assistant:"
        # transcript; saved in and read from tokenizer_config.json, as transformers keeps it.
        self.chat_template: str | None = None
        self._unused_ids: dict[int, tuple[int, ...]] = {}  # per vocabulary size, see unused_ids
        self._vocab: dict[str, int] | None = None  # get_vocab, built once

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def gpt2(cls) -> GPT2Tokenizer:
        """OpenAI's GPT-2 vocabulary, bundled with the package (checked against tiktoken's pinned hashes)."""
        return cls._from_source(("gpt2",))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """A `tokenizer.json` (byte-level BPE), a `.tiktoken` rank file, `vocab.json` (with `merges.txt` beside it)
        or `encoder.json` (with `vocab.bpe`), or a directory holding one of them."""
        path = Path(path)
        if path.is_dir():
            tokenizer, directory = cls._from_directory(path), path
        elif path.name in _BPE_PAIRS:  # one half of a vocabulary + merges pair
            merges = path.parent / _BPE_PAIRS[path.name]
            for needed in (path, merges):
                if not needed.exists():
                    raise TokenizerError(f"{needed}: file not found ({path.name} and {merges.name} form a pair)")
            tokenizer, directory = cls._from_source(("bpe", str(path), str(merges))), path.parent
        elif not path.exists():
            raise TokenizerError(f"{path}: tokenizer file not found")
        elif path.suffix == ".json":  # with the tokenizer_config.json beside it, as a directory reads them
            tokenizer, directory = cls._from_source(("tokenizer.json", str(path))), path.parent
        elif path.suffix == ".tiktoken":
            return cls._from_source(("tiktoken", str(path)))
        else:
            raise TokenizerError(f"{path}: unknown tokenizer format (expected tokenizer.json, vocab.json or .tiktoken)")
        config = _tokenizer_config(directory / "tokenizer_config.json")
        # transformers 4 kept the roles in special_tokens_map.json, over the config's (which lacks
        # added_tokens_decoder here): read them so, as transformers does.
        config |= {k: v for k, v in _tokenizer_config(directory / SPECIAL_TOKENS_MAP).items() if k in ROLES}
        tokenizer._read_added_tokens(directory, config)
        max_length = config.get("model_max_length")
        if type(max_length) is int and max_length > 0:  # transformers' "no limit" of 1e30 included
            tokenizer.model_max_length = max_length
        template_file = directory / CHAT_TEMPLATE_FILE
        tokenizer.chat_template = (read_utf8(template_file, error=TokenizerError) if template_file.is_file()
                                   else _chat_template(config.get("chat_template")))
        return tokenizer

    @classmethod
    def _from_directory(cls, path: Path) -> GPT2Tokenizer:
        # tokenizer.json first: beside vocab.json + merges.txt (as HF model repositories ship them) it also holds
        # the split pattern and the added special tokens.
        if (path / "tokenizer.json").exists():
            return cls._from_source(("tokenizer.json", str(path / "tokenizer.json")))
        for vocab, merges in _BPE_PAIRS.items():
            if (path / vocab).exists() and (path / merges).exists():
                return cls._from_source(("bpe", str(path / vocab), str(path / merges)))
        found = sorted(path.glob("*.tiktoken"))
        if found:
            return cls._from_source(("tiktoken", str(found[0])))
        raise TokenizerError(f"{path}: no tokenizer files (tokenizer.json, *.tiktoken, vocab.json+merges.txt)")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "gpt2") -> GPT2Tokenizer:
        """'gpt2' (or any OpenAI GPT-2 size, which share one vocabulary) -> the bundled files; else a path."""
        name = str(name_or_path)
        if name.removeprefix("openai-community/") in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
            if not Path(name).exists():
                return cls.gpt2()
        return cls.from_file(name_or_path)

    @classmethod
    def _from_source(cls, source: tuple[str, ...], eos_token: str | None = None) -> GPT2Tokenizer:
        kind, text_tokens = source[0], frozenset()
        if kind == "gpt2":
            encoding = _gpt2_encoding(str(ASSETS / "encoder.json"), str(ASSETS / "vocab.bpe"), True, ())
        elif kind == "bpe":
            encoding = _gpt2_encoding(source[1], source[2], False, _stamp(source[1], source[2]))
        elif kind == "tokenizer.json":
            encoding, text_tokens = _tokenizer_json_encoding(source[1], _stamp(source[1]))
        else:
            encoding = _tiktoken_file_encoding(source[1], _stamp(source[1]))
        if not encoding._special_tokens:
            raise TokenizerError(f"{source[-1]}: the vocabulary has no special token to use as end of text")
        return cls(encoding, source=source, eos_token=eos_token or _default_eos(encoding._special_tokens),
                   text_tokens=text_tokens)

    def __reduce__(self):
        roles = {role: getattr(self, role) for role in ROLES if role != "pad_token"}  # pad by id: it may be any
        return (_rebuild, (self._source, self._added, self._loaded, roles, self._pad_token_id, self.padding_side,
                           self.truncation_side, self.model_max_length, self.chat_template))

    # ---- added tokens (transformers' add_tokens / add_special_tokens) ----------------------------------------
    def _read_added_tokens(self, directory: Path, config: dict[str, Any]) -> None:
        """What transformers adds on loading a directory: added_tokens.json's tokens (the vocab.json + merges.txt
        layout keeps them there; special when a role, listed as special or marked so in added_tokens_decoder),
        then the roles of tokenizer_config.json, a role's token added as a special token when the vocabulary
        lacks it."""
        added_file = directory / "added_tokens.json"
        try:
            roles = {role: _token_text(config[role]) for role in ROLES if isinstance(config.get(role), (str, dict))}
            listed = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
            listed = {_token_text(t) for t in listed} if isinstance(listed, list) else set()
            decoder = config.get("added_tokens_decoder")
            decoder = decoder if isinstance(decoder, dict) else {}
            added = read_json(added_file, error=TokenizerError) if added_file.is_file() else {}
            if not (isinstance(added, dict) and all(type(i) is int for i in added.values())):
                raise TokenizerError(f"{added_file}: expected a JSON object of token -> integer id")
            vocab, new, fresh = self.get_vocab(), [], 0
            for token, token_id in sorted(added.items(), key=lambda item: item[1]):
                if token in vocab:
                    if vocab[token] != token_id:
                        continue
                elif token_id != len(self) + fresh:
                    raise TokenizerError(f"{added_file}: {token!r} has id {token_id}; the next free id is "
                                         f"{len(self) + fresh}")
                else:
                    fresh += 1
                new.append((token, token in roles.values() or token in listed
                            or bool((decoder.get(str(token_id)) or {}).get("special"))))
            _add_runs(self, new)
            for role, token in roles.items():
                self.add_tokens(token, special_tokens=True)
                self._set_role(role, token)
            self._loaded = len(self._added)
        except TokenizerError:  # already names its file
            raise
        except ValueError as err:
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: {err}") from None

    def add_tokens(self, new_tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Give the tokens this vocabulary lacks the next ids (from len(tokenizer) on), register those it has under
        their ids, and return how many were added, as transformers does; then
        `model.resize_token_embeddings(len(tokenizer))`. As in transformers, an ordinary added token is
        matched wherever it occurs in a text and kept by decode(skip_special_tokens=True); a special one is
        dropped by it and, like <|endoftext|>, is text in `encode` unless `allowed_special` names it (see the
        module's note). save_pretrained writes them into tokenizer.json, which transformers loads alike."""
        tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"added tokens must be non-empty strings, got {token!r}")
        vocab, specials = self.get_vocab(), self.encoding._special_tokens
        new = [t for t in dict.fromkeys(tokens) if t not in vocab]
        # A token vocab.json spells alike ("!", "hello", also "Ġhello") keeps its id, as in transformers: then
        # matched as written in text (or special, e.g. a pad_token "!").
        known = [t for t in dict.fromkeys(tokens) if t in vocab and t not in specials]
        if not new and not known:
            return 0
        ids = {**{t: vocab[t] for t in known}, **{t: len(self) + n for n, t in enumerate(new)}}
        self.encoding = tiktoken.Encoding(self.encoding.name, pat_str=self.encoding._pat_str,
                                          mergeable_ranks=self.encoding._mergeable_ranks,
                                          special_tokens={**specials, **ids})
        if not special_tokens:
            self._text_tokens = self._text_tokens | frozenset(ids)
        self._added += tuple((t, special_tokens) for t in dict.fromkeys(tokens) if t in ids)
        self._vocab, self._unused_ids, self._splitters = None, {}, {}
        return len(ids)

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any]) -> int:
        """transformers' call: {"pad_token": "[PAD]", "additional_special_tokens": ["<|user|>"], ...} adds the
        tokens this vocabulary lacks as special tokens (see add_tokens) and makes each the named role's token;
        returns how many were new. Roles: eos_token, bos_token, unk_token, pad_token, and lists under
        additional_special_tokens (transformers 5: extra_special_tokens)."""
        lists = ("additional_special_tokens", "extra_special_tokens")
        unknown = [key for key in special_tokens_dict if key not in ROLES + lists]
        if unknown:
            raise ValueError(f"add_special_tokens: unknown key {unknown[0]!r}; GPT-2's tokenizer has "
                             f"{', '.join(ROLES + lists)}")
        added = 0
        # The roles first, then the lists, as transformers 5 numbers them whatever the dict's order.
        for key, value in sorted(special_tokens_dict.items(), key=lambda item: item[0] in lists):
            values = [_token_text(v) for v in value] if key in lists else [_token_text(value)]
            added += self.add_tokens(values, special_tokens=True)
            if key in ROLES:
                self._set_role(key, values[0])
        return added

    def _set_role(self, role: str, token: str) -> None:
        """Make `token`, a token of this vocabulary, the eos/bos/unk/pad token (its `<role>_id` follows)."""
        token_id = self.get_vocab().get(token)
        if token_id is None:
            raise ValueError(f"{role} {token!r} is not a token of this vocabulary")
        if role == "eos_token" and token not in self.encoding.special_tokens_set:
            raise ValueError(f"eos_token {token!r} is not a special token of this vocabulary")
        if role == "pad_token":
            self._pad_token_id = token_id
        else:
            self._role_ids[role] = token_id

    def fingerprint(self, roles: bool = True) -> str:
        """sha256 of what decides the ids: the split pattern, the special tokens and the ranks, whatever file
        format they were read from (a rank file and the tokenizer.json save_pretrained converts it to agree).
        What an output made with it records, to tell later whether a tokenizer is still the same one. With
        `roles=False`, the ids alone: which tokens are EOS, BOS, UNK and padding do not count."""
        parts = [portable_pattern(self.split_pattern).encode(), b"\0specials"]
        # Not a vocabulary token registered as special under its id (a pad_token "!", added again on loading a
        # directory that names it): the ids encode gives are the same.
        parts += [f"{i}:{t}\0".encode() for t, i in sorted(self.own_id_tokens().items(), key=lambda x: x[1])]
        parts.append(b"\0ranks")
        for token, rank in sorted(self.encoding._mergeable_ranks.items(), key=lambda x: x[1]):
            parts.append(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        # Added tokens matched in text, and roles (EOS ends every document of preprocessed data), only where they
        # differ from a vocabulary's defaults, so that an unchanged tokenizer keeps the fingerprint it had.
        if self._text_tokens:
            parts += [b"\0text"] + [f"{t}\0".encode() for t in sorted(self._text_tokens)]
        role_ids = (self.eos_token_id, self.bos_token_id, self.unk_token_id, self.pad_token_id)
        if roles and role_ids != (self.encoding._special_tokens[_default_eos(self.encoding._special_tokens)],) * 4:
            parts.append(b"\0roles" + ",".join(map(str, role_ids)).encode())
        return hashlib.sha256(b"".join(parts)).hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the vocabulary next to a model, in files `from_file(directory)` and transformers' AutoTokenizer
        both load to the same ids: GPT-2 style vocab.json + merges.txt for GPT-2 vocabularies, else tokenizer.json
        (a rank file is converted to one). Vocabulary files of another format left in the directory by an earlier
        save are removed: a loader would read them instead."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kind = self._source[0]
        if self._added:  # the source files lack the added tokens: tokenizer.json holds them
            written: dict[str, Path | None] = {"tokenizer.json": None}
        elif kind in ("gpt2", "bpe"):
            vocab, merges = ((ASSETS / "encoder.json", ASSETS / "vocab.bpe") if kind == "gpt2"
                             else map(Path, self._source[1:]))
            written = {"vocab.json": vocab, "merges.txt": merges}
        else:
            written = {"tokenizer.json": Path(self._source[1]) if kind == "tokenizer.json" else None}
        # Files this tokenizer still reads (to copy from, and when pickled) are never removed.
        own = {Path(f).resolve() for f in self._source[1:]}
        # added_tokens.json too: loading the directory would add its tokens to this vocabulary.
        # special_tokens_map.json too: transformers would read its old roles over the new config's.
        stale = [directory / name for name in ("tokenizer.json", "vocab.json", "merges.txt", "encoder.json",
                                               "vocab.bpe", "added_tokens.json", SPECIAL_TOKENS_MAP)
                 if name not in written]
        for path in [*stale, *directory.glob("*.tiktoken")]:
            if path.exists() and path.resolve() not in own:
                path.unlink()
        for name, source in written.items():
            target = directory / name
            if source is None:
                atomic_write_text(target, json.dumps(self.to_tokenizer_json(), ensure_ascii=False) + "\n")
            elif not (target.exists() and os.path.samefile(source, target)):
                with atomic_file(target) as tmp:  # a new file: never written through a link into another's
                    shutil.copyfile(source, tmp)
        # GPT2Tokenizer rebuilds a ByteLevel pre-tokenizer in transformers; any other split needs the fast class,
        # which reads tokenizer.json as it is.
        config = {"tokenizer_class": "GPT2Tokenizer" if "vocab.json" in written else "PreTrainedTokenizerFast",
                  "eos_token": self.eos_token, "bos_token": self.bos_token, "unk_token": self.unk_token,
                  "model_max_length": self.model_max_length, "add_prefix_space": False}
        if self._pad_token_id is not None:  # set, even to the EOS token: transformers then has a pad token to batch
            config["pad_token"] = self.pad_token
        # The chat format, gpt2kit's plain one included, so that transformers' apply_chat_template writes what
        # gpt2kit's chat does: in the config (older transformers) and in its own file (transformers 5 reads it first).
        config["chat_template"] = PLAIN.template if self.chat_template is None else self.chat_template
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, config["chat_template"])

    def bpe_merges(self) -> list[tuple[bytes, bytes]]:
        """The merges of this vocabulary in merge order, recovered from its ranks (tiktoken keeps no merge list):
        each multi-byte token split into the two lower-ranked tokens that BPE joins to make it."""
        ranks = self.encoding._mergeable_ranks
        return [_split_in_two(ranks, token) for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get)]

    def to_tokenizer_json(self) -> dict[str, Any]:
        """This vocabulary as a HuggingFace `tokenizers` file: byte-level BPE after this tokenizer's split pattern,
        special tokens as added tokens, and ignore_merges (a piece found in the vocabulary is one token, as
        tiktoken encodes)."""
        ranks = self.encoding._mergeable_ranks
        specials = self.encoding._special_tokens
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": t in self._text_tokens, "special": t not in self._text_tokens}
                             for t, i in sorted(specials.items(), key=lambda x: x[1])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": portable_pattern(self.split_pattern)},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      # The special tokens too: tokenizers numbers an added token that the vocabulary lacks
                      # after the vocabulary's last id, whatever id it is given (cl100k's specials sit in gaps).
                      "vocab": {**{token_string(t): i for t, i in sorted(ranks.items(), key=lambda x: x[1])},
                                **specials},
                      "merges": [[token_string(left), token_string(right)] for left, right in self.bpe_merges()]},
        }

    # ---- encoding -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def check_fits(self, vocab_size: int) -> None:
        """ValueError unless a model of `vocab_size` has a logit (and an embedding) for every id this tokenizer
        produces: a tokenizer of another model does not belong with it."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
                             "use the model's own tokenizer (saved beside it, or passed as tokenizer=, --tokenizer)")

    @property
    def split_pattern(self) -> str:
        """The regex that splits text into pieces before BPE (GPT2_PATTERN for GPT-2 and ByteLevel vocabularies)."""
        return self.encoding._pat_str

    def encode(self, text: str, *, allowed_special: str | set[str] = (), add_special_tokens: bool = True
               ) -> list[int]:
        """Token ids of `text`. Special-token text is ordinary text unless listed in `allowed_special`.
        `add_special_tokens` is transformers' option: GPT-2's tokenizer adds none either way."""
        allowed = self._matched(allowed_special)
        if not allowed:
            return self.encoding.encode_ordinary(text)
        splitters = self._splitters_for(allowed)
        if splitters is None:
            return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        ids: list[int] = []

        def split(piece: str, level: int) -> None:
            if level == len(splitters):
                ids.extend(self.encoding.encode_ordinary(piece))
                return
            for n, part in enumerate(splitters[level].split(piece)):  # text, token, text, ...
                if n % 2:
                    ids.append(self.encoding._special_tokens[part])
                elif part:
                    split(part, level + 1)

        split(text, 0)
        return ids

    def _splitters_for(self, allowed: str | Set[str]) -> list[regex.Pattern] | None:
        """Where one allowed added token holds another ("<tool>" and "<tool>call", runs of tabs), or special and
        ordinary added tokens are both allowed (they may overlap: "x<s" and "<s>" in "ax<s>b"): patterns that split
        a text as transformers does, on special tokens first and then on ordinary ones, each trying the longest
        first (tiktoken takes the leftmost match, trying tokens in no fixed order); None otherwise."""
        key = "all" if allowed == "all" else allowed if isinstance(allowed, frozenset) else frozenset(allowed)
        if key not in self._splitters:
            tokens = self.encoding.special_tokens_set if allowed == "all" else self.encoding.special_tokens_set & key
            kinds = [tokens - self._text_tokens, tokens & self._text_tokens]
            patterns = None
            if all(kinds) or any(a != b and a in b for a in tokens for b in tokens):
                patterns = [regex.compile("(" + "|".join(map(regex.escape, sorted(kind, key=len, reverse=True)))
                                          + ")") for kind in kinds if kind]
            self._splitters[key] = patterns
        return self._splitters[key]

    def _matched(self, allowed_special: str | set[str]) -> str | set[str]:
        """The special tokens an encode call maps to their ids: those allowed, and the ordinary added tokens."""
        if isinstance(allowed_special, str):  # a token's text alone would be read as its characters
            if allowed_special != "all":
                raise ValueError(f"allowed_special must be 'all' or a set of special tokens, got {allowed_special!r}"
                                 f" (one token: {{{allowed_special!r}}})")
            return allowed_special
        return self._text_tokens | set(allowed_special) if allowed_special else self._text_tokens  # () per call

    def encode_batch(self, texts: Sequence[str], *, allowed_special: str | set[str] = (),
                     num_threads: int = 8) -> list[list[int]]:
        """Encode many texts on a thread pool (tiktoken releases the GIL)."""
        allowed = self._matched(allowed_special)
        if not allowed:
            return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if self._splitters_for(allowed) is not None:
            return [self.encode(text, allowed_special=allowed) for text in texts]
        return self.encoding.encode_batch(list(texts), num_threads=num_threads, allowed_special=allowed,
                                          disallowed_special=())

    def unused_ids(self, vocab_size: int) -> list[int]:
        """The ids below `vocab_size` this tokenizer cannot decode: past its vocabulary (a model's vocabulary padded
        to a multiple of 64, say) or holes in it (cl100k_base has some). Text generation never samples them.
        Kept per size: every generate call with a tokenizer asks (5 ms for GPT-2's vocabulary)."""
        if vocab_size not in self._unused_ids:
            known = set(self.encoding._mergeable_ranks.values()) | set(self.encoding._special_tokens.values())
            self._unused_ids[vocab_size] = tuple(i for i in range(vocab_size) if i not in known)
        return list(self._unused_ids[vocab_size])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError):
            raise self._unknown_id(ids) from None

    def decode(self, ids: int | Iterable[int], *, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        """Text of `ids` (or of one id); bytes that do not form complete UTF-8 characters become U+FFFD. An id that
        is not in the vocabulary is a ValueError naming it. `clean_up_tokenization_spaces` is accepted and, as in
        transformers 5 for BPE tokenizers, never applied: it would delete spaces the text has."""
        ids = _id_list(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        try:
            return self.encoding.decode(ids, errors="replace")
        except (KeyError, OverflowError):  # raised by tiktoken for ids it has no token for
            raise self._unknown_id(ids) from None

    def _unknown_id(self, ids: list[int]) -> ValueError:
        def known(i: int) -> bool:
            try:
                self.encoding.decode_single_token_bytes(i)
            except (KeyError, OverflowError):
                return False
            return True

        bad = next((i for i in ids if not known(i)), None)
        return ValueError(f"cannot decode id {bad}: it is not in the vocabulary of {self.encoding.name!r} "
                          f"({self.encoding.n_vocab} ids, see unused_ids for its gaps)")

    def chat_format(self) -> ChatFormat:
        """How this tokenizer's model reads conversations (gpt2kit.conversation: plain, alpaca, or its Jinja
        chat_template)."""
        pad = {} if self._pad_token_id is None else {"pad_token": self.pad_token}  # as transformers: when set
        return chat_format(self.chat_template, eos_token=self.eos_token, bos_token=self.bos_token,
                           unk_token=self.unk_token, **pad)

    def apply_chat_template(self, conversation: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]], *,
                            tokenize: bool = True, add_generation_prompt: bool | None = None,
                            continue_final_message: bool = False, padding: bool | str = False,
                            truncation: bool | str = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = True,
                            return_assistant_tokens_mask: bool = False
                            ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """transformers' call for chat prompts: the transcript that `gpt2kit chat`, the server and the pipeline
        write (the chat format of `chat_template`, see gpt2kit.conversation), as text, or tokenized: as
        transformers 5, a BatchEncoding (input_ids, attention_mask) unless `return_dict=False` (the ids alone),
        with padding, truncation, max_length and return_tensors as in a tokenizer call. A list of conversations
        gives one transcript each. Unlike transformers, add_generation_prompt defaults to True (unless the final
        message is continued, which it cannot be combined with). `return_assistant_tokens_mask` adds transformers'
        "assistant_masks": 1 for each token overlapping what the template's {% generation %} tag marks (all 0,
        with a warning, for a template without the tag)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message ends the text inside the last message; add_generation_prompt "
                             "would open a new one: give one of them")
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        if return_assistant_tokens_mask and continue_final_message:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")
        add_generation_prompt = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        if not conversation:
            raise ValueError("apply_chat_template: the conversation is empty")
        chat = self.chat_format()
        batched = not isinstance(conversation[0], Mapping)
        if batched and not all(conversation):
            raise ValueError("apply_chat_template: a conversation of the batch is empty")
        conversations = [turns_of(messages) for messages in (conversation if batched else [conversation])]
        marked = return_assistant_tokens_mask and chat.generation_spans is not None
        if return_assistant_tokens_mask and not marked:
            warnings.warn("return_assistant_tokens_mask: the chat template has no {% generation %} tag marking the "
                          "assistant's text; the mask is all 0", stacklevel=2)
        if marked:  # the same text, rendered with the spans the tag marks
            rows = [chat.encode_marked(self, *chat.generation_spans(turns, add_generation_prompt))
                    for turns in conversations]
            ids, masks = [row[0] for row in rows], [[int(flag) for flag in row[1]] for row in rows]
        else:
            texts = [chat.transcript(turns, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message) for turns in conversations]
            if not tokenize:
                return texts if batched else texts[0]
            ids = [chat.encode(self, text) for text in texts]
            masks = [[0] * len(row) for row in ids]
        encoded = self._batch(ids, single=not batched, padding=padding, truncation=truncation, max_length=max_length,
                              return_tensors=return_tensors,
                              aligned={"assistant_masks": masks} if return_assistant_tokens_mask else None)
        return encoded if return_dict else encoded["input_ids"]

    def batch_decode(self, sequences: Iterable[Iterable[int]], *, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # ---- transformers' names for tokens as strings (byte-level: " world" is "Ġworld") --------------------------
    @property
    def pad_token_id(self) -> int:
        """The id padding fills rows with: the pad token's when one is set (`pad_token`, `pad_token_id`,
        add_special_tokens or a saved tokenizer_config.json), else the EOS id, as GPT-2 has no pad token."""
        return self.eos_token_id if self._pad_token_id is None else self._pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, token_id: int | None) -> None:
        self._pad_token_id = token_id

    @property
    def pad_token(self) -> str:
        return self.convert_ids_to_tokens(self.pad_token_id)

    @pad_token.setter
    def pad_token(self, token: str) -> None:
        """`tok.pad_token = tok.eos_token`, the usual line for GPT-2: padding already uses the EOS id, and now a
        saved tokenizer names it as its pad token too (transformers pads batches only with one)."""
        self._set_role("pad_token", token)

    @property
    def added_since_loading(self) -> list[str]:
        """The tokens add_tokens / add_special_tokens gave new ids since loading, in id order (not those of the
        directory's own added_tokens.json, nor tokens of the vocabulary registered with their ids)."""
        own = self.own_id_tokens()
        return [token for token, _ in self._added[self._loaded:] if token in own]

    def own_id_tokens(self) -> dict[str, int]:
        """Special and added tokens with ids of their own, by text: all of them but vocabulary tokens registered
        under their ids (add_special_tokens({"pad_token": "!"}), as transformers registers them)."""
        rank_ids = set(self.encoding._mergeable_ranks.values())
        return {token: i for token, i in self.encoding._special_tokens.items() if i not in rank_ids}

    @property
    def ordinary_added_tokens(self) -> frozenset[str]:
        """Added tokens that are not special (add_tokens): matched wherever they occur in a text."""
        return self._text_tokens

    @property
    def all_special_tokens(self) -> list[str]:
        # By the special tokens' own ids (encode_single_token would find "é" registered as 165 as its UTF-8 token).
        return sorted(self.encoding.special_tokens_set - self._text_tokens, key=self.encoding._special_tokens.get)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.encoding._special_tokens[t] for t in self.all_special_tokens]

    def get_vocab(self) -> dict[str, int]:
        """Every token as vocab.json spells it (bytes through GPT-2's byte-to-character map), special tokens as
        their text, with its id."""
        if self._vocab is None:
            self._vocab = {token_string(token): i for token, i in self.encoding._mergeable_ranks.items()}
            self._vocab.update(self.encoding._special_tokens)
        return self._vocab

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        specials = {i: t for t, i in self.encoding._special_tokens.items()}
        tokens = [specials[i] if i in specials else token_string(self.decode_bytes([i])) for i in _id_list(ids)]
        return tokens[0] if _is_one_id(ids) else tokens

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Ids of tokens spelled as get_vocab spells them; a string that is no token gives unk_token_id, as in
        transformers."""
        vocab = self.get_vocab()
        if isinstance(tokens, str):
            return vocab.get(tokens, self.unk_token_id)
        return [vocab.get(t, self.unk_token_id) for t in tokens]

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 padding_side: str | None = None, truncation_side: str | None = None,
                 pad_to_multiple_of: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, add_special_tokens: bool = True,
                 allowed_special: str | set[str] = ()) -> BatchEncoding:
        """transformers-style encoding: {"input_ids", "attention_mask"} as lists, or as tensors ("pt" or "np"),
        with transformers' rules:
        - padding: False/"do_not_pad", True/"longest" or "max_length" (rows longer than max_length stay long),
          widths rounded up to `pad_to_multiple_of`, on `padding_side` (default: the attribute, "right");
        - truncation: True/"longest_first"/"only_first" keep max_length tokens, from `truncation_side` (default:
          the attribute, "right": the first tokens stay); unset, a max_length without padding truncates;
        - max_length defaults to model_max_length where truncation or "max_length" padding needs one;
        - add_special_tokens is accepted: GPT-2's tokenizer adds none."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.encode_batch(texts, allowed_special=allowed_special) if len(texts) > 1 else \
            [self.encode(t, allowed_special=allowed_special) for t in texts]
        return self._batch(ids, single=isinstance(text, str), padding=padding, truncation=truncation,
                           max_length=max_length, padding_side=padding_side, truncation_side=truncation_side,
                           pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors,
                           return_attention_mask=return_attention_mask)

    def _batch(self, ids: list[list[int]], *, single: bool, padding: bool | str = False,
               truncation: bool | str | None = None, max_length: int | None = None, padding_side: str | None = None,
               truncation_side: str | None = None, pad_to_multiple_of: int | None = None,
               return_tensors: str | None = None, return_attention_mask: bool = True,
               aligned: Mapping[str, list[list[int]]] | None = None) -> BatchEncoding:
        """Encoded rows truncated, padded and shaped as __call__ documents (`single`: one text, not a list).
        `aligned`: more rows of per-token values, one per row of `ids`, truncated alike, padded with 0 and returned
        under their names."""
        side = padding_side or self.padding_side
        cut_side = truncation_side or self.truncation_side
        for name, value in (("padding_side", side), ("truncation_side", cut_side)):
            if value not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        truncating = _truncates(truncation, max_length, padding)
        if max_length is None and self.model_max_length >= NO_LIMIT and (truncating or padding == "max_length"):
            # transformers' "no limit" (int(1e30)): nothing to truncate or pad to, so neither, as transformers
            # does (with a warning, as here).
            warnings.warn("no max_length and a model_max_length of no limit: neither truncating nor padding to a "
                          "maximum length", stacklevel=3)
            truncating, padding = False, padding != "max_length" and padding
        limit = self.model_max_length if max_length is None else max_length
        if truncating and padding not in (False, "do_not_pad") and pad_to_multiple_of and limit % pad_to_multiple_of:
            raise ValueError(f"truncation and padding are both on, but the truncation length ({limit}) is not a "
                             f"multiple of pad_to_multiple_of ({pad_to_multiple_of})")
        columns = {"input_ids": ids, **(aligned or {})}
        if truncating:
            columns = {name: [row[len(row) - limit:] if cut_side == "left" and len(row) > limit else row[:limit]
                              for row in rows] for name, rows in columns.items()}
        ids = columns["input_ids"]
        width = None
        if padding == "max_length":
            width = self.model_max_length if max_length is None else max_length
        elif padding in (True, "longest"):
            width = max((len(row) for row in ids), default=0)
        if width is not None and pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        columns["attention_mask"] = [[1] * len(row) for row in ids]
        if width is not None:
            for name, rows in columns.items():
                fill = self.pad_token_id if name == "input_ids" else 0
                columns[name] = [[fill] * max(width - len(row), 0) + row if side == "left" else
                                 row + [fill] * max(width - len(row), 0) for row in rows]
        names = ["input_ids", *(["attention_mask"] if return_attention_mask else []), *(aligned or ())]
        if return_tensors is not None:
            return BatchEncoding({name: _as_array(columns[name], return_tensors) for name in names})
        return BatchEncoding({name: columns[name][0] if single else columns[name] for name in names})


def _is_one_id(ids: Any) -> bool:
    """An int, a NumPy integer or a 0-d tensor, as transformers' decode takes one id."""
    return isinstance(ids, int) or getattr(ids, "ndim", None) == 0


def _id_list(ids: Any) -> list[int]:
    return [int(ids)] if _is_one_id(ids) else [int(i) for i in ids]


def _as_array(rows: list[list[int]], kind: str) -> Any:
    """A (batch, length) int64 tensor ("pt") or NumPy array ("np") of padded rows."""
    if kind not in ("pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {kind!r}")
    if len({len(row) for row in rows}) > 1:
        raise ValueError("texts have different lengths: pass padding=True to return tensors")
    import numpy as np

    array = np.array(rows, dtype=np.int64).reshape(len(rows), len(rows[0]) if rows else 0)
    if kind == "np":
        return array
    import torch

    return torch.from_numpy(array)


def _default_eos(specials: dict[str, int]) -> str:
    """A known end-of-text name, else the first special token (a trained vocabulary lists it first)."""
    known = [name for name in EOS_NAMES if name in specials]
    return known[0] if known else min(specials, key=specials.__getitem__)


def _add_runs(tokenizer: GPT2Tokenizer, tokens: Sequence[tuple[str, bool]]) -> None:
    """add_tokens for (token, special) pairs in order, one call (one new encoding) per run of the same kind."""
    for special, run in itertools.groupby(tokens, key=lambda item: item[1]):
        tokenizer.add_tokens([token for token, _ in run], special_tokens=special)


def _rebuild(source: tuple[str, ...], added: tuple[tuple[str, bool], ...], loaded: int, roles: dict[str, str],
             pad_token_id: int | None, padding_side: str, truncation_side: str, model_max_length: int,
             chat_template: str | None) -> GPT2Tokenizer:
    tok = GPT2Tokenizer._from_source(source)
    _add_runs(tok, added)
    tok._loaded = loaded
    for role, token in roles.items():
        tok._set_role(role, token)
    tok.pad_token_id, tok.padding_side, tok.truncation_side = pad_token_id, padding_side, truncation_side
    tok.model_max_length, tok.chat_template = model_max_length, chat_template
    return tok


def _tokenizer_config(config_file: Path) -> dict[str, Any]:
    """tokenizer_config.json's (or special_tokens_map.json's) values; none when it is missing (they refine the
    vocabulary's defaults). One that is not a JSON object is an error naming it, as in transformers: its roles
    would be silently lost."""
    if not config_file.is_file():
        return {}
    values = read_json(config_file, error=TokenizerError)
    if not isinstance(values, dict):
        raise TokenizerError(f"{config_file}: expected a JSON object of tokenizer settings")
    return values


def _token_text(value: Any) -> str:
    """A token given as a string or as transformers' AddedToken (its `content`; in a JSON file, an object)."""
    text = value.get("content") if isinstance(value, dict) else getattr(value, "content", value)
    if not isinstance(text, str):
        raise ValueError(f"a token must be a string or an AddedToken, got {value!r}")
    return text


def _chat_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a Jinja string, or transformers' list of named templates (the one
    named "default" is the chat template)."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _truncates(truncation: bool | str | None, max_length: int | None, padding: bool | str) -> bool:
    """transformers' rule: truncation=True or a strategy name truncates; unset, a max_length without padding does."""
    if truncation is None:
        return max_length is not None and padding is False
    if truncation in (True, "longest_first", "only_first"):
        return True
    if truncation in (False, "do_not_truncate"):
        return False
    raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', "
                     f"got {truncation!r}")


class BatchEncoding(dict):
    """What a tokenizer call returns: a dict of input_ids / attention_mask that also reads as attributes
    (`enc.input_ids`) and moves its tensors with `.to(device)`, as transformers' BatchEncoding does."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; keys: {', '.join(self)}") from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor to `device` (in place, returning self, as transformers' does)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def check_training_sizes(vocab_size: int, min_frequency: int, special_tokens: int = 1) -> None:
    """ValueError unless BPE training can make a vocabulary of `vocab_size` ids (256 bytes, the special tokens
    and merges, within tiktoken's 32-bit ids) and `min_frequency` is a count (>= 0)."""
    least = 256 + special_tokens
    if not least <= vocab_size < MAX_ID:
        raise ValueError(f"vocab_size must be at least {least} (256 bytes + {special_tokens} special token"
                         f"{'s' * (special_tokens != 1)}) and below {MAX_ID}, got {vocab_size}")
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0 (pairs seen fewer times are not merged), got {min_frequency}")


def train_bpe(files: Sequence[str | os.PathLike], vocab_size: int, output_dir: str | os.PathLike, *,
              min_frequency: int = 2, special_tokens: Sequence[str] = (ENDOFTEXT,),
              texts: Iterable[str] | None = None, progress: bool = True) -> GPT2Tokenizer:
    """Train a byte-level BPE vocabulary (GPT-2's pre-tokenizer and alphabet) on text files, or on `texts`
    (pass files=[]), with HF `tokenizers`; writes `tokenizer.json` to `output_dir` and returns it as a
    GPT2Tokenizer. The end of text is the special token whose name comes first in EOS_NAMES (<|endoftext|>,
    </s>, <|im_end|>, ...; the order of `special_tokens` does not matter), else the first special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if texts is None and not files:
        raise ValueError("nothing to train on: give training files or texts")
    if not special_tokens:
        raise ValueError("special_tokens: give at least one, the end-of-text token")
    for f in files:
        if not Path(f).is_file():
            raise TokenizerError(f"{f}: training file not found")
    check_training_sizes(vocab_size, min_frequency, len(special_tokens))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # tokenizers draws its bar on stdout; into a pipe or file it writes only blank lines.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  show_progress=progress and sys.stdout is not None and sys.stdout.isatty(),
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if texts is not None:
        tokenizer.train_from_iterator(texts, trainer)
    else:
        try:
            tokenizer.train([str(f) for f in files], trainer)
        except Exception as err:  # the Rust side says only "stream did not contain valid UTF-8"
            if "UTF-8" not in str(err):
                raise
            for f in files:
                read_utf8(f, error=TokenizerError)  # names the file, line and byte
            raise
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "tokenizer.json.tmp"
    tokenizer.save(str(tmp))
    os.replace(tmp, output_dir / "tokenizer.json")
    return GPT2Tokenizer.from_file(output_dir / "tokenizer.json")
