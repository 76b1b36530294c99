"""preprocess: round trips, document boundaries, worker/chunk invariance, splits, dtypes, bad input, atomicity."""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit import GPT2Tokenizer, cli
from gpt2kit.tokenizer import train_bpe
from gpt2kit.data import DataError, PretrainingDataset, output_is_current, preprocess, read_meta
from gpt2kit.data.preprocess import is_validation
from gpt2kit.data.readers import is_safe_cut, iter_texts, resolve_inputs

from .conftest import DATA, REPO
from .processes import running

WIKI = DATA / "wikitext-2" / "wiki.test.tokens"
VERDICT = DATA / "the-verdict" / "the-verdict.txt"
LAMBADA = DATA / "lambada" / "lambada_test.jsonl"
CL100K = DATA / "cl100k" / "cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.gpt2()


def run(inputs, out, **kwargs):
    kwargs.setdefault("workers", 1)
    return preprocess(inputs, out, progress=False, **kwargs)


def split_tokens(out, split="train") -> np.ndarray:
    meta = read_meta(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def documents(out, split="train") -> list[np.ndarray]:
    tokens, offsets = split_tokens(out, split), np.fromfile(out / f"{split}.idx", dtype="<i8")
    assert offsets[0] == 0 and offsets[-1] == len(tokens) and (np.diff(offsets) > 0).all()
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def wikitext_articles(text: str) -> list[str]:
    """Reference split, line by line: an article starts at a ` = Title = ` line; leading blank lines join it."""
    articles, current = [], ""
    for line in text.splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line) and current.strip():
            articles.append(current)
            current = ""
        current += line
    return articles + [current]


def all_files(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---- round trips and boundaries ---------------------------------------------------------------------------------
def test_wikitext_round_trip_articles_and_eos(tmp_path, tok):
    summary = run(WIKI, tmp_path / "wiki", chunk_bytes=50_000)  # many chunks, cut at titles and inside articles
    text = WIKI.read_text(encoding="utf-8")
    articles = wikitext_articles(text)
    docs = documents(tmp_path / "wiki")
    assert len(docs) == len(articles) == summary["documents"] == 62
    for doc, article in zip(docs, articles):
        assert doc[-1] == tok.eos_token_id and (doc[:-1] != tok.eos_token_id).all()
        assert doc[:-1].tolist() == tok.encode(article)  # same tokens as encoding the article whole
    assert "".join(tok.decode(d[:-1]) for d in docs) == text
    assert summary["tokens"] == sum(len(d) for d in docs)


def test_text_file_is_one_document_and_paragraphs_split_at_blank_lines(tmp_path, tok):
    text = VERDICT.read_text(encoding="utf-8")
    run(VERDICT, tmp_path / "one", chunk_bytes=2000)
    (doc,) = documents(tmp_path / "one")
    assert doc.tolist() == tok.encode(text) + [tok.eos_token_id]

    run(VERDICT, tmp_path / "para", format="paragraphs", append_eos=False, chunk_bytes=2000)
    docs = documents(tmp_path / "para")
    paragraphs = re.split(r"(?<=\n\n)(?=\S)", text)  # a blank line ends a paragraph, which keeps it
    assert [tok.decode(d) for d in docs] == paragraphs and len(docs) > 50
    assert not any(tok.eos_token_id in d for d in docs)


@pytest.mark.parametrize("name", ["train.csv", "train.TSV", "train.parquet", "train.csv.zst"])
def test_a_table_is_refused_unless_read_as_text_on_purpose(tmp_path, tok, name):
    """A csv was trained on as text, header, commas and quotes included; a parquet file failed as bad UTF-8 with
    advice to replace the bad bytes."""
    (tmp_path / name).write_bytes(b"text\nhello world\n")
    with pytest.raises(DataError, match=rf"{re.escape(name)}: a \.\w+ table is not read as text here: write its "
                                        r"text column as JSON lines"):
        run(tmp_path / name, tmp_path / "out")
    if not name.endswith(".zst") and "parquet" not in name:
        run(tmp_path / name, tmp_path / "out", format="text")  # asked for
        assert tok.decode(documents(tmp_path / "out")[0].tolist()).startswith("text\nhello")


def test_jsonl_and_zst_round_trip(tmp_path, tok):
    lines = LAMBADA.read_text(encoding="utf-8").splitlines()[:300]
    plain = tmp_path / "part.jsonl"
    plain.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line is skipped
    packed = tmp_path / "part.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    run(plain, tmp_path / "a", chunk_bytes=10_000)
    run(packed, tmp_path / "b", chunk_bytes=10_000, workers=2)
    texts = [json.loads(line)["text"] for line in lines]
    docs = documents(tmp_path / "b")
    assert [d[:-1].tolist() for d in docs] == [tok.encode(t) for t in texts]
    assert split_tokens(tmp_path / "a").tobytes() == split_tokens(tmp_path / "b").tobytes()
    source = read_meta(tmp_path / "b")["sources"][0]
    assert source["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert source["bytes"] == packed.stat().st_size and source["documents"] == 300
    # Several frames (as `cat a.zst b.zst` or a parallel compressor writes) read as one text.
    half = len(plain.read_bytes()) // 2
    frames = tmp_path / "frames.jsonl.zst"
    frames.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part) for part in (
        plain.read_bytes()[:half], plain.read_bytes()[half:])))
    run(frames, tmp_path / "c", chunk_bytes=10_000)
    assert split_tokens(tmp_path / "c").tobytes() == split_tokens(tmp_path / "a").tobytes()
    # A truncated download is an error, not a shorter corpus.
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(packed.read_bytes()[:int(packed.stat().st_size * 0.9)])
    with pytest.raises(DataError, match=r"cut.jsonl.zst: the zstandard stream ends inside a frame"):
        run(cut, tmp_path / "d", chunk_bytes=10_000)


def test_special_token_text_is_not_a_control_token(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text("before <|endoftext|> after")
    run(path, tmp_path / "out")
    (doc,) = documents(tmp_path / "out")
    assert (doc == tok.eos_token_id).sum() == 1 and doc[-1] == tok.eos_token_id


def test_directories_globs_and_order(tmp_path, tok):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "a.txt").write_text("first file")
    (corpus / "b" / "c.txt").write_text("second file")
    (corpus / "b" / "notes.md").write_text("not a known suffix: skipped with format auto")
    (corpus / ".hidden.txt").write_text("hidden: skipped")
    run(corpus, tmp_path / "dir")
    assert [tok.decode(d[:-1]) for d in documents(tmp_path / "dir")] == ["first file", "second file"]
    run([str(corpus / "**" / "*.txt"), corpus / "a.txt"], tmp_path / "glob")  # a repeated file is read once
    assert [tok.decode(d[:-1]) for d in documents(tmp_path / "glob")] == ["first file", "second file"]
    run(corpus, tmp_path / "explicit", format="text")
    assert len(documents(tmp_path / "explicit")) == 3


# ---- invariance ----------------------------------------------------------------------------------------------------
def test_output_identical_for_any_worker_count_and_chunk_size(tmp_path):
    inputs = [WIKI, VERDICT, DATA / "zh-wiki-sample" / "zhwiki_wiki_00_jastfkjg.jsonl"]
    outputs = []
    for workers, chunk in ((1, 1 << 22), (2, 30_000), (3, 30_000), (2, 7_000)):
        out = tmp_path / f"w{workers}-{chunk}"
        run(inputs, out, workers=workers, chunk_bytes=chunk, val_fraction=0.1, shard_tokens=100_000)
        outputs.append(all_files(out))
    names = sorted(outputs[0])
    assert "val-00000.bin" in names and "train-00002.bin" in names and {"train.idx", "val.idx"} <= set(names)
    for other in outputs[1:]:
        assert other == outputs[0]


@pytest.mark.parametrize("name,fmt", [("wiki.raw", "wikitext"), ("play.txt", "paragraphs"), ("play.txt", "text")])
def test_tiny_chunks_give_the_same_documents_and_tokens(tmp_path, name, fmt):
    """Cuts every few bytes: boundaries and tokens must not depend on where the chunks end."""
    raw = (DATA / "wikitext-2" / "wiki.test.raw").read_bytes()
    (tmp_path / "wiki.raw").write_bytes(b"  \n \n" + raw[:150_000] + raw[1_000_000:1_060_000])  # has " = Q..." lines
    (tmp_path / "play.txt").write_bytes(b"\n\n" + (DATA / "tinyshakespeare" / "input.txt").read_bytes()[:60_000])
    outputs = []
    for chunk in (1 << 20, 17, 250, 3000):
        run(tmp_path / name, tmp_path / f"out-{chunk}", format=fmt, chunk_bytes=chunk)
        outputs.append(all_files(tmp_path / f"out-{chunk}"))
    assert all(o == outputs[0] for o in outputs[1:])
    if fmt == "wikitext":
        assert len(documents(tmp_path / "out-17")) == len(wikitext_articles((tmp_path / name).read_text())) == 11


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "Z", " ", "\n", "\r", "\t", "\u3000", "\xa0", "7", ".", "'s", "中", "。", "é",
                                  "\U0001f600"]), min_size=2, max_size=14).map("".join))
def test_safe_cuts_do_not_change_tokens(text):
    """Where the chunker may cut inside a document, GPT-2's and cl100k's tokens of the halves add up to the whole."""
    data = text.encode("utf-8")
    encodings = [GPT2Tokenizer.gpt2().encoding, GPT2Tokenizer.from_file(CL100K).encoding]
    for p in range(1, len(data)):
        if is_safe_cut(data, p):
            a, b = data[:p].decode(), data[p:].decode()
            for enc in encodings:
                assert enc.encode_ordinary(text) == enc.encode_ordinary(a) + enc.encode_ordinary(b)


# ---- splits, dtypes, shards ----------------------------------------------------------------------------------------
def test_val_split_is_deterministic_by_document_position(tmp_path, tok):
    out = tmp_path / "split"
    summary = run(WIKI, out, val_fraction=0.25)
    articles = wikitext_articles(WIKI.read_text(encoding="utf-8"))
    to_val = is_validation(np.arange(len(articles)), 0.25)
    assert to_val.sum() == len(articles) // 4 == summary["splits"]["val"]["documents"]
    for split, chosen in (("train", ~to_val), ("val", to_val)):
        expected = [a for a, v in zip(articles, chosen) if v]
        assert [tok.decode(d[:-1]) for d in documents(out, split)] == expected
    assert len(PretrainingDataset(out, 128, split="val")) == (summary["splits"]["val"]["tokens"] - 1) // 128


def test_uint32_for_large_vocabularies(tmp_path):
    out = tmp_path / "cl100k"
    run(VERDICT, out, tokenizer=CL100K)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["name"] == "file"
    big = GPT2Tokenizer.from_file(CL100K)
    assert split_tokens(out).tolist() == big.encode(VERDICT.read_text()) + [big.eos_token_id]
    assert (out / meta["tokenizer"]["file"] / "tokenizer.json").is_file()
    assert meta["tokenizer"]["eos_token_id"] == big.eos_token_id > 65535


def test_meta_contents(tmp_path):
    out = tmp_path / "m"
    run([VERDICT, WIKI], out, shard_tokens=50_000)
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {
        "name": "gpt2", "source": "gpt2", "vocab_size": 50257, "eos_token_id": 50256, "eos_token": "<|endoftext|>",
        "fingerprint": GPT2Tokenizer.gpt2().fingerprint()}
    train = meta["splits"]["train"]
    assert [s["tokens"] for s in train["shards"][:-1]] == [50_000] * (len(train["shards"]) - 1)
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"] == meta["tokens"]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (VERDICT, WIKI)]
    assert [s["sha256"] for s in meta["sources"]] == digests
    assert [s["documents"] for s in meta["sources"]] == [1, 62]


# ---- bad input -----------------------------------------------------------------------------------------------------
def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.tmp-*"))


def test_invalid_utf8(tmp_path, tok):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"line one\nline two \xff\xfe here\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad.txt:2: invalid UTF-8 at byte offset 18 .*--errors replace"):
        run(path, out)
    assert_nothing_written(tmp_path, out)
    run(path, out, errors="replace")
    assert tok.decode(documents(out)[0][:-1]) == "line one\nline two \ufffd\ufffd here\n"


@pytest.mark.parametrize("content,message", [
    (b'{"text": "ok"}\n{"text": "broken\n', r"c.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n\n{"body": "x", "id": 1}\n', r"c.jsonl:3: no 'text' field \(fields: body, id\).*--text-key"),
    (b'{"text": 5}\n', r"c.jsonl:1: field 'text' is int, expected a string"),
    (b'["text"]\n', r"c.jsonl:1: expected a JSON object"),
    (b'[\n  {"text": "a"}\n]\n', r"c.jsonl:1: malformed JSON.*expects JSON Lines \(one object per line\)"),
    (b'{"text": "ok"}\n{"text": "caf\xc3"}\n', r"c.jsonl:2: invalid UTF-8 at byte offset 28"),
    pytest.param(b'{"text": "ok"}\n{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                 r"c.jsonl:2: JSON nested too deeply", id="deep"),
    (b'{"text": "ok"}\n\x0c\n', r"c.jsonl:2: malformed JSON"),  # not JSON whitespace: not a blank line
])
def test_bad_jsonl(tmp_path, content, message):
    path, out = tmp_path / "c.jsonl", tmp_path / "out"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        run([VERDICT, path], out, workers=2)  # the first file is already written when the second fails
    assert_nothing_written(tmp_path, out)


def test_jsonl_reports_its_first_bad_line_whatever_the_chunk_size(tmp_path):
    """A chunk was decoded whole before its lines were parsed: a later line's bad UTF-8 came before an earlier
    line's bad JSON in a big chunk, not in small ones."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": oops}\n{"text": "b"}\n{"text": "\xff"}\n')
    for chunk_bytes in (1, 1 << 20):
        with pytest.raises(DataError, match=r"c.jsonl:2: malformed JSON"):
            run(path, tmp_path / "out", chunk_bytes=chunk_bytes)


def test_jsonl_takes_an_integer_longer_than_python_converts(tmp_path, tok):
    """Valid JSON: an id of 5000 digits beside the text stopped the run (Python converts at most 4300)."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok", "n": ' + b"1" * 5000 + b"}\n")
    run(path, tmp_path / "out")
    assert tok.decode(documents(tmp_path / "out")[0][:-1]) == "ok"


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_bad_input_is_the_error_for_any_worker_count(tmp_path, workers):
    """With workers, reading runs ahead of tokenizing: a later file's read error waited for no earlier chunk."""
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n' * 1000)[:-9])
    with pytest.raises(DataError, match=r"a.jsonl:2: malformed JSON"):
        run([tmp_path / "a.jsonl", tmp_path / "b.jsonl.zst"], tmp_path / "out", workers=workers)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_a_failed_run_closes_the_files_it_was_writing(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(DataError):  # its traceback keeps the writers alive: only closing them closes the files
        run([VERDICT, bad], tmp_path / "out", workers=1)
    opened = []
    for fd in set(os.listdir("/proc/self/fd")) - before:
        with contextlib.suppress(OSError):
            opened.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [path for path in opened if ".out.tmp-" in path], opened


def test_long_documents_come_in_pieces_marked_where_they_end():
    """A tokenizer trained on the corpus counts documents by these marks, not by pieces."""
    pieces = list(iter_texts(resolve_inputs([VERDICT], "text"), chunk_bytes=4096))
    assert len(pieces) > 1 and [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(text for text, _ in pieces) == VERDICT.read_text(encoding="utf-8")


def test_empty_and_missing_and_unreadable_inputs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=r"no text in the input \(2 file\(s\) read, 1 empty record"):
        run([tmp_path / "empty.txt", tmp_path / "blank.jsonl"], out)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir: directory has no input files"):
        run(tmp_path / "emptydir", out)
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        run(tmp_path / "nope.txt", out)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer, got 0"):
        run(tmp_path / "empty.txt", out, chunk_bytes=0)
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl\.zst: no file matches"):
        run(tmp_path / "*.jsonl.zst", out)
    os.symlink(tmp_path / "gone.txt", tmp_path / "link.txt")
    with pytest.raises(DataError, match=r"link.txt: cannot read \(No such file or directory\)"):
        run(tmp_path / "link.txt", out)
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"bad.jsonl.zst: not a valid zstandard stream"):
        run(tmp_path / "bad.jsonl.zst", out)
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    real_open = open

    def deny(path, *args, **kwargs):  # chmod 000 does not stop root, so refuse the way the OS would
        if str(path) == str(secret):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(DataError, match=r"secret.txt: cannot read \(Permission denied\)"):
        run(secret, out)
    monkeypatch.undo()
    assert_nothing_written(tmp_path, out)


def test_too_few_documents_for_val(tmp_path):
    with pytest.raises(DataError, match=r"val_fraction=0.1 puts none of the 1 document\(s\) in 'val'.*paragraphs"):
        run(VERDICT, tmp_path / "out", val_fraction=0.1)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_cli_reports_one_line_and_exit_code(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "x"}\n')
    code = cli.main(["preprocess", "--input", str(path), "--output", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("gpt2kit preprocess: error: ") and "c.jsonl:2: no 'text' field" in err[-1]
    code = cli.main(["preprocess", "--input", str(VERDICT), "--output", str(tmp_path / "ok"), "--workers", "2",
                     "--no-append-eos", "--format", "paragraphs", "--val-fraction", "0.5"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"preprocessed 1 file\(s\), .* MB/s, .*M tokens/s", out)
    assert read_meta(tmp_path / "ok")["append_eos"] is False


# ---- atomic output -------------------------------------------------------------------------------------------------
def test_existing_output_is_kept_unless_overwrite(tmp_path, tok):
    out = tmp_path / "out"
    run(VERDICT, out)
    before = all_files(out)
    with pytest.raises(DataError, match="already holds a preprocess output; pass overwrite=True"):
        run(WIKI, out)
    assert all_files(out) == before
    run(WIKI, out, overwrite=True)
    assert len(documents(out)) == 62 and not list(tmp_path.glob(".out.*"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a preprocess output; not touching it"):
        run(VERDICT, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"



def test_a_text_key_without_json_lines_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"text_key 'body' names the field of JSON lines input; none of the inputs "
                                         r"is read as jsonl \(paragraphs\)"):
        preprocess(VERDICT, tmp_path / "out", text_key="body", format="paragraphs", progress=False)
    assert not (tmp_path / "out").exists()


def test_output_is_current_compares_settings_tokenizer_and_input_files(tmp_path):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "out"
    corpus.write_text(VERDICT.read_text())
    assert not output_is_current(out, corpus)
    preprocess(corpus, out, workers=1, progress=False)
    assert output_is_current(out, corpus) and output_is_current(out, [corpus], tokenizer="gpt2")
    for changed in ({"format": "paragraphs"}, {"text_key": "body"}, {"val_fraction": 0.5}, {"append_eos": False},
                    {"errors": "replace"}, {"tokenizer": str(tmp_path / "other.json")}):
        assert not output_is_current(out, corpus, **changed), changed
    assert not output_is_current(out, [corpus, VERDICT])
    tokenizer = tmp_path / "tok"
    train_bpe([corpus], 300, tokenizer)
    preprocess(corpus, out, workers=1, progress=False, tokenizer=tokenizer, overwrite=True)
    assert output_is_current(out, corpus, tokenizer=tokenizer)
    train_bpe([corpus], 310, tokenizer)  # another vocabulary at the same path
    assert not output_is_current(out, corpus, tokenizer=tokenizer)
    preprocess(corpus, out, workers=1, progress=False, overwrite=True)
    text = corpus.read_text()
    os.utime(corpus, ns=(0, 0))  # touched or copied: same contents, so the output still holds (one hash)
    assert output_is_current(out, corpus)
    assert read_meta(out)["sources"][0]["mtime_ns"] == 0  # written back: the next check hashes nothing
    meta = read_meta(out)
    del meta["sources"][0]["mtime_ns"]  # a meta.json of the previous version: checked by its hash
    (out / "meta.json").write_text(json.dumps(meta))
    assert output_is_current(out, corpus) and read_meta(out)["sources"][0]["mtime_ns"] == 0
    corpus.write_text(text.swapcase())  # an edit that keeps the size was reused before
    assert corpus.stat().st_size == len(text.encode()) and not output_is_current(out, corpus)
    with corpus.open("a") as f:
        f.write("more")
    assert not output_is_current(out, corpus)
    corpus.unlink()
    assert not output_is_current(out, corpus)

def test_an_output_of_an_older_pipeline_or_a_broken_meta_is_not_current(tmp_path):
    """The version was 1 while later changes gave other tokens for the same input (a byte-order mark, leading blank
    lines): such an output was reused. A meta.json missing its records raised a KeyError."""
    run([VERDICT], tmp_path / "out")
    meta = read_meta(tmp_path / "out")
    assert output_is_current(tmp_path / "out", VERDICT)
    for broken in ({**meta, "version": 1}, {k: v for k, v in meta.items() if k != "tokenizer"},
                   {**meta, "sources": [{"path": str(VERDICT)}]}, {**meta, "tokenizer": None}):
        (tmp_path / "out" / "meta.json").write_text(json.dumps(broken))
        assert not output_is_current(tmp_path / "out", VERDICT)


def _start(tmp_path, big, out, workers):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "gpt2kit", "preprocess", "--input", str(big), "--output", str(out),
                             "--workers", str(workers), "--chunk-bytes", "200000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_shard(tmp_path, out, proc):
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        shards = list(tmp_path.glob(f".{out.name}.tmp-*/train-00000.bin"))
        if shards and shards[0].stat().st_size > 0:
            return
        time.sleep(0.05)
    pytest.fail("preprocess finished or stalled before writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, sig):
    big = tmp_path / "big.txt"
    big.write_text(VERDICT.read_text() * 400)  # 8 MB: a few seconds of work
    out = tmp_path / "out"
    proc = _start(tmp_path, big, out, workers=2)
    _wait_for_shard(tmp_path, out, proc)
    workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert len(workers) == 2
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    deadline = time.time() + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers))  # the pool's processes end with their parent, even a killed one
    if sig == signal.SIGINT:  # handled: the staging directory is removed
        assert proc.returncode == 130 and not list(tmp_path.glob(".out.tmp-*"))
    else:  # killed: its staging directory is left behind, hidden, and the next run removes it
        assert list(tmp_path.glob(".out.tmp-*"))
        run(VERDICT, out)
        assert not list(tmp_path.glob(".out.tmp-*")) and len(documents(out)) == 1


@pytest.mark.parametrize("text", ["\n\nHello there.\n\nSecond paragraph.\n", "\n\n\u00a0\n\nfoo bar\n",
                                  "  \r\n\r\n  Title words\r\n\r\nNext one here.\r\n"])
def test_leading_blank_lines_tokenize_alike_for_any_chunk_size(tmp_path, text):
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode())
    outputs = []
    for chunk_bytes in (1, 2, 3, 5, 8, 1 << 20):
        out = tmp_path / f"out-{chunk_bytes}"
        run(path, out, format="paragraphs", chunk_bytes=chunk_bytes)
        outputs.append((split_tokens(out).tolist(), read_meta(out)["documents"]))
    assert all(o == outputs[-1] for o in outputs), outputs


def test_inputs_are_files_once_and_never_the_output(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some words to read.")
    monkeypatch.chdir(tmp_path)
    summary = run(["corpus/a.txt", corpus / "a.txt", "corpus/../corpus/a.txt"], tmp_path / "o1")
    assert summary["files"] == 1 and summary["documents"] == 1
    first = run(corpus, corpus / "out", format="text", errors="replace")
    again = run(corpus, corpus / "out", format="text", errors="replace", overwrite=True)
    assert first["files"] == again["files"] == 1 and first["tokens"] == again["tokens"]
    assert output_is_current(corpus / "out", corpus, format="text", errors="replace")
    with pytest.raises(DataError, match=r"a.txt: exists and is not a directory"):  # not "no input files outside"
        run(corpus / "a.txt", corpus / "a.txt")


def test_preprocessed_outputs_in_an_input_directory_are_not_read_as_text(tmp_path):
    """An earlier output in the corpus directory: its pretty-printed meta.json read as a malformed JSON line and
    stopped the run. Outputs are skipped like hidden files; given as the input itself, the error says what it is."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some words to read.")
    first = run(corpus, corpus / "tokens")
    (corpus / "notes.json").write_text('{"text": "a JSON line of its own"}\n')  # an input named meta-like: read
    second = run(corpus, tmp_path / "elsewhere")
    assert first["files"] == 1 and second["files"] == 2 and second["documents"] == 2
    with pytest.raises(DataError, match=r"tokens: already preprocessed \(token shards and .*meta.json\), not text"):
        run(corpus / "tokens", tmp_path / "again")
    other = corpus / "data" / "meta.json"  # another program's meta.json: an input like any other
    other.parent.mkdir()
    other.write_text('{"text": "not token data"}\n')
    assert run(corpus, tmp_path / "third")["files"] == 3


def test_a_symlinked_output_fills_the_directory_it_points_to(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "big")
    run(VERDICT, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "big" / "meta.json").is_file()


def test_a_highly_compressed_zst_is_read_in_chunks(tmp_path):
    from gpt2kit.data.readers import Source, iter_chunks

    record = b'{"text": "the same words again and again"}\n'
    path = tmp_path / "rep.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(record * 200_000))
    chunks = list(iter_chunks(Source(path, "jsonl"), 1 << 16))
    assert max(len(c.data) for c in chunks) <= 3 * (1 << 16)
    assert b"".join(c.data for c in chunks) == record * 200_000


def test_the_validation_share_is_exact_in_decimal():
    assert is_validation(np.arange(100), 0.57).sum() == 57
    assert is_validation(np.arange(1000), 0.1).sum() == 100
    assert is_validation(np.arange(10_000_000), 4e-7).sum() == 4
    assert is_validation(np.arange(10_000_000), 1.5e-6).sum() == 15


def test_a_byte_order_mark_before_json_lines_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    assert run(path, tmp_path / "out")["documents"] == 2


@pytest.mark.parametrize("fmt,text", [("text", "Hello world.\n"), ("paragraphs", "\n\nFirst para.\n\nSecond.\n"),
                                      ("wikitext", "\n = Title = \n\nSome text .\n = Next = \n\nMore .\n")])
def test_a_byte_order_mark_is_not_text_in_any_format(tmp_path, fmt, text):
    """The mark was tokenized (three byte tokens), and before blank lines it made a document of its own."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    expected = run(plain, tmp_path / "plain", format=fmt)
    for chunk_bytes in (1, 4, 1 << 20):
        assert run(marked, tmp_path / f"marked-{chunk_bytes}", format=fmt, chunk_bytes=chunk_bytes)["documents"] \
            == expected["documents"]
        assert split_tokens(tmp_path / f"marked-{chunk_bytes}").tolist() == split_tokens(tmp_path / "plain").tolist()


def test_chunks_found_after_long_runs_without_a_cut_tokenize_alike(tmp_path):
    """The search for a cut resumes near the end of what it searched (it rescanned from the start: quadratic);
    cuts found that way must still split the text where GPT-2's and cl100k's tokens do not change."""
    import random

    from gpt2kit.data.readers import Source, iter_chunks

    encodings = [GPT2Tokenizer.gpt2().encoding, GPT2Tokenizer.from_file(CL100K).encoding]
    pieces = ["\u4e2d\u6587\u3002\r\n", "\u5b57\r\n", "\r\n", "x\ny", "\n z", "ab cd", " ", "\u00e9\r\n"]
    rng, path, cut_inside = random.Random(0), tmp_path / "t.txt", 0
    for _ in range(40):
        text = "".join(rng.choices(pieces, weights=[30, 30, 5, 1, 1, 1, 3, 5], k=rng.randint(20, 200)))
        path.write_text(text, encoding="utf-8", newline="")
        for chunk_bytes in (1, 3, 8, 16, 64):
            chunks = [c.data.decode() for c in iter_chunks(Source(path, "text"), chunk_bytes)]
            assert "".join(chunks) == text
            cut_inside += len(chunks) - 1
            for enc in encodings:
                assert [t for c in chunks for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)
    assert cut_inside > 100  # the texts were cut, not read whole


@pytest.mark.parametrize("fmt", ["text", "wikitext", "jsonl"])
def test_the_search_for_a_cut_reads_a_long_line_once(tmp_path, monkeypatch, fmt):
    """A run with no newline was searched again from its start after every block read (linear only where a newline
    fell near the end): 6.75 s for 33 MB of Chinese text. The bytes searched must stay proportional to the file,
    and a WikiText title after such a line still starts a document."""
    from gpt2kit.data import readers

    searched = []
    find_cut = readers._find_cut
    monkeypatch.setattr(readers, "_find_cut", lambda buf, f, start: (searched.append(len(buf) - start),
                                                                      find_cut(buf, f, start))[1])
    line = "\u4e2d\u6587\u3002" * 20_000  # 180 kB, no newline and no space between letters
    text = {"text": line + "\nend\n", "wikitext": f" = A = \n{line}\n = B = \nend\n",
            "jsonl": json.dumps({"text": line}, ensure_ascii=False) + "\n" + '{"text": "end"}\n'}[fmt]
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(readers.iter_chunks(readers.Source(path, fmt), 1024))
    assert b"".join(c.data for c in chunks) == text.encode()
    assert sum(searched) < 3 * len(text.encode())
    if fmt == "wikitext":
        assert [c.data.startswith(b" = B = ") for c in chunks][-1] and chunks[-2].ends_doc


def test_a_long_line_is_read_in_a_few_growing_blocks(tmp_path):
    """The buffer grew by one chunk per read and was copied whole each time: quadratic in a line's length (16 s for
    a 256 MB JSON line). It now doubles, so a line takes a logarithmic number of reads."""
    from gpt2kit.data import readers

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "abcdefg " * 200_000}) + "\n" + '{"text": "end"}\n')
    source, reads = readers.Source(path, "jsonl"), []
    read = readers._HashingReader.read
    readers._HashingReader.read = lambda self, n: (reads.append(n), read(self, n))[1]
    try:
        chunks = list(readers.iter_chunks(source, 1024))
    finally:
        readers._HashingReader.read = read
    assert b"".join(c.data for c in chunks) == path.read_bytes() and len(reads) < 20


def test_added_tokens_are_never_split_between_chunks(tmp_path):
    """A tokenizer's added tokens are matched in the text: a cut inside "New York" gave its two BPE halves, so the
    tokens depended on chunk_bytes."""
    tok = GPT2Tokenizer.gpt2()
    tok.add_tokens(["New York"])
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "a.txt"
    path.write_text("I love New York city.\nA line\n\nEND of it. New York again.\n" * 3)
    expected = tok.encode(path.read_text()) + [tok.eos_token_id]
    for chunk_bytes, workers in ((1 << 20, 1), (8, 1), (5, 2), (3, 2)):
        out = tmp_path / f"out{chunk_bytes}"
        run([path], out, tokenizer=tmp_path / "tok", chunk_bytes=chunk_bytes, workers=workers)
        assert PretrainingDataset(out, 4).tokens(0, len(expected)).tolist() == expected


@pytest.mark.parametrize("name", ["corpus.jsonl.gz", "corpus.txt.xz", "corpus.bz2"])
def test_other_compression_is_refused_not_tokenized(tmp_path, name):
    import gzip

    (tmp_path / name).write_bytes(gzip.compress(b'{"text": "a document"}\n'))
    for fmt in ("auto", "text"):
        with pytest.raises(DataError, match=r"compression is not read here: decompress the file, or recompress it "
                                            r"with zstandard \(.zst\)"):
            run([tmp_path / name], tmp_path / "out", format=fmt, errors="replace")


def test_a_zstandard_error_names_the_byte_after_the_good_data(tmp_path):
    data = b"".join(b'{"text": "doc %d hello world"}\n' % i for i in range(20_000))
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) + b"garbage")
    with pytest.raises(DataError, match=f"at or after decompressed byte {len(data)} "):
        run([path], tmp_path / "out")


def test_an_old_output_moved_aside_by_a_killed_replacement_is_removed(tmp_path):
    """replace_directory moves the old output to .NAME.old-PID-...; a kill before its removal left a full copy."""
    run([VERDICT], tmp_path / "out")
    stale = tmp_path / ".out.old-999999999-0d52679f"
    (tmp_path / "out").rename(stale)
    run([VERDICT], tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "meta.json").is_file()


def test_a_rank_file_that_cannot_be_saved_fails_before_tokenizing(tmp_path, monkeypatch):
    """A .tiktoken file whose token is no merge of lower-ranked ones encodes, but cannot be copied into the output
    as merges: that failed after the whole corpus was tokenized, with a message naming no file."""
    import base64

    from gpt2kit.tokenizer import TokenizerError

    ranks = tmp_path / "odd.tiktoken"
    tokens = [bytes([b]) for b in range(256)] + [b"abc"]
    ranks.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    assert GPT2Tokenizer.from_file(ranks).encode("abc abc")[0] == 256
    monkeypatch.setattr(sys.modules["gpt2kit.data.preprocess"], "iter_chunks",  # the module, not the function
                        lambda *a: pytest.fail("the corpus was read"))
    out = tmp_path / "out"
    with pytest.raises(TokenizerError, match=r"odd.tiktoken: cannot be copied into the output \(token b'abc'"):
        run(VERDICT, out, tokenizer=ranks)
    assert_nothing_written(tmp_path, out)


def test_a_lone_surrogate_escape_in_json_lines_is_u_fffd(tmp_path, tok):
    """tiktoken encoded it as U+FFFD already; training a tokenizer on it failed (the tokenizers library refuses
    it) with a message naming no file."""
    from gpt2kit.data.tokenizer_training import train_tokenizer

    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "hello world hello world"}\n{"text": "bad \\ud800 x \\ud83d\\ude00"}\n')
    run(path, tmp_path / "out")
    assert documents(tmp_path / "out")[1].tolist() == tok.encode("bad \ufffd x \U0001f600") + [tok.eos_token_id]
    trained = train_tokenizer([path], tmp_path / "tok", vocab_size=300, progress=False)
    assert trained.decode(trained.encode("bad \ufffd x")) == "bad \ufffd x"


def _die(chunk):
    os._exit(1)


def test_a_worker_that_dies_is_one_error_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["gpt2kit.data.preprocess"], "_encode_chunk", _die)  # the module, not the function
    out = tmp_path / "out"
    with pytest.raises(ChildProcessError, match="a tokenizing worker process died"):
        run(VERDICT, out, workers=2, chunk_bytes=4096)
    assert_nothing_written(tmp_path, out)
