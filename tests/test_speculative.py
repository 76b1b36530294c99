"""Speculative decoding (assistant model, prompt lookup): the model's own greedy tokens, transformers' assisted
output, and exactly the model's distribution when sampling."""

import io

import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.chat import chat
from gpt2kit.cli import main
from gpt2kit.generation import generate, stream_generate
from gpt2kit.pipeline import pipeline
from gpt2kit.speculative import SpeculativeGenerator, prompt_lookup
from gpt2kit.tokenizer import GPT2Tokenizer, train_bpe

from .conftest import DATA, HF_VOCAB, random_hf_pair, save_tiny_text_model


def repetitive_prompt(seed: int, length: int = 10) -> torch.Tensor:
    """Random ids, then their first half again: prompt lookup has something to find."""
    ids = torch.randint(0, HF_VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :length // 2]], 1)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A smaller random model with hf_pair's vocabulary, gpt2kit's and transformers' (the same weights)."""
    with torch.random.fork_rng():
        return random_hf_pair(tmp_path_factory.mktemp("draft") / "model", seed=1, n_layer=1, n_embd=32, n_head=2)


def test_prompt_lookup_takes_what_followed_the_first_earlier_occurrence():
    seq = torch.tensor([5, 6, 7, 8, 5, 6, 9, 5, 6])
    assert prompt_lookup(seq, 2, 3).tolist() == [7, 8, 5]  # "5 6" first occurs at 0
    assert prompt_lookup(seq, 2, 10).tolist() == [7, 8, 5, 6, 9, 5, 6]  # up to the sequence's end
    assert prompt_lookup(torch.tensor([1, 2, 3, 9, 3]), 2, 2).tolist() == [9, 3]  # "9 3" is new; "3" is not
    assert prompt_lookup(torch.tensor([1, 2, 3]), 2, 2).tolist() == []
    assert prompt_lookup(torch.tensor([4]), 2, 2).tolist() == []


@pytest.mark.parametrize("options", [{}, dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=8),
                                     dict(logit_bias={3: 2.0}, frequency_penalty=0.5)])
def test_greedy_prompt_lookup_and_assistant_give_the_models_own_tokens(hf_pair, draft, options):
    hf, ours = hf_pair
    for seed in range(3):
        ids = repetitive_prompt(seed)
        plain = generate(ours, ids, max_new_tokens=40, **options)
        lookup = generate(ours, ids, max_new_tokens=40, prompt_lookup_num_tokens=5, **options)
        assisted = generate(ours, ids, max_new_tokens=40, assistant_model=draft[1], **options)
        assert torch.equal(lookup, plain) and torch.equal(assisted, plain)


def test_greedy_speculative_output_equals_transformers_assisted_generation(hf_pair, draft):
    hf, ours = hf_pair
    for seed in range(3):
        ids = repetitive_prompt(seed)
        theirs = hf.generate(ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5,
                             pad_token_id=HF_VOCAB - 1)
        assert torch.equal(generate(ours, ids, max_new_tokens=40, prompt_lookup_num_tokens=5), theirs)
        theirs = hf.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft[0],
                             pad_token_id=HF_VOCAB - 1)
        assert torch.equal(generate(ours, ids, max_new_tokens=40, assistant_model=draft[1]), theirs)


def test_guesses_are_kept_and_the_model_runs_fewer_passes(hf_pair):
    _, ours = hf_pair
    ids = repetitive_prompt(0)
    # The model as its own assistant, never unsure: every guess is its own token.
    run = SpeculativeGenerator(ours, ids, max_new_tokens=30, assistant_model=ours, assistant_confidence_threshold=0)
    rows_scored = []  # the LM head's positions per call: 1 for each guess, 1 + guesses for the model's check
    handle = ours.lm_head.register_forward_hook(lambda module, args, out: rows_scored.append(out.shape[1]))
    try:
        tokens = list(run)
    finally:
        handle.remove()
    assert len(tokens) == 30 and run.guessed == run.accepted == 28
    assert torch.equal(run.sequences(), generate(ours, ids, max_new_tokens=30))
    # 20 guesses, then the 8 that leave room for the model's last token: 2 passes of the model instead of 30.
    assert [n for n in rows_scored if n > 1] == [21, 9]


def test_generation_ends_at_eos_and_stop_strings_inside_kept_guesses(hf_pair):
    _, ours = hf_pair
    ids = repetitive_prompt(0)
    plain = generate(ours, ids, max_new_tokens=40, eos_token_id=[])
    eos = int(plain[0, ids.shape[1] + 12])  # a token the run reaches after some guesses were kept
    ended = generate(ours, ids, max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(generate(ours, ids, max_new_tokens=40, eos_token_id=eos, prompt_lookup_num_tokens=8), ended)
    assert torch.equal(generate(ours, ids, max_new_tokens=40, eos_token_id=eos, assistant_model=ours), ended)
    assert ended.shape[1] < plain.shape[1]


def test_scores_and_logits_of_each_token_equal_plain_decodings(hf_pair):
    _, ours = hf_pair
    ids = repetitive_prompt(1)
    options = dict(max_new_tokens=25, return_dict_in_generate=True, output_scores=True, output_logits=True,
                   repetition_penalty=1.2)
    plain = generate(ours, ids, **options)
    lookup = generate(ours, ids, prompt_lookup_num_tokens=6, **options)
    assert torch.equal(lookup.sequences, plain.sequences) and len(lookup.scores) == len(plain.scores) == 25
    for a, b in zip((*lookup.scores, *lookup.logits), (*plain.scores, *plain.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_heuristic_schedule_grows_the_guess_after_rounds_that_keep_every_guess(hf_pair):
    _, ours = hf_pair
    ids = repetitive_prompt(2)
    options = dict(max_new_tokens=20, assistant_model=ours, assistant_confidence_threshold=0, num_assistant_tokens=2)
    transient = SpeculativeGenerator(ours, ids, num_assistant_tokens_schedule="heuristic_transient", **options)
    list(transient)
    assert transient.guess_length > 2
    persistent = SpeculativeGenerator(ours, ids, num_assistant_tokens_schedule="heuristic", **options)
    list(persistent)
    again = SpeculativeGenerator(ours, ids, num_assistant_tokens_schedule="heuristic", **options)
    assert again.guess_length == persistent.guess_length > 2  # kept with the assistant from one call to the next
    assert SpeculativeGenerator(ours, ids, **options).guess_length == 2  # "constant"


def _two_token_distribution(model: GPT2LMHeadModel, ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Exact probabilities of the first two sampled tokens (V, V) after top-k filtering."""
    def probs(seq):
        logits = model(seq).logits[0, -1]
        kept = logits.topk(top_k).indices
        return torch.full_like(logits, -torch.inf).index_copy(0, kept, logits[kept]).softmax(-1)

    with torch.no_grad():
        first = probs(ids)
        return torch.stack([first[t] * probs(torch.cat([ids, torch.tensor([[t]])], 1))
                            for t in range(len(first))])


def test_speculative_sampling_follows_the_models_distribution(one_thread):
    """Leviathan et al.'s rule, on a vocabulary small enough to count: the frequencies of the first two tokens
    match the model's own distribution, not the assistant's, whose guesses are often kept."""
    def model(seed, std):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=6,
                                            bos_token_id=5, eos_token_id=5, initializer_range=std)).eval()
        return lm

    target, assistant = model(0, 0.5), model(1, 0.5)
    ids, top_k, runs = torch.tensor([[1, 2, 3]]), 4, 2000
    exact = _two_token_distribution(target, ids, top_k)
    guess = _two_token_distribution(assistant, ids, top_k)
    assert 0.5 * (exact - guess).abs().sum() > 0.3  # a rule that kept the assistant's guesses would be seen
    generator = torch.Generator().manual_seed(0)
    for guesser in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=2)):
        counts = torch.zeros_like(exact)
        for _ in range(runs):
            out = generate(target, ids, max_new_tokens=2, do_sample=True, top_k=top_k, eos_token_id=[],
                           generator=generator, **guesser)
            counts[out[0, 3], out[0, 4]] += 1
        assert 0.5 * (counts / runs - exact).abs().sum() < 0.07, guesser


def test_seeded_speculative_sampling_is_reproducible(hf_pair, draft):
    _, ours = hf_pair
    ids = repetitive_prompt(0)
    options = dict(max_new_tokens=30, do_sample=True, top_p=0.9, seed=7, assistant_model=draft[1])
    assert torch.equal(generate(ours, ids, **options), generate(ours, ids, **options))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an integer >= 1"),
    (dict(prompt_lookup_num_tokens=3, num_return_sequences=2, do_sample=True), "generates one sequence"),
    (dict(prompt_lookup_num_tokens=3, compile=True), "neither compile=True"),
    (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule must be"),
    (dict(assistant_confidence_threshold=1.0), "assistant_confidence_threshold must be"),
    (dict(max_matching_ngram_size=0), "max_matching_ngram_size must be"),
])
def test_bad_speculative_options_raise_clear_errors(hf_pair, kwargs, message):
    _, ours = hf_pair
    with pytest.raises(ValueError, match=message):
        generate(ours, repetitive_prompt(0), max_new_tokens=5, **kwargs)


def test_speculative_decoding_refuses_batches_beams_and_another_vocabulary(hf_pair, tiny_model):
    _, ours = hf_pair
    batch = torch.cat([repetitive_prompt(0), repetitive_prompt(1)])
    with pytest.raises(ValueError, match="one sequence at a time"):
        generate(ours, batch, max_new_tokens=5, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="num_beams=1"):
        generate(ours, repetitive_prompt(0), max_new_tokens=5, num_beams=2, assistant_model=ours)
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256)).eval()
    with pytest.raises(ValueError, match="same vocabulary"):
        generate(ours, repetitive_prompt(0), max_new_tokens=5, assistant_model=small)
    with pytest.raises(ValueError, match="give one of the two"):
        generate(ours, repetitive_prompt(0), max_new_tokens=5, assistant_model=ours, prompt_lookup_num_tokens=3)


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("spec") / "model")


def test_pipeline_streaming_and_chat_give_the_same_text_speculatively(text_model_dir):
    plain = pipeline("text_generation", text_model_dir)
    assisted = pipeline("text_generation", text_model_dir, assistant_model=text_model_dir)
    prompts = ["I had always thought Jack Gisburn", "the picture", "I had always thought"]
    options = dict(max_new_tokens=30, stop=["."])
    expected = plain(prompts, **options)
    assert assisted(prompts, **options) == expected
    assert plain(prompts, prompt_lookup_num_tokens=4, **options) == expected
    tok = GPT2Tokenizer.from_pretrained(text_model_dir)
    streamed = "".join(stream_generate(plain.model, tok, prompts[0], max_new_tokens=30, stop=["."],
                                       prompt_lookup_num_tokens=4))
    assert prompts[0] + streamed == expected[0][0]["generated_text"]
    chat = [{"role": "user", "content": "Who painted the picture?"}]
    assert assisted(chat, max_new_tokens=20) == plain(chat, max_new_tokens=20)


def test_an_assistant_with_another_tokenizer_is_refused(text_model_dir, tmp_path):
    other = tmp_path / "other"
    GPT2LMHeadModel.from_pretrained(text_model_dir).save_pretrained(other)
    train_bpe([DATA / "tinyshakespeare" / "input.txt"], 512, other)  # as many ids, other merges
    with pytest.raises(ValueError, match="tokenizer differs"):
        pipeline("text_generation", text_model_dir, assistant_model=other)


def test_cli_generates_the_same_text_speculatively(text_model_dir, capsys):
    outputs = []
    for extra in ([], ["--prompt-lookup-num-tokens", "4"], ["--assistant-model", str(text_model_dir)]):
        assert main(["generate", "--model", str(text_model_dir), "--prompt", "I had always thought",
                     "--max-new-tokens", "25", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > len("I had always thought")


def test_chat_replies_the_same_with_an_assistant_and_with_prompt_lookup(text_model_dir):
    def session(**options):
        stdout = io.StringIO()
        chat(str(text_model_dir), stdin=io.StringIO("Who painted it?\nAnd then?\n"), stdout=stdout,
             do_sample=False, max_new_tokens=12, **options)
        return stdout.getvalue()

    plain = session()
    assert session(assistant_model=str(text_model_dir)) == plain
    assert session(prompt_lookup_num_tokens=4) == plain and plain.count("\n") == 2


def test_the_pipeline_takes_an_assistant_object_and_loads_a_directory_as_the_model_is(text_model_dir):
    plain = pipeline("text_generation", text_model_dir)
    assistant = GPT2LMHeadModel.from_pretrained(text_model_dir)
    given = pipeline("text_generation", text_model_dir, assistant_model=assistant)
    assert given.assistant_model is assistant
    assert given("the picture", max_new_tokens=20) == plain("the picture", max_new_tokens=20)
    bf16 = GPT2LMHeadModel.from_pretrained(text_model_dir, dtype=torch.bfloat16)
    loaded = pipeline("text_generation", bf16, tokenizer=plain.tokenizer, assistant_model=text_model_dir)
    assert loaded.assistant_model.lm_head.weight.dtype == torch.bfloat16


def test_max_length_counts_the_batchs_padded_prompt_as_without_guessing(text_model_dir):
    prompts = ["I had always thought Jack Gisburn rather a cheap genius", "the picture"]
    plain = pipeline("text_generation", text_model_dir)(prompts, max_length=30)
    assert pipeline("text_generation", text_model_dir)(prompts, max_length=30, prompt_lookup_num_tokens=3) == plain
    assisted = pipeline("text_generation", text_model_dir, assistant_model=text_model_dir)
    assert assisted(prompts, max_length=30) == plain


def test_an_assistant_with_a_shorter_context(text_model_dir, tmp_path):
    short = save_tiny_text_model(tmp_path / "short", n_positions=32)
    model = GPT2LMHeadModel.from_pretrained(text_model_dir)
    assistant = GPT2LMHeadModel.from_pretrained(short)
    ids = torch.arange(1, 16).unsqueeze(0)
    # It reads at most prompt + max_new_tokens - 2 positions: the last guess and token are never fed to it.
    assert torch.equal(generate(model, ids, max_new_tokens=19, assistant_model=assistant),
                       generate(model, ids, max_new_tokens=19))
    with pytest.raises(ValueError, match="needs 33 positions of the assistant model, beyond its context of 32"):
        generate(model, ids, max_new_tokens=20, assistant_model=assistant)
    # A conversation stays within the shorter context, turn after turn.
    stdout = io.StringIO()
    messages = "".join(f"Who painted the picture of the lady in the gallery, tell me {i}\n" for i in range(5))
    chat(str(text_model_dir), assistant_model=str(short), stdin=io.StringIO(messages), stdout=stdout,
         do_sample=False)
    assert stdout.getvalue().count("\n") == 5


def test_an_assistant_whose_tokenizer_pads_otherwise_has_the_same_ids(text_model_dir, tmp_path):
    other = tmp_path / "padded"
    GPT2LMHeadModel.from_pretrained(text_model_dir).save_pretrained(other)
    tok = GPT2Tokenizer.from_pretrained(text_model_dir)
    tok.pad_token_id = 1  # another role, the same ids
    tok.save_pretrained(other)
    plain = pipeline("text_generation", text_model_dir)
    assert pipeline("text_generation", text_model_dir, assistant_model=other)("the picture") == plain("the picture")


def test_a_given_tokenizer_does_not_hide_an_assistants_own_other_one(text_model_dir, tmp_path):
    other = tmp_path / "other"
    GPT2LMHeadModel.from_pretrained(text_model_dir).save_pretrained(other)
    train_bpe([DATA / "tinyshakespeare" / "input.txt"], 512, other)
    with pytest.raises(ValueError, match="tokenizer differs"):
        pipeline("text_generation", text_model_dir, tokenizer=text_model_dir, assistant_model=other)
