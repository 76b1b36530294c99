"""The model against transformers' GPT-2 on random weights, plus its own invariants."""

import copy
import math

import pytest
import torch
import transformers

from gpt2kit import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, KVCache
from gpt2kit.config import PRESETS

SHAPES = [
    dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=300),
    dict(n_layer=3, n_embd=96, n_head=6, n_positions=48, vocab_size=257, n_inner=200),
]


def hf_pair(tmp_path, shape, cls=transformers.GPT2LMHeadModel, ours=GPT2LMHeadModel, **extra):
    """A random transformers model and the same weights loaded through gpt2kit."""
    hf = cls(transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0, **extra)).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, ours.from_pretrained(tmp_path / "hf")


def padded_batch(vocab, side):
    ids = torch.randint(0, vocab, (3, 12))
    mask = torch.ones_like(ids)
    lengths = [12, 7, 3]
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, : 12 - n] = 0
        else:
            mask[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_loss_match_transformers(tmp_path, shape):
    hf, ours = hf_pair(tmp_path, shape)
    ids = torch.randint(0, shape["vocab_size"], (2, 17))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = ours(ids, labels=ids)
    assert (ref.logits - out.logits).abs().max() <= 1e-4
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_transformers(tmp_path, shape, side):
    hf, ours = hf_pair(tmp_path, shape)
    ids, mask = padded_batch(shape["vocab_size"], side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' generate derives them the same way
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # a left-padded row's first token would be "predicted" from a pad position
    labels[torch.arange(3), mask.argmax(-1)] = -100
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)  # positions derived from the mask inside
    real = mask.bool()
    assert (ref.logits[real] - out.logits[real]).abs().max() <= 1e-4
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_right_padding_matches_transformers_at_every_position(tmp_path, shape):
    """A pad query after real tokens attends to them, as in transformers (it also attended to itself): the logits
    at pad positions and a loss over labels that keep the pads (labels=input_ids) agree too. The loss comes
    first in the output, as transformers' out[0]."""
    hf, ours = hf_pair(tmp_path, shape)
    ids, mask = padded_batch(shape["vocab_size"], "right")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as gpt2kit derives them from the mask
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=ids)
        out = ours(ids, attention_mask=mask, labels=ids)
    assert (ref.logits - out.logits).abs().max() <= 1e-4
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5
    assert out[0] is out.loss and ref[0] is ref.loss and out.keys()[:2] == ["loss", "logits"]
    classifier = GPT2ForSequenceClassification(ours.config.replace(pad_token_id=0))
    assert classifier(ids, labels=torch.tensor([0, 1, 1]))[0].dim() == 0


def test_left_padded_row_equals_the_prompt_alone(tiny_model):
    ids, mask = padded_batch(tiny_model.config.vocab_size, "left")
    with torch.no_grad():
        batch = tiny_model(ids, attention_mask=mask).logits
        alone = tiny_model(ids[1:2, 5:]).logits
    assert torch.allclose(batch[1, 5:], alone[0], atol=1e-5)


def test_inputs_embeds_replace_the_token_embeddings(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    body = tiny_model.transformer
    with torch.no_grad():
        expected = body(ids).last_hidden_state
        embedded = body(ids, inputs_embeds=body.wte(ids)).last_hidden_state
        torch.testing.assert_close(embedded, expected, rtol=0, atol=0)
        shifted = body(ids, inputs_embeds=body.wte(ids) + 1.0).last_hidden_state
        torch.testing.assert_close(body(inputs_embeds=body.wte(ids)).last_hidden_state, expected, rtol=0, atol=0)
    assert not torch.allclose(shifted, expected)
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(2, 10, \d+\) and input_ids \(2, 1\)"):
        body(ids[:, :1], inputs_embeds=body.wte(torch.randint(0, 9, (2, 10))))  # it broadcast the embeddings
    with pytest.raises(ValueError, match="give input_ids"):
        body()
    with pytest.raises(ValueError, match="logits_to_keep computes the last positions' logits only"):
        tiny_model(ids, labels=ids, logits_to_keep=1)  # its loss was 0


def test_transformers_inputs_token_types_embeds_cache_and_tuples(tmp_path):
    """Inputs transformers' GPT-2 takes, on the same weights: token_type_ids, inputs_embeds on the LM and the
    classifier, use_cache (its cache passed back), return_dict=False and a tensor logits_to_keep (each a
    TypeError or a crash before)."""
    shape = SHAPES[0]
    hf, ours = hf_pair(tmp_path, shape)
    ids = torch.randint(0, shape["vocab_size"], (2, 10))
    types = torch.randint(0, 3, (2, 10))
    with torch.no_grad():
        ref = hf(ids, token_type_ids=types, labels=ids)
        out = ours(ids, token_type_ids=types, labels=ids)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)
        embeds = hf.transformer.wte(ids)
        torch.testing.assert_close(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits)
        loss, logits = ours(ids, labels=ids, return_dict=False)
        plain = hf(ids, labels=ids)
        torch.testing.assert_close((loss, logits), (plain.loss, plain.logits))
        keep = torch.tensor([0, 4, 9])
        torch.testing.assert_close(ours(ids, logits_to_keep=keep).logits, hf(ids, logits_to_keep=keep).logits)
        first = ours(ids[:, :6], use_cache=True)
        assert isinstance(first.past_key_values, KVCache) and first.past_key_values.length == 6
        step = ours(ids[:, 6:7], past_key_values=first.past_key_values)
        torch.testing.assert_close(step.logits[:, -1], hf(ids[:, :7]).logits[:, -1])
    classifier_hf, classifier = hf_pair(tmp_path / "cls", shape, cls=transformers.GPT2ForSequenceClassification,
                                        ours=GPT2ForSequenceClassification, num_labels=3, pad_token_id=0)
    with torch.no_grad():
        embeds = classifier_hf.transformer.wte(ids)
        torch.testing.assert_close(classifier(inputs_embeds=embeds, token_type_ids=types).logits,
                                   classifier_hf(inputs_embeds=embeds, token_type_ids=types).logits)
        (logits,) = classifier(ids, return_dict=False)
        torch.testing.assert_close(logits, classifier_hf(ids).logits)


def test_targets_equal_shifted_labels(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.no_grad():
        from_labels = tiny_model(ids, labels=ids).loss
        from_targets = tiny_model(ids[:, :-1], targets=ids[:, 1:]).loss
    assert torch.allclose(from_labels, from_targets, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_decoding_matches_full_forward(tiny_model, side):
    """Every position, padding too: a right-padding query decoded one at a time attended to itself, which the full
    forward's (and transformers') does not when real tokens precede it."""
    config = tiny_model.config
    ids, mask = padded_batch(config.vocab_size, side)
    cache = KVCache(config, batch_size=3, max_length=20)
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=mask).logits
        steps = [tiny_model(ids[:, :2], attention_mask=mask[:, :2], past_key_values=cache).logits]
        for t in range(2, 12):
            steps.append(tiny_model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    assert cache.length == 12
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_half_precision_attention_written_out_does_not_overflow(tiny_config):
    """output_attentions (and the compiled decode step) write attention out: its float16 scores overflowed to inf
    where SDPA's and transformers' reorder_and_upcast_attn stay finite."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(800.0)  # queries and keys of size ~1e3: products > 65504
    model = model.half()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
    with torch.no_grad():
        sdpa = model(ids).logits
        written = model(ids, output_attentions=True)
    assert torch.isfinite(sdpa).all() and torch.isfinite(written.logits).all()
    assert all(torch.isfinite(a).all() for a in written.attentions)
    torch.testing.assert_close(written.logits.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


def test_context_overflow_is_a_clear_error(tiny_model):
    n = tiny_model.config.n_positions
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_model(torch.zeros(1, n + 1, dtype=torch.long))


def test_sequence_classification_matches_transformers(tmp_path):
    shape = SHAPES[0]
    hf, ours = hf_pair(tmp_path, shape, cls=transformers.GPT2ForSequenceClassification,
                       ours=GPT2ForSequenceClassification, num_labels=3, pad_token_id=1)
    ids, mask = padded_batch(shape["vocab_size"], "right")
    ids = ids.masked_fill(ids == 1, 2).masked_fill(mask == 0, 1)  # pad id 1 only where padded
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
        by_pad_id = ours(ids, labels=labels)  # no mask: pools the last non-pad token like HF
    assert (ref.logits - out.logits).abs().max() <= 1e-4
    assert (ref.logits - by_pad_id.logits).abs().max() <= 1e-4
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5



def test_hidden_states_match_transformers(tmp_path):
    """output_hidden_states: the embeddings' and every block's output, the last after ln_f, as transformers'; also
    beside the fused training loss, and from the classifier."""
    shape = SHAPES[1]
    hf, ours = hf_pair(tmp_path, shape)
    ids = torch.randint(0, shape["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        out = ours(ids, output_hidden_states=True)
        fused = ours(ids[:, :-1], targets=ids[:, 1:], return_logits=False, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == shape["n_layer"] + 1
    for mine, theirs in zip(out.hidden_states, ref):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.hidden_states[-1], ref[-1][:, :-1], atol=1e-5, rtol=1e-5)
    assert fused.logits is None and ours(ids).hidden_states is None
    hf, ours = hf_pair(tmp_path, SHAPES[0], cls=transformers.GPT2ForSequenceClassification,
                       ours=GPT2ForSequenceClassification, num_labels=3, pad_token_id=1)
    with torch.no_grad():
        ref = hf(ids.clamp(2), output_hidden_states=True).hidden_states
        out = ours(ids.clamp(2), output_hidden_states=True).hidden_states
    assert len(out) == len(ref) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))
    # The bare transformer returns transformers' output too: last_hidden_state, hidden_states.
    base = ours.transformer(ids.clamp(2), output_hidden_states=True)
    assert torch.equal(base.last_hidden_state, base.hidden_states[-1]) and len(base.hidden_states) == len(ref)
    assert ours.transformer(ids.clamp(2)).hidden_states is None


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_attention_weights_match_transformers(tmp_path, side):
    """output_attentions: every block's weights (B, n_head, T, keys) as transformers' eager attention gives them, at
    every real query (a padding query's row is meaningless on both sides); the output is SDPA's, and weights over
    a KV cache cover the cached keys too."""
    shape = SHAPES[1]
    hf, ours = hf_pair(tmp_path, shape, attn_implementation="eager")
    ids, mask = padded_batch(shape["vocab_size"], side)
    mask = None if side == "none" else mask
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as gpt2kit derives them
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_attentions=True)
        out = ours(ids, attention_mask=mask, output_attentions=True)
        plain = ours(ids, attention_mask=mask)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert len(out.attentions) == len(ref.attentions) == shape["n_layer"] and plain.attentions is None
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert mine.shape == theirs.shape == (3, shape["n_head"], 12, 12)
        torch.testing.assert_close(mine.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.sum(-1), torch.ones_like(mine[..., 0]))
    torch.testing.assert_close(out.logits[real], plain.logits[real], atol=1e-5, rtol=1e-5)
    if side == "none":  # the last 4 tokens over a cache of the first 8: the whole matrix's last rows
        cache = KVCache(ours.config, 3, 12)
        with torch.no_grad():
            ours(ids[:, :8], past_key_values=cache)
            cached = ours(ids[:, 8:], past_key_values=cache, output_attentions=True)
        for mine, whole in zip(cached.attentions, out.attentions):
            torch.testing.assert_close(mine, whole[:, :, 8:], atol=1e-5, rtol=1e-5)
        classifier = GPT2ForSequenceClassification(ours.config).eval()
        assert len(classifier(ids, output_attentions=True).attentions) == shape["n_layer"]


@pytest.mark.parametrize("problem_type,num_labels,labels", [
    (None, 1, torch.tensor([0.5, -1.0, 2.0])), (None, 1, torch.tensor([[0.5], [-1.0], [2.0]])),
    (None, 3, torch.tensor([0, 2, 1])),
    (None, 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ("regression", 3, torch.tensor([[0.5, 1.0, -1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])),
    ("single_label_classification", 3, torch.tensor([2, 0, 1])),
    ("multi_label_classification", 3, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))])
def test_classification_loss_follows_the_problem_type_as_transformers(tmp_path, problem_type, num_labels, labels):
    shape = SHAPES[0]
    hf, ours = hf_pair(tmp_path, shape, cls=transformers.GPT2ForSequenceClassification,
                       ours=GPT2ForSequenceClassification, num_labels=num_labels, pad_token_id=1,
                       **({"problem_type": problem_type} if problem_type else {}))
    ids = torch.randint(2, shape["vocab_size"], (3, 9))
    with torch.no_grad():
        ref, out = hf(ids, labels=labels), ours(ids, labels=labels)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)


def test_an_unknown_problem_type_is_an_error(tmp_path):
    hf, ours = hf_pair(tmp_path, SHAPES[0], cls=transformers.GPT2ForSequenceClassification,
                       ours=GPT2ForSequenceClassification, num_labels=2, pad_token_id=1)
    ours.config.extra["problem_type"] = "ranking"
    with pytest.raises(ValueError, match="problem_type must be one of regression, single_label_classification"):
        ours(torch.tensor([[3, 4]]), labels=torch.tensor([1]))

def test_lm_head_is_tied_and_init_follows_gpt2(tiny_config):
    config = GPT2Config(**{**tiny_config.to_dict(), "n_layer": 8, "n_embd": 128})
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - scaled) < 1e-3
    assert model.transformer.h[0].ln_1.weight.eq(1).all()


def param_formula(config: GPT2Config) -> int:
    d, inner = config.n_embd, config.mlp_dim
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + config.n_layer * block + 2 * d


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    config = GPT2Config.from_name(name)
    with torch.device("meta"):
        n = GPT2LMHeadModel(config).num_parameters()
    assert n == param_formula(config)
    if name in ("gpt2", "gpt2-medium", "gpt2-tiny", "gpt2-mini"):
        hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
        with torch.device("meta"):
            hf_n = sum(p.numel() for p in transformers.GPT2LMHeadModel(hf_config).parameters())
        assert n == hf_n


def test_known_parameter_counts():
    counts = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, expected in counts.items():
        with torch.device("meta"):
            assert GPT2LMHeadModel(GPT2Config.from_name(name)).num_parameters() == expected


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPT2Config.from_name("gpt3")
    with pytest.raises(ValueError, match="unknown model field 'n_layers'"):
        GPT2Config.from_dict({"n_layers": 2})
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="tie_word_embeddings must be true or false, got 'false'"):
        GPT2Config.from_dict({"tie_word_embeddings": "false"})  # a string would read as true


def test_config_json_round_trip(tmp_path, tiny_config):
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(tiny_config.to_hf_dict()))
    assert GPT2Config.from_json_file(path).to_dict() == {**tiny_config.to_dict(), "architectures": ["GPT2LMHeadModel"],
                                                       "model_type": "gpt2"}
    # transformers' calls: from_pretrained reads a model directory's config.json, save_pretrained writes one.
    tiny_config.save_pretrained(tmp_path / "saved")
    assert transformers.GPT2Config.from_pretrained(tmp_path / "saved").n_embd == tiny_config.n_embd
    again = GPT2Config.from_pretrained(tmp_path / "saved", n_layer=1)
    assert again.replace(n_layer=tiny_config.n_layer) == GPT2Config.from_json_file(tmp_path / "saved" / "config.json")
    assert again.n_layer == 1


@pytest.mark.parametrize("rows", [[2, 0, 0, 1], [0, 0, 2, 1], [0, 1, 2, 3], [3, 1]])
def test_kv_cache_reorder_keeps_and_repeats_rows(tiny_config, rows):
    """As many rows as before (beam search) reorders the written positions in place; fewer rows (finished
    sequences dropped) makes a smaller cache. Either way row i holds what row rows[i] held."""
    cache = KVCache(tiny_config, batch_size=4, max_length=10)
    shape = (4, tiny_config.n_head, 6, tiny_config.head_dim)
    k, v = torch.randn(shape), torch.randn(shape)
    for layer in range(tiny_config.n_layer):
        cache.update(layer, k, v)
    cache.length = 6
    before = cache.keys.clone(), cache.values.clone()
    index = torch.tensor(rows)
    cache.reorder(index)
    assert cache.batch_size == len(rows) and cache.length == 6
    torch.testing.assert_close(cache.keys[:, :, :, :6], before[0][:, index, :, :6], rtol=0, atol=0)
    torch.testing.assert_close(cache.values[:, :, :, :6], before[1][:, index, :, :6], rtol=0, atol=0)


def test_a_cache_of_another_dtype_is_one_clear_error(tiny_config):
    model = GPT2LMHeadModel(tiny_config).eval().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"KV cache holds torch.float32 but the model computes in torch.bfloat16"):
        model(torch.tensor([[1, 2, 3]]), past_key_values=KVCache(tiny_config, 1, 8))
    # Under autocast a float32 model's cache is float32 and its keys bf16: SDPA casts, generation works.
    from gpt2kit.generation import generate

    float_model = GPT2LMHeadModel(tiny_config).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generate(float_model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[]).shape == (1, 6)


def test_finetuning_a_classifier_drops_its_problem_type(tmp_path):
    """A regression (or multi-label) checkpoint's problem_type would pick the wrong loss for gpt2kit's
    single-label data: a new label set starts from single-label classification."""
    from gpt2kit.training.trainer import load_classifier

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64, num_labels=1)
    config.extra["problem_type"] = "regression"
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    model = load_classifier(tmp_path, num_labels=3)
    labels = torch.tensor([0, 2, 1, 1])
    out = model(torch.randint(0, 64, (4, 5)), labels=labels)
    assert "problem_type" not in model.config.extra
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item())


def test_layer_norm_epsilon_must_be_a_positive_number():
    for bad in ("x", 0, -1e-5, None):
        with pytest.raises(ValueError, match="layer_norm_epsilon must be a number > 0"):
            GPT2Config(layer_norm_epsilon=bad)


def test_gradient_checkpointing_enable_keeps_gradients_and_saves_less(tiny_config):
    """transformers' call: the blocks recompute their activations in backward (what train.recompute does)."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 33))

    def gradients_and_saved_bytes(model):
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(1)  # the same dropout masks (checkpoint() replays them in the recomputation)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    plain = GPT2LMHeadModel(tiny_config).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    checkpointed.gradient_checkpointing_enable()  # twice: still one wrapper
    expected, plain_bytes = gradients_and_saved_bytes(plain)
    got, checkpointed_bytes = gradients_and_saved_bytes(checkpointed)
    assert all(torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-7) for n in expected)
    assert checkpointed_bytes < plain_bytes / 2
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # names unchanged
