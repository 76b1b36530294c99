"""GPT2Tokenizer against OpenAI's encoding (tiktoken's own loader) and the `tokenizers` library."""

import base64
import copy
import json
import pickle

import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2kit import GPT2Tokenizer
from gpt2kit.tokenizer import ASSETS, TokenizerError, byte_to_unicode, train_bpe

from .conftest import DATA

SAMPLE_CHARS = 200_000


def corpus_samples() -> dict[str, str]:
    zh = [json.loads(line)["text"] for line in (DATA / "zh-wiki-sample" / "zhwiki_wiki_00_kazuhiradz.jsonl").open()]
    return {
        "wikitext": (DATA / "wikitext-2" / "wiki.test.raw").read_text()[:SAMPLE_CHARS],
        "wikitext-tokens": (DATA / "wikitext-2" / "wiki.valid.tokens").read_text()[:SAMPLE_CHARS],
        "shakespeare": (DATA / "tinyshakespeare" / "input.txt").read_text()[:SAMPLE_CHARS],
        "sst2": (DATA / "glue" / "SST-2" / "dev.tsv").read_text(),
        "chinese": "\n".join(zh)[:SAMPLE_CHARS],
    }


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.gpt2()


@pytest.fixture(scope="module")
def openai_encoding() -> tiktoken.Encoding:
    """OpenAI's gpt2 encoding exactly as tiktoken builds it, from the same files (no download, no cache)."""
    import os
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(ASSETS / "vocab.bpe"), str(ASSETS / "encoder.json"))
    return tiktoken.Encoding("gpt2-reference", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory) -> Tokenizer:
    """Byte-level BPE in HF `tokenizers` from the same vocab/merges."""
    reference = Tokenizer(models.BPE.from_file(str(ASSETS / "encoder.json"), str(ASSETS / "vocab.bpe")))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    return reference


def test_vocabulary_shape(tok):
    assert tok.vocab_size == 50257
    assert tok.eos_token_id == 50256
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("name", ["wikitext", "wikitext-tokens", "shakespeare", "sst2", "chinese"])
def test_ids_equal_openai_and_tokenizers(tok, openai_encoding, hf_tokenizers, name):
    text = corpus_samples()[name]
    ours = tok.encode(text)
    assert ours == openai_encoding.encode_ordinary(text)
    lines = text.splitlines(keepends=True)[:2000]  # `tokenizers` is slow; a line-wise sample is plenty
    assert [tok.encode(line) for line in lines] == [e.ids for e in hf_tokenizers.encode_batch(lines)]
    assert tok.decode(ours) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_matches_openai_on_unseen_text(tok, openai_encoding, text):
    assert tok.encode(text) == openai_encoding.encode_ordinary(text)


def test_special_token_policy(tok):
    text = "a<|endoftext|>b"
    assert 50256 not in tok.encode(text)  # raw text never injects a control token
    assert tok.encode(text, allowed_special="all") == [64, 50256, 65]
    # Any collection names tokens (a list was a TypeError from tiktoken); a token's text alone is no collection:
    # with added tokens it was read as a set of its characters, and the token stayed text.
    listed = ["<|endoftext|>"]
    assert tok.encode(text, allowed_special=listed) == [64, 50256, 65]
    assert tok.encode_batch([text], allowed_special=listed) == [[64, 50256, 65]]
    with pytest.raises(ValueError, match=r"allowed_special must be 'all' or a set of special tokens, got '<\|end"):
        tok.encode(text, allowed_special="<|endoftext|>")
    assert tok.decode([64, 50256, 65]) == text
    assert tok.decode([64, 50256, 65], skip_special_tokens=True) == "ab"


def test_call_pads_truncates_and_returns_tensors(tok):
    batch = tok(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[15496, 995], [17250, 50256]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    left = tok(["Hello world", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    assert left["input_ids"].tolist() == [[15496, 995], [50256, 17250]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert tok("one two three four", truncation=True, max_length=2)["input_ids"] == tok.encode("one two")
    # Left padding keeps the first tokens too (it used to keep the last ones): truncation_side decides.
    assert tok("one two three four", truncation=True, max_length=2, padding_side="left")["input_ids"] == \
        tok.encode("one two")
    assert tok("one two three four", truncation=True, max_length=2, truncation_side="left")["input_ids"] == \
        tok.encode(" three four")
    assert tok("one two", truncation=True, max_length=0, truncation_side="left")["input_ids"] == []
    fixed = tok("Hi", padding="max_length", max_length=4)
    assert fixed == {"input_ids": [17250, 50256, 50256, 50256], "attention_mask": [1, 0, 0, 0]}
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hello world", "Hi"], return_tensors="pt")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' GPT2TokenizerFast on the bundled files, padding with EOS as GPT-2 users set it up."""
    from transformers import GPT2TokenizerFast

    directory = tmp_path_factory.mktemp("hf-gpt2")
    GPT2Tokenizer.gpt2().save_pretrained(directory)
    reference = GPT2TokenizerFast.from_pretrained(directory)
    reference.pad_token = reference.eos_token
    return reference


CALLS = [dict(padding=padding, truncation=truncation, max_length=max_length, padding_side=side,
              pad_to_multiple_of=multiple)
         for padding in (False, True, "longest", "max_length", "do_not_pad")
         for truncation in (None, True, False, "longest_first", "do_not_truncate")
         for max_length in (None, 0, 2, 5)
         for side in ("left", "right") for multiple in (None, 4)
         if not (padding == "max_length" and max_length is None)]  # 1024 columns: checked once below


def test_calls_encode_as_transformers_does(tok, hf_tok):
    """Every combination of padding, truncation, max_length, sides and pad_to_multiple_of gives transformers'
    ids and masks (left padding once implied left truncation; max_length alone did not truncate)."""
    import warnings

    texts = ["one two three four five six", "a", "", "Hello world, \u4e2d\u6587 \U0001f600!"]
    ours = copy.copy(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns of max_length without truncation
        for cut in ("left", "right"):  # transformers reads truncation_side off the tokenizer only
            ours.truncation_side = hf_tok.truncation_side = cut
            for options in CALLS:
                for batch in (texts, texts[0]):
                    try:
                        expected = dict(hf_tok(batch, **options))
                    except ValueError:  # a truncation length that is no multiple of pad_to_multiple_of
                        with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
                            ours(batch, **options)
                        continue
                    assert dict(ours(batch, **options)) == dict(tok(batch, **options, truncation_side=cut)) \
                        == expected, (cut, options)
        hf_tok.truncation_side = "right"
        assert dict(tok(texts, padding="max_length")) == dict(hf_tok(texts, padding="max_length"))
        for padding in (True, "max_length"):  # model_max_length (1024) is the truncation length: no multiple of 3
            with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
                hf_tok(texts, padding=padding, truncation=True, pad_to_multiple_of=3)
            with pytest.raises(ValueError, match=r"\(1024\) is not a multiple of pad_to_multiple_of"):
                tok(texts, padding=padding, truncation=True, pad_to_multiple_of=3)
        assert dict(tok(texts[0] * 300, truncation=True)) == dict(hf_tok(texts[0] * 300, truncation=True))
    enc = tok(texts, padding=True, return_attention_mask=False, add_special_tokens=False, return_tensors="np")
    ref = hf_tok(texts, padding=True, return_attention_mask=False, add_special_tokens=False, return_tensors="np")
    assert list(enc) == list(ref) == ["input_ids"] and (enc.input_ids == ref.input_ids).all()
    with pytest.raises(ValueError, match="truncation must be"):
        tok("a", truncation="only_second")


def test_transformers_names_for_tokens_and_the_batch(tok, hf_tok):
    assert tok.get_vocab() == hf_tok.get_vocab()
    text = " world h\u00e9llo \u4e2d"  # (transformers reads "<|endoftext|>" in text as the token; gpt2kit never)
    assert tok.tokenize(text) == hf_tok.tokenize(text)
    ids = tok.encode(text) + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids[0]) == hf_tok.convert_ids_to_tokens(ids[0])
    tokens = ["\u0120world", "<|endoftext|>", "no such token"]
    assert tok.convert_tokens_to_ids(tokens) == hf_tok.convert_tokens_to_ids(tokens) == [995, 50256, 50256]
    assert tok.convert_tokens_to_ids("\u0120world") == 995
    for name in ("eos_token", "bos_token", "unk_token", "eos_token_id", "bos_token_id", "unk_token_id",
                 "all_special_tokens", "all_special_ids", "model_max_length"):
        assert getattr(tok, name) == getattr(hf_tok, name), name
    assert tok.pad_token == hf_tok.pad_token and tok.decode(15496) == hf_tok.decode(15496) == "Hello"
    assert tok.decode(torch.tensor(15496)) == "Hello" and tok.decode(ids, clean_up_tokenization_spaces=True)
    custom = copy.copy(tok)
    custom.pad_token = "!"
    assert custom.pad_token_id == 0 and custom(["a b", "a"], padding=True)["input_ids"][1] == [64, 0]
    with pytest.raises(ValueError, match="not a token"):
        custom.pad_token = "<|pad|>"
    batch = tok(["Hello world", "Hi"], padding=True, return_tensors="pt").to("cpu")
    assert batch.input_ids.tolist() == batch["input_ids"].tolist() and batch.attention_mask.shape == (2, 2)
    with pytest.raises(AttributeError, match="keys: input_ids, attention_mask"):
        batch.token_type_ids


def test_model_max_length_and_sides_survive_saving_and_pickling(tok, tmp_path):
    custom = copy.copy(tok)
    custom.model_max_length, custom.truncation_side = 2048, "left"
    custom.save_pretrained(tmp_path)
    assert GPT2Tokenizer.from_file(tmp_path).model_max_length == 2048
    clone = pickle.loads(pickle.dumps(custom))
    assert (clone.model_max_length, clone.truncation_side) == (2048, "left")


def test_pickles_for_worker_processes(tok, tmp_path):
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 1000  # rebuilt from its files, not shipped whole
    assert clone.encode("pickled text") == tok.encode("pickled text")
    trained = train_bpe([], 300, tmp_path, texts=["abc abd"] * 20, special_tokens=["<|eos|>", "<pad>"],
                        progress=False)
    chosen = GPT2Tokenizer(trained.encoding, source=trained._source, eos_token="<pad>")
    clone = pickle.loads(pickle.dumps(chosen))  # the end of text was reset to the vocabulary's default
    assert (clone.eos_token, clone.eos_token_id) == ("<pad>", 1)


def test_cl100k_rank_file_for_chinese():
    cl100k = GPT2Tokenizer.from_file(DATA / "cl100k" / "cl100k_base.tiktoken")
    assert cl100k.vocab_size == 100277 and cl100k.eos_token_id == 100257
    text = corpus_samples()["chinese"][:20000]
    ids = cl100k.encode(text)
    assert cl100k.decode(ids) == text
    assert len(ids) < len(GPT2Tokenizer.gpt2().encode(text))  # the point of using it for Chinese
    assert cl100k.encode("hello world") == [15339, 1917]  # cl100k's published ids


def test_openai_rank_files_by_name_and_other_rank_files(tmp_path, tok):
    """OpenAI's rank files are known by name (GPT-2's ranks saved as r50k_base.tiktoken give GPT-2's ids and
    its <|endoftext|>); another file's end-of-text id follows its highest rank, gaps included."""
    ranks = tok.encoding._mergeable_ranks
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (tmp_path / "r50k_base.tiktoken").write_text("\n".join(lines) + "\n")
    r50k = GPT2Tokenizer.from_file(tmp_path / "r50k_base.tiktoken")
    text = "In 2023123 we  said:\n\n  it's done " + corpus_samples()["shakespeare"][:5000]
    assert r50k.encode(text) == tok.encode(text) and r50k.eos_token_id == 50256
    gapped = [f"{base64.b64encode(bytes([b])).decode()} {b if b < 200 else b + 10}" for b in range(256)]
    (tmp_path / "gapped.tiktoken").write_text("\n".join(gapped) + "\n")
    other = GPT2Tokenizer.from_file(tmp_path / "gapped.tiktoken")
    assert other.eos_token_id == 266 and other.decode([other.eos_token_id]) == "<|endoftext|>"
    assert other.unused_ids(267) == list(range(200, 210))


def test_a_vocabulary_rewritten_in_place_is_read_again(tmp_path):
    texts = [corpus_samples()["shakespeare"][:50000]]
    assert train_bpe([], 300, tmp_path, texts=texts).vocab_size == 300
    assert train_bpe([], 400, tmp_path, texts=texts).vocab_size == 400  # same path, new file
    assert GPT2Tokenizer.from_file(tmp_path).vocab_size == 400


def test_tokenizer_json_and_vocab_merges_dirs(tmp_path, tok, hf_tokenizers):
    hf_tokenizers.save(str(tmp_path / "tokenizer.json"))
    from_json = GPT2Tokenizer.from_file(tmp_path / "tokenizer.json")
    text = corpus_samples()["shakespeare"][:20000]
    assert from_json.encode(text) == tok.encode(text)
    tok.save_pretrained(tmp_path / "saved")
    assert GPT2Tokenizer.from_pretrained(tmp_path / "saved").encode(text) == tok.encode(text)
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert hf(text[:2000])["input_ids"] == tok.encode(text[:2000])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        GPT2Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "wp.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match="byte-level BPE only"):
        GPT2Tokenizer.from_file(tmp_path / "wp.json")
    (tmp_path / "bad.tiktoken").write_text("not-base64 x\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:1: expected"):
        GPT2Tokenizer.from_file(tmp_path / "bad.tiktoken")
    # tiktoken's Rust core panicked on these (not an Exception: the CLI printed two tracebacks) or failed later.
    byte_lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    for name, lines, message in [
            ("few", byte_lines[:200], r"few.tiktoken lacks 56 of the 256 single-byte tokens"),
            ("twice", byte_lines + [byte_lines[7].split()[0] + " 300"], r"twice.tiktoken:257: token b'\\x07' is "
             "listed twice"),
            ("same_rank", byte_lines + ["YWI= 5"], r"same_rank.tiktoken:257: rank 5 is also on line 6"),
            ("negative", ["YWI= -1"] + byte_lines, r"negative.tiktoken:1: rank -1 is negative"),
            ("blank", [], r"blank.tiktoken lacks 256 of the 256")]:
        (tmp_path / f"{name}.tiktoken").write_text("\n".join(lines) + "\n")
        with pytest.raises(TokenizerError, match=message):
            GPT2Tokenizer.from_file(tmp_path / f"{name}.tiktoken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        GPT2Tokenizer.from_pretrained(tmp_path / "empty")


# ---- save_pretrained: what it writes reloads, in gpt2kit and in transformers, to the same ids -------------------
SAVE_TEXTS = ["hello world", "| and ([docs/performance.md](docs/performance.md#x)). 133.5 \n",
              "\u4e2d\u6587\u7684\u4f8b\u5b50\uff0c\u6d4b\u8bd5\u3002\r\n\n  x  ", "I'LL   don't 12345 \U0001F469\u200d\U0001F467"]


def assert_reloads_to_the_same_ids(tok, directory):
    import transformers

    auto = transformers.AutoTokenizer.from_pretrained(directory)
    back = GPT2Tokenizer.from_file(directory)
    for text in SAVE_TEXTS:
        assert auto(text)["input_ids"] == back.encode(text) == tok.encode(text), text
    assert back.eos_token == auto.eos_token == tok.eos_token
    # Special tokens keep their ids (tokenizers renumbered cl100k's, which sit in gaps of the vocabulary).
    specials = "x" + "y".join(sorted(tok.encoding.special_tokens_set))
    assert auto(specials)["input_ids"] == tok.encode(specials, allowed_special="all")


def test_a_rank_file_saves_as_a_tokenizer_json_transformers_loads(tmp_path):
    cl100k = GPT2Tokenizer.from_file(DATA / "cl100k" / "cl100k_base.tiktoken")
    cl100k.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                                       "tokenizer_config.json"]
    assert_reloads_to_the_same_ids(cl100k, tmp_path / "saved")
    # The split pattern is cl100k's, not GPT-2's: transformers must not rebuild a ByteLevel pre-tokenizer.
    # Saved under another name, it is saved back as tokenizer.json; saving into its own directory is a no-op.
    (tmp_path / "saved" / "tokenizer.json").rename(tmp_path / "my_tok.json")
    renamed = GPT2Tokenizer.from_file(tmp_path / "my_tok.json")
    renamed.save_pretrained(tmp_path / "again")
    assert_reloads_to_the_same_ids(cl100k, tmp_path / "again")
    GPT2Tokenizer.from_file(tmp_path / "again").save_pretrained(tmp_path / "again")
    assert_reloads_to_the_same_ids(cl100k, tmp_path / "again")


def test_a_save_replaces_the_vocabulary_an_earlier_save_left(tmp_path):
    texts = ["some text to train on, over and over"] * 50
    trained = train_bpe([], 300, tmp_path / "trained", texts=texts, progress=False)
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "model")
    trained.save_pretrained(tmp_path / "model")
    assert GPT2Tokenizer.from_file(tmp_path / "model").vocab_size == trained.vocab_size < 50257
    assert not (tmp_path / "model" / "vocab.json").exists()
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "model")
    assert GPT2Tokenizer.from_file(tmp_path / "model").vocab_size == 50257
    GPT2Tokenizer.from_file(tmp_path / "model").save_pretrained(tmp_path / "model")  # into its own files


def test_a_directory_with_tokenizer_json_and_vocab_files_reads_tokenizer_json(tmp_path):
    """HF model repositories ship both; tokenizer.json holds the split pattern and the added tokens."""
    cl100k = GPT2Tokenizer.from_file(DATA / "cl100k" / "cl100k_base.tiktoken")
    cl100k.save_pretrained(tmp_path)
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "gpt2" / name).rename(tmp_path / name)
    assert GPT2Tokenizer.from_file(tmp_path).fingerprint() == cl100k.fingerprint()


def test_the_end_of_text_token_of_other_vocabularies(tmp_path):
    trained = train_bpe([], 300, tmp_path, texts=["abc abd"] * 20, special_tokens=["<|eos|>", "<pad>"],
                        progress=False)
    assert trained.eos_token == "<|eos|>"
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [{**spec["added_tokens"][0], "content": "<|begin_of_text|>", "id": 0},
                            {**spec["added_tokens"][1], "content": "<|end_of_text|>", "id": 1}]
    for token in ("<|eos|>", "<pad>"):
        spec["model"]["vocab"][{"<|eos|>": "<|begin_of_text|>", "<pad>": "<|end_of_text|>"}[token]] = \
            spec["model"]["vocab"].pop(token)
    (tmp_path / "llama.json").write_text(json.dumps(spec))
    assert GPT2Tokenizer.from_file(tmp_path / "llama.json").eos_token == "<|end_of_text|>"


def _spec(tmp_path, **changes):
    spec = json.loads((tmp_path / "base" / "tokenizer.json").read_text())
    for path, value in changes.items():
        target = spec
        *parents, last = path.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    return spec


@pytest.mark.parametrize("change, message", [
    ("top_list", r"bad.json: model type None"),
    ("no_vocab", r"bad.json: model.vocab must be a JSON object of token -> integer id"),
    ("added_without_content", r"bad.json: added_tokens\[0\] must be an object with a string content"),
    ("three_part_merge", r"bad.json: merge 1 is 'a b c'; expected two tokens"),
    ("metaspace_token", r"bad.json: token '\u2581a' is not in GPT-2's byte-level alphabet"),
    ("normalizer", r"bad.json: normalizer 'NFKC': gpt2kit runs tokenizers without a normalizer"),
    ("prefix_space", r"bad.json: pre_tokenizer: add_prefix_space is true"),
    ("stripping_added_token", r"bad.json: added token '<\|user\|>' has rstrip set; gpt2kit matches added tokens "
     "exactly as written"),
    ("missing_bytes", r"bad.json: the vocabulary lacks 1 of the 256 single-byte tokens"),
    ("unmerged_token", r"bad.json: 1 multi-byte tokens \(e.g. b'zzz'\) are made by no merge while ignore_merges is "
     "false"),
    # tokenizers ignored these (a BOS token went missing) or tiktoken panicked / overflowed on them.
    ("bos_post_processor", r"bad.json: post_processor 'TemplateProcessing' adds tokens around the text"),
    ("bert_post_processor", r"bad.json: post_processor 'BertProcessing' adds tokens"),
    ("shared_id", r"bad.json: tokens b'a' and b'b' share id \d+; ids must be distinct"),
    ("special_on_a_token", r"bad.json: tokens b'a' and '<\|endoftext\|>' share id"),
    ("huge_id", r"bad.json: token '<\|endoftext\|>' has id 4294967296; ids must lie in \[0, 4294967296\)"),
    ("negative_id", r"bad.json: token '<\|endoftext\|>' has id -1"),
    ("added_twice", r"bad.json: added_tokens lists '<\|endoftext\|>' more than once"),
    ("bad_regex", r"bad.json: split pattern '\(ab': Parsing error"),
    # A second split, or a split of another kind, were ignored: the ids differed from transformers'.
    ("split_twice", r"bad.json: pre_tokenizer \[Split, ByteLevel\(use_regex=True\)\] is not a byte-level split"),
    ("digits", r"bad.json: pre_tokenizer \[Digits, ByteLevel\(use_regex=True\)\] is not"),
    ("removed", r"bad.json: pre_tokenizer \[Split, ByteLevel\(use_regex=False\)\] is not"),
])
def test_tokenizer_json_settings_gpt2kit_cannot_run_are_refused(tmp_path, change, message):
    train_bpe([], 300, tmp_path / "base", texts=["abc abd xyz"] * 20, progress=False)
    spec = _spec(tmp_path)
    vocab = spec["model"]["vocab"]
    if change == "top_list":
        spec = [spec]
    elif change == "no_vocab":
        del spec["model"]["vocab"]
    elif change == "added_without_content":
        del spec["added_tokens"][0]["content"]
    elif change == "three_part_merge":
        spec["model"]["merges"] = ["a b c"]
    elif change == "metaspace_token":
        vocab["\u2581a"] = len(vocab)
    elif change == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif change == "prefix_space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif change == "stripping_added_token":
        spec["added_tokens"].append({**spec["added_tokens"][0], "content": "<|user|>", "id": len(vocab),
                                     "special": False, "rstrip": True})
    elif change == "missing_bytes":
        del vocab["x"]
    elif change in ("bos_post_processor", "bert_post_processor"):
        spec["post_processor"] = (
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                      {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
             "special_tokens": {}} if change == "bos_post_processor" else {"type": "BertProcessing"})
    elif change == "shared_id":
        vocab["a"] = vocab["b"]
    elif change == "special_on_a_token":
        spec["added_tokens"][0]["id"] = vocab["a"]
    elif change in ("huge_id", "negative_id"):
        spec["added_tokens"][0]["id"] = 2 ** 32 if change == "huge_id" else -1
    elif change == "added_twice":
        spec["added_tokens"].append({**spec["added_tokens"][0], "id": len(vocab)})
    elif change == "bad_regex":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(ab"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    elif change in ("split_twice", "digits", "removed"):
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": change != "removed"}
        first = ({"type": "Digits", "individual_digits": True} if change == "digits" else
                 {"type": "Split", "pattern": {"Regex": "\\s+"}, "invert": False,
                  "behavior": "Removed" if change == "removed" else "Isolated"})
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, byte_level]}
    else:
        vocab["zzz"] = len(vocab)
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=message):
        GPT2Tokenizer.from_file(tmp_path / "bad.json")


def test_post_processors_that_add_nothing_are_accepted(tmp_path):
    """transformers saves GPT-2 with a TemplateProcessing of the text alone; hub files carry a ByteLevel one."""
    train_bpe([], 300, tmp_path / "base", texts=["abc abd xyz"] * 20, progress=False)
    text_alone = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                  "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                  "special_tokens": {}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    for n, processor in enumerate([text_alone, byte_level, {"type": "Sequence", "processors": [byte_level]}]):
        (tmp_path / f"ok{n}.json").write_text(json.dumps(_spec(tmp_path, post_processor=processor)))
        assert GPT2Tokenizer.from_file(tmp_path / f"ok{n}.json").encode("abc abd") == \
            Tokenizer.from_file(str(tmp_path / f"ok{n}.json")).encode("abc abd").ids


def test_merges_tiktoken_would_make_otherwise_are_refused(tmp_path):
    """tiktoken joins any adjacent pair whose result is a token, transformers only listed pairs: with merges
    (b c), (a b), (ab c), transformers encodes "abc" as [a, bc] and tiktoken would join a + bc into abc."""
    to_text = byte_to_unicode()
    vocab = {"<|endoftext|>": 0, **{to_text[b]: b + 1 for b in range(256)}, "bc": 257, "ab": 258, "abc": 259}
    train_bpe([], 300, tmp_path / "base", texts=["abc abd xyz"] * 20, progress=False)
    spec = _spec(tmp_path, model__vocab=vocab, model__merges=[["b", "c"], ["a", "b"], ["ab", "c"]],
                 model__ignore_merges=False)
    spec["added_tokens"] = [{**spec["added_tokens"][0], "id": 0}]
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    assert Tokenizer.from_file(str(tmp_path / "bad.json")).encode("abc").ids == [98, 257]
    with pytest.raises(TokenizerError, match=r"bad.json: merge 3 \('ab c'\) makes a token that tiktoken would "
                                             r"build from 'a bc'"):
        GPT2Tokenizer.from_file(tmp_path / "bad.json")


def test_vocab_and_merges_files_are_checked_like_tokenizer_json(tmp_path):
    """vocab.json + merges.txt from elsewhere: a missing byte made tiktoken panic on encode, a token no merge
    makes was emitted whole where transformers splits it."""
    vocab = json.loads((ASSETS / "encoder.json").read_text())
    merges = (ASSETS / "vocab.bpe").read_text()
    for name, change, message in [
            ("no_byte", lambda v: v.pop("z"), r"no_byte/merges.txt: the vocabulary lacks 1 of the 256"),
            ("unmerged", lambda v: v.update({"\u0120zzzzq": len(v)}),
             r"unmerged/merges.txt: 1 multi-byte tokens \(e.g. b' zzzzq'\) are made by no merge \(in vocab.json \+ "
             r"merges.txt\)")]:
        edited = dict(vocab)
        change(edited)
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.json").write_text(json.dumps(edited))
        (tmp_path / name / "merges.txt").write_text(merges)
        with pytest.raises(TokenizerError, match=message):
            GPT2Tokenizer.from_file(tmp_path / name)


@pytest.mark.parametrize("vocab, merges, message", [
    ("[]", "#version: 0.2\n", r"bad/vocab.json: the file must be a JSON object of token -> integer id"),
    ('{"a": "1"}', "#version: 0.2\n", r"bad/vocab.json: the file must be a JSON object of token -> integer id"),
    ("{}", b"#version: 0.2\n\xff\n", r"bad/merges.txt: not UTF-8 text"),
])
def test_malformed_vocab_and_merges_files_name_the_file(tmp_path, vocab, merges, message):
    """They crashed with AttributeError / TypeError, or gave a decoding error that named no file."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text(vocab)
    (tmp_path / "bad" / ("merges.txt")).write_bytes(merges if isinstance(merges, bytes) else merges.encode())
    with pytest.raises(TokenizerError, match=message):
        GPT2Tokenizer.from_file(tmp_path / "bad")


def test_merges_without_a_version_header_keep_their_first_merge(tmp_path):
    """transformers skips only a "#version" first line; gpt2kit dropped line 1 whatever it held."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "vocab.json").write_bytes((ASSETS / "encoder.json").read_bytes())
    lines = (ASSETS / "vocab.bpe").read_text().split("\n")
    assert lines[0].startswith("#version")
    (tmp_path / "plain" / "merges.txt").write_text("\n".join(lines[1:]))
    text = " the theory of everything"
    assert GPT2Tokenizer.from_file(tmp_path / "plain").encode(text) == GPT2Tokenizer.gpt2().encode(text)


def test_a_vocab_json_path_loads_with_its_merges(tmp_path):
    """A path to vocab.json (or encoder.json) is the pair it belongs to; it was read as a tokenizer.json."""
    (tmp_path / "vocab.json").write_bytes((ASSETS / "encoder.json").read_bytes())
    with pytest.raises(TokenizerError, match=r"merges.txt: file not found \(vocab.json and merges.txt form a pair"):
        GPT2Tokenizer.from_file(tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_bytes((ASSETS / "vocab.bpe").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    tokenizer = GPT2Tokenizer.from_file(tmp_path / "vocab.json")
    assert tokenizer.encode(" Hello world") == GPT2Tokenizer.gpt2().encode(" Hello world")
    assert tokenizer.model_max_length == 77
    assert GPT2Tokenizer.from_file(ASSETS / "encoder.json").fingerprint() == GPT2Tokenizer.gpt2().fingerprint()


def test_unmerged_tokens_the_split_never_leaves_whole_are_accepted(tmp_path, monkeypatch):
    """tokenizers' ByteLevelBPETokenizer lists extra special tokens (here "<|pad|>") in vocab.json with no merge:
    GPT-2's split cuts such text into "<|", "pad", "|>", so tiktoken never emits the token and the ids equal
    transformers'. Copies of the bundled files are trusted by hash, as the bundled ones are."""
    import transformers

    import gpt2kit.tokenizer as tokenizer_module

    vocab = json.loads((ASSETS / "encoder.json").read_text())
    vocab["<|pad|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_bytes((ASSETS / "vocab.bpe").read_bytes())
    text = "a <|pad|> b<|pad|>"
    assert GPT2Tokenizer.from_file(tmp_path).encode(text) == \
        transformers.GPT2TokenizerFast.from_pretrained(tmp_path)(text)["input_ids"]

    def no_merge_check(*args):
        raise AssertionError("a copy of the bundled files was checked merge by merge")

    monkeypatch.setattr(tokenizer_module, "_split_in_two", no_merge_check)
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "copy")
    assert GPT2Tokenizer.from_file(tmp_path / "copy").fingerprint() == GPT2Tokenizer.gpt2().fingerprint()


def test_saving_into_the_directory_of_its_own_encoder_files_keeps_them(tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((ASSETS / name).read_bytes())
    tok = GPT2Tokenizer.from_file(tmp_path)
    tok.save_pretrained(tmp_path)  # deleted encoder.json before copying from it
    assert {"encoder.json", "vocab.bpe", "vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert GPT2Tokenizer.from_file(tmp_path).fingerprint() == GPT2Tokenizer.gpt2().fingerprint()
    assert pickle.loads(pickle.dumps(tok)).encode("still readable") == tok.encode("still readable")


def test_ids_outside_the_vocabulary_are_named(tok):
    for bad in (-1, 50257, 2 ** 40):
        with pytest.raises(ValueError, match=f"cannot decode id {bad}: it is not in the vocabulary of 'gpt2'"):
            tok.decode([10, bad])
        with pytest.raises(ValueError, match=f"cannot decode id {bad}"):
            tok.decode_bytes([bad])
    empty = tok([], padding=True, return_tensors="pt")
    assert empty["input_ids"].shape == empty["attention_mask"].shape == (0, 0)


def test_training_input_mistakes_are_clear(tmp_path):
    with pytest.raises(ValueError, match="nothing to train on"):
        train_bpe([], 300, tmp_path)
    with pytest.raises(ValueError, match="special_tokens: give at least one"):
        train_bpe([], 300, tmp_path / "none", texts=["abc"], special_tokens=())
    assert not (tmp_path / "none").exists()
    for options, message in [({"min_frequency": -1}, "min_frequency must be >= 0"),
                             ({"vocab_size": 2 ** 40}, "vocab_size must be at least 257 .* and below 4294967296")]:
        with pytest.raises(ValueError, match=message):  # tokenizers overflowed on these, after mkdir
            train_bpe([], **{"vocab_size": 300, **options}, output_dir=tmp_path / "none", texts=["abc"])
        assert not (tmp_path / "none").exists()
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match=r"latin1.txt:1: invalid UTF-8 at byte offset 3"):
        train_bpe([tmp_path / "latin1.txt"], 300, tmp_path / "out", progress=False)


def test_a_converted_rank_file_is_the_same_tokenizer_to_transformers_and_to_itself(tmp_path):
    """Long digit runs split in threes in both engines (Oniguruma reads "{1,3}+" otherwise); the fingerprint
    follows the ids, not the file format; saving next to the rank file it was read from keeps that file."""
    import shutil

    import transformers

    shutil.copy(DATA / "cl100k" / "cl100k_base.tiktoken", tmp_path / "cl100k_base.tiktoken")
    cl100k = GPT2Tokenizer.from_file(tmp_path)
    cl100k.save_pretrained(tmp_path)
    assert (tmp_path / "cl100k_base.tiktoken").is_file() and pickle.loads(pickle.dumps(cl100k)).vocab_size > 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in (" 4096 and 1234567 items", "year 20250101"):
        assert auto(text)["input_ids"] == cl100k.encode(text)
    assert GPT2Tokenizer.from_file(tmp_path / "tokenizer.json").fingerprint() == cl100k.fingerprint()
    assert GPT2Tokenizer.gpt2().fingerprint() != cl100k.fingerprint()
