"""The static-shape decode step (attention over the whole preallocated cache, cache writes at a position tensor)
against today's eager step, and compiled decoding (torch.compile of that step) against eager decoding."""

import pytest
import torch
from torch._dynamo.utils import counters

from gpt2kit import GPT2LMHeadModel
from gpt2kit.generation import AUTOTUNE_ENV, TokenGenerator, generate
from gpt2kit.model import KVCache, positions_from_mask

pytestmark = pytest.mark.usefixtures("one_thread")
# One prompt length and max_new_tokens everywhere: the compiled step's shapes (batch, cache length) stay the
# same, so the file compiles once per batch size.
BATCH_1 = (torch.tensor([[5, 6, 7, 8, 9]]), None)
PADDED = (torch.tensor([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11], [0, 12, 13, 14, 15]]),
          torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
NEW_TOKENS = 10


@pytest.mark.parametrize("ids, mask", [BATCH_1, PADDED], ids=["batch-1", "left-padded"])
@torch.no_grad()
def test_static_step_gives_the_eager_steps_logits(tiny_model, ids, mask):
    B, P = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    eager_cache, static_cache = (KVCache(tiny_model.config, B, P + NEW_TOKENS) for _ in range(2))
    logits = tiny_model(ids, mask, past_key_values=eager_cache).logits[:, -1]
    tiny_model(ids, mask, past_key_values=static_cache)
    # What each row may see in the static step: its real prompt tokens, then every new position it reaches.
    step_mask = torch.zeros(B, 1, 1, P + NEW_TOKENS, dtype=torch.bool)
    step_mask[:, 0, 0, :P] = mask.bool()
    positions = mask.sum(1, keepdim=True)
    for index in range(P, P + NEW_TOKENS):
        token = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        logits = tiny_model(token, mask, positions_from_mask(mask)[:, -1:], past_key_values=eager_cache).logits[:, -1]
        step_mask[..., index] = True
        static = tiny_model.decode_step(token, positions, torch.tensor([index]), step_mask, static_cache)
        positions = positions + 1
        torch.testing.assert_close(static, logits, rtol=1e-5, atol=1e-5)
    filled = P + NEW_TOKENS
    torch.testing.assert_close(static_cache.keys[..., :filled, :], eager_cache.keys[..., :filled, :])
    torch.testing.assert_close(static_cache.values[..., :filled, :], eager_cache.values[..., :filled, :])


@pytest.mark.parametrize("ids, mask, autotune", [(*BATCH_1, "1"), (*PADDED, "0")], ids=["batch-1", "left-padded"])
def test_compiled_decoding_gives_the_eager_tokens(tiny_model, ids, mask, autotune, monkeypatch):
    """Batch 1 as users compile it, autotuned; the padded batch without autotuning, as the other tests compile
    (twice as fast: autotuning one shape costs half a minute here)."""
    monkeypatch.setenv(AUTOTUNE_ENV, autotune)
    eager = generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    compiled = generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True)
    assert compiled.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(compiled, eager)


def test_a_second_generator_reuses_the_compiled_step_and_new_weights_are_seen(tiny_model, tiny_config):
    ids, mask = PADDED

    def tokens(model):
        return torch.stack(list(TokenGenerator(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                               compile=True)))

    def eager_tokens(model):
        return generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, -NEW_TOKENS:].T

    first = tokens(tiny_model)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the step was compiled (here or by an earlier test with the same shapes)
    assert torch.equal(tokens(tiny_model), first)
    assert counters["stats"]["unique_graphs"] == graphs
    # On a CPU the weights are constants of the compiled step: another model gets its own (dynamo's guards)...
    other = GPT2LMHeadModel(tiny_config).eval()
    assert torch.equal(tokens(other), eager_tokens(other))
    assert not torch.equal(eager_tokens(other), first)
    # ... and so do weights changed in place, as by an optimizer step (the generator sees their versions).
    before = eager_tokens(other)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    changed = eager_tokens(other)
    assert not torch.equal(changed, before)
    assert torch.equal(tokens(other), changed)
    # An edit through .data bumps no version counter: the weights' sums still change.
    for p in other.parameters():
        p.data.mul_(0.5)
    assert torch.equal(tokens(other), eager_tokens(other))
    assert torch.equal(tokens(tiny_model), first)



def test_the_weight_fingerprint_samples_a_loaded_models_transposed_weights_where_they_are(tiny_model_dir):
    """A loaded HF checkpoint's Conv1D weights are transposed views. The fingerprint sums the same evenly spaced
    elements as for a contiguous weight without copying it (a reshape copied every weight on each generate call:
    100 ms of GPT-2 small's first token), and an edit through .data still changes it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpt2kit.generation import _FINGERPRINT_SAMPLES, _weights_fingerprint

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    weights = list(model.parameters())
    transposed = [i for i, p in enumerate(weights) if not p.is_contiguous()]
    assert transposed  # c_attn, c_proj, c_fc
    with Ops() as ops:
        before = _weights_fingerprint(model)
    assert not ops.names & {"clone", "copy_", "_to_copy", "contiguous"}
    for i in transposed:
        step = max(1, weights[i].numel() // _FINGERPRINT_SAMPLES)
        expected = float(weights[i].detach().contiguous().view(-1)[::step].sum(dtype=torch.float64))
        assert before[i][3] == pytest.approx(expected, rel=1e-12)
    weights[transposed[0]].data[0, 0] += 1.0  # the first element is always sampled
    assert _weights_fingerprint(model)[transposed[0]][3] != before[transposed[0]][3]

def test_prompts_of_other_lengths_reuse_the_compiled_step(tiny_model):
    ids = BATCH_1[0]
    generate(tiny_model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for length, new_tokens in ((3, NEW_TOKENS), (17, 4)):  # the cache is sized in steps, not to the prompt
        ids = torch.arange(1, length + 1)[None]
        eager = generate(tiny_model, ids, max_new_tokens=new_tokens, eos_token_id=[])
        assert torch.equal(generate(tiny_model, ids, max_new_tokens=new_tokens, eos_token_id=[], compile=True),
                           eager)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.fixture
def sharp_model(tiny_config) -> GPT2LMHeadModel:
    """Wide initial weights: attention is far from uniform, so a step that read another cache (or none) would
    pick other tokens (with the default 0.02 the tokens barely depend on the cache)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config.replace(initializer_range=0.5)).eval()


def test_a_finished_generator_hands_its_zeroed_cache_to_the_next_and_running_ones_keep_their_own(tiny_model):
    ids, mask = PADDED

    def generator():
        return TokenGenerator(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True)

    eager = generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    first = generator()
    list(first)
    spare = first.cache
    assert spare.keys.count_nonzero() == 0 and spare.values.count_nonzero() == 0
    # Two generators alive at once, stepped in turn: the first takes the spare, the second gets a new cache.
    a, b = generator(), generator()
    assert a.cache is spare and b.cache is not spare
    steps_a, steps_b = iter(a), iter(b)
    for _ in range(NEW_TOKENS):
        next(steps_a)
        next(steps_b)
    assert torch.equal(a.sequences(), eager) and torch.equal(b.sequences(), eager)
    # A generator the caller stops early hands back its cache too, zeroed, and the next one decodes right.
    c = generator()
    steps_c = iter(c)
    next(steps_c)
    steps_c.close()  # as a `break` out of a for loop over it does
    again = generator()
    assert again.cache is c.cache and c.cache.keys.count_nonzero() == 0
    assert torch.equal(torch.cat([ids, torch.stack(list(again)).T], 1), eager)
    with pytest.raises(RuntimeError, match="generates once"):
        next(iter(again))


def test_a_new_cache_is_read_by_the_already_compiled_step(sharp_model):
    """The CPU step is compiled with freezing: a cache it took as a constant would be read by every later
    generator of the same shape, whatever cache that generator holds."""
    from gpt2kit import generation

    ids, _ = BATCH_1
    eager = generate(sharp_model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    for _ in range(2):
        generation._spare_caches.clear()  # each run allocates its own cache
        assert torch.equal(generate(sharp_model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True), eager)


def test_a_model_made_in_inference_mode_compiles(tiny_config):
    with torch.inference_mode():  # its weights are inference tensors, which keep no version counter
        model = GPT2LMHeadModel(tiny_config).eval()
    ids, mask = BATCH_1
    eager = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True), eager)
    with torch.inference_mode():  # new weights copied in place, where no version counter sees it
        model.load_state_dict(GPT2LMHeadModel(tiny_config).state_dict())
    eager = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True), eager)


def test_the_compiled_step_may_hold_many_shapes(tiny_model):
    """Every model, batch size, dtype and cache length is an entry of the one compiled function; dynamo's default
    of 8 would be a hard error at the ninth."""
    from contextlib import ExitStack

    from gpt2kit.generation import RECOMPILE_LIMIT

    run = TokenGenerator(tiny_model, *BATCH_1, max_new_tokens=NEW_TOKENS, compile=True)
    with ExitStack() as stack:
        for option in run.compile_options:
            stack.enter_context(option)
        assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT > 8


def test_compile_needs_the_cache(tiny_model):
    with pytest.raises(ValueError, match="compile=True needs use_cache=True"):
        generate(tiny_model, BATCH_1[0], compile=True, use_cache=False)


def test_a_spare_cache_made_in_inference_mode_is_not_reused_outside_it(tiny_model):
    ids, mask = BATCH_1
    eager = generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    with torch.inference_mode():  # its cache holds inference tensors, which only inference mode may write
        assert torch.equal(generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                    compile=True), eager)
    assert torch.equal(generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True),
                       eager)


def test_a_generator_started_in_inference_mode_closes_outside_it(tiny_model):
    """Handing its cache back wrote inference tensors outside inference mode: close() raised RuntimeError."""
    ids, mask = BATCH_1
    with torch.inference_mode():
        steps = iter(TokenGenerator(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True))
        first = [next(steps), next(steps)]
    steps.close()
    eager = generate(tiny_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(torch.stack(first, 1), eager[:, ids.shape[1]:ids.shape[1] + 2])


def test_a_deleted_models_compiled_steps_and_frozen_weights_are_freed(tiny_config):
    """Each model's CPU step holds a frozen copy of its weights; kept after the model is gone, they would leak
    and fill the compiled function's entries up to RECOMPILE_LIMIT."""
    import gc
    import weakref

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    ids, _ = BATCH_1
    weights = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_config).eval()
        eager = generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        assert torch.equal(generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], compile=True), eager)
        weights.append(weakref.ref(model.transformer.wte.weight))
        del model
        gc.collect()
    # Freed when the next model compiles: the first two models' weights are gone, and one entry is left.
    assert [weight() is None for weight in weights] == [True, True, False]
    assert len(_debug_get_cache_entry_list(GPT2LMHeadModel.decode_step.__code__)) == 1


def test_an_autotune_setting_other_than_0_or_1_is_one_error(tiny_model, monkeypatch):
    monkeypatch.setenv(AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="GPT2KIT_COMPILE_AUTOTUNE must be 0 or 1, got 'yes'"):
        generate(tiny_model, BATCH_1[0], max_new_tokens=2, eos_token_id=[], compile=True)
