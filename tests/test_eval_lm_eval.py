"""Agreement with lm-evaluation-harness: its own `wikitext` and `lambada_openai` task definitions, run through
its HuggingFace backend on the same weights and the same local files, give the numbers gpt2kit gives."""

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.tokenizer import train_bpe
from gpt2kit.evaluation import evaluate_lambada, evaluate_perplexity
from gpt2kit.evaluation.lambada import encode_target, read_lambada, split_last_word

from .conftest import DATA

pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed (pip install "lm-eval[hf]")')

WIKITEXT = DATA / "wikitext-2" / "wiki.test.raw"
LAMBADA = DATA / "lambada" / "lambada_test.jsonl"
N_ARTICLES, N_PASSAGES = 2, 40


def bigram_planted_model(tokenizer: GPT2Tokenizer, passages: list[str]) -> GPT2LMHeadModel:
    """A random model whose (untied) LM head also knows each passage's last-word bigrams, so it gets some of
    them right: accuracy is neither 0 nor 1, and both tools must agree on which passages pass."""
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=tokenizer.vocab_size,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        for text in passages:
            context, target = encode_target(tokenizer, *split_last_word(text))
            sequence = context[-1:] + target
            for current, following in zip(sequence, sequence[1:]):
                direction = F.layer_norm(wte[current], (config.n_embd,))
                model.lm_head.weight[following] += direction / direction.norm()
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    # A 1024-token BPE keeps both tools fast (the LM head dominates a tiny model) and splits most LAMBADA
    # target words into several tokens. Its tokenization in HF and in gpt2kit is the same.
    tokenizer = train_bpe([DATA / "wikitext-2" / "wiki.valid.tokens"], 1024, tmp_path_factory.mktemp("bpe"))
    model = bigram_planted_model(tokenizer, read_lambada(LAMBADA)[:N_PASSAGES])
    directory = tmp_path_factory.mktemp("lm-eval") / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # tokenizer.json + tokenizer_config.json, which HF's AutoTokenizer loads
    return model, tokenizer, directory


def test_wikitext_and_lambada_agree_with_lm_eval(exported, tmp_path):
    from gpt2kit.evaluation.harness import run_lm_eval

    model, tokenizer, directory = exported
    theirs = run_lm_eval(directory, {"wikitext": WIKITEXT, "lambada": LAMBADA}, tmp_path,
                         limits={"wikitext": N_ARTICLES, "lambada": N_PASSAGES}, batch_size=4)
    wikitext = evaluate_perplexity(model, tokenizer, WIKITEXT, limit=N_ARTICLES, batch_size=3, progress=False)
    lambada = evaluate_lambada(model, tokenizer, LAMBADA, limit=N_PASSAGES, batch_size=3, progress=False)

    assert wikitext["windows"] > 2 * N_ARTICLES  # articles span several 64-token windows
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert wikitext[metric] == pytest.approx(theirs["wikitext"][metric], rel=1e-4), metric
    assert 3 <= lambada["correct"] <= N_PASSAGES - 3
    assert lambada["target_tokens"] > 2 * N_PASSAGES  # multi-token target words
    assert lambada["acc"] == theirs["lambada"]["acc"]
    assert lambada["perplexity"] == pytest.approx(theirs["lambada"]["perplexity"], rel=1e-4)


def test_the_cross_check_reads_wikitext_json_lines_as_gpt2kit_eval_does(tmp_path):
    """One article per JSON line, as `gpt2kit eval --task wikitext` reads it: the lines' raw JSON was one page."""
    import json

    from gpt2kit.evaluation.harness import _write_task

    data = tmp_path / "articles.jsonl"
    data.write_text('{"text": "First article text."}\n{"text": "Second one."}\n')
    _write_task(tmp_path, "wikitext", data, None)
    copy = tmp_path / "gpt2kit_local_wikitext.jsonl"
    pages = [json.loads(line)["page"] for line in copy.read_text().splitlines()]
    assert pages == ["First article text.", "Second one."]
    # The copy never replaces the data (it was cut to `limit` rows when they shared a name).
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    _write_task(tmp_path, "lambada", lambada, 1)
    assert len(lambada.read_text().splitlines()) == 3
    assert (tmp_path / "gpt2kit_local_lambada.jsonl").read_text() == '{"text": "one"}\n'
    with pytest.raises(ValueError, match="the comparison writes its copy of the data there"):
        _write_task(tmp_path, "lambada", tmp_path / "gpt2kit_local_lambada.jsonl", 1)
