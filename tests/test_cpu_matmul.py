"""Float32 products through oneDNN (gpt2kit.cpu_matmul): the same results as PyTorch's default kernel, forward
and backward, in every place that uses them, and PyTorch's kernel wherever oneDNN does not apply. Both choices
are tested on any machine (each test sets it), whatever this CPU would pick by itself."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from gpt2kit import GPT2LMHeadModel, cpu_matmul
from gpt2kit.cpu_matmul import linear, mm, use_onednn_float32, weight_gradient
from gpt2kit.evaluation.scoring import Window, score_windows
from gpt2kit.losses import linear_cross_entropy

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")]
ONEDNN_OP = "mkldnn::_linear_pointwise"


@pytest.fixture(params=[True, False], ids=["onednn", "default"])
def onednn(request):
    """Run the test with float32 products through oneDNN, then through PyTorch's default; restore the choice."""
    before = use_onednn_float32()
    use_onednn_float32(request.param)
    yield request.param
    use_onednn_float32(before)


def ops_run(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("x_shape, out_features, bias", [((5, 7, 24), 40, True), ((9, 48), 8, True),
                                                         ((2, 3, 4, 16), 16, False)])
def test_linear_forward_and_backward_equal_a_float64_reference(onednn, x_shape, out_features, bias):
    """Wider and narrower outputs than inputs take the two layouts of the weight gradient."""
    torch.manual_seed(0)
    x = torch.randn(*x_shape, dtype=torch.float64)
    w = torch.randn(out_features, x_shape[-1], dtype=torch.float64)
    b = torch.randn(out_features, dtype=torch.float64) if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    reference = F.linear(*leaves)
    grad_output = torch.randn_like(reference)
    reference.backward(grad_output)
    ours = [t.float().requires_grad_() for t in (x, w, b) if t is not None]
    result = {}
    names = ops_run(lambda: result.update(y=linear(*ours)))
    result["y"].backward(grad_output.float())
    assert (ONEDNN_OP in names) == onednn
    assert result["y"].shape == reference.shape and result["y"].dtype == torch.float32
    torch.testing.assert_close(result["y"].double(), reference.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours, leaves):
        assert mine.grad.is_contiguous()
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


def test_higher_order_and_transformed_gradients_equal_nn_linears(onednn):
    """Hessian-vector products (a backward with create_graph), torch.func.grad and forward-mode AD through the
    layer: as nn.Linear's (the oneDNN backward once returned gradients autograd could not follow: zero Hv)."""
    from torch.autograd import forward_ad

    from gpt2kit.cpu_matmul import Linear

    torch.manual_seed(0)
    ours, reference = Linear(16, 8), torch.nn.Linear(16, 8)
    reference.load_state_dict(ours.state_dict())
    x, v = torch.randn(4, 16), torch.randn(4, 16)
    results = []
    for layer in (ours, reference):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(layer(leaf).tanh().sum(), leaf, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), leaf, retain_graph=True)
        layer.zero_grad()
        grad.square().sum().backward()
        per_parameter = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(
            dict(layer.named_parameters()))
        with forward_ad.dual_level():
            tangent = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, v))).tangent
        results.append((hv, layer.weight.grad, per_parameter["weight"], tangent))
    assert results[0][0].abs().max() > 0.1
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_mm_and_weight_gradient_equal_torch_mm(onednn):
    torch.manual_seed(0)
    a, b, x = torch.randn(6, 30), torch.randn(30, 50), torch.randn(6, 20)
    torch.testing.assert_close(mm(a, b), a @ b, rtol=1e-5, atol=1e-5)
    out = torch.empty(6, 50)
    assert (mm(a, b, out=out).data_ptr() == out.data_ptr()) != onednn  # oneDNN allocates its own result
    for grad in (torch.randn(6, 50), torch.randn(6, 4)):  # out >= in and out < in
        product = weight_gradient(grad, x)
        assert product.is_contiguous()
        torch.testing.assert_close(product, grad.T @ x, rtol=1e-5, atol=1e-5)
        total = torch.randn(grad.shape[1], x.shape[1])
        expected = total + grad.T @ x
        assert weight_gradient(grad, x, add_to=total) is total
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_matrices_with_gaps_between_rows_keep_pytorchs_kernel(monkeypatch):
    """oneDNN takes contiguous matrices and their transposes; a column slice (rows with gaps) sent it to a
    reference kernel that took minutes at GPT-2's vocabulary."""
    before = use_onednn_float32()
    use_onednn_float32(True)
    try:
        torch.manual_seed(0)
        wide, b, x, w = torch.randn(6, 40), torch.randn(30, 8), torch.randn(3, 5, 32), torch.randn(7, 16)
        a = wide[:, :30]
        for call, expected in ((lambda: mm(a, b), a @ b), (lambda: mm(b.T, wide[:, :30].T), b.T @ a.T),
                               (lambda: weight_gradient(a, wide[:, 30:]), a.T @ wide[:, 30:]),
                               (lambda: linear(x[..., ::2], w), F.linear(x[..., ::2], w))):
            result = {}
            assert ONEDNN_OP not in ops_run(lambda: result.update(y=call()))
            torch.testing.assert_close(result["y"], expected)
        assert ONEDNN_OP in ops_run(lambda: mm(wide[:, :30].contiguous().T.T, b))  # dense again: oneDNN
        # The gradient reaching a layer's backward may have gaps too (a slice of a wider one): 14x slower there.
        x, w, wider = torch.randn(4, 32, requires_grad=True), torch.randn(16, 32), torch.randn(4, 40)
        seen = []

        def onednn_checked(a, *rest):
            seen.append(cpu_matmul._dense(a) and all(cpu_matmul._dense(t) for t in rest if t is not None))
            return original(a, *rest)

        original = cpu_matmul.onednn_linear
        monkeypatch.setattr(cpu_matmul, "onednn_linear", onednn_checked)
        linear(x, w).backward(wider[:, :16])
        assert seen and all(seen)
        torch.testing.assert_close(x.grad, wider[:, :16] @ w)
    finally:
        use_onednn_float32(before)


@pytest.mark.parametrize("case", ["bf16", "autocast", "empty"])
def test_linear_keeps_pytorchs_kernel_where_onednn_does_not_apply(case):
    """Low precision, autocast and empty inputs run F.linear itself (bf16 already multiplies through oneDNN,
    inside aten)."""
    before = use_onednn_float32()
    use_onednn_float32(True)
    try:
        torch.manual_seed(0)
        x, w = torch.randn(0 if case == "empty" else 4, 8), torch.randn(6, 8)
        if case == "bf16":
            x, w = x.bfloat16(), w.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            names = ops_run(lambda: linear(x, w))
            y, expected = linear(x, w), F.linear(x, w)
        assert ONEDNN_OP not in names
        assert y.dtype == expected.dtype and torch.equal(y, expected)
    finally:
        use_onednn_float32(before)


def test_model_training_gradients_and_generation_agree_between_the_kernels(tiny_config):
    """The model's projections, its fused loss (tied embedding included) and its unfused logits give the same
    loss and gradients through either kernel, and greedy decoding the same tokens."""
    before = use_onednn_float32()
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no random draws
    model = GPT2LMHeadModel(config).train()
    batch = torch.randint(0, tiny_config.vocab_size, (2, 17))
    results = {}
    try:
        for enabled in (True, False):
            use_onednn_float32(enabled)
            for fused in (True, False):
                out = model(batch[:, :-1], targets=batch[:, 1:], return_logits=not fused)
                out.loss.backward()
                results[enabled, fused] = (out.loss.detach(),
                                           {n: p.grad.clone() for n, p in model.named_parameters()})
                model.zero_grad(set_to_none=True)
            model.eval()
            results[enabled, "tokens"] = model.generate(batch[:, :5], max_new_tokens=8, do_sample=False)
            model.train()
    finally:
        use_onednn_float32(before)
    assert torch.equal(results[True, "tokens"], results[False, "tokens"])
    reference_loss, reference_grads = results[False, False]
    for key in [(True, True), (True, False), (False, True)]:
        loss, grads = results[key]
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_fused_loss_over_several_chunks_uses_onednn_and_matches_the_default(onednn):
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16), torch.randn(129, 16)  # a vocabulary off the padding multiple
    targets = torch.randint(0, 129, (10,))
    targets[3] = -100
    grads = {}
    for enabled in (onednn, not onednn):
        use_onednn_float32(enabled)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        names = ops_run(lambda: linear_cross_entropy(h, w, targets, chunk_rows=4).backward())
        assert (ONEDNN_OP in names) == enabled
        grads[enabled] = (h.grad, w.grad)
    use_onednn_float32(onednn)
    for mine, theirs in zip(grads[True], grads[False]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_evaluation_scores_agree_between_the_kernels(tiny_model):
    torch.manual_seed(0)
    windows = [Window(torch.randint(0, 500, (41,)).tolist(), 30), Window(torch.randint(0, 500, (9,)).tolist(), 8)]
    before = use_onednn_float32()
    try:
        results = []
        for enabled in (True, False):
            use_onednn_float32(enabled)
            names = ops_run(lambda: results.append(score_windows(tiny_model, windows, vocab_size=500,
                                                                 greedy=True, progress=False)))
            assert (ONEDNN_OP in names) == enabled
    finally:
        use_onednn_float32(before)
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine.logprobs, theirs.logprobs, rtol=1e-5, atol=1e-5)
        assert torch.equal(mine.greedy, theirs.greedy)


def test_the_choice_follows_the_environment():
    code = "from gpt2kit.cpu_matmul import use_onednn_float32; print(use_onednn_float32())"
    for setting, expected in (("onednn", "True"), ("oneDNN", "True"), ("default", "False")):
        env = {**os.environ, "GPT2KIT_FLOAT32_MATMUL": setting}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert result.stdout.strip() == expected, result.stderr
    # A wrong value fails the command that multiplies, with one line; the import and --help still work.
    env = {**os.environ, "GPT2KIT_FLOAT32_MATMUL": "mkl"}
    assert subprocess.run([sys.executable, "-m", "gpt2kit", "--help"], env=env, capture_output=True).returncode == 0
    result = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--model", "gpt2-tiny", "--random-init",
                             "--prompt", "hi", "--max-new-tokens", "1"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("gpt2kit generate: error: GPT2KIT_FLOAT32_MATMUL must be auto, onednn or "
                                     "default, got 'mkl'")
