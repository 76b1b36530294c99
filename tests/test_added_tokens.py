"""Adding tokens to a tokenizer and resizing a model's embeddings to match, as transformers users do to give GPT-2
a pad token or chat markers: the same ids, files and embeddings as transformers."""

import json
import pickle

import numpy as np
import pytest
import torch
import transformers

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.data.datasets import load_tokenizer, read_meta
from gpt2kit.data.preprocess import preprocess
from gpt2kit.model import GPT2ForSequenceClassification
from gpt2kit.quantization import quantize_int8
from gpt2kit.tokenizer import TokenizerError

TEXT = "hi <|user|> x<code>y hello [PAD] <|endoftext|> and  hello again<code>"
SPECIALS = {"pad_token": "[PAD]", "additional_special_tokens": ["<|user|>"]}
ORDINARY = ["<code>", " hello"]


@pytest.fixture
def pair(tmp_path):
    """gpt2kit's GPT-2 tokenizer and transformers' loaded from its files, both given the same added tokens."""
    ours = GPT2Tokenizer.gpt2()
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    for tok in (ours, theirs):
        assert tok.add_special_tokens(SPECIALS) == 2
        assert tok.add_tokens(ORDINARY) == 2
    return ours, theirs


def test_added_tokens_get_transformers_ids(pair):
    ours, theirs = pair
    assert len(ours) == len(theirs) == 50261
    assert (ours.pad_token, ours.pad_token_id) == (theirs.pad_token, theirs.pad_token_id) == ("[PAD]", 50257)
    assert ours.convert_tokens_to_ids(["<|user|>", "<code>", " hello"]) == [50258, 50259, 50260]
    # Ordinary added tokens are matched in text as transformers matches them; special ones only when allowed
    # (gpt2kit's rule for <|endoftext|> too), and then as transformers does by default.
    assert ours.encode(TEXT, allowed_special="all") == theirs(TEXT)["input_ids"]
    plain = ours.encode(TEXT)
    assert plain.count(50259) == 2 and plain.count(50260) == 2 and 50257 not in plain and 50258 not in plain
    assert ours.decode(plain) == TEXT
    assert ours(TEXT)["input_ids"] == plain and ours.encode_batch([TEXT, TEXT]) == [plain, plain]
    ids = theirs(TEXT)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.all_special_tokens == ["<|endoftext|>", "[PAD]", "<|user|>"]
    # Known tokens get no new id ("hello" is in GPT-2's vocabulary; " hello" there is spelled "Ġhello"); the
    # vocabulary's are registered under their ids, then matched as written.
    assert ours.add_tokens(["<code>", "hello", "Ġhello"]) == theirs.add_tokens(["<code>", "hello", "Ġhello"]) == 2
    assert len(ours) == len(theirs) == 50261 and ours.added_since_loading == ["[PAD]", "<|user|>", "<code>", " hello"]
    assert ours.encode("a hello Ġhello") == theirs("a hello Ġhello")["input_ids"]


@pytest.mark.parametrize("token,saved", [("!", True), ("hello", True), ("é", False), ("Ġhello", False)])
def test_a_vocabulary_token_made_special_keeps_its_id_as_in_transformers(token, saved, tmp_path):
    """transformers registers a token vocab.json spells alike under its id (pad_token "!" is 0): it was skipped, so
    text was split otherwise, skip_special_tokens kept it, and a tokenizer transformers saved so failed to load."""
    ours = GPT2Tokenizer.gpt2()
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    for tok in (ours, theirs):
        assert tok.add_special_tokens({"pad_token": token}) == 1 and len(tok) == 50257
    text = f"Hi{token}{token} What?{token} ok{token}"
    ids = theirs(text)["input_ids"]
    assert ours.encode(text, allowed_special="all") == ids and ours.pad_token_id == theirs.pad_token_id
    assert ours.all_special_ids == sorted(theirs.all_special_ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    if not saved:  # the files of a single byte and of a merge's result failed to load; these load as those do
        return
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for directory in ("ours", "theirs"):
        reloaded = GPT2Tokenizer.from_file(tmp_path / directory)
        assert reloaded.encode(text, allowed_special="all") == ids and reloaded.pad_token_id == theirs.pad_token_id
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / directory)(text)["input_ids"] == ids
        assert reloaded.fingerprint() == ours.fingerprint()
    assert pickle.loads(pickle.dumps(ours)).encode(text, allowed_special="all") == ids


def test_added_tokens_survive_saving_pickling_and_workers(pair, tmp_path):
    ours, theirs = pair
    ours.save_pretrained(tmp_path / "ours")
    assert not (tmp_path / "ours" / "vocab.json").exists()  # GPT-2's files lack the added tokens
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "[PAD]"
    theirs.save_pretrained(tmp_path / "theirs")
    for reloaded in (GPT2Tokenizer.from_file(tmp_path / "ours"), GPT2Tokenizer.from_file(tmp_path / "theirs"),
                     pickle.loads(pickle.dumps(ours))):
        assert len(reloaded) == 50261 and reloaded.pad_token_id == 50257
        assert reloaded.encode(TEXT) == ours.encode(TEXT)
        assert reloaded.encode(TEXT, allowed_special="all") == theirs(TEXT)["input_ids"]
        assert reloaded.fingerprint() == ours.fingerprint()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert hf(TEXT)["input_ids"] == theirs(TEXT)["input_ids"] and hf.pad_token == "[PAD]"
    # Preprocessing encodes in worker processes (the pickled tokenizer): the ordinary added tokens are matched.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "tokens"
    preprocess(corpus, out, tokenizer=tmp_path / "ours", workers=2, progress=False)
    meta = read_meta(out)
    tokens = np.concatenate([np.fromfile(out / shard["file"], dtype=meta["dtype"])
                             for shard in meta["splits"]["train"]["shards"]])
    assert tokens.tolist() == ours.encode(TEXT) + [ours.eos_token_id]


def test_roles_and_bad_input(tmp_path):
    tok = GPT2Tokenizer.gpt2()
    assert tok.add_special_tokens({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}) == 2
    assert (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (50257, 50258, 50256)
    tok.save_pretrained(tmp_path / "t")
    again = GPT2Tokenizer.from_file(tmp_path / "t")
    assert (again.eos_token, again.bos_token, again.pad_token_id) == ("<|im_end|>", "<|im_start|>", 50257)
    assert "pad_token" not in json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())  # unset: EOS pads
    with pytest.raises(ValueError, match="unknown key 'sep_token'"):
        tok.add_special_tokens({"sep_token": "<sep>"})
    with pytest.raises(ValueError, match="non-empty strings"):
        tok.add_tokens([""])
    with pytest.raises(ValueError, match="pad_token 'nope!' is not a token"):
        tok.pad_token = "nope!"
    config = tmp_path / "t" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pad_token": {"id": 3}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: a token must be a string or an AddedToken"):
        GPT2Tokenizer.from_file(tmp_path / "t")


def test_a_pad_token_set_to_the_eos_token_is_saved_for_transformers(tmp_path):
    """`tok.pad_token = tok.eos_token`, the usual line for GPT-2: padding used the EOS id already, and now the saved
    tokenizer names it, so transformers' tokenizer pads batches too; unset, GPT-2 has no pad token, as in
    transformers."""
    tok = GPT2Tokenizer.gpt2()
    tok.save_pretrained(tmp_path / "unset")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "unset").pad_token is None
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == 50256
    for copy in (tok, pickle.loads(pickle.dumps(tok))):
        copy.save_pretrained(tmp_path / "set")
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "set")
        assert (theirs.pad_token, theirs.pad_token_id) == ("<|endoftext|>", 50256)
        assert theirs(["a", "a b c"], padding=True)["input_ids"][0] == tok(["a", "a b c"], padding=True)["input_ids"][0]
    again = GPT2Tokenizer.from_file(tmp_path / "set")
    again.add_special_tokens({"eos_token": "<|im_end|>"})
    assert again.pad_token_id == 50256  # set: it stays when EOS changes
    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    assert tok.pad_token_id == tok.eos_token_id == 50257  # unset: padding follows EOS


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_as_transformers(tmp_path, tied):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=32,
                                       tie_word_embeddings=tied)).eval()
    model.save_pretrained(tmp_path / "m")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 300, (2, 12))
    before = model(ids).logits
    embedding = model.resize_token_embeddings(310)
    theirs.resize_token_embeddings(310)
    assert embedding is model.get_input_embeddings() and model.config.vocab_size == 310
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert model.get_output_embeddings().weight.shape == (310, 64)
    after = model(ids).logits
    assert torch.equal(after[..., :300], before)  # kept rows keep their values
    # New rows: the old rows' mean, which transformers samples around with a covariance scaled by 1e-9.
    for name in ("transformer.wte.weight", "lm_head.weight"):
        torch.testing.assert_close(model.state_dict()[name], theirs.state_dict()[name], atol=1e-4, rtol=0)
    torch.testing.assert_close(after, theirs(ids).logits, atol=1e-3, rtol=0)
    # Saved with the new size, it loads back, in gpt2kit and in transformers, to the same logits.
    model.save_pretrained(tmp_path / "resized")
    for loaded in (GPT2LMHeadModel.from_pretrained(tmp_path / "resized"),
                   transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "resized")):
        torch.testing.assert_close(loaded.eval()(ids).logits, after, atol=1e-5, rtol=1e-5)
    # Training on a new token reaches its row; rounding up and shrinking are transformers' too.
    model.train()
    model(torch.tensor([[305, 1, 2]]), labels=torch.tensor([[305, 1, 2]])).loss.backward()
    assert model.transformer.wte.weight.grad[305].abs().sum() > 0
    model.resize_token_embeddings(311, pad_to_multiple_of=64)
    assert model.config.vocab_size == 320 and model.lm_head.weight.shape[0] == 320
    model.resize_token_embeddings(200)
    assert model(ids[ids < 200].view(1, -1)).logits.shape[-1] == 200
    # The modules stay, with their hooks and requires_grad (a frozen embedding stays frozen), as in transformers.
    embedding, seen = model.get_input_embeddings(), []
    embedding.register_forward_hook(lambda *_: seen.append(1))
    embedding.weight.requires_grad_(False)
    assert model.resize_token_embeddings() is embedding and model.config.vocab_size == 200
    assert model.resize_token_embeddings(210) is embedding is model.transformer.wte
    model(ids[ids < 200].view(1, -1))
    assert seen and not embedding.weight.requires_grad and model.lm_head.out_features == 210
    assert embedding.weight.grad is None  # a new parameter: no gradient of the old shape
    same = embedding.weight
    assert model.resize_token_embeddings(210) is embedding and embedding.weight is same  # nothing to change


def test_resize_without_mean_and_for_classifiers_and_refusals():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16, num_labels=3)
    classifier = GPT2ForSequenceClassification(config).eval()
    classifier.resize_token_embeddings(104, mean_resizing=False)
    new_rows = classifier.transformer.wte.weight[100:]
    assert classifier.get_output_embeddings() is None and classifier.config.vocab_size == 104
    assert not torch.allclose(new_rows, new_rows.mean(0).expand_as(new_rows))  # drawn, not one mean row
    assert classifier(torch.tensor([[103, 5]])).logits.shape == (1, 3)
    model = quantize_int8(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
                                                     n_positions=16)).eval())
    with pytest.raises(ValueError, match="resize_token_embeddings needs float weights held whole"):
        model.resize_token_embeddings(104)


def test_training_with_added_tokens_saves_a_model_that_loads_with_them(tmp_path):
    """The transformers recipe end to end: add tokens, resize, train on text that uses them; the run's final model
    and tokenizer load together (pipeline) with the new rows trained."""
    from gpt2kit import Trainer, pipeline
    from gpt2kit.training.config import load_config

    tok = GPT2Tokenizer.gpt2()
    tok.add_tokens(["<code>", "</code>"])
    tok.add_special_tokens({"pad_token": "[PAD]"})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64))
    model.resize_token_embeddings(len(tok))
    start = model.transformer.wte.weight[50257].clone()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"run <code>x = {i}</code> now\n\n" for i in range(64)))
    config = load_config(out_dir=str(tmp_path / "run"), model={"name": "gpt2-tiny"},
                         data={"train": str(corpus), "format": "paragraphs", "max_length": 32},
                         train={"max_steps": 4, "micro_batch_size": 4}, optim={"lr": 1e-2, "warmup_steps": 0},
                         log={"tensorboard": False, "plot": False, "progress": False})
    Trainer(model=model, tokenizer=tok, args=config).train()
    assert not torch.equal(model.transformer.wte.weight[50257], start)  # "<code>" was seen and trained
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 50260
    generator = pipeline("text_generation", model=str(final))
    assert len(generator.tokenizer) == 50260 and generator.tokenizer.pad_token == "[PAD]"
    assert generator.tokenizer.encode("<code>") == [50257]
    out = generator("run <code>", max_new_tokens=3, do_sample=False, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)


def test_overlapping_added_tokens_take_the_longest_match(tmp_path):
    """tiktoken tries special tokens in no fixed order; transformers takes the longest match at each position."""
    ours = GPT2Tokenizer.gpt2()
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    tokens = ["\t\t", "\t\t\t", "\t\t\t\t", "<tool>", "<tool>call", "<s>y", "z<eot>"]
    for tok in (ours, theirs):
        tok.add_tokens(tokens)
        tok.add_special_tokens({"additional_special_tokens": ["<s>", "<s>x", "<eot>"]})
    # Special tokens are split out first, then ordinary ones: "<s>y" and "z<eot>" never match whole.
    texts = ["if x:\n\t\t\t\treturn 1\n\t\t\tpass", "x<tool>call y <tool> z", "<s>x<s> a", "<s>y z<eot> b"]
    for text in texts:
        assert ours.encode(text, allowed_special="all") == theirs(text)["input_ids"]
    assert ours.encode_batch(texts, allowed_special="all") == [theirs(t)["input_ids"] for t in texts]
    ours.save_pretrained(tmp_path / "ours")
    reloaded = GPT2Tokenizer.from_file(tmp_path / "ours")  # ordinary added tokens read from tokenizer.json
    assert [reloaded.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    # A partial overlap alone, no token inside another: "q<s" ends where "<s>" begins (tiktoken took "q<s").
    ours, theirs = GPT2Tokenizer.gpt2(), transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    for tok in (ours, theirs):
        tok.add_tokens(["q<s"])
        tok.add_special_tokens({"additional_special_tokens": ["<s>"]})
    assert ours.encode("aq<s>b", allowed_special="all") == theirs("aq<s>b")["input_ids"]


def test_fingerprint_tells_what_changes_the_ids():
    """Data and a run's saved tokenizer are reused by fingerprint: it changes with how an added token is matched
    and with the roles (EOS ends every document), and not for a tokenizer left at its defaults."""
    plain = GPT2Tokenizer.gpt2()
    as_text, as_special = GPT2Tokenizer.gpt2(), GPT2Tokenizer.gpt2()
    as_text.add_tokens(["<code>"])
    as_special.add_tokens(["<code>"], special_tokens=True)
    assert len({plain.fingerprint(), as_text.fingerprint(), as_special.fingerprint()}) == 3
    padded = GPT2Tokenizer.gpt2()
    padded.add_special_tokens({"additional_special_tokens": ["<code>"]})
    assert padded.fingerprint() == as_special.fingerprint()
    padded.pad_token = "<code>"
    assert padded.fingerprint() != as_special.fingerprint()
    padded.pad_token = padded.eos_token
    assert padded.fingerprint() == as_special.fingerprint()
    ended = GPT2Tokenizer.gpt2()
    ended.add_special_tokens({"eos_token": "<|im_end|>"})
    assert ended.fingerprint() not in (plain.fingerprint(), as_special.fingerprint())


def test_preprocessed_data_keeps_the_roles(tmp_path):
    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "[PAD]"})
    tok.save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one\n\ntwo\n")
    preprocess(corpus, tmp_path / "data", format="paragraphs", tokenizer=tmp_path / "tok", workers=1, progress=False)
    loaded = load_tokenizer(tmp_path / "data")
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.fingerprint()) == (50257, 50258, tok.fingerprint())
    meta = read_meta(tmp_path / "data")
    tokens = np.concatenate([np.fromfile(tmp_path / "data" / s["file"], dtype=meta["dtype"])
                             for s in meta["splits"]["train"]["shards"]]).tolist()
    assert tokens.count(50257) == 2 and tokens[-1] == 50257 and 50256 not in tokens  # two documents, ended alike


def test_directories_with_added_tokens_json_and_roles_load_as_in_transformers(tmp_path):
    """The vocab.json + merges.txt layout keeps added tokens in added_tokens.json; a role naming a token the
    vocabulary lacks adds it as a special token. transformers loads both so."""
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 50257, "<code>": 50258}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "[PAD]",
                                                                 "unk_token": "<unk>"}))
    ours = GPT2Tokenizer.from_file(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(ours) == len(theirs) == 50260
    assert (ours.pad_token_id, ours.unk_token_id) == (theirs.pad_token_id, theirs.unk_token_id) == (50257, 50259)
    assert ours.encode("a<code>b") == theirs("a<code>b")["input_ids"]  # not a role: an ordinary added token
    # The directory's own added tokens were not added since loading (a LoRA run warned their rows were untrained).
    assert ours.added_since_loading == []
    ours.add_tokens(["<new>"])
    assert ours.added_since_loading == pickle.loads(pickle.dumps(ours)).added_since_loading == ["<new>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 50300}))
    with pytest.raises(TokenizerError, match=r"^\S*added_tokens.json: '\[PAD\]' has id 50300; the next free id is "
                                             r"50257"):  # named once, by its own file
        GPT2Tokenizer.from_file(tmp_path)


def test_saving_over_a_directory_drops_its_old_added_tokens_json(tmp_path):
    """Left in place, its tokens were added to the vocabulary saved over it when the directory was loaded."""
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<extra>": 50257}))
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path)
    assert not (tmp_path / "added_tokens.json").exists() and len(GPT2Tokenizer.from_file(tmp_path)) == 50257


def test_gguf_marks_ordinary_added_tokens_user_defined():
    from gpt2kit.gguf import gguf_vocabulary

    tok = GPT2Tokenizer.gpt2()
    tok.add_tokens(["<code>"])
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tokens, types, _ = gguf_vocabulary(tok, 50264)
    assert tokens[50256:50259] == ["<|endoftext|>", "<code>", "[PAD]"]
    assert types[50256:50260] == [3, 4, 3, 5]  # control, user-defined (matched in text), control, unused


def test_tokenizer_files_as_transformers_reads_and_writes_them(tmp_path):
    """Review findings against transformers: a broken tokenizer_config.json is an error (its roles were silently
    dropped), a tokenizer.json path reads the config beside it as its directory does, vocabulary files are
    replaced rather than written through a hard link into another model's, roles number before the extra special
    tokens whatever the dict's order, chat templates see a set pad_token, and transformers' "no limit"
    model_max_length neither truncates nor pads to a length."""
    import os
    import warnings

    from gpt2kit.tokenizer import TokenizerError

    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "t")
    through_file = GPT2Tokenizer.from_file(tmp_path / "t" / "tokenizer.json")
    assert (through_file.eos_token_id, through_file.pad_token_id) == (50257, 50257)
    config = tmp_path / "t" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", "{,", 1))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
        GPT2Tokenizer.from_file(tmp_path / "t")

    (tmp_path / "other").mkdir()
    (tmp_path / "model").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "other" / name).write_text("another model's\n")
        os.link(tmp_path / "other" / name, tmp_path / "model" / name)
    GPT2Tokenizer.gpt2().save_pretrained(tmp_path / "model")  # copies the bundled vocab.json and merges.txt
    assert all((tmp_path / "other" / name).read_text() == "another model's\n" for name in ("vocab.json", "merges.txt"))

    ours, theirs = GPT2Tokenizer.gpt2(), transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "model")
    special = {"additional_special_tokens": ["<x>"], "pad_token": "[PAD]"}
    ours.add_special_tokens(special)
    theirs.add_special_tokens(special)
    assert [ours.convert_tokens_to_ids(t) for t in ("<x>", "[PAD]")] == theirs.convert_tokens_to_ids(["<x>", "[PAD]"])

    ours.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}[{{ pad_token }}]"
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=False) == "Hi[[PAD]]"
    # Setting a role's token or id moves both, in memory, pickled and saved (the other one stayed stale).
    ours.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    ours.eos_token = "<|im_end|>"
    ours.bos_token_id = ours.convert_tokens_to_ids("<x>")
    for copy in (ours, pickle.loads(pickle.dumps(ours))):
        assert (copy.eos_token, copy.eos_token_id, copy.bos_token) == ("<|im_end|>", 50259, "<x>")
    ours.save_pretrained(tmp_path / "roles")
    again = GPT2Tokenizer.from_file(tmp_path / "roles")
    assert (again.eos_token_id, again.bos_token, again.unk_token_id) == (50259, "<x>", 50256)
    ours.model_max_length = int(1e30)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ours(["hello world", "a"], padding="max_length")["input_ids"] == [[31373, 995], [64]]
        assert ours(["hello world", "a"], truncation=True, padding=True, pad_to_multiple_of=3)["input_ids"] == \
            [[31373, 995, ours.pad_token_id], [64, ours.pad_token_id, ours.pad_token_id]]


def test_roles_in_a_special_tokens_map_are_read_and_a_stale_one_is_not_left(tmp_path):
    """transformers 4 kept the roles in special_tokens_map.json, which transformers still reads over a config
    without added_tokens_decoder: gpt2kit reads them too, and saving over such a directory removes the file
    (transformers read its old EOS over the new config's)."""
    import json

    directory = tmp_path / "old"
    GPT2Tokenizer.gpt2().save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    (directory / "added_tokens.json").write_text(json.dumps({"<pad>": 50257}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    ours, theirs = GPT2Tokenizer.from_file(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert (ours.pad_token, ours.pad_token_id) == (theirs.pad_token, theirs.pad_token_id) == ("<pad>", 50257)
    assert ours.decode([64, 50257, 65], skip_special_tokens=True) == "ab"
    ours.add_special_tokens({"eos_token": "<|im_end|>"})
    ours.save_pretrained(directory)
    assert not (directory / "special_tokens_map.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(directory).eos_token_id == ours.eos_token_id == 50258
