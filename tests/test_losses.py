"""The fused LM-head + cross-entropy loss against F.cross_entropy on materialized logits, alone and in the model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2kit import GPT2LMHeadModel
from gpt2kit.losses import linear_cross_entropy, lm_loss, padded_vocab_size

pytestmark = pytest.mark.usefixtures("one_thread")
N, C, V = 45, 24, 101


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 hidden (N, C), weight (V, C) and targets (N,) with some ignored (-100), spread over the rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:6] = -100
    targets[20] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, dtype=torch.float64):
    """F.cross_entropy on the full logits, with leaf copies of the inputs in `dtype` for their gradients."""
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    return F.cross_entropy(h @ w.T, targets, ignore_index=-100), h, w


def check_against_reference(hidden, weight, targets, chunk_rows, dtype) -> None:
    """linear_cross_entropy (bf16 autocast when dtype is bf16) and its gradients against the reference in dtype."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
    loss.backward()
    ref, ref_h, ref_w = reference(hidden.to(dtype), weight.to(dtype), targets)
    ref.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-8} if dtype == torch.float32 else {"rtol": 0.02, "atol": 1e-3}
    assert loss.item() == pytest.approx(ref.item(), rel=tolerance["rtol"])
    torch.testing.assert_close(w.grad, ref_w.grad.float(), **tolerance)
    torch.testing.assert_close(h.grad, ref_h.grad.float(), **tolerance)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, None, 1000])  # one row, ragged chunks, even chunks, one chunk
def test_linear_cross_entropy_equals_float64_reference(chunk_rows):
    hidden, weight, targets = inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
    ref, ref_h, ref_w = reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (loss * 0.25).backward()  # a grad_output other than 1 must scale both gradients
    (ref * 0.25).backward()
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w.grad, ref_w.grad.float(), rtol=1e-5, atol=1e-8)
    assert h.grad[:6].abs().max() == 0 and h.grad[20].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_in_several_slices_of_a_chunk_equals_the_reference(monkeypatch, dtype):
    """A chunk's softmax runs a slice of rows at a time (SLICE_ELEMENTS logits): 3-row slices of 16-row chunks."""
    import gpt2kit.losses

    monkeypatch.setattr(gpt2kit.losses, "SLICE_ELEMENTS", 3 * padded_vocab_size(V))
    check_against_reference(*inputs(4), 16, dtype)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_far_below_the_best_logit_keeps_a_finite_exact_loss(fused, dtype):
    """The loss is -log(softmax[target]), except where that probability underflows float32 (a target logit
    200 below the others: exp(-200) is 0 in float32, its log -inf): then log-sum-exp - logit, as F.cross_entropy."""
    hidden, weight, targets = inputs(5)
    weight[targets[7]] = -hidden[7] * (200 / hidden[7].square().sum())  # target logit -200 in row 7
    weight[targets[9]] = -hidden[9] * (90 / hidden[9].square().sum())  # -90: p about 1e-39, a float32 subnormal
    ref, _, _ = reference(hidden, weight, targets)
    per_row = F.cross_entropy(hidden.double() @ weight.double().T, targets, reduction="none")
    assert per_row[7] > 199 and 89 < per_row[9] < 100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if fused:
            loss = linear_cross_entropy(h, w, targets, chunk_rows=16)
        else:
            loss = lm_loss((h @ w.T)[None], targets[None], chunk_elements=16 * V)
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6 if dtype == torch.float32 else 0.02)


@pytest.mark.parametrize("vocab", [101, 128, 129])  # padded to 128, not padded, padded to 256
def test_vocabulary_padding_inside_the_loss_is_invisible(vocab):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(vocab, C, generator=g) * 0.5
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[-1] = vocab - 1  # the last real column is scored, the padded ones after it never are
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_rows=16)
    ref, ref_h, ref_w = reference(hidden, weight, targets)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    ref.backward()
    assert w.grad.shape == (vocab, C) and w.grad.is_contiguous()
    assert padded_vocab_size(vocab) == {101: 128, 128: 128, 129: 256}[vocab]
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, ref_w.grad.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", [101, 127, -1])  # a padded column (scored -inf), the last one, a negative id
def test_a_target_outside_the_vocabulary_is_an_error_not_an_infinite_loss(target):
    hidden, weight = torch.randn(N, C), torch.randn(101, C)
    targets = torch.randint(0, 101, (N,))
    targets[5] = target
    with pytest.raises(ValueError, match=rf"outside the model's vocabulary of 101 ids .*: {target}$"):
        linear_cross_entropy(hidden, weight, targets)


def test_all_targets_ignored_gives_zero_loss_and_gradients_like_lm_loss():
    hidden, weight, _ = inputs()
    targets = torch.full((N,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_rows=8)
    logits = (hidden @ weight.T).requires_grad_()
    chunked = lm_loss(logits[None], targets[None])
    assert torch.isfinite(loss) and loss.item() == 0.0 == chunked.item()
    loss.backward()
    chunked.backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0 and logits.grad.abs().max() == 0


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_the_matmuls_in_bf16_and_returns_gradients_in_the_inputs_dtypes(hidden_dtype):
    hidden, weight, targets = inputs(1)
    hidden = hidden.to(hidden_dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_rows=16)
        # What the unfused model computes under autocast: bf16 logits from F.linear, the loss in float32.
        autocast_ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
    ref, ref_h, ref_w = reference(hidden.float(), weight, targets, torch.float32)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(autocast_ref.item(), rel=1e-5)  # the same bf16 logits
    assert loss.item() != ref.item()  # ... which are not float32's
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    ref.backward()
    assert h.grad.dtype == hidden_dtype and w.grad.dtype == torch.float32
    for ours, exact in ((h.grad.float(), ref_h.grad), (w.grad, ref_w.grad)):
        assert (ours - exact).norm() / exact.norm() < 2e-2


def test_only_the_gradients_asked_for_are_computed():
    hidden, weight, targets = inputs(2)
    h = hidden.clone().requires_grad_()
    frozen = weight.clone()  # a frozen head, as with LoRA
    linear_cross_entropy(h, frozen, targets, chunk_rows=10).backward()
    ref, ref_h, _ = reference(hidden, weight, targets)
    ref.backward()
    assert frozen.grad is None
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight.clone().requires_grad_(), targets)
    assert loss.grad_fn is None and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_kind", ["targets", "labels"])
def test_model_fused_loss_equals_the_loss_on_logits(tiny_config, loss_kind):
    model = GPT2LMHeadModel(tiny_config).eval()  # no dropout: both passes must see the same network
    ids = torch.randint(0, tiny_config.vocab_size, (3, 20))
    if loss_kind == "targets":
        targets = ids[:, 1:].clone()
        targets[0, :5] = -100
        args, kwargs = (ids[:, :-1],), {"targets": targets}
    else:
        labels = ids.clone()
        labels[1, :4] = -100
        args, kwargs = (ids,), {"labels": labels}
    full = model(*args, **kwargs)
    full.loss.backward()
    expected = gradients(model)
    fused = model(*args, **kwargs, return_logits=False)
    fused.loss.backward()
    assert full.logits is not None and fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-5, atol=0)
    for name, grad in gradients(model).items():  # float32 rounding differs: tolerances relative to the largest
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_model_fused_loss_reaches_the_tied_embedding(tiny_config):
    model = GPT2LMHeadModel(tiny_config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 16))  # tokens >= 100 never appear: only the head gives their rows a gradient
    model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad[100:].abs().amax(-1).min() > 0
    # The input tokens' rows hold both contributions: the head's and the embedding lookup's.
    hidden = model.transformer(ids[:, :-1]).last_hidden_state.flatten(0, 1).detach()
    head_only = torch.autograd.grad(linear_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:].flatten()),
                                    model.lm_head.weight)[0]
    torch.testing.assert_close(grad[100:], head_only[100:], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grad[:100], head_only[:100])


def test_model_with_a_wrapped_head_falls_back_to_logits(tiny_config):
    class Head(nn.Linear):  # stands for a LoRA or int8 layer: its own forward must run
        def forward(self, x):
            return super().forward(x) * 2

    model = GPT2LMHeadModel(tiny_config).eval()
    head = Head(tiny_config.n_embd, tiny_config.vocab_size, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    out = model(ids[:, :-1], targets=ids[:, 1:], return_logits=False)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, lm_loss(out.logits, ids[:, 1:]))
    torch.testing.assert_close(out.loss, model(ids[:, :-1], targets=ids[:, 1:]).loss)


def test_scratch_buffers_shared_between_calls_and_threads_leave_results_exact():
    """The loss keeps its scratch blocks between calls (per thread): calls with other shapes and dtypes in
    between, and calls running in two threads at once, must each still equal the reference."""
    import threading

    cases = [(inputs(seed), rows, dtype) for seed, rows, dtype in
             [(0, 16, torch.float32), (1, 7, torch.bfloat16), (2, None, torch.float32), (3, 16, torch.bfloat16)]]

    def check(case) -> None:
        (hidden, weight, targets), rows, dtype = case
        check_against_reference(hidden, weight, targets, rows, dtype)

    for case in cases + cases[::-1]:
        check(case)
    errors = []

    def worker(case) -> None:
        try:
            for _ in range(5):
                check(case)
        except Exception as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(case,)) for case in cases[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_backward_through_the_same_fused_loss_twice_is_refused():
    hidden, weight, targets = inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_tied_embedding_gradient_is_one_tensor(tiny_config):
    """The head's weight gradient goes to the token lookup, which adds its rows into it (index_add_): no zero-filled
    (vocab x C) gradient of the lookup's own, and no sum of two (vocab x C) tensors."""
    from torch.profiler import profile  # lists the ops autograd ran

    model = GPT2LMHeadModel(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 17))
    shape = [tiny_config.vocab_size, tiny_config.n_embd]
    with profile(record_shapes=True) as prof:
        model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss.backward()
    ops = [(e.key, e.input_shapes[:2]) for e in prof.key_averages(group_by_input_shape=True)]
    lookups = sum(e.count for e in prof.key_averages() if e.key == "aten::embedding_dense_backward")
    assert lookups == 1  # the position embedding's
    assert not [key for key, shapes in ops if key in ("aten::add", "aten::add_") and shapes == [shape, shape]]
    assert ("aten::index_add_", [shape, []]) in ops


def test_tied_gradient_accumulates_over_micro_batches_as_the_unfused_loss(tiny_config):
    model = GPT2LMHeadModel(tiny_config).eval()
    batches = [torch.randint(0, tiny_config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    grads = []
    for fused in (False, True):
        for ids in batches:  # two backward passes into the same .grad, as gradient accumulation does
            model(ids[:, :-1], targets=ids[:, 1:], return_logits=not fused).loss.mul(0.5).backward()
        grads.append(gradients(model))
    for name, expected in grads[0].items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_tied_lookup_without_the_loss_gradient_gives_its_own_part():
    """The lookup alone (its loss never ran backward): the weight's gradient is the embedding's, as F.embedding's."""
    from gpt2kit.losses import TiedEmbeddingGradient, tied_embedding

    weight = torch.randn(50, 8, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [0, 49, 1]])
    upstream = torch.randn(2, 3, 8)
    (tied_embedding(ids, weight, TiedEmbeddingGradient()) * upstream).sum().backward()
    expected = torch.autograd.grad((nn.functional.embedding(ids, weight) * upstream).sum(), weight)[0]
    torch.testing.assert_close(weight.grad, expected)


def test_bf16_loss_on_an_unpadded_vocabulary_copies_the_weight_once():
    """Vocabulary already a multiple of 128: under autocast the bf16 weight is a scratch copy, not the weight."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(128, C, generator=g) * 0.5
    targets = torch.randint(0, 128, (N,), generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_rows=16)
    loss.backward()
    ref, ref_h, ref_w = reference(hidden.bfloat16(), weight.bfloat16(), targets)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=0.02)
    torch.testing.assert_close(w.grad, ref_w.grad.float(), rtol=0.02, atol=1e-3)
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=0.02, atol=1e-3)
    assert torch.equal(w.detach(), weight)  # the weight itself was never written


def test_an_empty_batch_and_fp16_weights():
    """No rows: loss 0, zero gradients. fp16 weights without autocast: the weight gradient is averaged in float32
    before rounding (a sum over chunks of a frequent target would overflow fp16)."""
    h, w = torch.zeros(0, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and (w.grad is None or not w.grad.any())
    rows = 4096
    hidden = torch.full((rows, C), 30.0, dtype=torch.float16, requires_grad=True)
    weight = torch.zeros(V, C, dtype=torch.float16, requires_grad=True)
    # Each 1024-row chunk's product fits fp16; their float32 sum (about -122880) would not.
    linear_cross_entropy(hidden, weight, torch.zeros(rows, dtype=torch.long), chunk_rows=1024).backward()
    assert torch.isfinite(weight.grad).all()
    torch.testing.assert_close(weight.grad[0].float(), torch.full((C,), -30.0 * (1 - 1 / V)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_float16_chunk_whose_weight_gradient_passes_float16s_range(autocast):
    """3000 rows of one target with a hidden channel at 40: the chunk's g.T @ x sums to about -120000, past
    float16's 65504. The product is scaled by a power of two and the gradient comes out finite and right."""
    torch.manual_seed(0)
    hidden = torch.randn(3000, C) * 0.1
    hidden[:, 3] = 40
    targets = torch.full((3000,), 7)
    weight = torch.randn(V, C) * 0.02
    reference = weight.double().requires_grad_()
    F.cross_entropy(hidden.half().double() @ reference.T, targets).backward()
    if autocast:  # float32 weights, float16 matmuls
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            linear_cross_entropy(hidden, w, targets).backward()
    else:
        w = weight.half().requires_grad_()
        linear_cross_entropy(hidden.half(), w, targets).backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad.double(), reference.grad, rtol=2e-2, atol=2e-2)


def test_second_order_gradients_and_torch_func_through_the_loss(tiny_config):
    """create_graph through lm_loss gives the reference's Hessian-vector product (its saved gradient was a constant:
    a wrong HVP without an error); torch.func.grad runs through the model's loss (an autograd.Function without
    setup_context failed there); the fused loss refuses second-order gradients instead of returning wrong ones."""
    hidden, weight, targets = inputs()
    logits = (hidden @ weight.T).requires_grad_()
    vector = torch.randn_like(logits)
    hvps = []
    for loss_fn in (lm_loss, lambda x, t: F.cross_entropy(x[0], t[0], ignore_index=-100)):
        (grad,) = torch.autograd.grad(loss_fn(logits[None], targets[None]), logits, create_graph=True)
        hvps.append(torch.autograd.grad((grad * vector).sum(), logits)[0])
    torch.testing.assert_close(hvps[0], hvps[1])

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
    params = dict(model.named_parameters())
    for return_logits in (True, False):
        grads = torch.func.grad(lambda p: torch.func.functional_call(
            model, p, (ids,), {"labels": ids, "return_logits": return_logits}).loss)(params)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        torch.testing.assert_close(grads["transformer.wte.weight"], model.lm_head.weight.grad, atol=1e-6, rtol=1e-5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad(linear_cross_entropy(h, w, targets), h, create_graph=True)
