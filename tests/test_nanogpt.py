"""nanoGPT checkpoints (out/ckpt.pt) converted to HF directories: the same network, with or without biases."""

import pickle

import pytest
import torch
import transformers

from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
from gpt2kit.checkpoint import CheckpointError
from gpt2kit.cli import main
from gpt2kit.nanogpt import read_nanogpt

ARGS = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50304, dropout=0.0, bias=True)


def nanogpt_checkpoint(path, *, bias=True, compiled=True, mask=True, vocab_size=50304):
    """What nanoGPT's train.py saves, built from a gpt2kit model of the same shape (the parameter names are
    nanoGPT's): its state dict (compiled: "_orig_mod." names; older versions: a causal-mask buffer per layer),
    model_args, the optimizer and the run's config."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=vocab_size,
                                       activation_function="gelu"))  # nanoGPT's nn.GELU(): exact
    state = model.state_dict()
    if not bias:
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
        for k in [k for k in model.state_dict() if k.endswith(".bias")]:
            model.get_parameter(k).data.zero_()
    if mask:
        state.update({f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)})
    prefix = "_orig_mod." if compiled else ""
    args = {**ARGS, "bias": bias, "vocab_size": vocab_size}
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "model_args": args,
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "iter_num": 100,
                "best_val_loss": torch.tensor(3.2), "config": {"dataset": "shakespeare", "learning_rate": 6e-4}},
               path)
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_a_nanogpt_checkpoint_converts_to_the_same_network(tmp_path, bias):
    reference = nanogpt_checkpoint(tmp_path / "ckpt.pt", bias=bias)
    assert main(["convert", "--from-nanogpt", str(tmp_path), "--output", str(tmp_path / "hf")]) == 0
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
        assert torch.equal(ours(ids).logits, expected)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert ours.config.n_positions == 32 and ours.config.tie_word_embeddings
    assert ours.config.activation_function == "gelu" and theirs.config.activation_function == "gelu"
    assert ours.config.eos_token_id == ours.config.bos_token_id == 50256  # GPT-2's end of text
    assert GPT2Tokenizer.from_file(tmp_path / "hf").vocab_size == 50257  # GPT-2's vocabulary comes along


def test_a_larger_vocabulary_than_gpt2s_gets_no_gpt2_tokenizer(tmp_path):
    """A nanoGPT run on another tokenizer's ids (cl100k_base's, padded to 100352) must not get GPT-2's files."""
    nanogpt_checkpoint(tmp_path / "ckpt.pt", vocab_size=100352)
    assert main(["convert", "--from-nanogpt", str(tmp_path), "--output", str(tmp_path / "hf")]) == 0
    config = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config
    assert config.vocab_size == 100352
    assert not any((tmp_path / "hf" / name).exists() for name in ("tokenizer.json", "vocab.json", "merges.txt"))
    # GPT-2's end-of-text id is another token there (and past a character-level vocabulary): no BOS or EOS id.
    assert config.eos_token_id is None and config.bos_token_id is None
    nanogpt_checkpoint(tmp_path / "chars.pt", vocab_size=65)
    assert main(["convert", "--from-nanogpt", str(tmp_path / "chars.pt"), "--output", str(tmp_path / "chars")]) == 0
    chars = GPT2LMHeadModel.from_pretrained(tmp_path / "chars")
    assert chars.config.eos_token_id is None
    assert chars.generate(torch.tensor([[1, 2]]), max_new_tokens=3).shape == (1, 5)


def test_bad_nanogpt_checkpoints_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such nanoGPT checkpoint"):
        read_nanogpt(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint torch.load reads safely"):
        read_nanogpt(tmp_path / "ckpt.pt")

    class Code:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    (tmp_path / "ckpt.pt").write_bytes(pickle.dumps({"model": {}, "model_args": Code()}))
    with pytest.raises(CheckpointError, match=r"not a checkpoint torch.load reads safely \(Unsupported operand") \
            as caught:
        read_nanogpt(tmp_path / "ckpt.pt")
    assert "weights_only` set to `False`" not in str(caught.value)  # torch's advice, which would run the code
    assert "ran code" not in capsys.readouterr().out
    torch.save({"model": {}, "model_args": {"n_layer": 2}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="model_args lacks n_head, n_embd, block_size, vocab_size"):
        read_nanogpt(tmp_path)
    nanogpt_checkpoint(tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    saved["model_args"]["n_embd"] = 128
    torch.save(saved, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"has shape \(50304, 64\), model_args imply \(50304, 128\)"):
        read_nanogpt(tmp_path)
    assert main(["convert", "--from-nanogpt", str(tmp_path), "--output", str(tmp_path / "hf"), "--format",
                 "bin"]) == 2
    assert "--from-nanogpt writes safetensors" in capsys.readouterr().err
