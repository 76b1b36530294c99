"""LAMBADA scoring on crafted passages with a bigram model whose probabilities are known: the whole last word,
however many tokens it has, must be the greedy continuation; perplexity is per passage."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.evaluation import evaluate_lambada
from gpt2kit.evaluation.lambada import encode_target, read_lambada, split_last_word

from .conftest import DATA


class BigramLM(nn.Module):
    """Next-token logits depend only on the current token: `table[current] = {next: logit}`, 0 elsewhere."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int, n_positions: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_positions=n_positions, vocab_size=vocab_size)
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the model a device

    def forward(self, input_ids):
        assert input_ids.shape[1] <= self.config.n_positions
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for (b, t), current in zip(torch.cartesian_prod(*map(torch.arange, input_ids.shape)).tolist(),
                                   input_ids.flatten().tolist()):
            for following, value in self.table.get(current, {}).items():
                logits[b, t, following] = value
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer.gpt2()


def ids(tok, text):
    return tok.encode(text)


def test_split_and_tokenize_like_lm_eval(tok):
    assert split_last_word("He looked at Harlin") == ("He looked at", " Harlin")
    assert split_last_word("alone") == ("", " alone")
    context, target = encode_target(tok, "He looked at", " Harlin")
    assert context + target == tok.encode("He looked at Harlin") and tok.decode(target) == " Harlin"
    # A double space before the word: the context's trailing space moves into the target.
    context, target = encode_target(tok, *split_last_word("He looked at  Harlin"))
    assert tok.decode(context) == "He looked at" and tok.decode(target) == "  Harlin"
    assert encode_target(tok, "", " alone") == ([tok.eos_token_id], tok.encode(" alone"))
    with_bos = GPT2Tokenizer.gpt2()
    with_bos.add_special_tokens({"bos_token": "<s>"})  # lm-eval prefixes BOS where the tokenizer has one
    assert encode_target(with_bos, "", " alone") == ([with_bos.bos_token_id], with_bos.encode(" alone"))


def test_whole_word_must_be_greedy_and_perplexity_is_per_passage(tok):
    mr, the, cat = ids(tok, " Mr")[0], ids(tok, " the")[0], ids(tok, " cat")[0]
    b, oul, ter = ids(tok, " Boulter")
    *shared, ton = ids(tok, " Boulton")
    assert shared == [b, oul] and ton != ter  # two words that differ only in their third token
    table = {mr: {b: 4.0}, b: {oul: 4.0}, oul: {ter: 4.0, ton: 2.0}, the: {the: 6.0, cat: 5.0}}
    model = BigramLM(table, tok.vocab_size)
    passages = ["I met Mr Boulter",  # three tokens, all greedy: correct
                "She met Mr Boulton",  # first two greedy, the third is not: wrong
                "The dog chased the cat"]  # " the" beats " cat": wrong, unless stop words are filtered
    result = evaluate_lambada(model, tok, passages, stop_word_filter=True, stop_words=["the", "a"],
                              batch_size=2, progress=False)
    assert result["correct"] == 1 and result["acc"] == pytest.approx(1 / 3)
    assert result["correct_stop_word_filter"] == 2
    # A name whose first token is a stop word's (" All" of " Allie"): greedy, so right with the filter too;
    # "the" as the target is a stop word and always wrong with it.
    al, lie = ids(tok, " Allie")
    waved = BigramLM({ids(tok, " at")[0]: {al: 4.0}, al: {lie: 4.0}}, tok.vocab_size)
    named = evaluate_lambada(waved, tok, ["She waved at Allie", "She waved at the"], stop_word_filter=True,
                             stop_words=["all", "the", "at"], progress=False)
    assert tok.decode([al]) == " All" and named["correct"] == 1 and named["correct_stop_word_filter"] == 1

    V = tok.vocab_size
    z1 = math.log(V - 1 + math.exp(4))  # rows after " Mr" and " B"
    z2 = math.log(V - 2 + math.exp(4) + math.exp(2))  # row after "oul"
    z3 = math.log(V - 2 + math.exp(6) + math.exp(5))  # row after " the"
    word_logp = [4 + 4 + 4 - 2 * z1 - z2, 4 + 4 + 2 - 2 * z1 - z2, 5 - z3]
    assert result["perplexity"] == pytest.approx(math.exp(-sum(word_logp) / 3), rel=1e-6)
    assert result["target_token_perplexity"] == pytest.approx(math.exp(-sum(word_logp) / 7), rel=1e-6)
    assert result["target_tokens"] == 7


def test_long_passages_keep_their_end(tok):
    """A passage longer than max_length + 1 tokens loses its first tokens, never its target."""
    mr = ids(tok, " Mr")[0]
    b, oul, ter = ids(tok, " Boulter")
    model = BigramLM({mr: {b: 4.0}, b: {oul: 4.0}, oul: {ter: 4.0}}, tok.vocab_size, n_positions=6)
    passage = "one two three four five six seven eight nine ten Mr Boulter"
    result = evaluate_lambada(model, tok, [passage], progress=False)  # raises if a window exceeds 6 tokens
    assert result["correct"] == 1


def test_results_do_not_depend_on_batch_size(tok):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    passages = read_lambada(DATA / "lambada" / "lambada_test.jsonl")[:6]
    runs = [evaluate_lambada(model, tok, passages, batch_size=b, progress=False) for b in (1, 4, 6)]
    runs.append(evaluate_lambada(model, tok, passages, batch_size=4, compile=True, progress=False))
    for run in runs[1:]:
        assert run["perplexity"] == pytest.approx(runs[0]["perplexity"], rel=1e-6)
        assert run["correct"] == runs[0]["correct"]
    # With right answers among them (a random model gets none): every third passage's last word is planted.
    table = {}
    for passage in passages[::3]:
        context, target = encode_target(tok, *split_last_word(passage))
        for current, following in zip([context[-1], *target], target):
            table.setdefault(current, {})[following] = 9.0
    planted = BigramLM(table, tok.vocab_size)
    counts = {b: evaluate_lambada(planted, tok, passages, batch_size=b, progress=False)["correct"] for b in (1, 4, 6)}
    assert counts == {1: 2, 4: 2, 6: 2}


def test_bad_lines_name_file_and_line(tmp_path, tok):
    path = tmp_path / "lambada.jsonl"
    path.write_text(json.dumps({"text": "a fine passage"}) + "\n" + json.dumps({"passage": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"lambada.jsonl:2: expected an object with a string field 'text'"):
        read_lambada(path)
    path.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"lambada.jsonl:1: empty passage"):
        read_lambada(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"lambada.jsonl:1: not valid JSON"):
        read_lambada(path)
    # JSON strings may hold U+2028, U+2029 and U+0085 raw: they are not line breaks of JSON Lines.
    path.write_text(json.dumps({"text": "one\u2028two three"}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "next\x85line here"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_lambada(path) == ["one\u2028two three", "next\x85line here"]


def test_a_word_too_long_for_the_window_names_its_line(tmp_path, tok):
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n" + json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "so " + "x" * 400}) + "\n")
    model = BigramLM({}, tok.vocab_size, n_positions=16)
    with pytest.raises(ValueError, match=r"lambada.jsonl:4: the last word has \d+ tokens; 1..16"):
        evaluate_lambada(model, tok, path, progress=False)
    with pytest.raises(ValueError, match=r"^passage 2: the last word"):
        evaluate_lambada(model, tok, ["a b", "so " + "x" * 400], progress=False)
    with pytest.raises(ValueError, match=r"lambada.jsonl: no passages to evaluate"):
        evaluate_lambada(model, tok, path, limit=0, progress=False)
    # Passages given as a list are checked as a file's are; options that would go unused are refused.
    with pytest.raises(ValueError, match=r"^passage 2: empty passage"):
        evaluate_lambada(model, tok, ["a b", " "], progress=False)
    with pytest.raises(ValueError, match=r"^passage 1: expected a passage \(str\), got int"):
        evaluate_lambada(model, tok, [5], progress=False)
    with pytest.raises(ValueError, match="stop_words are the words stop_word_filter=True leaves out"):
        evaluate_lambada(model, tok, ["a b"], stop_words=["a"], progress=False)
    with pytest.raises(ValueError, match=r"max_length must be an integer between 1 and the model's context \(16\), "
                                         r"got 8.0"):
        evaluate_lambada(model, tok, ["a b"], max_length=8.0, progress=False)


def test_perplexity_past_floats_range_is_inf(tok):
    """Every target token costs 1000 nats: the mean per word is past exp's range, which gives inf, no error."""
    model = BigramLM({i: {0: 1000.0} for i in range(tok.vocab_size)}, tok.vocab_size)
    result = evaluate_lambada(model, tok, ["He looked at Harlin"], progress=False)
    assert result["perplexity"] == math.inf and result["target_token_perplexity"] == math.inf
