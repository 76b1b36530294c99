"""nanoGPT checkpoints in: `out/ckpt.pt` as its train.py saves it, converted to an HF-format directory.

nanoGPT's GPT is GPT-2 with the same parameter names as gpt2kit's model (nn.Linear projections, `transformer.`
prefix, tied LM head) and exact GELU (`nn.GELU()`, transformers' "gelu"); its `model_args` give the shape. Only
the weights are read, with `weights_only=True` (the file is a pickle: nothing in it may run code). A model trained
without biases (`bias=False`) gets zero biases, which compute the same function. A character-level vocabulary
(nanoGPT's data/*/meta.pkl, another pickle) is not read: pass such a model its tokenizer yourself; a model of
GPT-2's vocabulary (50257 ids, or nanoGPT's 50304 padding) gets the bundled GPT-2 tokenizer files and GPT-2's
end-of-text id; any other vocabulary gets no BOS or EOS id (its tokenizer's are not known here).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .checkpoint import CheckpointError, save_pretrained, unpickling_reason
from .config import GPT2Config
from .model import GPT2LMHeadModel
from .tokenizer import GPT2Tokenizer

CHECKPOINT_NAME = "ckpt.pt"
_SHAPE_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
_COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper, in the names of a model saved compiled
NANOGPT_PADDED_VOCAB = 50304  # nanoGPT pads GPT-2's 50257 ids to a multiple of 64
_MASK_BUFFER = ".attn.bias"  # the causal mask older nanoGPT registers when flash attention is missing


def read_nanogpt(path: str | os.PathLike) -> GPT2LMHeadModel:
    """The model in a nanoGPT checkpoint file (or the out_dir holding ckpt.pt), in the dtype it was saved in."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such nanoGPT checkpoint (train.py writes out_dir/{CHECKPOINT_NAME})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a checkpoint torch.load reads safely ({unpickling_reason(err)})") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("model_args"), dict)):
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected the 'model' and 'model_args' entries its "
                              "train.py saves)")
    args = checkpoint["model_args"]
    missing = [name for name in _SHAPE_ARGS if name not in args]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}")
    dropout = float(args.get("dropout", 0.0))
    # GPT-2's end-of-text id for GPT-2's vocabulary; another (65 characters, cl100k's ids) is not known here.
    eos = GPT2Config.eos_token_id if is_gpt2_vocabulary(args["vocab_size"]) else None
    try:
        config = GPT2Config(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                            n_positions=args["block_size"], vocab_size=args["vocab_size"], resid_pdrop=dropout,
                            embd_pdrop=dropout, attn_pdrop=dropout, activation_function="gelu",  # nn.GELU()
                            bos_token_id=eos, eos_token_id=eos)
    except ValueError as err:
        raise CheckpointError(f"{path}: model_args: {err}") from None
    state = {key.removeprefix(_COMPILED_PREFIX): tensor for key, tensor in checkpoint["model"].items()}
    state = {key: tensor for key, tensor in state.items() if not key.endswith(_MASK_BUFFER)}
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        config = config.replace(tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    expected = model.state_dict()
    if args.get("bias", True) is False:  # LayerNorms and projections without biases: a bias of zero each
        dtype = next(iter(state.values())).dtype
        state.update({key: torch.zeros(expected[key].shape, dtype=dtype) for key in expected
                      if key.endswith(".bias") and key not in state})
    if config.tie_word_embeddings and wte is not None:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    unexpected, absent = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unexpected or absent:
        raise CheckpointError(f"{path}: weights do not match nanoGPT's GPT for model_args {args}: missing "
                              f"{absent[:5]}, unexpected {unexpected[:5]}")
    wrong = next((key for key, tensor in state.items() if tensor.shape != expected[key].shape), None)
    if wrong is not None:
        raise CheckpointError(f"{path}: {wrong} has shape {tuple(state[wrong].shape)}, model_args imply "
                              f"{tuple(expected[wrong].shape)}")
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval()


def is_gpt2_vocabulary(vocab_size: int) -> bool:
    """Whether a nanoGPT model of `vocab_size` ids was trained on GPT-2's tokens (50257, or padded up to 50304);
    a smaller or larger vocabulary is another tokenizer's (characters, cl100k_base)."""
    return GPT2Config.vocab_size <= vocab_size <= NANOGPT_PADDED_VOCAB


def nanogpt_to_pretrained(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                          max_shard_size: int | str | None = None) -> Path:
    """`gpt2kit convert --from-nanogpt out/ckpt.pt --output DIR`: the checkpoint's model as an HF-format
    directory that gpt2kit, transformers and llama.cpp's converter load; GPT-2's tokenizer files come along for
    a model of GPT-2's vocabulary."""
    model, gpt2 = read_nanogpt(checkpoint), GPT2Tokenizer.gpt2()
    tokenizer = gpt2 if is_gpt2_vocabulary(model.config.vocab_size) else None
    return save_pretrained(model, output, max_shard_size=max_shard_size, tokenizer=tokenizer)
