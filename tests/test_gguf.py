"""GGUF export, read back with the `gguf` package's reader: llama.cpp's GPT-2 tensor names and shapes, the
weights in f32 / f16 / q8_0, and the vocabulary (GPT-2's own merges recovered exactly; a trained BPE's too)."""

import json
import os

import gguf
import numpy as np
import pytest
import tiktoken
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.cli import main
from gpt2kit.conversation import ALPACA, PLAIN
from gpt2kit.gguf import export_gguf, gguf_pre_tokenizer, gguf_tensor_name, gguf_vocabulary
from gpt2kit.quantization import quantize_int8
from gpt2kit.tokenizer import ASSETS

from .conftest import REPO, save_tiny_text_model

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()  # GPT-2's 50257 tokens


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def llama_shapes(config, vocab):
    """The (ne0, ne1) shapes llama.cpp's GPT-2 loader creates, by GGUF tensor name."""
    d, ff = config.n_embd, config.mlp_dim
    shapes = {"token_embd.weight": (d, vocab), "position_embd.weight": (d, config.n_positions),
              "output_norm.weight": (d,), "output_norm.bias": (d,)}
    for i in range(config.n_layer):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_norm.bias": (d,),
                       f"blk.{i}.attn_qkv.weight": (d, 3 * d), f"blk.{i}.attn_qkv.bias": (3 * d,),
                       f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.attn_output.bias": (d,),
                       f"blk.{i}.ffn_norm.weight": (d,), f"blk.{i}.ffn_norm.bias": (d,),
                       f"blk.{i}.ffn_up.weight": (d, ff), f"blk.{i}.ffn_up.bias": (ff,),
                       f"blk.{i}.ffn_down.weight": (ff, d), f"blk.{i}.ffn_down.bias": (d,)})
    return shapes


def test_parameter_names_map_to_llama_cpp_names():
    names = {n: gguf_tensor_name(n) for n in GPT2LMHeadModel(GPT2Config(**CONFIG)).state_dict()}
    assert names["transformer.h.1.attn.c_attn.bias"] == "blk.1.attn_qkv.bias"
    assert names["transformer.h.1.mlp.c_proj.bias"] == "blk.1.ffn_down.bias"
    assert names["lm_head.weight"] == "output.weight"  # written only when untied
    assert len(set(names.values())) == len(names) == 4 + 12 * 2 + 1
    for bad in ("transformer.h.0.attn.masked_bias", "transformer.h.0.attn.c_attn.scale", "transformer.h.0.x.weight"):
        with pytest.raises(ValueError, match=bad):
            gguf_tensor_name(bad)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_tensors_have_llama_cpp_names_shapes_and_the_weights(gpt2_vocab_model, tmp_path, dtype):
    model = gpt2_vocab_model
    fields, tensors = read(export_gguf(model, tmp_path / "m.gguf", dtype=dtype))
    assert fields["general.architecture"] == "gpt2"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    # The GGUF spec: present whenever a tensor is quantized.
    assert fields.get("general.quantization_version") == (gguf.GGML_QUANT_VERSION if dtype == "q8_0" else None)
    assert {k: fields[f"gpt2.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                             "feed_forward_length", "attention.head_count")} == {
        "context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 256,
        "attention.head_count": 4}
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    # The LM head is tied to the token embedding: llama.cpp then reads token_embd for the output.
    expected = llama_shapes(model.config, 50257)
    assert {name: tuple(int(n) for n in t.shape) for name, t in tensors.items()} == expected
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        weight = param.numpy()
        tensor = tensors[gguf_tensor_name(name)]
        if weight.ndim == 1 or dtype == "f32" or name == "transformer.wpe.weight":  # as llama.cpp's converter
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(tensor.data).reshape(weight.shape), weight)
        elif dtype == "f16":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(tensor.data).reshape(weight.shape), weight.astype(np.float16))
        else:  # q8_0: blocks of 32 int8 values times a float16 step (absmax / 127)
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
            step = np.abs(weight).reshape(-1, 32).max(1, keepdims=True) / 127
            error = np.abs(values - weight).reshape(-1, 32)
            # Half a step of rounding, plus up to 127 times the float16 rounding of the step (2**-11 relative).
            assert (error <= step * (0.5 + 127 * 2**-11) + 1e-7).all()
            assert error.mean() < 0.3 * step.mean()


def test_q8_0_keeps_matrices_whose_rows_are_not_whole_blocks_in_f16(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, n_inner=80))  # ffn_down's rows hold 80 values: 2.5 blocks
    _, tensors = read(export_gguf(model, tmp_path / "m.gguf", dtype="q8_0"))
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data),
                                  model.transformer.h[1].mlp.c_proj.weight.detach().numpy().astype(np.float16))


def test_untied_head_is_written_as_output(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, tie_word_embeddings=False))
    _, tensors = read(export_gguf(model, tmp_path / "m.gguf", dtype="f32"))
    assert tuple(int(n) for n in tensors["output.weight"].shape) == (64, 50257)
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), model.lm_head.weight.detach().numpy())


def test_gpt2_vocabulary_and_merges_are_openais_files(gpt2_vocab_model, tmp_path):
    fields, _ = read(export_gguf(gpt2_vocab_model, tmp_path / "m.gguf"))
    encoder = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(encoder, key=encoder.get)
    merges = [line for line in (ASSETS / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    assert fields["tokenizer.ggml.merges"] == merges
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == 3 and set(types[:50256]) == {1}  # <|endoftext|> is a control token
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_a_trained_vocabulary_and_a_padded_one(tmp_path):
    model_dir = save_tiny_text_model(tmp_path / "model")
    fields, tensors = read(export_gguf(model_dir, tmp_path / "m.gguf", dtype="f16"))
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges
    assert fields["tokenizer.ggml.token_type"][0] == 3  # the trained vocabulary's <|endoftext|> is id 0
    assert tuple(int(n) for n in tensors["token_embd.weight"].shape) == (64, 512)
    # A model whose vocabulary is padded beyond the tokenizer's gets unused placeholder tokens.
    tokens, types, _ = gguf_vocabulary(GPT2Tokenizer.gpt2(), 50304)
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)] and set(types[50257:]) == {5}


def test_cl100k_vocabulary_with_its_gaps(tmp_path):
    """cl100k_base (bundled in examples/): llama.cpp's "llama-bpe" split pattern, and its unused ids as padding."""
    tok = GPT2Tokenizer.from_file(REPO / "examples" / "data" / "cl100k" / "cl100k_base.tiktoken")
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, vocab_size=100352, bos_token_id=100257, eos_token_id=100257))
    fields, _ = read(export_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f32"))
    tokens, types, merges = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and len(tokens) == len(types) == 100352
    assert tokens[100257] == "<|endoftext|>" and types[100257] == 3 and types[100276] == 3
    assert tokens[100261:100276] == [f"[PAD{i}]" for i in range(100261, 100276)] and types[100261] == 5
    assert len(merges) == 100256 - 256  # every token but the 256 bytes is one merge
    ids = {t: i for i, t in enumerate(tokens)}
    for merge in merges[::997]:  # each merge joins two lower-ranked tokens into the next one
        left, right = merge.split(" ")
        assert max(ids[left], ids[right]) < ids[left + right]
    assert [ids[left + right] for left, right in (m.split(" ") for m in merges[:500])] == list(range(256, 756))
    # As a checkpoint saves it (tokenizer.json spells the pattern portably): still llama.cpp's "llama-bpe".
    tok.save_pretrained(tmp_path / "saved")
    assert gguf_pre_tokenizer(GPT2Tokenizer.from_file(tmp_path / "saved")) == "llama-bpe"


def test_errors_and_nothing_half_written(gpt2_vocab_model, tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    export_gguf(gpt2_vocab_model, target, dtype="f32")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(gpt2_vocab_model, target)
    with pytest.raises(IsADirectoryError, match="is a directory; expected the path of a file"):
        export_gguf(gpt2_vocab_model, tmp_path, overwrite=True)  # failed after writing, under another name
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_0'"):
        export_gguf(gpt2_vocab_model, tmp_path / "x.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="needs the float weights"):
        export_gguf(quantize_int8(GPT2LMHeadModel(GPT2Config(**CONFIG))), tmp_path / "x.gguf")
    large = GPT2LMHeadModel(GPT2Config(**CONFIG))
    with torch.no_grad():
        large.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5  # past f16's range: it would be written as inf
    with pytest.raises(ValueError, match=r"c_fc.weight: a value of magnitude 1e\+05 does not fit f16"):
        export_gguf(large, tmp_path / "x.gguf", dtype="f16")
    assert not (tmp_path / "x.gguf").exists()
    ranks = GPT2Tokenizer.gpt2().encoding._mergeable_ranks
    other = tiktoken.Encoding("other", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                              special_tokens={"<|endoftext|>": 50256})
    with pytest.raises(ValueError, match="another pattern"):
        export_gguf(gpt2_vocab_model, tmp_path / "x.gguf", tokenizer=GPT2Tokenizer(other, source=("gpt2",)))

    def crash(self):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(gpt2_vocab_model, target, dtype="f16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the old file, untouched; no temp file
    assert read(target)[0]["general.file_type"] == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes


def test_export_gguf_command(tmp_path, capsys):
    model_dir = save_tiny_text_model(tmp_path / "model")
    assert main(["export", "gguf", "--model", str(model_dir), "--output", str(tmp_path / "m.gguf"),
                 "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'm.gguf'}\n"
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == 7 and len(tensors) == 4 + 12 * 2


def test_an_export_never_replaces_the_models_own_files(tmp_path):
    from gpt2kit import GPT2ForSequenceClassification

    GPT2LMHeadModel(GPT2Config(**CONFIG)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="would replace a file of the model being exported"):
        export_gguf(tmp_path / "m", tmp_path / "m" / "model.safetensors", overwrite=True)
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "m")  # the weights are still there
    export_gguf(tmp_path / "m", tmp_path / "m" / "model.gguf", dtype="f32")  # beside them is fine
    # An HF cache snapshot links its files to blobs elsewhere: still the model's own file.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "blobs" / "abc")
    (tmp_path / "m" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    with pytest.raises(ValueError, match="would replace a file of the model being exported"):
        export_gguf(tmp_path / "m", tmp_path / "m" / "model.safetensors", overwrite=True)
    classifier = GPT2ForSequenceClassification(GPT2Config(**CONFIG))
    with pytest.raises(TypeError, match="only a GPT2LMHeadModel .* got GPT2ForSequenceClassification"):
        export_gguf(classifier, tmp_path / "c.gguf")


def test_an_export_of_lora_adapters_replaces_neither_them_nor_their_base(tmp_path):
    peft = pytest.importorskip("peft")
    from gpt2kit.training.lora import apply_lora, save_adapter

    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(**CONFIG)).save_pretrained(base)
    model = apply_lora(GPT2LMHeadModel.from_pretrained(base), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                               base_model_name_or_path=str(base)))
    save_adapter(model, tmp_path / "run")
    for output in (tmp_path / "run" / "adapter_model.safetensors", tmp_path / "run" / "model_config.json",
                   base / "model.safetensors", base / "config.json"):
        before = output.read_bytes()
        with pytest.raises(ValueError, match="would replace a file of the model being exported"):
            export_gguf(tmp_path / "run", output, overwrite=True)
        assert output.read_bytes() == before
    _, tensors = read(export_gguf(tmp_path / "run", tmp_path / "run" / "model.gguf", dtype="f32"))
    assert len(tensors) == 4 + 12 * 2


def test_an_output_that_is_a_model_file_is_refused_before_exists(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(**CONFIG)).save_pretrained(tmp_path / "m")
    output = tmp_path / "m" / "model.safetensors"
    for overwrite in ([], ["--overwrite"]):  # --overwrite would not help: not "exists; pass --overwrite"
        assert main(["export", "gguf", "--model", str(tmp_path / "m"), "--output", str(output), *overwrite]) == 2
        assert "would replace a file of the model being exported" in capsys.readouterr().err


def test_a_model_with_unmerged_lora_adapters_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from gpt2kit.training.lora import apply_lora

    merge_first = r"merge the LoRA adapters first \(`gpt2kit lora merge`, or peft's merge_and_unload\(\)\)"
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    apply_lora(model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=merge_first):
        export_gguf(model, tmp_path / "m.gguf")
    wrapped = peft.get_peft_model(GPT2LMHeadModel(GPT2Config(**CONFIG)), peft.LoraConfig(r=2, target_modules=["c_fc"]))
    with pytest.raises(ValueError, match=merge_first):  # peft's own wrapper: the same advice
        export_gguf(wrapped, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    _, tensors = read(export_gguf(wrapped.merge_and_unload(), tmp_path / "m.gguf", dtype="f32"))
    assert len(tensors) == 4 + 12 * 2


def test_the_chat_template_is_the_models_chat_format(tmp_path):
    """The file carries the Jinja form of the format gpt2kit writes conversations in (tests/test_conversation.py
    renders each as transformers and llama-cpp-python do): plain by default, the one the tokenizer records."""
    model_dir = save_tiny_text_model(tmp_path / "model")
    fields, _ = read(export_gguf(model_dir, tmp_path / "plain.gguf", dtype="f32"))
    assert fields["tokenizer.chat_template"] == PLAIN.template
    tok = GPT2Tokenizer.from_file(model_dir)
    tok.chat_template = ALPACA.template  # as an instruction finetune saves it
    tok.save_pretrained(model_dir)
    fields, _ = read(export_gguf(model_dir, tmp_path / "alpaca.gguf", dtype="f32"))
    assert fields["tokenizer.chat_template"] == ALPACA.template
