"""GGUF export: one file that llama.cpp (and what is built on it: llama-cpp-python, Ollama, LM Studio) loads.

The file holds llama.cpp's `gpt2` architecture: the hyperparameters, the byte-level BPE vocabulary (tokens in
id order as GPT-2's byte-to-unicode strings, token types, merges, the split pattern's name), the chat template
`gpt2kit chat` writes conversations with, and the tensors under llama.cpp's GPT-2 names. The merges are
recovered from the tokenizer's ranks (each token's bytes merged with the lower-ranked merges until two parts are
left), which reproduces GPT-2's `vocab.bpe` exactly and works the same for a vocabulary trained with
`gpt2kit tokenizer train` or for cl100k_base. Written with the `gguf` package (llama.cpp's own writer): f32, f16
(matrices in f16, norms and biases in f32 as llama.cpp requires) or q8_0 (matrices in llama.cpp's 8-bit blocks of
32, a matrix whose rows are not whole blocks in f16); the position embedding stays f32 in every type, as
llama.cpp's converter keeps it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import is_adapter_dir, is_saved_model_file, resolve_model_dir
from .files import atomic_file, check_output_file
from .model import GPT2LMHeadModel
from .pipeline import load_model_and_tokenizer
from .quantization import is_inference_only
from .tokenizer import CL100K_PATTERN, GPT2_PATTERN, GPT2Tokenizer, portable_pattern, token_string

GGUF_TYPES = ("f32", "f16", "q8_0")
F16_MAX = 65504.0  # the largest finite float16
Q8_0_BLOCK = 32  # values per q8_0 block: a row must hold whole blocks

# gpt2kit (= HF) parameter names -> llama.cpp's GPT-2 tensor names (gguf.TENSOR_NAMES for MODEL_ARCH.GPT2).
_TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
        "lm_head": "output"}
_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp's token types


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's GPT-2 tensor name of a gpt2kit parameter, e.g. transformer.h.3.attn.c_attn.weight ->
    blk.3.attn_qkv.weight. gpt2kit's Linear weights are (out, in), the orientation GGUF stores (ne0 = in), so
    tensors need no transposing (HF's Conv1D checkpoints do)."""
    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise ValueError(f"{name}: not a weight or bias")
    if module in _TOP:
        return f"{_TOP[module]}.{kind}"
    match = _BLOCK_NAME.fullmatch(module)
    if match and match.group(2) in _BLOCK:
        return f"blk.{match.group(1)}.{_BLOCK[match.group(2)]}.{kind}"
    raise ValueError(f"{name}: no GGUF GPT-2 tensor for this parameter")


def gguf_pre_tokenizer(tokenizer: GPT2Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's split pattern: "gpt-2", or "llama-bpe" for cl100k's (Llama 3 splits
    text with the same expression)."""
    # Compared as tokenizer.json writes them: a saved cl100k tokenizer reads back with the portable spelling.
    names = {portable_pattern(GPT2_PATTERN): "gpt-2", portable_pattern(CL100K_PATTERN): "llama-bpe"}
    pattern = portable_pattern(tokenizer.split_pattern)
    if pattern not in names:
        raise ValueError("GGUF export knows GPT-2's and cl100k's pre-tokenizers; this tokenizer splits text with "
                         "another pattern")
    return names[pattern]


def gguf_vocabulary(tokenizer: GPT2Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokenizer as GGUF's `gpt2` tokenizer model stores it: `vocab_size` tokens in id order (special tokens
    as their text, control type, ordinary added tokens user-defined; ids the tokenizer lacks, inside its range
    like cl100k's or beyond it, as unused `[PAD<id>]` entries), their types, and the merges ("left right", in
    merge order)."""
    tokenizer.check_fits(vocab_size)
    encoding = tokenizer.encoding
    # A vocabulary token registered as an added token (a pad_token "!") stays the ordinary token it is to BPE.
    specials = {i: text for text, i in tokenizer.own_id_tokens().items()}
    tokens, types = [], []
    for token_id in range(tokenizer.vocab_size):
        if token_id in specials:
            tokens.append(specials[token_id])
            # An ordinary added token is matched in text, as llama.cpp matches user-defined ones; control tokens
            # only where special tokens are parsed.
            types.append(_USER_DEFINED if specials[token_id] in tokenizer.ordinary_added_tokens else _CONTROL)
            continue
        try:
            data = encoding.decode_single_token_bytes(token_id)
        except KeyError:  # a gap in the ids
            tokens.append(f"[PAD{token_id}]")
            types.append(_UNUSED)
            continue
        tokens.append(token_string(data))
        types.append(_NORMAL)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [_UNUSED] * (vocab_size - len(types))
    merges = [f"{token_string(left)} {token_string(right)}" for left, right in tokenizer.bpe_merges()]
    return tokens, types, merges


def export_gguf(model: str | os.PathLike | GPT2LMHeadModel, output: str | os.PathLike, *,
                tokenizer: str | os.PathLike | GPT2Tokenizer | None = None, dtype: str = "f16",
                overwrite: bool = False) -> Path:
    """Write `model` (an HF-format directory, a local HF cache name, or a GPT2LMHeadModel) and its tokenizer (the
    one given, else the model directory's vocabulary, else GPT-2's) as one GGUF file of `dtype` f32, f16 or q8_0.
    The file appears only when complete."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'gpt2kit[gguf]'") from None
    if dtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; expected one of {', '.join(GGUF_TYPES)}")
    # What --overwrite would not help with is said before "exists; pass --overwrite".
    output = check_output_file(output)  # a directory, or a path below a file, is never worth --overwrite
    if isinstance(model, (str, os.PathLike)):
        source = resolve_model_dir(model).resolve()
        sources = {source}
        if is_adapter_dir(source):  # LoRA adapters: their base model's files are read too
            from .training.lora import adapter_base

            sources.add(adapter_base(source)[1].resolve())
        # The directory holding the output's name, not the file it may link to (an HF cache snapshot's blobs).
        folder = Path(os.path.abspath(output)).parent.resolve()
        if folder in sources and is_saved_model_file(output.name):
            raise ValueError(f"{output}: would replace a file of the model being exported ({folder}); "
                             "name the GGUF file otherwise (e.g. model.gguf)")
    elif hasattr(model, "peft_config"):  # LoRA layers keep base_layer.weight and the update apart: no GGUF tensors
        raise ValueError("GGUF export needs a model without LoRA layers: merge the LoRA adapters first "
                         "(`gpt2kit lora merge`, or peft's merge_and_unload()), then export the merged model")
    elif not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"only a GPT2LMHeadModel (or its directory) exports to GGUF, got {type(model).__name__}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer)
    if is_inference_only(lm):
        raise ValueError("GGUF export needs the float weights: export the model before quantizing or packing it")
    if lm.config.activation_function == "gelu":
        warnings.warn("the model uses exact GELU (activation_function 'gelu', nanoGPT's); llama.cpp's gpt2 computes "
                      "its tanh approximation, so its logits will differ slightly from gpt2kit's", stacklevel=2)
    config = lm.config
    pre_tokenizer = gguf_pre_tokenizer(tok)  # checked before anything is computed or written
    tokens, types, merges = gguf_vocabulary(tok, config.vocab_size)
    arch = gguf.MODEL_ARCH.GPT2
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(output.stem)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.mlp_dim)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_file_type(file_type)
        if dtype == "q8_0":  # the GGUF spec requires it of any file with quantized tensors
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_eos_token_id(tok.eos_token_id)
        if tok.pad_token_id != tok.eos_token_id:  # a pad token of its own (add_special_tokens)
            writer.add_pad_token_id(tok.pad_token_id)
        writer.add_add_bos_token(False)  # GPT-2 text starts without one, as in transformers
        # The model's chat format as Jinja (tokenizer.chat_template), so llama.cpp and the tools on it prompt the
        # model as `gpt2kit chat` and the server do.
        writer.add_chat_template(tok.chat_format().template)
        tied = lm.lm_head.weight is lm.transformer.wte.weight
        state = {k: v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
        for name, tensor in tqdm(state.items(), desc=f"export gguf {dtype}", unit="tensor"):
            target = gguf_tensor_name(name)
            data = tensor.detach().float().cpu().numpy()  # no copy of a float32 CPU weight: written before return
            # Norms and biases stay f32 (llama.cpp adds them in f32); so does the position embedding.
            if data.ndim == 1 or dtype == "f32" or target.startswith("position_embd"):
                writer.add_tensor(target, data)
            elif dtype == "q8_0" and data.shape[1] % Q8_0_BLOCK == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:  # f16, and q8_0's matrices whose rows are not whole blocks (as llama.cpp does)
                peak = float(abs(data).max(initial=0.0))
                if peak > F16_MAX:  # would be written as inf
                    raise ValueError(f"{name}: a value of magnitude {peak:.4g} does not fit f16 (at most {F16_MAX}); "
                                     f"export as f32")
                writer.add_tensor(target, data.astype("float16"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output
