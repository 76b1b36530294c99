"""Generation against transformers' generate() and logits processors on the same random weights, plus
cache/no-cache equality, seeded sampling, stop strings and byte-correct streaming."""

import collections

import numpy
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.generation import logits_process as hf_proc

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.model import CausalLMOutput
from gpt2kit.generation import (
    GenerationConfig, Sampler, TextStreamDecoder, ban_repeated_ngrams, bias_sequences, cut_below, generate,
    keep_min_p, keep_top_k, keep_top_p, keep_typical, parse_logit_bias, penalize_frequency_presence,
    _StopStringMatcher, penalize_repetition, scale_temperature, stream_generate, truncate_at_stop,
)

from .conftest import HF_VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = HF_VOCAB
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200], [3, 4, 5, 6]]


def left_padded(prompts, pad):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(hf, ids, mask=None, **kwargs):
    kwargs.setdefault("pad_token_id", VOCAB - 1)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), do_sample=False,
                           **kwargs)


# ---- greedy decoding equals transformers --------------------------------------------------------------------
def test_greedy_matches_transformers(hf_pair):
    hf, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    ref = hf_greedy(hf, ids, max_new_tokens=40, eos_token_id=None)
    out = ours.generate(ids, max_new_tokens=40, eos_token_id=[])
    assert out.shape == (1, len(PROMPTS[0]) + 40)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_length_counts_the_padded_prompt_as_transformers_does(hf_pair, num_beams):
    hf, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=VOCAB - 1)
    ref = hf_greedy(hf, ids, mask, max_length=ids.shape[1] + 9, num_beams=num_beams, eos_token_id=None)
    out = ours.generate(ids, mask, max_length=ids.shape[1] + 9, num_beams=num_beams, eos_token_id=[])
    assert out.shape == (3, ids.shape[1] + 9) and torch.equal(out, ref)
    assert torch.equal(out, ours.generate(ids, mask, max_new_tokens=9, num_beams=num_beams, eos_token_id=[]))
    with pytest.raises(ValueError, match="max_length 6 counts the prompt and new tokens, but the prompt alone has 7"):
        ours.generate(ids, mask, max_length=6, num_beams=num_beams)
    with pytest.raises(ValueError, match="give max_new_tokens or max_length .*, not both"):
        ours.generate(ids, mask, max_length=20, max_new_tokens=5)
    # The length given last applies: a default of one kind, a call of the other.
    config = GenerationConfig(max_length=12)
    assert config.replace(max_new_tokens=3).for_prompt(7).max_new_tokens == 3
    assert config.for_prompt(7).max_new_tokens == 5
    assert config.replace(max_length=None).for_prompt(7).max_new_tokens == 20


def test_left_padded_batch_matches_transformers_and_rows_stop_independently(hf_pair):
    hf, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=VOCAB - 1)
    free = ours.generate(ids, mask, max_new_tokens=30, eos_token_id=[])
    # An EOS id that row 0 emits at its 6th new token and row 1 never does: row 0 must stop alone.
    eos = int(free[0, ids.shape[1] + 5])
    assert eos not in free[1, ids.shape[1]:].tolist(), "pick another step for this random model"
    first_eos = free[0, ids.shape[1]:].tolist().index(eos)
    ref = hf_greedy(hf, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    out = ours.generate(ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    new = out[:, ids.shape[1]:]
    assert new[0, first_eos] == eos and (new[0, first_eos + 1:] == 0).all()
    assert torch.equal(new[1], free[1, ids.shape[1]:])  # row 1 continued after row 0 finished


def test_each_row_of_a_padded_batch_equals_the_prompt_alone(hf_pair):
    _, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=0)
    batch = ours.generate(ids, mask, max_new_tokens=25, eos_token_id=[])
    for row, prompt in enumerate(PROMPTS):
        alone = ours.generate(torch.tensor([prompt]), max_new_tokens=25, eos_token_id=[])
        assert torch.equal(batch[row, ids.shape[1]:], alone[0, len(prompt):])


def test_min_new_tokens_matches_transformers(hf_pair):
    hf, ours = hf_pair
    ids = torch.tensor([PROMPTS[1]])
    eos = int(ours.generate(ids, max_new_tokens=1)[0, -1])  # greedy would stop at once
    ref = hf_greedy(hf, ids, max_new_tokens=12, min_new_tokens=5, eos_token_id=eos)
    out = ours.generate(ids, max_new_tokens=12, min_new_tokens=5, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert out.shape[1] - ids.shape[1] >= 5 and eos not in out[0, 2:6].tolist()


@pytest.mark.parametrize("options", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, "bad words",
                                     "sequence bias"])
def test_greedy_with_a_processor_matches_transformers(hf_pair, options):
    hf, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    if isinstance(options, str):  # ban or bias what plain greedy decoding writes: a 1-token and a 2-token sequence
        plain = ours.generate(ids, max_new_tokens=40, eos_token_id=[])[0, ids.shape[1]:].tolist()
        sequences = [[plain[3]], plain[10:12]]
        options = ({"bad_words_ids": sequences} if options == "bad words" else
                   {"sequence_bias": [[sequences[0], -3.0], [sequences[1], -5.0]]})
    ref = hf_greedy(hf, ids, max_new_tokens=40, eos_token_id=None, **options)
    out = ours.generate(ids, max_new_tokens=40, eos_token_id=[], **options)
    assert torch.equal(out, ref)
    assert not torch.equal(out, ours.generate(ids, max_new_tokens=40, eos_token_id=[]))
    if "no_repeat_ngram_size" in options:
        pairs = list(zip(out[0].tolist(), out[0, 1:].tolist()))
        assert len(set(pairs)) == len(pairs)  # no 2-gram twice


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 2}])
def test_scores_and_logits_of_each_step_match_transformers(hf_pair, options):
    """return_dict_in_generate with output_scores / output_logits: the processed scores and the raw logits of
    every step, and compute_transition_scores of either, as transformers gives them (greedy and processed, a
    left-padded batch whose rows end at different steps)."""
    hf, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=VOCAB - 1)
    eos = int(ours.generate(ids[1:2], mask[1:2], max_new_tokens=3)[0, -1])  # the second row stops early
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, **options)
    ref = hf_greedy(hf, ids, mask, **kwargs)
    out = ours.generate(ids, mask, pad_token_id=VOCAB - 1, **kwargs)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out["sequences"], ref.sequences)
    assert len(out.scores) == len(out.logits) == len(ref.scores) == out.sequences.shape[1] - ids.shape[1]
    for mine, theirs in [*zip(out.scores, ref.scores), *zip(out.logits, ref.logits)]:
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert torch.isinf(out.scores[0]).any() == bool(options)  # min_new_tokens bans EOS at the first step
    for normalize in (False, True):
        for field in ("scores", "logits"):
            mine = ours.compute_transition_scores(out.sequences, getattr(out, field), normalize_logits=normalize)
            theirs = hf.compute_transition_scores(ref.sequences, getattr(ref, field), normalize_logits=normalize)
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # Sampling: the token drawn at each step is one its scores allow; without the flags, the plain tensor.
    sampled = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=3, seed=0,
                            return_dict_in_generate=True, output_scores=True)
    chosen = ours.compute_transition_scores(sampled.sequences, sampled.scores)
    assert out.logits is not None and sampled.logits is None and torch.isfinite(chosen).all()
    assert torch.equal(sampled.sequences, ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[],
                                                        do_sample=True, top_k=3, seed=0))
    beams = ours.generate(ids, mask, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert torch.equal(beams.sequences, ours.generate(ids, mask, max_new_tokens=4, num_beams=2))
    with pytest.raises(ValueError, match="not kept by beam search"):
        ours.generate(ids, mask, max_new_tokens=4, num_beams=2, return_dict_in_generate=True, output_scores=True)
    with pytest.warns(UserWarning, match="returned with return_dict_in_generate=True"):  # as transformers warns
        plain = ours.generate(ids, mask, pad_token_id=VOCAB - 1,
                              **kwargs | {"output_logits": False, "return_dict_in_generate": False})
        assert torch.equal(plain, out.sequences)
    # transformers' ModelOutput access: by position (unset fields skipped), keys, tuples; beam_indices positional.
    assert out[0] is out.sequences and out.keys() == ["sequences", "scores", "logits"] and "scores" in out
    assert sampled.to_tuple() == (sampled.sequences, sampled.scores) and "logits" not in sampled
    mine = ours.compute_transition_scores(out.sequences, out.scores, None, True)
    torch.testing.assert_close(mine, hf.compute_transition_scores(ref.sequences, ref.scores, None, True), atol=1e-5,
                               rtol=1e-5)


def test_ngram_ban_ignores_padding():
    history, scores = fixed_logits()
    padded = torch.cat([torch.full((4, 3), -1), history], dim=1)
    assert torch.equal(ban_repeated_ngrams(2)(padded, scores.clone()), ban_repeated_ngrams(2)(history, scores))


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3}, {"do_sample": True, "seed": 3, "top_k": 20},
                                     {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {7: 3.0}},
                                     {"no_repeat_ngram_size": 2}, {"do_sample": True, "seed": 4, "min_p": 0.2}])
def test_cached_decoding_equals_full_recomputation(hf_pair, options):
    _, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=0)
    cached = ours.generate(ids, mask, max_new_tokens=20, eos_token_id=[], **options)
    recomputed = ours.generate(ids, mask, max_new_tokens=20, eos_token_id=[], use_cache=False, **options)
    assert torch.equal(cached, recomputed)


def test_bf16_weights_generate_with_a_bf16_cache(hf_pair, tmp_path):
    _, ours = hf_pair
    model = GPT2LMHeadModel(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    model.to(torch.bfloat16)
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, model.generate(ids, max_new_tokens=10, eos_token_id=[], use_cache=False))


# ---- processors equal transformers' -------------------------------------------------------------------------
def fixed_logits():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, VOCAB, generator=g) * 3
    scores[1, :10] = 2.5  # ties at the top-k boundary
    scores[2, 7] = 40.0  # one token holds nearly all the mass
    history = torch.randint(0, VOCAB, (4, 9), generator=g)
    return history, scores


@pytest.mark.parametrize("ours, theirs", [
    (scale_temperature(0.7), hf_proc.TemperatureLogitsWarper(0.7)),
    (scale_temperature(1.8), hf_proc.TemperatureLogitsWarper(1.8)),
    (keep_top_k(1), hf_proc.TopKLogitsWarper(1)),
    (keep_top_k(5), hf_proc.TopKLogitsWarper(5)),
    (keep_top_k(10_000), hf_proc.TopKLogitsWarper(10_000)),
    (keep_top_p(0.9), hf_proc.TopPLogitsWarper(0.9)),
    (keep_top_p(0.3), hf_proc.TopPLogitsWarper(0.3)),
    (keep_top_p(1e-6), hf_proc.TopPLogitsWarper(1e-6)),
    (penalize_repetition(1.3), hf_proc.RepetitionPenaltyLogitsProcessor(1.3)),
    (penalize_repetition(0.8), hf_proc.RepetitionPenaltyLogitsProcessor(0.8)),
    (keep_min_p(0.05), hf_proc.MinPLogitsWarper(0.05)),
    (keep_min_p(0.5), hf_proc.MinPLogitsWarper(0.5)),
    (ban_repeated_ngrams(1), hf_proc.NoRepeatNGramLogitsProcessor(1)),
    (ban_repeated_ngrams(2), hf_proc.NoRepeatNGramLogitsProcessor(2)),
    (bias_sequences({(3,): 2.0, (7,): -100.0, (511,): 0.5}),
     hf_proc.SequenceBiasLogitsProcessor([[[3], 2.0], [[7], -100.0], [[511], 0.5]])),
    (keep_typical(0.9), hf_proc.TypicalLogitsWarper(0.9)),
    (keep_typical(0.2), hf_proc.TypicalLogitsWarper(0.2)),
    (keep_typical(1e-6), hf_proc.TypicalLogitsWarper(1e-6)),
    (cut_below(3e-3), hf_proc.EpsilonLogitsWarper(3e-3)),
    (cut_below(0.5), hf_proc.EpsilonLogitsWarper(0.5)),
    (cut_below(3e-3, eta=True), hf_proc.EtaLogitsWarper(3e-3)),
    (cut_below(0.2, eta=True), hf_proc.EtaLogitsWarper(0.2)),
])
def test_processor_matches_transformers(ours, theirs):
    history, scores = fixed_logits()
    expected = theirs(history, scores.clone())
    got = ours(history, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    probs = got.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(4))


def test_sequence_bias_and_bad_words_match_transformers():
    """A sequence's bias (or ban) lands on its last token in the rows that end with the rest of it."""
    history, scores = fixed_logits()
    tail0, tail2 = history[0, -2:].tolist(), history[2, -1:].tolist()
    sequences = [[*tail0, 5], [*tail2, 9], [*tail2, 5], [4, 4, 4, 8], [11]]
    bias = [[s, b] for s, b in zip(sequences, (3.0, -2.0, 1.5, 9.0, -0.5))]
    theirs = hf_proc.SequenceBiasLogitsProcessor(bias)(history, scores.clone())
    assert torch.equal(bias_sequences({tuple(s): b for s, b in bias})(history, scores.clone()), theirs)
    assert not torch.equal(theirs[0], scores[0]) and torch.equal(theirs[1, :11], scores[1, :11])
    theirs = hf_proc.NoBadWordsLogitsProcessor(sequences)(history, scores.clone())
    config = GenerationConfig(bad_words_ids=sequences, sequence_bias=bias)  # the JSON form, as transformers takes it
    _, ban = config.processors()  # the sequence bias, then the ban
    assert torch.equal(ban(history, scores.clone()), theirs) and torch.isinf(theirs[0, 5])
    padded = torch.cat([torch.full((4, 3), -1), history[:, :1]], dim=1)  # padding (-1) never matches a prefix
    assert torch.equal(ban(padded, scores.clone()).isinf(), scores.isinf().index_fill(1, torch.tensor([11]), True))
    # As transformers: a bad word that is an EOS id alone is left out; NumPy ids are ids.
    (only,) = GenerationConfig(bad_words_ids=[[11], [numpy.int64(12)]]).processors(eos=[11])
    assert torch.equal(only(history, scores.clone()).isinf()[:, 11:13], torch.tensor([[False, True]] * 4))
    theirs = hf_proc.NoBadWordsLogitsProcessor([[11], [12]], eos_token_id=11)(history, scores.clone())
    assert torch.equal(only(history, scores.clone()), theirs)


def test_eta_cutoff_rounds_its_threshold_as_transformers():
    """sqrt(epsilon) in float32 as transformers takes it: in double it kept a token at the threshold."""
    scores = torch.zeros(1, 100)
    scores[0, -1] = -3.4549804
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(cut_below(1e-3, eta=True)(ids, scores), hf_proc.EtaLogitsWarper(1e-3)(ids, scores.clone()))


def test_processor_chain_matches_transformers():
    """All of them at once, in transformers' order: the bias lands on a token the repetition penalty then scales."""
    history, scores = fixed_logits()
    seen, other = int(history[0, 0]), int(history[1, 0])
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=40, top_p=0.85, min_p=0.05, typical_p=0.95,
                              epsilon_cutoff=1e-4, eta_cutoff=1e-3, repetition_penalty=1.2, no_repeat_ngram_size=3,
                              logit_bias={seen: 6.0}, suppress_tokens=[other], bad_words_ids=[[other + 1]])
    theirs = transformers.LogitsProcessorList([
        hf_proc.SequenceBiasLogitsProcessor([[[seen], 6.0]]),
        hf_proc.RepetitionPenaltyLogitsProcessor(1.2), hf_proc.NoRepeatNGramLogitsProcessor(3),
        hf_proc.NoBadWordsLogitsProcessor([[other + 1]]), hf_proc.SuppressTokensLogitsProcessor([other]),
        hf_proc.TemperatureLogitsWarper(0.8), hf_proc.TopKLogitsWarper(40), hf_proc.TopPLogitsWarper(0.85),
        hf_proc.MinPLogitsWarper(0.05), hf_proc.TypicalLogitsWarper(0.95), hf_proc.EpsilonLogitsWarper(1e-4),
        hf_proc.EtaLogitsWarper(1e-3)])
    got = scores.clone()
    for process in config.processors():
        got = process(history, got)
    torch.testing.assert_close(got.softmax(-1), theirs(history, scores.clone()).softmax(-1), rtol=0, atol=0)


def test_repetition_penalty_ignores_padding():
    history, scores = fixed_logits()
    padded = torch.cat([torch.full((4, 3), -1), history], dim=1)  # -1 marks left padding
    assert torch.equal(penalize_repetition(1.3)(padded, scores.clone()), penalize_repetition(1.3)(history, scores))


def test_frequency_and_presence_penalties_follow_openais_formula():
    history, scores = fixed_logits()
    history = torch.cat([history, history[:, :4], history[:, 1:2]], dim=1)  # tokens seen 1, 2 and 3 times
    padded = torch.cat([torch.full((4, 3), -1), history], dim=1)  # -1 marks padding: never counted
    got = penalize_frequency_presence(0.7, -0.4)(padded, scores.clone())
    expected = scores.clone()
    for row, tokens in enumerate(history.tolist()):
        for token, count in collections.Counter(tokens).items():
            expected[row, token] -= 0.7 * count - 0.4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("step, chosen", [(1, 5), (3, 6)])
def test_frequency_penalty_counts_generated_tokens_only(step, chosen):
    """History [5, 5, 6]: after one generated token (6), token 5 is the prompt's and keeps its lead; with all
    three generated, 5 loses twice the penalty and 6 wins."""
    sampler = Sampler(GenerationConfig(frequency_penalty=0.5), GPT2Config(vocab_size=VOCAB))
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 1.0, 0.8
    assert sampler(logits, torch.tensor([[5, 5, 6]]), step).tolist() == [chosen]


def test_eos_and_pad_ids_must_lie_in_the_vocabulary():
    model_config = GPT2Config(vocab_size=VOCAB)  # its own EOS, GPT-2's 50256, lies past it and is left out
    assert Sampler(GenerationConfig(), model_config).eos == []
    assert Sampler(GenerationConfig(eos_token_id=numpy.int64(7)), model_config).eos == [7]
    for options, name in (({"pad_token_id": VOCAB}, "pad_token_id"), ({"pad_token_id": -1}, "pad_token_id"),
                          ({"eos_token_id": [3, VOCAB + 88]}, "eos_token_id"), ({"eos_token_id": -5}, "eos_token_id")):
        with pytest.raises(ValueError, match=f"{name} -?\\d+ is outside the model's vocabulary \\[0, {VOCAB}\\)"):
            Sampler(GenerationConfig(**options), model_config)


def test_logit_bias_forces_and_bans_tokens(hf_pair):
    _, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    forced = ours.generate(ids, max_new_tokens=8, eos_token_id=[], logit_bias={42: 100.0})
    assert forced[0, len(PROMPTS[0]):].tolist() == [42] * 8
    plain = ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    first = int(plain[0, len(PROMPTS[0])])
    banned = ours.generate(ids, max_new_tokens=8, eos_token_id=[], logit_bias={first: -100.0})
    assert first not in banned[0, len(PROMPTS[0]):].tolist()


def test_parse_logit_bias():
    assert parse_logit_bias("50256=-100,198=2.5") == {50256: -100.0, 198: 2.5}
    for bad in ("50256", "x=1", "1=y", ""):
        with pytest.raises(ValueError, match="expected TOKEN_ID=BIAS"):
            parse_logit_bias(bad)
    with pytest.raises(ValueError, match="token id 5 is given twice"):
        parse_logit_bias("5=1,5=-2")


# ---- sampling -----------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(hf_pair):
    _, ours = hf_pair
    ids, mask = left_padded(PROMPTS, pad=0)
    options = dict(do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=20, eos_token_id=[])
    a = ours.generate(ids, mask, seed=7, **options)
    assert torch.equal(a, ours.generate(ids, mask, seed=7, **options))
    assert torch.equal(a, ours.generate(ids, mask, generator=torch.Generator().manual_seed(7), **options))
    assert not torch.equal(a, ours.generate(ids, mask, seed=8, **options))
    torch.manual_seed(0)
    b = ours.generate(ids, mask, **options)  # the global RNG when no seed is given
    torch.manual_seed(0)
    assert torch.equal(b, ours.generate(ids, mask, **options))


def test_sampling_with_top_k_1_or_temperature_0_is_greedy(hf_pair):
    _, ours = hf_pair
    ids = torch.tensor([PROMPTS[2]])
    greedy = ours.generate(ids, max_new_tokens=15, eos_token_id=[])
    assert torch.equal(greedy, ours.generate(ids, max_new_tokens=15, eos_token_id=[], do_sample=True, top_k=1))
    assert torch.equal(greedy, ours.generate(ids, max_new_tokens=15, eos_token_id=[], do_sample=True,
                                             temperature=0))


def test_sampled_tokens_follow_the_filtered_distribution(hf_pair):
    """top_k=3: every sampled token is one of the three most likely at its step (checked by recomputation)."""
    _, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    out = ours.generate(ids, max_new_tokens=15, eos_token_id=[], do_sample=True, top_k=3, seed=0)
    with torch.no_grad():
        logits = ours(out).logits[0, ids.shape[1] - 1:-1]
    top3 = logits.topk(3).indices
    assert (top3 == out[0, ids.shape[1]:, None]).any(-1).all()


def test_num_return_sequences_repeats_each_prompt(hf_pair):
    _, ours = hf_pair
    ids, mask = left_padded(PROMPTS[:2], pad=0)
    out = ours.generate(ids, mask, max_new_tokens=10, do_sample=True, seed=0, num_return_sequences=3,
                        eos_token_id=[])
    assert out.shape == (6, ids.shape[1] + 10)
    assert torch.equal(out[:3, :ids.shape[1]], ids[[0, 0, 0]]) and torch.equal(out[3:, :ids.shape[1]], ids[[1, 1, 1]])
    assert len({tuple(r) for r in out[:3].tolist()}) > 1


# ---- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=200), "exceeds the model's context of 128 positions"),
    (dict(num_return_sequences=2), "needs do_sample=True"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
    (dict(nucleus=0.9), "unknown generation option"),
    (dict(stop=["x"]), "need the tokenizer"),
    (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
    (dict(frequency_penalty=2.5), "frequency_penalty must be a number in \\[-2, 2\\]"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
    (dict(presence_penalty=-3), "presence_penalty must be a number in \\[-2, 2\\]"),
    (dict(presence_penalty=True), "presence_penalty must be a number"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\]"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(logit_bias={1: 150.0}), "logit_bias must map token ids"),
    (dict(logit_bias={"1": 1.0}), "logit_bias must map token ids"),
    (dict(logit_bias={VOCAB: 1.0}), f"token id {VOCAB}, beyond the vocabulary of {VOCAB} ids"),
    (dict(bad_words_ids=[[1, VOCAB]]), f"bad_words_ids names token id {VOCAB}, beyond the vocabulary"),
    (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists"),
    (dict(bad_words_ids=[1, 2]), "bad_words_ids must be a list of non-empty lists"),
    (dict(sequence_bias={(1, VOCAB): 1.0}), f"sequence_bias names token id {VOCAB}"),
    (dict(sequence_bias=[[1, 2.0]]), "sequence_bias must map"),
    (dict(sequence_bias={(1, 2): "x"}), "sequence_bias must map non-empty token-id sequences to numbers"),
    (dict(do_sample=True, typical_p=0.0), "typical_p must be in \\(0, 1\\]"),
    (dict(do_sample=True, epsilon_cutoff=1.0), "epsilon_cutoff must be in \\[0, 1\\)"),
    (dict(do_sample=True, eta_cutoff=-0.1), "eta_cutoff must be in \\[0, 1\\)"),
    # each failed deep inside torch (NaN probabilities, a TypeError, an overflow) or was silently taken
    (dict(do_sample=True, temperature=float("inf"), min_new_tokens=2), "temperature must be a finite number"),
    (dict(do_sample=True, repetition_penalty=1e-40), "repetition_penalty must be a number in \\[0.001, 1000\\]"),
    (dict(temperature="0.7"), "temperature must be a number"),
    (dict(top_p="0.9"), "top_p must be a number or None"),
    (dict(do_sample="false"), "do_sample must be True or False"),
    (dict(stop=5), "stop must be a string or a list of strings"),
    (dict(seed=2 ** 70), "seed must be an integer that fits 64 bits"),
    (dict(seed=1.5), "seed must be an integer"),
    # a TypeError from the range checks below the type checks
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer, got '5'"),
    (dict(min_new_tokens=None), "min_new_tokens must be an integer, got None"),
    (dict(num_beams="2"), "num_beams must be an integer, got '2'"),
    (dict(num_return_sequences=None), "num_return_sequences must be an integer, got None"),
    (dict(eos_token_id=1.5), "eos_token_id must be a token id, a list of them or None, got 1.5"),
    (dict(eos_token_id="5"), "eos_token_id must be a token id"),
    (dict(pad_token_id=7.9), "pad_token_id must be a token id or None, got 7.9"),  # padded with 7
    (dict(pad_token_id=True), "pad_token_id must be a token id or None"),
    (dict(suppress_tokens=5), "suppress_tokens must be a list of token ids, got 5"),
    (dict(use_cache="no"), "use_cache must be True or False"),  # was taken as true
    (dict(stop=[1]), "stop must be a string or a list of strings"),
])
def test_bad_options_raise_clear_errors(hf_pair, kwargs, message):
    _, ours = hf_pair
    with pytest.raises(ValueError, match=message):
        ours.generate(torch.tensor([PROMPTS[0]]), **kwargs)


@pytest.mark.parametrize("ids, mask, message", [
    (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]]), "pad prompts on the left"),
    (torch.tensor([[1, VOCAB]]), None, "outside the model's vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), None, "prompt is empty"),
    (torch.tensor([1, 2]), None, "shape \\(batch, prompt_length\\)"),
])
def test_bad_inputs_raise_clear_errors(hf_pair, ids, mask, message):
    _, ours = hf_pair
    with pytest.raises(ValueError, match=message):
        ours.generate(ids, mask)


def test_the_whole_context_can_be_used(hf_pair):
    _, ours = hf_pair
    out = ours.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=128 - len(PROMPTS[0]), eos_token_id=[])
    assert out.shape == (1, 128)


# ---- stop strings and streaming (a scripted model decides the text) ------------------------------------------
class ScriptedLM(nn.Module):
    """Greedy decoding of it yields `scripts[row]` whatever the prompt; it keeps the KV cache contract (the
    model advances cache.length)."""

    def __init__(self, scripts: list[list[int]], vocab_size: int = 50257) -> None:
        super().__init__()
        self.config = GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=vocab_size, n_positions=256)
        self.scripts = scripts
        self.anchor = nn.Parameter(torch.zeros(()))  # device and dtype for the cache

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, logits_to_keep=0):
        past = past_key_values.length if past_key_values is not None else 0
        if past == 0:
            self.prompt_len = input_ids.shape[1]
        if past_key_values is not None:
            past_key_values.length = past + input_ids.shape[1]
        step = past + input_ids.shape[1] - self.prompt_len
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[min(step, len(script) - 1)]] = 1.0
        return CausalLMOutput(logits=logits)


@pytest.fixture(scope="module")
def gpt2_tok():
    return GPT2Tokenizer.gpt2()


def byte_tokens(tok, text):
    """One token per UTF-8 byte, so multi-byte characters are split across tokens."""
    return [tok.encoding.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


def test_stop_strings_end_rows_independently(gpt2_tok):
    texts = ["one two STOP three four five six", "alpha beta gamma delta epsilon zeta"]
    scripts = [gpt2_tok.encode(t) for t in texts]
    model = ScriptedLM(scripts)
    ids = torch.tensor([[10], [10]])
    out = generate(model, ids, max_new_tokens=40, stop=["STOP", "delta"], tokenizer=gpt2_tok, pad_token_id=0,
                   eos_token_id=[])
    new = out[:, 1:].tolist()
    ends = []
    for row, stop in enumerate(["STOP", "delta"]):
        script = scripts[row]
        # The row's last real token is the one whose text completes the stop string.
        end = next(i for i in range(1, len(script) + 1) if stop in gpt2_tok.decode(script[:i]))
        assert new[row][:end] == script[:end]
        assert all(t == 0 for t in new[row][end:])
        ends.append(end)
    assert ends[0] != ends[1] and out.shape[1] == 1 + max(ends)


def test_stop_string_split_inside_a_character_is_found(gpt2_tok):
    script = byte_tokens(gpt2_tok, "naïve 世界 and more")
    model = ScriptedLM([script])
    out = generate(model, torch.tensor([[10]]), max_new_tokens=40, stop=["世界"], tokenizer=gpt2_tok,
                   eos_token_id=[])
    assert gpt2_tok.decode(out[0, 1:].tolist()) == "naïve 世界"


def test_streaming_reassembles_multibyte_text_and_holds_partial_characters(gpt2_tok):
    text = "héllo wörld — 世界 🎉 ok"
    model = ScriptedLM([byte_tokens(gpt2_tok, text) + [gpt2_tok.eos_token_id]])
    pieces = list(stream_generate(model, gpt2_tok, "Hi", max_new_tokens=100))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(text.encode("utf-8"))  # continuation bytes were held, not emitted alone


def test_streaming_stops_before_a_stop_string_without_leaking_its_start(gpt2_tok):
    model = ScriptedLM([gpt2_tok.encode("The answer is 42.\nUser: next question")])
    pieces = list(stream_generate(model, gpt2_tok, "Q", max_new_tokens=50, stop=["\nUser:"]))
    assert "".join(pieces) == "The answer is 42."
    assert not any("\n" in p for p in pieces)


def test_streaming_a_random_model_equals_decoding_its_tokens(hf_pair, gpt2_tok):
    """Random tokens < 512 are mostly single GPT-2 bytes: many split or invalid UTF-8 sequences."""
    _, ours = hf_pair
    prompt = [1, 2, 3]
    tokens = ours.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=True, seed=5, eos_token_id=[])
    pieces = list(stream_generate(ours, gpt2_tok, prompt, max_new_tokens=60, do_sample=True, seed=5,
                                  eos_token_id=[]))
    assert "".join(pieces) == gpt2_tok.decode(tokens[0, 3:].tolist())


@pytest.mark.parametrize("text, stop, expected", [
    ("abcd", ["abcd", "bc"], "a"),  # "bc" completes first: generation stops there
    ("abc", ["bc", "abc"], ""),  # both complete with "c": the longer one is cut
    ("xaby", ["b", "ab"], "x"),
    ("plain", ["z"], "plain"),
])
def test_text_is_cut_before_the_stop_string_complete_first(gpt2_tok, text, stop, expected):
    """Overlapping stops: the whole text, the streamed pieces and generation (which stops at the token completing
    a stop) agree. Cutting at the earliest start gave "" for "abcd", while the stream had stopped at "a"."""
    assert truncate_at_stop(text, stop) == (expected, expected != text)
    decoder = TextStreamDecoder(gpt2_tok, stop)
    pieces = [decoder.push(i) for i in byte_tokens(gpt2_tok, text)] + [decoder.flush()]
    assert "".join(pieces) == expected


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=30), stop=st.lists(st.text(min_size=1, max_size=4), max_size=2),
       garbage=st.binary(max_size=3), whole_tokens=st.booleans())
def test_stream_decoder_equals_whole_decoding(gpt2_tok, text, stop, garbage, whole_tokens):
    """Bytes (valid UTF-8 or not) as one token per byte or as BPE tokens: the pieces join to the whole
    decoded text, cut before the first stop string."""
    ids = gpt2_tok.encode(text) if whole_tokens else byte_tokens(gpt2_tok, text)
    ids += [gpt2_tok.encoding.encode_single_token(bytes([b])) for b in garbage]
    decoder = TextStreamDecoder(gpt2_tok, stop)
    pieces, starts = [], []
    for i in ids:
        starts.append(decoder.decoded)  # where each token's text starts, as the server's logprobs use it
        pieces.append(decoder.push(i))
        assert decoder.released == len("".join(pieces)) <= decoder.decoded
    pieces.append(decoder.flush())
    whole, stopped = truncate_at_stop(gpt2_tok.decode(ids), stop)
    assert "".join(pieces) == whole and decoder.released == len(whole)
    if not stopped:
        assert starts == sorted(starts) and decoder.decoded == len(whole)


@pytest.mark.parametrize("stop, expected", [
    ([" abc"], " ab\ufffd"),  # " ab" held as a possible stop, then released by the last character: once
    (["b\ufffd"], " a"),  # the last character completes a stop: nothing past it
    (["\n"], " ab\ufffd"),
])
def test_a_character_left_unfinished_at_the_end_releases_or_stops_the_held_text(gpt2_tok, stop, expected):
    """flush() decodes the last unfinished character as U+FFFD: the text held for a possible stop string came out
    twice (or past the stop) when that character released it (or completed the stop)."""
    ids = gpt2_tok.encode(" ab") + [gpt2_tok.encoding.encode_single_token(b"\xe2")]
    assert truncate_at_stop(gpt2_tok.decode(ids), stop)[0] == expected
    decoder = TextStreamDecoder(gpt2_tok, stop)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == expected
    assert decoder.released == len(expected) and decoder.stopped == (stop == ["b\ufffd"])


@pytest.mark.parametrize("text, stop, expected", [
    ("\nUser: hi", ["\nUser:"], ""),  # a stop that begins in the leading whitespace: the reply is empty
    (" \n\nHello\nUser:", ["\nUser:"], "Hello"),
    ("\nHello\nmore", ["\n"], "Hello"),  # one wholly inside the leading whitespace does not count
    ("  \n", ["\n"], ""),
    ("  Hi", ["x"], "Hi"),
])
def test_a_stop_string_may_begin_in_the_skipped_leading_whitespace(gpt2_tok, text, stop, expected):
    """A plain chat reply skips its leading whitespace; a model that writes "\nUser:" at once has written an empty
    reply (the stop was missed, and the next turn shown as the reply). Whole text, stream and the token-level
    stop agree."""
    lead = len(text) - len(text.lstrip())
    whole, stopped = truncate_at_stop(text, stop, lead)
    assert whole == expected
    for ids in (gpt2_tok.encode(text), byte_tokens(gpt2_tok, text)):
        decoder = TextStreamDecoder(gpt2_tok, stop, skip_leading_space=True)
        assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == expected
        matcher = _StopStringMatcher(gpt2_tok, stop, 1, skip_leading_space=True)
        assert any([matcher.matches([i]) for i in ids]) == stopped


def test_max_length_caps_min_new_tokens_and_finished_rows_padding_is_never_decoded(hf_pair):
    """max_length below prompt + min_new_tokens ends at max_length, as in transformers (it was an error naming
    max_new_tokens); a finished row's padding is not read by the stop-string search (a pad id the tokenizer
    cannot decode failed)."""
    theirs, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    length = ids.shape[1] + 5
    assert torch.equal(ours.generate(ids, max_length=length, min_new_tokens=10),
                       theirs.generate(ids, max_length=length, min_new_tokens=10, do_sample=False))
    # So does max_new_tokens below min_new_tokens (a model's generation_config.json may set the minimum alone).
    assert torch.equal(ours.generate(ids, max_new_tokens=5, min_new_tokens=10),
                       theirs.generate(ids, max_new_tokens=5, min_new_tokens=10, do_sample=False))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50304)).eval()
    tokenizer = GPT2Tokenizer.gpt2()
    prompts = torch.tensor([tokenizer.encode("Hello world"), tokenizer.encode("Hi there")])
    free = generate(model, prompts, max_new_tokens=10, eos_token_id=[])
    stop = tokenizer.decode(free[0, 2:4].tolist())  # ends row 0 after two tokens; row 1 goes on
    out = generate(model, prompts, max_new_tokens=10, eos_token_id=[], stop=[stop], pad_token_id=50300,
                   tokenizer=tokenizer)
    assert (out[0, 4:] == 50300).all() and not (out[1, 4:] == 50300).any()


def test_a_padded_vocabulary_never_streams_an_id_the_tokenizer_lacks():
    from gpt2kit.generation import stream_generate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=50304)).eval()
    with torch.no_grad():
        model.lm_head.weight[50257:] += 5.0  # the padding rows are the likeliest tokens
    tokenizer = GPT2Tokenizer.gpt2()
    text = "".join(stream_generate(model, tokenizer, "Hi", max_new_tokens=40, do_sample=True, seed=2))  # KeyError
    ids = generate(model, torch.tensor([tokenizer.encode("Hi")]), max_new_tokens=40, do_sample=True, seed=2,
                   stop=["zzz"], tokenizer=tokenizer)
    assert int(ids.max()) < 50257 and isinstance(text, str)


def test_interleaved_generators_keep_dropout_off_and_the_models_mode(hf_pair):
    """Each generator used to switch the model to eval mode for its whole life and back at its end: one finishing
    first turned dropout on under the other, which then left the model in eval mode."""
    from gpt2kit.generation import TokenGenerator

    _, ours = hf_pair
    ours.transformer.drop.p = 0.5  # dropout that would change the tokens
    try:
        alone = ours.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=8)
        ours.train()
        first = iter(TokenGenerator(ours, torch.tensor([PROMPTS[0]]), max_new_tokens=3))
        second = TokenGenerator(ours, torch.tensor([PROMPTS[1]]), max_new_tokens=8)
        steps = iter(second)
        next(first), next(steps)
        list(first)  # the first ends while the second goes on
        list(steps)
        assert torch.equal(second.sequences(), alone) and ours.training
    finally:
        ours.transformer.drop.p = 0.0
        ours.eval()


def test_numpy_scalars_are_numbers_and_a_given_tokenizer_also_binds_beam_search(hf_pair):
    from gpt2kit.generation import GenerationConfig

    config = GenerationConfig(do_sample=numpy.bool_(True), temperature=numpy.float64(0.7), top_p=numpy.float32(0.9),
                              repetition_penalty=numpy.float64(1.2))
    assert config.sampling
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50304)).eval()
    with torch.no_grad():
        model.lm_head.weight[50300] += 5.0  # a padding row is the likeliest token
    tokenizer = GPT2Tokenizer.gpt2()
    ids = generate(model, torch.tensor([tokenizer.encode("Hi")]), max_new_tokens=3, num_beams=2, tokenizer=tokenizer)
    assert int(ids.max()) < 50257


@settings(max_examples=500, deadline=None)
@given(st.text("ab ", max_size=12), st.lists(st.text("ab ", min_size=1, max_size=8), max_size=3))
def test_held_length_is_the_longest_end_that_could_grow_into_a_stop_string(text, stop):
    from gpt2kit.generation import held_length

    expected = max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
                   default=0)
    assert held_length(text, stop) == expected


def test_transformers_streamers_receive_the_prompt_then_each_new_token(capsys):
    """generate(..., streamer=) as transformers calls a streamer: put(prompt), put(new ids) per step, end()."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).eval()  # GPT-2's vocabulary
    tok = GPT2Tokenizer.gpt2()
    ids = torch.tensor([tok.encode("Once upon a time")])

    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], 0

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.ended += 1

    recorder = Recorder()
    out = generate(model, ids, max_new_tokens=12, eos_token_id=[], streamer=recorder)
    assert recorder.calls[0] == ids.tolist() and recorder.ended == 1
    assert sum(recorder.calls[1:], []) == out[0, ids.shape[1]:].tolist() and len(recorder.calls) == 13
    model.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=transformers.TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == tok.decode(out[0, ids.shape[1]:].tolist()) + "\n"
    with pytest.raises(ValueError, match="streamer= streams one sequence"):
        generate(model, ids.repeat(2, 1), max_new_tokens=2, streamer=recorder)
