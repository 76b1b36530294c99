"""Inference-only weight formats. Weight-only int8: the int8 layer's arithmetic, the bound on its difference from
float32, greedy agreement. oneDNN-packed float weights: the same logits and tokens as nn.Linear. Where such a
model may (generation, serving) and may not (saving, ONNX export) go."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2LMHeadModel, quantization
from gpt2kit.cpu_matmul import onednn_supports
from gpt2kit.generation import generate
from gpt2kit.pipeline import TextGenerationPipeline, load_model_and_tokenizer
from gpt2kit.quantization import (
    Int8Linear,
    PackedLinear,
    describe_weights,
    is_inference_only,
    pack_weights,
    quantize_int8,
)

from .conftest import save_tiny_text_model


@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # the int8 kernel up to 16 rows, dequantized matmul above
# Input widths the int8 kernel takes (multiples of 16) and ones it must not be given (wrong sums or a crash).
@pytest.mark.parametrize("in_features", [96, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_computes_with_its_dequantized_weight(rows, in_features, dtype):
    linear = torch.nn.Linear(in_features, 80).to(dtype)
    layer = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(rows, in_features, dtype=dtype)
    expected = F.linear(x.bfloat16().double(), layer.dequantized().double(), layer.bias.double())
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (rows, 80)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    # Three dimensions (batch, tokens, features) as in the model.
    torch.testing.assert_close(layer(x.view(1, rows, in_features)), out.view(1, rows, 80), rtol=0, atol=0)


@pytest.mark.parametrize("product_dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_of_longer_inputs_in_either_product_dtype(monkeypatch, product_dtype):
    """Above the kernel's rows the product runs in bf16 on a CPU with bf16 instructions and in float32 on one
    without (where bf16 is emulated): the inputs are rounded to bf16 in both, the float32 product rounds
    nothing else."""
    monkeypatch.setattr(quantization, "_CPU_LONG_INPUT_DTYPE", product_dtype)
    linear = torch.nn.Linear(96, 80)
    layer = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, 20, 96)
    expected = F.linear(x.bfloat16().double(), layer.dequantized().double(), layer.bias.double())
    out = layer(x)
    assert out.dtype == torch.float32
    tolerance = 2e-2 if product_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_int8_weights_are_within_half_a_step_of_the_originals():
    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    layer = Int8Linear(weight, None)
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (64,)
    step = layer.scale.float()[:, None]
    error = (layer.weight.float() * step - weight).abs()
    assert bool((error <= step * 0.5 + 1e-7).all())
    assert int(layer.weight.abs().max()) >= 127  # the largest weight of a row uses the full range


def test_quantized_model_layout(tiny_model):
    q = quantize_int8(copy.deepcopy(tiny_model))
    layers = [name for name, m in q.named_modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * tiny_model.config.n_layer + 1 and "lm_head" in layers
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    # Only the projections change: embeddings, LayerNorms and biases keep their dtype.
    assert {p.dtype for p in q.parameters()} == {torch.float32}
    assert q.lm_head.weight.dtype == torch.int8 and q.transformer.wte.weight.dtype == torch.float32
    assert q.lm_head.weight.data_ptr() != q.transformer.wte.weight.data_ptr()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(q)
    with pytest.raises(ValueError, match="already quantized or packed"):
        pack_weights(q)


def _peaked(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Random GPT-2 weights give nearly flat next-token distributions; a larger embedding scale gives logits
    with margins like a trained model's, so greedy agreement is a meaningful check."""
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25)
    return model


def test_int8_logits_stay_within_the_documented_bound(tiny_model):
    model = _peaked(tiny_model)
    q = quantize_int8(copy.deepcopy(model))
    ids = torch.randint(0, model.config.vocab_size, (4, 48))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits.float()
    # The bound stated in docs/performance.md: within 10 % of the logits' standard deviation.
    assert (out - ref).abs().max() <= 0.1 * ref.std()


def test_int8_greedy_decoding_matches_float32(tiny_model):
    model = _peaked(tiny_model)
    q = quantize_int8(copy.deepcopy(model))
    prompts = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    for prompt in prompts:  # batch 1: the int8 kernel path for every decoded token
        ref = generate(model, prompt[None], max_new_tokens=24, eos_token_id=[])
        out = generate(q, prompt[None], max_new_tokens=24, eos_token_id=[])
        assert torch.equal(out, ref)
    # A left-padded batch: prefill of 4 x 12 rows takes the dequantized path, decode the kernel.
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0
    torch.testing.assert_close(generate(q, prompts, mask, max_new_tokens=24, eos_token_id=[]),
                               generate(model, prompts, mask, max_new_tokens=24, eos_token_id=[]), rtol=0, atol=0)


def test_compiled_int8_decoding_of_a_width_the_kernel_cannot_take(autotuned):
    """Width 40 keeps the LM head off the int8 kernel; under torch.compile inductor rewrote its bf16
    `product * scale` into that kernel anyway, and two rows crashed the process (SIGSEGV)."""
    from gpt2kit import GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=40, n_head=4, n_positions=32, vocab_size=64, initializer_range=0.5)
    q = quantize_int8(GPT2LMHeadModel(config))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    eager = generate(q, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(generate(q, ids, max_new_tokens=8, eos_token_id=[], compile=True), eager)


def test_quantize_option_loads_an_int8_model(tmp_path):
    model_dir = save_tiny_text_model(tmp_path / "m")
    model, tokenizer = load_model_and_tokenizer(model_dir, quantize="int8")
    assert is_inference_only(model) and describe_weights(model) == "int8 weights, float32 activations"
    text = TextGenerationPipeline(model, tokenizer)("Hello", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("Hello") and len(text) > len("Hello")
    with pytest.raises(ValueError, match="unknown quantize"):
        load_model_and_tokenizer(model_dir, quantize="int4")
    bf16, _ = load_model_and_tokenizer(model_dir, quantize="int8", dtype="bfloat16")  # the rest in that dtype
    assert describe_weights(bf16) == "int8 weights, bfloat16 activations"
    with pytest.raises(ValueError, match="torch backend"):
        load_model_and_tokenizer(model_dir, quantize="int8", backend="onnx")


def test_cli_generate_with_int8(tmp_path):
    model_dir = save_tiny_text_model(tmp_path / "m")
    done = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--model", str(model_dir), "--quantize",
                           "int8", "--prompt", "Hello", "--max-new-tokens", "4", "--no-do-sample"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello")


def test_quantized_models_are_not_saved_or_exported(tiny_model, tmp_path):
    from gpt2kit.export import export_onnx

    q = quantize_int8(copy.deepcopy(tiny_model))
    with pytest.raises(ValueError, match="inference only"):
        q.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="float weights"):
        export_onnx(q, tmp_path / "onnx")
    assert not (tmp_path / "q").exists() and not (tmp_path / "onnx").exists()


def test_a_quantized_model_cast_to_bf16_and_back_still_runs(tiny_model):
    q = quantize_int8(copy.deepcopy(tiny_model))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 20))  # 40 rows: the dequantized path
    with torch.no_grad():
        ref = q(ids).logits
        for dtype in (torch.bfloat16, torch.float32):
            q.to(dtype)
            assert q(ids[:1, :1]).logits.dtype == dtype and q(ids).logits.dtype == dtype
    assert q.lm_head.weight.dtype == torch.int8
    torch.testing.assert_close(q(ids).logits, ref, rtol=0.05, atol=0.05)


def test_an_int8_float16_model_generates_what_its_bf16_twin_does(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    runs = [generate(quantize_int8(copy.deepcopy(tiny_model).to(dtype)), ids, max_new_tokens=8)
            for dtype in (torch.float16, torch.bfloat16)]
    assert runs[0].shape == (1, 13)
    assert (runs[0] == runs[1]).float().mean() >= 0.75  # float16 and bf16 round the activations differently


def test_server_serves_an_int8_model(tmp_path):
    from fastapi.testclient import TestClient

    from gpt2kit.serving import ServerConfig, create_app

    model, tokenizer = load_model_and_tokenizer(save_tiny_text_model(tmp_path / "m"), quantize="int8")
    expected = TextGenerationPipeline(model, tokenizer)("Hello", max_new_tokens=6, do_sample=False,
                                                       return_full_text=False)[0]["generated_text"]
    with TestClient(create_app(model, tokenizer, ServerConfig(), model_name="tiny")) as client:
        card = client.get("/v1/models").json()["data"][0]["gpt2kit"]
        assert card["dtype"] == "int8 weights, float32 activations"
        assert card["parameters"] == load_model_and_tokenizer(tmp_path / "m")[0].num_parameters()
        reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_what_nn_linear_computes(tiny_model, dtype):
    model = tiny_model.to(dtype)
    if not onednn_supports(dtype):  # bf16 on a CPU without bf16 instructions: oneDNN cannot build the kernel
        with pytest.raises(ValueError, match="oneDNN runs bf16 products only on CPUs with bf16 instructions"):
            pack_weights(copy.deepcopy(model))
        return
    packed = pack_weights(copy.deepcopy(model))
    assert isinstance(packed.lm_head, PackedLinear) and describe_weights(packed) == f"{str(dtype)[6:]}, oneDNN-packed"
    mlp = packed.transformer.h[0].mlp  # GELU runs as the packed product's post-op, not as a module of its own
    assert mlp.c_fc.gelu == "tanh" and isinstance(mlp.act, torch.nn.Identity) and mlp.c_proj.gelu is None
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, **tol)
    if dtype == torch.float32:  # greedy decoding, batch 1 and a left-padded batch: the same tokens
        mask = torch.ones_like(ids[:, :12])
        mask[0, :4] = 0
        for args in [(ids[:1, :12],), (ids[:, :12], mask)]:
            assert torch.equal(generate(packed, *args, max_new_tokens=16, eos_token_id=[]),
                               generate(model, *args, max_new_tokens=16, eos_token_id=[]))
    with pytest.raises(ValueError, match="inference only"):
        packed.save_pretrained("unused")


def test_pack_weights_option(tmp_path):
    model_dir = save_tiny_text_model(tmp_path / "m")
    model, tokenizer = load_model_and_tokenizer(model_dir, pack_weights=True, device="cpu:0")  # "cpu" by its index
    assert describe_weights(model) == "float32, oneDNN-packed"
    reference, _ = load_model_and_tokenizer(model_dir)
    options = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    assert (TextGenerationPipeline(model, tokenizer)("Hello", **options)
            == TextGenerationPipeline(reference, tokenizer)("Hello", **options))
    with pytest.raises(ValueError, match="not with quantize"):
        load_model_and_tokenizer(model_dir, pack_weights=True, quantize="int8")
    done = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--model", str(model_dir), "--pack-weights",
                           "--prompt", "Hello", "--max-new-tokens", "4", "--no-do-sample"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_perplexity_with_packed_weights_equals_plain(tiny_model, tmp_path):
    from gpt2kit.evaluation import evaluate_perplexity
    from gpt2kit.tokenizer import train_bpe

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log\n" * 40, encoding="utf-8")
    tokenizer = train_bpe([text], 300, tmp_path / "bpe")
    plain = evaluate_perplexity(tiny_model, tokenizer, text, max_length=64, progress=False)
    packed = evaluate_perplexity(pack_weights(copy.deepcopy(tiny_model)), tokenizer, text, max_length=64,
                                 progress=False)
    assert packed["tokens"] == plain["tokens"] > 200
    assert packed["token_perplexity"] == pytest.approx(plain["token_perplexity"], rel=1e-6)


def test_cli_generate_compiled_equals_eager_and_refuses_packed_weights(tmp_path, capsys):
    from gpt2kit.cli import main

    model_dir = save_tiny_text_model(tmp_path / "m")
    base = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6", "--no-do-sample"]
    assert main([*base, "--quantize", "int8"]) == 0
    int8 = capsys.readouterr().out
    assert main([*base, "--quantize", "int8", "--compile"]) == 0
    assert capsys.readouterr().out == int8 and int8.startswith("Hello")
    assert main([*base, "--compile", "--pack-weights"]) == 2
    assert "packed" in capsys.readouterr().err


def test_a_packed_model_refuses_what_it_cannot_do():
    """Copying, saving and casting an opaque oneDNN weight failed deep inside torch, and state_dict silently left
    the packed weights out: each is one clear error."""
    import io
    import pickle

    from gpt2kit import GPT2Config

    model = pack_weights(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16,
                                                    vocab_size=64)).eval())
    for attempt, what in ((lambda: copy.deepcopy(model), "copied"), (lambda: pickle.dumps(model), "pickled"),
                          (lambda: torch.save(model, io.BytesIO()), "pickled"), (model.state_dict, "saved"),
                          (lambda: model.to(torch.bfloat16), "moved or cast")):
        with pytest.raises(ValueError, match=f"a oneDNN-packed model cannot be {what}"):
            attempt()
    state, wte = GPT2LMHeadModel(model.config).state_dict(), model.transformer.wte.weight.clone()
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight: a oneDNN-packed model cannot be "
                                         "loaded into"):
        model.load_state_dict(state, strict=False)  # it loaded the biases only, a hybrid of two models
    with pytest.raises(ValueError, match="a oneDNN-packed model cannot be loaded into"):
        model.lm_head.load_state_dict({"weight": state["lm_head.weight"]}, strict=False)
    assert torch.equal(model.transformer.wte.weight, wte)  # refused before anything loaded
    # The refused cast changed nothing: the embeddings before the first packed layer are still float32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.float().to("cpu") is model  # what changes nothing is allowed


@pytest.mark.parametrize("transform", [quantize_int8, pack_weights])
def test_a_model_with_lora_adapters_is_refused(tiny_model, transform):
    """peft's adapter layers are nn.Linear too: quantized, the adapters cast the activations to int8 and the logits
    were silently wrong; packed, the forward crashed."""
    from peft import LoraConfig

    from gpt2kit.training.lora import apply_lora

    apply_lora(tiny_model, LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="the model has LoRA adapters: merge them first"):
        transform(tiny_model)


def test_float_weights_do_not_load_into_an_int8_model(tiny_model):
    """load_state_dict would copy them into the int8 buffers, truncated to integers, without a word."""
    float_state = GPT2LMHeadModel(tiny_model.config).state_dict()  # other random weights
    quantized = quantize_int8(copy.deepcopy(tiny_model))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight: float weights cannot load into an "
                                         r"int8 layer"):
        quantized.load_state_dict(float_state, strict=False)
    assert torch.equal(quantized.transformer.wte.weight, tiny_model.transformer.wte.weight)  # refused before loading
    # Also when the load starts below the model (a block) or above it (a wrapper).
    with pytest.raises(ValueError, match="float weights cannot load into an int8 layer"):
        quantized.transformer.h[0].load_state_dict(tiny_model.transformer.h[0].state_dict(), strict=False)
    with pytest.raises(ValueError, match="float weights cannot load into an int8 layer"):
        torch.nn.ModuleDict({"m": quantized}).load_state_dict({f"m.{k}": v for k, v in float_state.items()},
                                                              strict=False)
    quantized.load_state_dict(quantized.state_dict())  # its own int8 state loads


def test_an_int8_state_dict_does_not_load_into_a_float_model(tiny_model):
    """Copied in, the int8 values read as float weights of +-127, the tied embedding's too; with strict=False the
    load raised nothing at all."""
    int8_state = quantize_int8(copy.deepcopy(tiny_model)).state_dict()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"^transformer.h.0.attn.c_attn.weight: torch.int8 weights .* cannot "
                                             r"load into float weights"):
            tiny_model.load_state_dict(int8_state, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


@pytest.mark.parametrize("transform", [quantize_int8, pack_weights])
def test_int8_and_packed_models_are_not_trained_or_adapted(tiny_model, transform, tmp_path):
    """Their weights are buffers or opaque tensors: a run changed the embeddings and LayerNorms alone (packed:
    nothing, with a warning from torch), then failed at its first checkpoint."""
    from peft import LoraConfig

    from gpt2kit.training import Trainer, load_config
    from gpt2kit.training.lora import apply_lora

    model = transform(copy.deepcopy(tiny_model))
    data = [{"input_ids": torch.arange(8), "targets": torch.arange(1, 9)}] * 4
    config = load_config(out_dir=str(tmp_path / "run"), train={"max_steps": 2, "micro_batch_size": 2},
                         log={"progress": False, "tensorboard": False, "plot": False})
    with pytest.raises(ValueError, match="^model: the model's weights are int8-quantized or oneDNN-packed, which "
                                         "are for inference only"):
        Trainer(args=config, model=model, train_dataset=data).train()
    with pytest.raises(ValueError, match="^LoRA: the model's weights are int8-quantized or oneDNN-packed"):
        apply_lora(model, LoraConfig(r=2, target_modules=["c_attn"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("transform", [quantize_int8, pack_weights])
def test_quantizing_a_model_without_gpt2_projections_is_an_error_not_a_no_op(tiny_model, transform):
    with pytest.raises(ValueError, match="no GPT-2 projections .* in this GPT2Model: pass the GPT2LMHeadModel"):
        transform(tiny_model.transformer)
    with pytest.raises(ValueError, match="in this OptimizedModule"):
        transform(torch.compile(tiny_model))
    assert not is_inference_only(tiny_model)
