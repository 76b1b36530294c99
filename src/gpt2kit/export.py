"""ONNX export with a KV cache, and an onnxruntime-backed model that gpt2kit's generation runs unchanged.

`export_onnx` writes two graphs of the same network beside the model's config and tokenizer:

- `prefill.onnx`: input_ids, attention_mask, position_ids -> logits, present_keys, present_values
- `decode.onnx`:  the same plus past_keys, past_values (the cache so far) -> the same outputs

Caches are stacked over layers, (n_layer, batch, n_head, length, head_dim), the layout of gpt2kit's KVCache.
Batch, sequence and past lengths are dynamic axes. `attention_mask` (batch, past + sequence) marks real tokens
with 1 (left padding works as in PyTorch); `position_ids` (batch, sequence) count real tokens only.

The graphs are traced from `KVCacheLM`, a thin wrapper around GPT2LMHeadModel's own modules whose cache is
plain input/output tensors: the preallocated, in-place KVCache of model.py suits eager PyTorch, not a graph.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import (CONFIG_NAME, load_config, read_generation_config, resolve_model_dir,
                         write_generation_config)
from .config import GPT2Config
from .files import atomic_directory, check_output_directory
from .model import CausalLMOutput, GPT2LMHeadModel, KVCache, check_inputs, eval_mode, positions_from_mask
from .quantization import is_inference_only
from .tokenizer import GPT2Tokenizer, tokenizer_files

PREFILL_NAME = "prefill.onnx"
DECODE_NAME = "decode.onnx"
EXPORT_INFO_NAME = "onnx_export.json"
DEFAULT_OPSET = 17
# Opsets the graphs export at: 13 has every operator used, 20 is the TorchScript exporter's newest.
MIN_OPSET, MAX_OPSET = 13, 20
INSTALL_HINT = "pip install 'gpt2kit[onnx]'"


class KVCacheLM(nn.Module):
    """GPT2LMHeadModel's computation with the cache passed in and returned as stacked tensors.

    It reuses the model's modules (no copied weights); attention is written out with an explicit mask built
    from tensor shapes so the traced graph stays valid for every batch, sequence and past length."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model
        self.n_head = model.config.n_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_keys: Tensor | None = None, past_values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        transformer = self.model.transformer
        B, T = input_ids.shape
        # Key j is visible to query i (at absolute index S - T + i) if it is real and not in the future; a query
        # always sees itself so padded rows never softmax over nothing.
        key_index = torch.ones_like(attention_mask).cumsum(-1) - 1  # (B, S)
        query_index = key_index[:, -1:] - T + 1 + torch.ones_like(input_ids).cumsum(-1) - 1  # (B, T)
        causal = key_index[:, None, :] <= query_index[:, :, None]  # (B, T, S)
        itself = key_index[:, None, :] == query_index[:, :, None]
        visible = (causal & attention_mask.bool()[:, None, :]) | itself
        blocked = ~visible[:, None]  # (B, 1, T, S)

        x = transformer.wte(input_ids) + transformer.wpe(position_ids)
        presents_k, presents_v = [], []
        for layer, block in enumerate(transformer.h):
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
            if past_keys is not None:
                k = torch.cat([past_keys[layer], k], dim=2)
                v = torch.cat([past_values[layer], v], dim=2)
            presents_k.append(k)
            presents_v.append(v)
            scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            attn = scores.masked_fill(blocked, float("-inf")).softmax(-1) @ v
            x = x + block.attn.c_proj(attn.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.ln_2(x))
        # Constant folding stores the head's weight transposed for onnxruntime's MatMul, beside the embedding it
        # is tied to (154 MB more for GPT-2 small): an Einsum or a weight-first product over the one copy made
        # each decode step 2-12x slower.
        logits = self.model.lm_head(transformer.ln_f(x))
        return logits, torch.stack(presents_k), torch.stack(presents_v)


def _example_inputs(config: GPT2Config, batch: int, length: int, past: int) -> dict[str, Tensor]:
    """Inputs of the traced example: left padding in row 0 so the masking path is exercised. Drawn from a
    generator of their own: exporting never moves the caller's random stream."""
    generator = torch.Generator().manual_seed(0)
    total = past + length
    mask = torch.ones(batch, total, dtype=torch.long)
    mask[0, :1] = 0
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, length), generator=generator),
              "attention_mask": mask, "position_ids": positions_from_mask(mask)[:, past:]}
    if past:
        shape = (config.n_layer, batch, config.n_head, past, config.head_dim)
        inputs["past_keys"] = torch.randn(shape, generator=generator)
        inputs["past_values"] = torch.randn(shape, generator=generator)
    return inputs


def _export_graph(wrapper: KVCacheLM, path: Path, config: GPT2Config, *, with_past: bool, opset: int) -> None:
    # Traced at small lengths the context allows (the axes are dynamic; past and sequence differ in the decode
    # graph so that neither is taken for the other).
    n = config.n_positions
    length = min(3, n - 1) if with_past else min(3, n)
    inputs = _example_inputs(config, batch=2, length=length, past=min(4, n - length) if with_past else 0)
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                    "present_keys": {1: "batch", 3: "total"}, "present_values": {1: "batch", 3: "total"}}
    if with_past:
        dynamic_axes |= {"past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"}}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every call; the graphs it writes are what we test.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # Into a directory of its own: past 2 GB the exporter writes each weight to a file named after it, and
        # generated names (onnx::MatMul_262) mean different weights in the two graphs.
        staging = path.parent / f".{path.stem}-export"
        staging.mkdir()
        torch.onnx.export(wrapper, tuple(inputs.values()), str(staging / path.name), input_names=list(inputs),
                          output_names=["logits", "present_keys", "present_values"], dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    place_graph(staging, path)


def place_graph(staging: Path, path: Path) -> None:
    """Move the graph exported into `staging` to `path`: as it is when it is one file, else with its weights
    gathered into one `<name>.data` file beside it (a graph over 2 GB keeps its weights outside the protobuf)."""
    if [p.name for p in staging.iterdir()] == [path.name]:
        (staging / path.name).replace(path)
    else:
        import onnx

        graph = onnx.load(str(staging / path.name))  # with its external weights
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    shutil.rmtree(staging)


def export_onnx(model: str | os.PathLike | GPT2LMHeadModel, output_dir: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, tokenizer: str | os.PathLike | GPT2Tokenizer | None = None,
                overwrite: bool = False) -> Path:
    """Write prefill.onnx + decode.onnx (fp32), config.json, the model's generation_config.json and the tokenizer
    files into `output_dir`.

    `model` is an HF-format directory or a GPT2LMHeadModel; `tokenizer` (a GPT2Tokenizer, file or directory) is
    saved in, by default the model directory's tokenizer files. The directory appears only when complete."""
    try:  # torch's exporter needs it, but says so only after tracing the whole model
        importlib.import_module("onnx")
    except ImportError:
        raise ImportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    if not isinstance(model, (GPT2LMHeadModel, str, os.PathLike)):
        raise TypeError(f"only a GPT2LMHeadModel (or its directory) exports to ONNX, got {type(model).__name__}")
    source_dir = None if isinstance(model, GPT2LMHeadModel) else resolve_model_dir(model)
    # Before the export runs; the source first, as --overwrite would not help.
    output_dir = check_output_directory(output_dir, overwrite=overwrite, replaces=True, source=source_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = GPT2Tokenizer.from_pretrained(tokenizer)
    lm = model if source_dir is None else GPT2LMHeadModel.from_pretrained(source_dir)
    if lm.config.n_positions < 2:
        raise ValueError("ONNX export needs a context (n_positions) of at least 2: the decode graph reads a cache")
    if is_inference_only(lm):
        raise ValueError("ONNX export needs the float weights: export the model before quantizing or packing it")
    param = next(lm.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        lm = copy.deepcopy(lm).float().cpu()  # the caller's model keeps its dtype and device
    if tokenizer is not None:
        tokenizer.check_fits(lm.config.vocab_size)
    wrapper = KVCacheLM(lm)
    with eval_mode(lm), atomic_directory(output_dir) as tmp:
        with torch.no_grad():
            for name in tqdm([PREFILL_NAME, DECODE_NAME], desc="export onnx", unit="graph"):
                _export_graph(wrapper, tmp / name, lm.config, with_past=name == DECODE_NAME, opset=opset)
        config = lm.config.to_hf_dict()
        config["dtype"] = "float32"  # the graphs', whatever the source's
        if "torch_dtype" in config:  # transformers' older name for it
            config["torch_dtype"] = "float32"
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_generation_config(tmp, lm.generation_config)  # what generation starts from, as in PyTorch
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source_dir is not None:
            for path in tokenizer_files(source_dir):
                shutil.copyfile(path, tmp / path.name)
        info = {"format": "gpt2kit-onnx", "opset": opset, "dtype": "float32", "graphs": [PREFILL_NAME, DECODE_NAME],
                "cache_layout": "(n_layer, batch, n_head, length, head_dim)"}
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def _check_graph(shapes: dict[str, list[int | str]], path: Path, config: GPT2Config) -> None:
    """ValueError naming `path` and config.json's field when the graph's inputs and outputs (`shapes`, by name)
    are not those `export_onnx` writes for `config`: with another model's config.json the first step would fail
    with a bare shape error."""
    caches = ["present_keys", "present_values", *(["past_keys", "past_values"] if path.name == DECODE_NAME else [])]
    missing = [name for name in ("input_ids", "attention_mask", "position_ids", "logits", *caches)
               if name not in shapes]
    if missing:
        raise ValueError(f"{path}: not a graph of `gpt2kit export onnx` (no {', '.join(missing)})")
    # The caches are (n_layer, batch, n_head, length, head_dim = n_embd / n_head); logits end in vocab_size.
    checks = [(name, dim, field, size) for name in caches for dim, field, size in
              ((0, "n_layer", config.n_layer), (2, "n_head", config.n_head), (4, "n_embd", config.head_dim))]
    checks.append(("logits", 2, "vocab_size", config.vocab_size))
    for name, dim, field, size in checks:
        if shapes[name][dim] != size:
            raise ValueError(f"{path}: {name} has shape {shapes[name]}, but {path.parent / CONFIG_NAME} has "
                             f"{field} {getattr(config, field)} (dim {dim} would be {size}): that config.json is "
                             "not the exported model's")


class OnnxLMHeadModel(nn.Module):
    """An exported directory run by onnxruntime behind GPT2LMHeadModel's forward signature, so `generate`,
    `stream_generate` and pipelines run it unchanged (CPU, float32). Only the sampling of the next token from
    the logits stays in PyTorch; the network runs in onnxruntime."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"the onnx backend needs the onnxruntime package: {INSTALL_HINT}") from None
        super().__init__()
        directory = Path(directory)
        for name in (CONFIG_NAME, PREFILL_NAME, DECODE_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name}; write an ONNX model directory with "
                                        "`gpt2kit export onnx --model MODEL --output ONNX_DIR` and pass ONNX_DIR")
        self.directory = directory
        self.config = load_config(directory)
        self.generation_config = read_generation_config(directory)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        sessions = []
        for name in (PREFILL_NAME, DECODE_NAME):
            try:
                session = ort.InferenceSession(str(directory / name), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no other base
                message = " ".join(str(err).split())
                raise ValueError(f"{directory / name}: onnxruntime cannot load it ({message}); export the model "
                                 "again") from None
            values = (*session.get_inputs(), *session.get_outputs())
            _check_graph({value.name: value.shape for value in values}, directory / name, self.config)
            sessions.append(session)
        self.prefill, self.decode = sessions

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """As GPT2LMHeadModel.forward (without losses): the graphs read the filled part of `past_key_values`
        and the new keys/values are written back into it."""
        cache = past_key_values
        B, T = input_ids.shape
        past = check_inputs(self.config, input_ids, attention_mask, cache)  # onnxruntime's errors say less
        outside = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
        if len(outside):  # as PyTorch's embedding refuses it: onnxruntime's Gather counts a negative id from the end
            raise IndexError(f"index out of range: token id {int(outside[0])} is not in the vocabulary "
                             f"(0..{self.config.vocab_size - 1})")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        feeds = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long(),
                 "position_ids": position_ids.long().expand(B, T)}
        session = self.prefill
        if past:
            feeds |= {"past_keys": cache.keys[:, :, :, :past], "past_values": cache.values[:, :, :, :past]}
            session = self.decode
        logits, keys, values = session.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})
        if cache is not None:
            cache.keys[:, :, :, past:past + T] = torch.from_numpy(keys[:, :, :, past:])
            cache.values[:, :, :, past:past + T] = torch.from_numpy(values[:, :, :, past:])
            cache.length = past + T
        logits = torch.from_numpy(logits)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutput(logits=logits, past_key_values=cache)
