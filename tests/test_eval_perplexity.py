"""Perplexity: hand-computed values on models with known probabilities, window/stride semantics checked
token by token against a naive reference, batch-size invariance, and padding that is never scored."""

import dataclasses
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpt2kit import GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.evaluation import evaluate_perplexity, wikitext_detokenize
from gpt2kit.evaluation.perplexity import document_windows, read_documents, split_wikitext_articles
from gpt2kit.tokenizer import train_bpe

from .conftest import DATA

TEXT = "The cat sat on the mat.\nIt was a sunny day, and the cat was happy.\n"


class ContextFreeLM(nn.Module):
    """p(next token) = softmax(`logits`) whatever the context: the NLL of a text is a sum we can compute by hand,
    and it does not depend on how the text is cut into windows. (Log-probabilities are float32, as in
    lm-evaluation-harness, hence rel=1e-6.)"""

    def __init__(self, logits: torch.Tensor, n_positions: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_positions=n_positions, vocab_size=len(logits))
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids):
        assert input_ids.shape[1] <= self.config.n_positions
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return GPT2Tokenizer.gpt2()


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 512-token BPE, so the tiny_config model (vocab 512) can read real text."""
    return train_bpe([DATA / "wikitext-2" / "wiki.valid.tokens"], 512, tmp_path_factory.mktemp("bpe"))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size(gpt2_tokenizer):
    vocab = gpt2_tokenizer.vocab_size
    model = ContextFreeLM(torch.zeros(vocab), n_positions=8)
    result = evaluate_perplexity(model, gpt2_tokenizer, [TEXT], progress=False)
    n_tokens = len(gpt2_tokenizer.encode(TEXT))
    assert result["tokens"] == n_tokens
    assert result["token_perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert result["words"] == 17  # 16 words + the empty piece after the final newline
    assert result["word_perplexity"] == pytest.approx(vocab ** (n_tokens / 17), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / len(TEXT.encode()), rel=1e-6)
    assert result["byte_perplexity"] == pytest.approx(2 ** result["bits_per_byte"], rel=1e-6)


def test_a_document_starts_after_the_tokenizers_bos_as_in_lm_eval():
    """lm-eval prefixes BOS where the tokenizer has one; EOS was used whatever the BOS."""
    tok = GPT2Tokenizer.gpt2()
    tok.add_special_tokens({"bos_token": "<s>"})
    seen = []

    class Recording(ContextFreeLM):
        def forward(self, input_ids):
            seen.append(input_ids[:, 0].tolist())
            return super().forward(input_ids)

    evaluate_perplexity(Recording(torch.zeros(len(tok)), n_positions=8), tok, [TEXT], progress=False)
    assert seen[0][0] == tok.bos_token_id != tok.eos_token_id


@pytest.mark.parametrize("max_length,stride", [(8, 8), (8, 3), (8, 1), (5, 5), (64, 64)])
def test_every_token_scored_once_with_known_probabilities(gpt2_tokenizer, max_length, stride):
    """Distinct per-token probabilities: a token scored twice or missed would change the sum."""
    vocab = gpt2_tokenizer.vocab_size
    logits = torch.sin(torch.arange(vocab, dtype=torch.float32)) * 3
    model = ContextFreeLM(logits, n_positions=64)
    tokens = gpt2_tokenizer.encode(TEXT)
    log_p = torch.log_softmax(logits.double(), -1)
    expected_nll = -sum(float(log_p[t]) for t in tokens)
    result = evaluate_perplexity(model, gpt2_tokenizer, [TEXT], max_length=max_length, stride=stride,
                                 progress=False)
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-6)
    assert result["token_perplexity"] == pytest.approx(math.exp(expected_nll / len(tokens)), rel=1e-6)


def test_windows_match_lm_eval_rolling_example():
    """lm-evaluation-harness's documented example: tokens 0..9, max length 4, prefix BOS."""
    bos = -1
    windows = document_windows(list(range(10)), prefix_token_id=bos, max_length=4, stride=4)
    pairs = [(w.tokens[:-1], w.tokens[-w.n_scored:]) for w in windows]
    assert pairs == [([bos, 0, 1, 2], [0, 1, 2, 3]), ([3, 4, 5, 6], [4, 5, 6, 7]), ([5, 6, 7, 8], [8, 9])]


@pytest.mark.parametrize("n,max_length,stride", [(1, 4, 4), (4, 4, 4), (5, 4, 4), (23, 6, 6), (23, 6, 4),
                                                 (23, 6, 1), (40, 7, 3)])
def test_windows_score_each_token_once_within_max_length(n, max_length, stride):
    windows = document_windows(list(range(100, 100 + n)), prefix_token_id=0, max_length=max_length,
                               stride=stride)
    scored = [t for w in windows for t in w.tokens[-w.n_scored:]]
    assert scored == list(range(100, 100 + n))
    assert all(len(w.tokens) - 1 <= max_length for w in windows)
    # After the first chunk every window is full-length, so each scored token sees at least
    # max_length - stride + 1 tokens of context.
    assert all(len(w.tokens) - 1 == max_length for w in windows[1:])


def naive_nll(model, tokens, prefix, max_length, stride):
    """The definition, one token at a time: token j of chunk k is predicted from seq[max(0, end_k - L) : j]."""
    seq = [prefix, *tokens]
    nll, done = 0.0, 0
    while done < len(tokens):
        end = min(done + (max_length if done == 0 else stride), len(tokens))
        start = max(0, end - max_length)
        for j in range(done + 1, end + 1):
            logits = model(torch.tensor([seq[start:j]])).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[seq[j]])
        done = end
    return nll


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 5), (16, 1)])
def test_stride_semantics_against_a_token_by_token_reference(tiny_config, small_tokenizer, max_length, stride):
    model = GPT2LMHeadModel(tiny_config).eval()
    text = "Robert Boulter is an English film, television and theatre actor."
    tokens = small_tokenizer.encode(text)
    assert len(tokens) > 2 * max_length  # several windows
    with torch.no_grad():
        expected = naive_nll(model, tokens, small_tokenizer.eos_token_id, max_length, stride)
    result = evaluate_perplexity(model, small_tokenizer, [text], max_length=max_length, stride=stride,
                                 batch_size=3, progress=False)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)


def test_overlapping_windows_use_more_context(tiny_config, small_tokenizer):
    """Smaller strides cost more forward tokens; with stride 1 every token has the full window of context."""
    model = GPT2LMHeadModel(tiny_config).eval()
    docs = [read_documents(DATA / "wikitext-2" / "wiki.test.raw")[0][:3000]]
    disjoint = evaluate_perplexity(model, small_tokenizer, docs, max_length=32, progress=False)
    strided = evaluate_perplexity(model, small_tokenizer, docs, max_length=32, stride=8, progress=False)
    assert disjoint["tokens"] == strided["tokens"]
    assert strided["forward_tokens"] > 3 * disjoint["forward_tokens"]
    assert strided["nll"] != disjoint["nll"]


def test_results_do_not_depend_on_batch_size(tiny_config, small_tokenizer):
    model = GPT2LMHeadModel(tiny_config).eval()
    docs = [article[:1500] for article in read_documents(DATA / "wikitext-2" / "wiki.test.raw")[:3]]
    runs = [evaluate_perplexity(model, small_tokenizer, docs, max_length=48, stride=20, batch_size=b,
                                format="wikitext", progress=False) for b in (1, 2, 7, 64)]
    assert runs[0]["windows"] > 20
    for run in runs[1:]:
        assert run["nll"] == pytest.approx(runs[0]["nll"], rel=1e-6)
        assert run["tokens"] == runs[0]["tokens"] and run["windows"] == runs[0]["windows"]


def test_lm_head_chunks_share_one_scratch_block_with_the_training_loss(tiny_config, small_tokenizer,
                                                                         monkeypatch):
    """The LM head writes each chunk of scored rows into one reused block, the last, shorter chunk too; the
    block, first made under inference mode, is then the training loss's block of the same shape and must
    still be writable there."""
    from gpt2kit.evaluation import scoring

    monkeypatch.setattr(scoring, "ROWS_PER_CHUNK", 5)
    model = GPT2LMHeadModel(tiny_config).eval()
    text = "Robert Boulter is an English film, television and theatre actor."
    tokens = small_tokenizer.encode(text)
    with torch.no_grad():
        expected = naive_nll(model, tokens, small_tokenizer.eos_token_id, 16, 16)
    for batch_size in (1, 3):
        result = evaluate_perplexity(model, small_tokenizer, [text], max_length=16, batch_size=batch_size,
                                     progress=False)
        assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert len(tokens) > 2 * 16  # several windows of 16 scored rows: chunks of 5, 5, 5 and a shorter one
    ids = torch.tensor([tokens[:6]])  # 5 float32 targets: the training loss asks for a (5, vocab) block too
    loss = model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss  # eval mode: no dropout
    loss.backward()
    reference = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("cache, columns, device, rows", [
    (32 * 2 ** 20, 50304, "cpu", 128),  # 25 MB of logits in a 32 MB L3, where 1024 rows (206 MB) spill
    (8 * 2 ** 20, 50304, "cpu", 64),  # never fewer rows than the GEMM kernels run fast on
    (32 * 2 ** 20, 512, "cpu", 1024),  # a small vocabulary: ROWS_PER_CHUNK still bounds it
    (None, 50304, "cpu", 1024),  # no cache size to read
    (32 * 2 ** 20, 50304, "meta", 1024),  # not a CPU: the cache is not the CPU's concern
])
def test_the_scored_rows_per_chunk_fit_the_last_level_cache(monkeypatch, cache, columns, device, rows):
    from gpt2kit.evaluation import scoring

    monkeypatch.setattr(scoring, "last_level_cache_bytes", lambda: cache)
    assert scoring.rows_per_chunk(columns, torch.device(device)) == rows


def test_the_last_level_cache_is_read_from_sysfs():
    from gpt2kit.evaluation.scoring import last_level_cache_bytes

    size = last_level_cache_bytes()
    if Path("/sys/devices/system/cpu/cpu0/cache").is_dir():
        assert size is not None and size >= 2 ** 16  # at least the 64 KB an L1 has, in bytes
    else:
        assert size is None


class PoisonPadding(nn.Module):
    """Wraps a model; logits are NaN wherever the input is the pad id, so scoring a pad position shows."""

    def __init__(self, model, pad_token_id):
        super().__init__()
        self.model, self.config, self.pad = model, model.config, pad_token_id

    def forward(self, input_ids):
        logits = self.model(input_ids).logits
        return SimpleNamespace(logits=logits.masked_fill((input_ids == self.pad)[..., None], float("nan")))


def test_padding_is_never_scored(tiny_config, small_tokenizer):
    model = GPT2LMHeadModel(tiny_config).eval()
    docs = ["A short one.", "A somewhat longer document, with a few more words in it than the first.", "Mid size."]
    pad = small_tokenizer.vocab_size - 1
    assert all(pad not in small_tokenizer.encode(d) for d in docs)
    small_tokenizer.pad_token_id = pad
    try:
        padded = evaluate_perplexity(PoisonPadding(model, pad), small_tokenizer, docs, batch_size=3,
                                     progress=False)
    finally:
        small_tokenizer.pad_token_id = small_tokenizer.eos_token_id
    alone = evaluate_perplexity(model, small_tokenizer, docs, batch_size=1, progress=False)
    assert math.isfinite(padded["nll"])
    assert padded["nll"] == pytest.approx(alone["nll"], rel=1e-6)


def test_wikitext_articles_and_detokenizer():
    raw = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    articles = split_wikitext_articles(raw)
    assert len(articles) == 62  # the test split of EleutherAI/wikitext_document_level
    assert articles[0].startswith(" = Robert Boulter = \n")
    assert "\n".join([" ", *articles]) == raw  # nothing lost but the blank line before the first title
    assert sum(len(re.split(r"\s+", a)) for a in articles) == 241_211 + 2 * 62  # words + leading/trailing pieces
    text = " = = Career = = \n He was born in 1 @,@ 000 @-@ 2 @.@ 5 , and ( later ) moved . \n"
    assert wikitext_detokenize(text) == " == Career ==\nHe was born in 1,000-2.5, and (later) moved.\n"


def test_bad_input_is_one_clear_error(tmp_path, gpt2_tokenizer):
    model = ContextFreeLM(torch.zeros(gpt2_tokenizer.vocab_size), n_positions=8)
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: expected an object with a string field 'text'"):
        evaluate_perplexity(model, gpt2_tokenizer, bad)
    bad.write_text('{"text": "fine"}\n{"text": "x", "n": ' + "1" * 5000 + "}\n")  # past Python's digit limit
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not valid JSON"):
        evaluate_perplexity(model, gpt2_tokenizer, bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate_perplexity(model, gpt2_tokenizer, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="stride must be between 1 and max_length"):
        evaluate_perplexity(model, gpt2_tokenizer, [TEXT], max_length=4, stride=5)
    with pytest.raises(ValueError, match="max_length must be an integer between 1 and the model's context"):
        evaluate_perplexity(model, gpt2_tokenizer, [TEXT], max_length=9)
    small = ContextFreeLM(torch.zeros(512), n_positions=8)
    with pytest.raises(ValueError, match="tokenizer has 50257 tokens but the model's vocab_size is 512"):
        evaluate_perplexity(small, gpt2_tokenizer, [TEXT])
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        evaluate_perplexity(model, gpt2_tokenizer, [TEXT], stride=0)
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        evaluate_perplexity(model, gpt2_tokenizer, [TEXT, TEXT], limit=-1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt: the documents contain no tokens"):
        evaluate_perplexity(model, gpt2_tokenizer, tmp_path / "empty.txt")
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"good.jsonl: no documents to evaluate"):
        evaluate_perplexity(model, gpt2_tokenizer, tmp_path / "good.jsonl", limit=0)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:1: invalid UTF-8 at byte offset 3"):
        evaluate_perplexity(model, gpt2_tokenizer, latin1)


def test_perplexity_past_floats_range_is_inf(gpt2_tokenizer):
    """A bad model on a text with few whitespace words (Chinese, say): NLL per word above 709 nats."""
    logits = torch.full((gpt2_tokenizer.vocab_size,), -1000.0)
    logits[0] = 0.0  # token 0 takes all the probability; every other token costs 1000 nats
    result = evaluate_perplexity(ContextFreeLM(logits, n_positions=8), gpt2_tokenizer, ["\u4e2d\u6587" * 5],
                                 progress=False)
    assert result["word_perplexity"] == math.inf and math.isfinite(result["bits_per_byte"])


def test_dropout_is_off_during_evaluation_and_the_mode_restored(tiny_config, small_tokenizer):
    tiny_config.resid_pdrop = tiny_config.embd_pdrop = tiny_config.attn_pdrop = 0.5
    model = GPT2LMHeadModel(tiny_config).train()
    first = evaluate_perplexity(model, small_tokenizer, [TEXT], progress=False)
    second = evaluate_perplexity(model, small_tokenizer, [TEXT], progress=False)
    assert first["nll"] == second["nll"] and model.training


def test_scores_over_the_tokenizer_vocabulary_of_a_padded_head(tiny_config):
    """A model vocabulary that is not a multiple of 128 (the head multiplies with zero rows appended) and larger
    than the tokenizer's: log-probabilities, greedy and restricted greedy hits are over the tokenizer's tokens
    only, as a float64 log-softmax of the model's own logits says."""
    from gpt2kit.evaluation.scoring import Window, score_windows

    torch.manual_seed(0)
    model = GPT2LMHeadModel(dataclasses.replace(tiny_config, vocab_size=601)).eval()
    vocab = 500
    disallowed = torch.zeros(vocab, dtype=torch.bool)
    disallowed[::3] = True
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (8,), generator=generator).tolist()
    with torch.no_grad():  # continue with greedy, restricted greedy and random tokens, so that all kinds of hit occur
        for step in range(40):
            logits = model(torch.tensor([tokens])).logits[0, -1, :vocab]
            choices = (logits.argmax(), logits.masked_fill(disallowed, -math.inf).argmax(),
                       torch.randint(0, vocab, (), generator=generator))
            tokens.append(int(choices[step % 3]))
    windows = [Window(tokens[:n], n_scored=n - 1 - n // 3) for n in (48, 17, 29)]
    scores = score_windows(model, windows, vocab_size=vocab, batch_size=2, greedy=True, disallowed=disallowed,
                           progress=False)
    hits = restricted_hits = 0
    for window, score in zip(windows, scores, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([window.tokens[:-1]])).logits[0, -window.n_scored:, :vocab].double()
        targets = torch.tensor(window.tokens[-window.n_scored:])
        expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(score.logprobs, expected, rtol=0, atol=1e-5)
        assert torch.equal(score.greedy, logits.argmax(-1) == targets)
        # The target competes with the allowed tokens even when it is disallowed itself.
        best_allowed = logits.masked_fill(disallowed, -math.inf).amax(-1)
        assert torch.equal(score.restricted_greedy, logits.gather(-1, targets[:, None]).squeeze(-1) >= best_allowed)
        hits += int(score.greedy.sum())
        restricted_hits += int((score.restricted_greedy & ~score.greedy).sum())
    assert hits > 5 and restricted_hits > 2


def test_compiled_log_sum_exp_sums_in_float64(gpt2_tokenizer):
    """`compile=True` on a peaked distribution over GPT-2's vocabulary (a few large logits and a long tail, as a
    trained LM has), where a float32 sum of the exponentials loses the tail (compiled, it is off by 2e-6 here):
    each log-probability is float64's to 2e-7, and the eager path's to 5e-6."""
    from gpt2kit.evaluation.scoring import Window, score_windows

    generator = torch.Generator().manual_seed(0)
    vocab = gpt2_tokenizer.vocab_size
    rank = torch.randperm(vocab, generator=generator) + 1
    logits = torch.randn(vocab, generator=generator) * 3 - rank.float().log()
    model = ContextFreeLM(logits, n_positions=64)
    tokens = torch.randint(0, vocab, (64,), generator=generator).tolist()
    expected = logits.double().log_softmax(-1)[tokens[1:]]
    for compile, atol in ((True, 2e-7), (False, 5e-6)):
        scores = score_windows(model, [Window(tokens, 63)], vocab_size=vocab, compile=compile, progress=False)
        assert scores[0].logprobs.dtype == torch.float64
        torch.testing.assert_close(scores[0].logprobs, expected, rtol=0, atol=atol)


def test_compiled_evaluation_matches_the_token_by_token_reference(tiny_config, small_tokenizer):
    model = GPT2LMHeadModel(tiny_config).eval()
    text = "Robert Boulter is an English film, television and theatre actor."
    tokens = small_tokenizer.encode(text)
    with torch.no_grad():
        expected = naive_nll(model, tokens, small_tokenizer.eos_token_id, 16, 5)
    compiled = evaluate_perplexity(model, small_tokenizer, [text], max_length=16, stride=5, batch_size=3,
                                   compile=True, progress=False)
    eager = evaluate_perplexity(model, small_tokenizer, [text], max_length=16, stride=5, batch_size=3,
                                progress=False)
    assert compiled["nll"] == pytest.approx(expected, rel=1e-5)
    assert compiled["nll"] == pytest.approx(eager["nll"], rel=1e-6)


def test_exp_or_inf_is_inf_only_past_floats_range_and_keeps_nan():
    from gpt2kit.evaluation.scoring import exp_or_inf

    assert exp_or_inf(709.5) == math.exp(709.5) and exp_or_inf(1.0) == pytest.approx(math.e)
    assert exp_or_inf(709.8) == math.inf and exp_or_inf(math.inf) == math.inf
    assert math.isnan(exp_or_inf(math.nan))


def test_the_format_is_read_off_the_suffix_in_any_case(tmp_path):
    """An upper-case WIKI.TEST.RAW or X.JSONL was scored as one plain text, braces and headings included."""
    wiki = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    lines = '{"text": "one"}\n{"text": "two"}\n'
    for name, text in [("wiki.test.raw", wiki), ("x.jsonl", lines)]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / name.upper()).write_text(text, encoding="utf-8")
        expected = read_documents(tmp_path / name)
        assert len(expected) > 1 and read_documents(tmp_path / name.upper()) == expected
