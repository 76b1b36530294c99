"""`gpt2kit tokenizer train`: a byte-level BPE vocabulary for the Chinese sample, run by gpt2kit (tiktoken) with
exactly the ids HF `tokenizers` gives on the same tokenizer.json."""

import json
import os
import random

import pytest
from tokenizers import Tokenizer

from gpt2kit import GPT2Tokenizer, cli
from gpt2kit.data import DataError, PretrainingDataset, load_tokenizer, preprocess
from gpt2kit.data.tokenizer_training import RECORD_FILE, tokenizer_is_current, train_tokenizer

from .conftest import DATA

ZH = DATA / "zh-wiki-sample"


def zh_texts() -> list[str]:
    return [json.loads(line)["text"] for path in sorted(ZH.glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("zh") / "tok"
    assert cli.main(["tokenizer", "train", "--input", str(ZH), "--vocab-size", "3000", "--output", str(out)]) == 0
    return out


def test_trained_vocabulary_loads_and_fits_chinese(trained, capsys):
    tok = GPT2Tokenizer.from_file(trained / "tokenizer.json")
    assert tok.vocab_size == 3000 and tok.eos_token_id == 0 and tok.eos_token == "<|endoftext|>"
    texts = zh_texts()
    assert len(texts) == 286
    chars = sum(len(t) for t in texts)
    ours = sum(len(tok.encode(t)) for t in texts)
    gpt2 = GPT2Tokenizer.gpt2()
    assert ours < 0.75 * sum(len(gpt2.encode(t)) for t in texts)  # GPT-2 spends 2-3 tokens per Chinese character
    assert ours < chars
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_same_ids_as_hf_tokenizers(trained):
    tok = GPT2Tokenizer.from_file(trained / "tokenizer.json")
    hf = Tokenizer.from_file(str(trained / "tokenizer.json"))
    hf.encode_special_tokens = True  # gpt2kit's encode() reads "<|endoftext|>" in text as text
    texts = zh_texts() + (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()[:2000]
    # Text made of vocabulary pieces probes merges a corpus may not: tokens reachable by several splits.
    rng = random.Random(0)
    pieces = [p.decode("utf-8") for p in map(tok.encoding.decode_single_token_bytes, range(1, tok.vocab_size))
              if p.decode("utf-8", "ignore").encode("utf-8") == p]
    texts += ["".join(rng.choices(pieces, k=rng.randint(1, 8))) for _ in range(5000)]
    for text in texts:
        assert tok.encode(text) == hf.encode(text).ids, text
    hf.encode_special_tokens = False
    marked = "标题<|endoftext|>正文"
    assert tok.encode(marked, allowed_special="all") == hf.encode(marked).ids


def test_preprocess_with_trained_vocabulary(trained, tmp_path):
    out = tmp_path / "zh-data"
    summary = preprocess(ZH, out, tokenizer=trained / "tokenizer.json", workers=2, val_fraction=0.05, progress=False)
    assert summary["documents"] == 286 and summary["splits"]["val"]["documents"] == 14
    tok = load_tokenizer(out)  # from the copy inside the output
    sentence = "数学是利用符号语言研究数量"
    assert tok.encode(sentence) == GPT2Tokenizer.from_file(trained / "tokenizer.json").encode(sentence)
    ds = PretrainingDataset(out, 256)
    assert tok.decode(ds[0]["input_ids"]).startswith(zh_texts()[0][:20])


def test_training_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no text in the input"):
        train_tokenizer(tmp_path / "empty.jsonl", tmp_path / "out", vocab_size=500)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="vocab_size must be at least 257 "):
        train_tokenizer(DATA / "the-verdict" / "the-verdict.txt", tmp_path / "out", vocab_size=100)
    assert not (tmp_path / "out").exists()  # nothing written for a request that could never succeed
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        train_tokenizer(tmp_path / "bad.jsonl", tmp_path / "out", vocab_size=500)
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):  # found while training on a first file
        train_tokenizer([DATA / "the-verdict" / "the-verdict.txt", tmp_path / "bad.jsonl"], tmp_path / "out",
                        vocab_size=500, progress=False)
    assert not (tmp_path / "out").exists()  # it was left behind, empty
    verdict = DATA / "the-verdict" / "the-verdict.txt"
    with pytest.raises(ValueError, match="errors must be 'strict' or 'replace', got 'ignore'"):
        train_tokenizer(verdict, tmp_path / "out2", vocab_size=500, errors="ignore")
    with pytest.raises(ValueError, match="text_key 'body' names the field of JSON lines input"):
        train_tokenizer(verdict, tmp_path / "out2", vocab_size=500, text_key="body")
    assert not (tmp_path / "out2").exists()


def test_a_vocabulary_that_fails_the_check_is_never_written(tmp_path, monkeypatch):
    """The engines' cross-check runs before the file is put in place: a rejected vocabulary leaves no
    tokenizer.json for a later run to reuse, and an earlier good one stays."""
    corpus = DATA / "the-verdict" / "the-verdict.txt"
    good = train_tokenizer(corpus, tmp_path, vocab_size=400, progress=False)
    monkeypatch.setattr(GPT2Tokenizer, "encode", lambda self, text, **kw: [0])  # a disagreeing engine
    with pytest.raises(DataError, match="disagree"):
        train_tokenizer(corpus, tmp_path, vocab_size=600, progress=False)
    monkeypatch.undo()
    assert GPT2Tokenizer.from_file(tmp_path).vocab_size == good.vocab_size == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", RECORD_FILE]  # no staging folder left
    assert tokenizer_is_current(tmp_path, corpus, vocab_size=400)  # the record is still the good vocabulary's


def test_tokenizer_is_current_compares_settings_and_input_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DATA / "the-verdict" / "the-verdict.txt").read_text())
    out = tmp_path / "tok"
    assert not tokenizer_is_current(out, corpus, vocab_size=300)
    train_tokenizer(corpus, out, vocab_size=300, progress=False)
    assert tokenizer_is_current(out, corpus, vocab_size=300)
    assert not tokenizer_is_current(out, corpus, vocab_size=301)
    assert not tokenizer_is_current(out, corpus, vocab_size=300, min_frequency=3)
    text = corpus.read_text()
    corpus.write_text(text.swapcase())  # same size, other text
    assert not tokenizer_is_current(out, corpus, vocab_size=300)
    corpus.write_text(text)  # back to the trained text: its time moved, its contents did not
    assert tokenizer_is_current(out, corpus, vocab_size=300)
    with corpus.open("a") as f:
        f.write("more text")
    assert not tokenizer_is_current(out, corpus, vocab_size=300)
    (out / RECORD_FILE).unlink()  # a tokenizer.json the user put there is theirs: always current
    assert tokenizer_is_current(out, corpus, vocab_size=999)


def test_a_retrain_interrupted_around_its_record_is_not_current(tmp_path, monkeypatch):
    """The record is written before tokenizer.json is replaced: a stop in between leaves a record naming the new
    file beside the old one (neither is current), and a stop before it leaves the old pair as it was. (Written
    after, an old record vouched for the new file, and a first run's file without a record was taken as the
    user's own.)"""
    from gpt2kit.data import tokenizer_training

    corpus = DATA / "the-verdict" / "the-verdict.txt"
    train_tokenizer(corpus, tmp_path, vocab_size=300, progress=False)

    def interrupted(*args):
        raise KeyboardInterrupt

    replace = os.replace

    def stop_before_the_vocabulary(source, target):  # the record (written atomically) is replaced first
        if str(target) == str(tmp_path / "tokenizer.json"):
            raise KeyboardInterrupt
        replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_training.os, "replace", stop_before_the_vocabulary)
        with pytest.raises(KeyboardInterrupt):
            train_tokenizer(corpus, tmp_path, vocab_size=400, progress=False)
    assert GPT2Tokenizer.from_file(tmp_path).vocab_size == 300
    assert not tokenizer_is_current(tmp_path, corpus, vocab_size=300)  # the record is of the other settings
    assert not tokenizer_is_current(tmp_path, corpus, vocab_size=400)  # and of another file
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_training, "atomic_write_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_tokenizer(corpus, tmp_path / "first", vocab_size=300, progress=False)
    assert not (tmp_path / "first" / "tokenizer.json").exists()


def test_retraining_over_a_saved_tokenizer_drops_its_other_files(tmp_path):
    """`--overwrite` replaced tokenizer.json only: the old tokenizer_config.json (its EOS), chat template and added
    tokens were applied to the new vocabulary, and the old EOS ended every preprocessed document."""
    old = GPT2Tokenizer.gpt2()
    old.add_special_tokens({"eos_token": "<|im_end|>"})
    old.chat_template = "{{ messages[0]['content'] }}"
    old.save_pretrained(tmp_path)
    (tmp_path / "added_tokens.json").write_text('{"<x>": 50300}')
    train_tokenizer(DATA / "the-verdict" / "the-verdict.txt", tmp_path, vocab_size=300, progress=False)
    new = GPT2Tokenizer.from_file(tmp_path)
    assert (new.vocab_size, new.eos_token, new.eos_token_id, new.chat_template) == (300, "<|endoftext|>", 0, None)


def test_records_of_the_previous_version_and_moved_times_are_checked_once(tmp_path, monkeypatch):
    import os

    from gpt2kit.data import readers

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DATA / "the-verdict" / "the-verdict.txt").read_text())
    train_tokenizer(corpus, tmp_path / "tok", vocab_size=300, progress=False)
    record = json.loads((tmp_path / "tok" / RECORD_FILE).read_text())
    assert record["inputs"][0]["sha256"] == readers.sha256_file(corpus)  # taken while training read it
    calls = []
    real = readers.sha256_file
    monkeypatch.setattr(readers, "sha256_file", lambda path: calls.append(path) or real(path))
    os.utime(corpus, ns=(0, 0))
    assert tokenizer_is_current(tmp_path / "tok", corpus, vocab_size=300) and len(calls) == 1
    assert tokenizer_is_current(tmp_path / "tok", corpus, vocab_size=300) and len(calls) == 1  # time written back
    # A record of the previous version ([path, size]) is current by path and size, and gets a time and hash.
    record["inputs"] = [[str(corpus), corpus.stat().st_size]]
    (tmp_path / "tok" / RECORD_FILE).write_text(json.dumps(record))
    assert tokenizer_is_current(tmp_path / "tok", corpus, vocab_size=300) and len(calls) == 2
    assert json.loads((tmp_path / "tok" / RECORD_FILE).read_text())["inputs"][0]["sha256"] == real(corpus)


def test_an_output_inside_the_input_directory_is_never_read_as_input(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text((DATA / "the-verdict" / "the-verdict.txt").read_text())
    first = train_tokenizer(corpus, corpus / "tok", vocab_size=300, progress=False)
    assert tokenizer_is_current(corpus / "tok", corpus, vocab_size=300)
    again = train_tokenizer(corpus, corpus / "tok", vocab_size=300, progress=False)  # it read tok/*.json: an error
    assert again.encode("The Verdict") == first.encode("The Verdict")
    assert [i["path"] for i in json.loads((corpus / "tok" / RECORD_FILE).read_text())["inputs"]] == [
        str(corpus / "a.txt")]
    # A corpus file inside the output directory, named explicitly, is read (it was refused as inside the output).
    train_tokenizer(corpus / "a.txt", corpus, vocab_size=300, progress=False)
    assert tokenizer_is_current(corpus, corpus / "a.txt", vocab_size=300)
