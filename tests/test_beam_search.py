"""Beam search against transformers' generate(num_beams=...) on the same random weights: token for token, with
beams that end early (EOS ids the model likes), length penalties, every early_stopping mode, several returned
sequences, processors, and left-padded batches."""

import pytest
import torch

from gpt2kit import GenerationConfig
from gpt2kit.cli import main
from gpt2kit.pipeline import pipeline

from .conftest import HF_VOCAB, save_tiny_text_model

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = HF_VOCAB
PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def likely(hf_pair):
    """The model's 1st, 3rd and 4th most likely first tokens after PROMPT: as EOS ids, beams end early."""
    with torch.no_grad():
        top = hf_pair[1](torch.tensor([PROMPT])).logits[0, -1].topk(4).indices.tolist()
    return top[0], top[2], top[3]


def both(hf_pair, ids, mask, eos, **options):
    """Both models' beam search; eos None means the models' own EOS id (VOCAB - 1) on both sides."""
    hf, ours = hf_pair
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), do_sample=False,
                             max_new_tokens=25, eos_token_id=eos, pad_token_id=VOCAB - 1, **options)
    mine = ours.generate(ids, mask, max_new_tokens=25, eos_token_id=eos, pad_token_id=VOCAB - 1, **options)
    return theirs, mine


@pytest.mark.parametrize("options", [
    dict(num_beams=4),
    dict(num_beams=3, length_penalty=0.5),
    dict(num_beams=4, early_stopping=True),
    dict(num_beams=4, early_stopping="never", length_penalty=2.0),
    dict(num_beams=4, num_return_sequences=3),
    dict(num_beams=2, repetition_penalty=1.3, min_new_tokens=5, no_repeat_ngram_size=2),
])
@pytest.mark.parametrize("eos", ["model's", "third", "first", "two"])
def test_beam_search_matches_transformers(hf_pair, likely, options, eos):
    eos_id = {"model's": None, "third": likely[1], "first": likely[0], "two": [likely[1], likely[2]]}[eos]
    theirs, mine = both(hf_pair, torch.tensor([PROMPT]), None, eos_id, **options)
    assert torch.equal(mine, theirs)


def test_beams_ending_early_make_shorter_outputs(hf_pair, likely):
    theirs, mine = both(hf_pair, torch.tensor([PROMPT]), None, likely[0], num_beams=3, length_penalty=0.5)
    assert torch.equal(mine, theirs) and mine.shape[1] < len(PROMPT) + 25  # the winner ended at its EOS
    assert mine[0, -1] == likely[0]


def test_left_padded_batch_matches_transformers_and_recomputation(hf_pair, likely):
    prompts = [PROMPT, [100, 200], [3, 4, 5, 6]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for eos in (None, likely[1]):
        theirs, mine = both(hf_pair, ids, mask, eos, num_beams=3, num_return_sequences=2)
        assert torch.equal(mine, theirs)
        recomputed = hf_pair[1].generate(ids, mask, max_new_tokens=25, eos_token_id=[] if eos is None else eos,
                                         pad_token_id=VOCAB - 1, num_beams=3, num_return_sequences=2,
                                         use_cache=False)
        assert torch.equal(mine, recomputed)


def test_beam_search_scores_at_least_greedy(hf_pair):
    """Without EOS and length penalty 0, the best beam's total log-probability is at least greedy's."""
    ours = hf_pair[1]
    ids = torch.tensor([PROMPT])

    def log_prob(sequence):
        with torch.no_grad():
            logp = ours(sequence[None]).logits[0, :-1].float().log_softmax(-1)
        return float(logp[torch.arange(len(PROMPT) - 1, len(sequence) - 1), sequence[len(PROMPT):]].sum())
    greedy = ours.generate(ids, max_new_tokens=12, eos_token_id=[])[0]
    beam = ours.generate(ids, max_new_tokens=12, eos_token_id=[], num_beams=5, length_penalty=0.0)[0]
    assert log_prob(beam) >= log_prob(greedy) - 1e-5


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=2, do_sample=True), "beam sampling\\) is not supported"),
    (dict(num_beams=2, stop=["x"]), "neither stop strings nor compile"),
    (dict(num_beams=2, compile=True), "neither stop strings nor compile"),
    (dict(num_beams=2, num_return_sequences=3), "num_beams >= num_return_sequences"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
    (dict(num_beams=2, early_stopping=1), "early_stopping must be"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
])
def test_bad_beam_options(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options)


def test_bad_inputs_are_named_as_given(hf_pair):
    ours = hf_pair[1]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\), input_ids \(1, 7\)"):
        ours.generate(torch.tensor([PROMPT]), torch.ones(2, 7, dtype=torch.long), num_beams=3)
    with pytest.raises(ValueError, match="input_ids must be a LongTensor"):
        ours.generate([PROMPT], num_beams=3)


def test_pipeline_and_command_run_beam_search(tmp_path, capsys):
    model_dir = save_tiny_text_model(tmp_path / "model")
    pipe = pipeline("text_generation", model=str(model_dir))
    ids = pipe.tokenizer.encode("I had always thought")
    best = pipe.model.generate(torch.tensor([ids]), max_new_tokens=10, num_beams=3,
                               eos_token_id=pipe.tokenizer.eos_token_id)
    expected = pipe.tokenizer.decode(best[0, len(ids):].tolist())
    out = pipe("I had always thought", max_new_tokens=10, num_beams=3, return_full_text=False)
    assert out == [{"generated_text": expected}]
    two = pipe("I had always thought", max_new_tokens=10, num_beams=3, num_return_sequences=2)
    assert len(two) == 2 and two[0]["generated_text"] == "I had always thought" + expected
    assert main(["generate", "--model", str(model_dir), "--prompt", "I had always thought", "--max-new-tokens",
                 "10", "--num-beams", "3", "--completion-only"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(ValueError, match="does not stream"):
        list(pipe.stream("I had", num_beams=2))
    with pytest.raises(ValueError, match="chat input ends each reply at a stop string"):
        pipe([{"role": "user", "content": "Hi"}], num_beams=2)
