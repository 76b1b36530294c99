"""Inference-only weight formats for CPUs: weight-only int8, and float weights prepacked for oneDNN.

Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory bandwidth: GPT-2 small
reads 497 MB per token in float32, 249 MB in bf16 and 124 MB in int8.

`pack_weights` keeps the float weights but stores each projection and the LM head in oneDNN's blocked layout,
reordered once: PyTorch's default matrix-vector product (MKL) streams the weights at about half the memory
bandwidth on the benchmark CPU, oneDNN on a packed weight near all of it (GPT-2 small, batch 1, float32: 17 ->
29 tokens/s). The product is the same float32 (or bf16) arithmetic in another summation order; the MLP's GELU
becomes the first projection's oneDNN post-op.

`quantize_int8` stores each projection and the LM head as int8 with one scale per output row (symmetric, round
to nearest); the matrix products take bf16 inputs on those weights, everything else (embeddings, LayerNorms,
biases, the residual stream, attention and the KV cache) keeps the model's dtype. The difference from float32
is the rounding of the weights (at most half a step of the stored bf16 scale, about |w|max/254 of the row), of
the products' inputs to bf16 and of the products to bf16 (the fused kernel returns bf16; so does the bf16 matmul
of longer inputs, which multiplies in float32 instead on a CPU without bf16 instructions, where bf16 products
are emulated and several times slower); tests bound it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_matmul import onednn_supports
from .model import MLP, is_plain

# Up to this many rows (batch x new tokens) the fused int8 kernel wins: it reads 1 byte per weight. Above it
# the product is compute-bound and one bf16 matmul on the converted weights is faster (2x at 32 rows).
_INT8_KERNEL_MAX_ROWS = 16
_COMPUTE_DTYPE = torch.bfloat16  # what the int8 kernel multiplies in (its scales and inputs share this dtype)
# What the matmul of longer inputs multiplies in on this CPU: float32 where it would emulate bf16 (6x faster for a
# 256-token prefill on an AVX2 CPU), its inputs still rounded to bf16 as the kernel's are. A GPU takes bf16.
_CPU_LONG_INPUT_DTYPE = _COMPUTE_DTYPE if onednn_supports(_COMPUTE_DTYPE) else torch.float32


def long_input_dtype(device: torch.device) -> torch.dtype:
    """What an int8 layer's product of more than _INT8_KERNEL_MAX_ROWS input rows (a prefill) multiplies in."""
    return _CPU_LONG_INPUT_DTYPE if device.type == "cpu" else _COMPUTE_DTYPE


# The CPU kernel reads the input features in blocks of 16: other widths give wrong sums or crash (torch 2.13).
_INT8_KERNEL_IN_MULTIPLE = 16


class InferenceLinear(nn.Module):
    """What int8 and packed layers share: weights in a form only inference reads, which float weights cannot load
    into. The model calls check_load on every such layer before it loads anything; the layer calls it too, for a
    load that starts at a block or at a wrapper of the model."""

    def check_load(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        self.check_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)


class Int8Linear(InferenceLinear):
    """y = x @ (q * scale).T + bias with q int8 (out, in) and scale (out,): the product in bf16, the result and
    the bias in x's dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(_COMPUTE_DTYPE)
        # Round against the scale as stored, so that q * scale is the nearest representable weight.
        q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized(self) -> Tensor:
        """The weight this layer stands for, q * scale as (out, in) float32 (exact: 8-bit times bf16)."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        # Few tensor ops per call: at batch 1 this wrapper runs 49 times per GPT-2 token.
        scale = self.scale.to(_COMPUTE_DTYPE)  # a no-op unless the model was cast after quantizing
        if (x.device.type == "cpu" and x.numel() <= _INT8_KERNEL_MAX_ROWS * self.in_features
                and self.in_features % _INT8_KERNEL_IN_MULTIPLE == 0):
            inputs = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE).contiguous()
            y = torch._weight_int8pack_mm(inputs, self.weight, scale).view(*x.shape[:-1], self.out_features)
            # The bias add promotes bf16 to the model's dtype (float16 + bf16 to float32, hence the cast).
            return (y if self.bias is None else torch.add(self.bias, y)).to(x.dtype)
        # The scale is per output row, so it can multiply the product instead of the weight: int8 values are
        # exact in bf16, the conversion is one cheap pass, and q * scale is never rounded to bf16.
        product = long_input_dtype(x.device)
        y = F.linear(x.to(_COMPUTE_DTYPE).to(product), self.weight.to(product))
        if self.bias is None:
            # Scaled in float32: inductor rewrites a bf16 `y * scale` into the int8 kernel above, even for the
            # widths it crashes on.
            return (y.float() * scale.float()).to(x.dtype)
        return torch.addcmul(self.bias, y, scale).to(x.dtype)  # one rounding of y * scale + bias, then x's dtype

    def check_load(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        """Refuse float weights: copy_ would truncate them to int8, silently."""
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point():
            raise ValueError(f"{prefix}weight: float weights cannot load into an int8 layer; load them into the "
                             f"float model, then quantize_int8")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8, compute=bf16"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize, in place, every nn.Linear of the transformer blocks and the LM head of a GPT-2 model to int8.
    A tied LM head gets its own int8 copy; the embedding stays as it is for lookups. For inference only: the
    result cannot be trained or saved (load the original weights for that)."""
    return _replace_linears(model, lambda linear: Int8Linear(linear.weight, linear.bias))


class PackedLinear(InferenceLinear):
    """nn.Linear for CPU inference with its weight reordered once into oneDNN's layout. The packed weight is an
    opaque tensor, kept outside the module's parameters and buffers: the layer cannot be moved, cast, copied or
    saved (pack last, after choosing device and dtype)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"pack_weights needs float32 or bf16 weights on the CPU, got {weight.dtype} on "
                             f"{weight.device}")
        if not onednn_supports(weight.dtype):
            raise ValueError("pack_weights: oneDNN runs bf16 products only on CPUs with bf16 instructions "
                             "(AVX512-BF16 or AMX), which this one lacks; pack the float32 model")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # laid out for one row per step
        self.packed_dtype = weight.dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.gelu: str | None = None  # set by fuse_gelu: the GELU applied to the product, "tanh" or "none"

    def fuse_gelu(self, approximate: str) -> None:
        """Apply GELU (nn.GELU's `approximate`) to the product as oneDNN writes it: at an evaluation batch of
        8 x 1024 tokens a separate GELU pass over the (rows, 4 x n_embd) activations costs about 10 % of GPT-2
        small's forward; as a post-op it costs next to nothing. Same function, oneDNN's implementation: the
        values differ from PyTorch's in the last bits."""
        self.gelu = approximate

    def forward(self, x: Tensor) -> Tensor:
        if self.gelu is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], self.gelu)

    # The packed weight is an opaque oneDNN tensor: copying, saving or casting it would fail deep inside torch
    # (or, for state_dict, silently leave the weight out), so each is refused here with the way out.
    _REFUSAL = "a oneDNN-packed model cannot be {}: do it before pack_weights (pack last)"

    def check_apply(self, fn) -> None:
        """Refuse a move or cast (`fn` as nn.Module._apply gets it); the model calls this before moving anything."""
        probe = fn(torch.empty(0, dtype=self.packed_dtype))
        if probe.dtype != self.packed_dtype or probe.device.type != "cpu":
            raise ValueError(self._REFUSAL.format(f"moved or cast (to {probe.dtype} on {probe.device})"))

    def _apply(self, fn, recurse=True):
        self.check_apply(fn)
        return self

    def __deepcopy__(self, memo):
        raise ValueError(self._REFUSAL.format("copied"))

    def __reduce_ex__(self, protocol):
        raise ValueError(self._REFUSAL.format("pickled or saved"))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError(self._REFUSAL.format("saved (its state_dict would lack the packed weights)"))

    def check_load(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        """Refuse any load: the weight has no place to load into, and with strict=False only the bias would
        load, a hybrid of two models."""
        if prefix + "weight" in state_dict or prefix + "bias" in state_dict:
            raise ValueError(f"{prefix}weight: " + self._REFUSAL.format("loaded into"))

    def extra_repr(self) -> str:
        fused = "" if self.gelu is None else f", then GELU ({self.gelu})"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=oneDNN-packed{fused}"


def _replace_linears(model: nn.Module, make_layer: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Swap every nn.Linear of the transformer blocks and the LM head for make_layer(linear), in place."""
    if is_inference_only(model):
        raise ValueError("the model's weights are already quantized or packed")
    if not all(is_plain(p) for p in model.parameters()):
        raise ValueError("the model is sharded (tensor parallel or FSDP: DTensor weights): quantize or pack a model "
                         "held whole by one process")
    if any(".lora_" in name for name, _ in model.named_modules()):
        # peft's adapter layers are nn.Linear too: quantized, they would cast the activations to int8.
        raise ValueError("the model has LoRA adapters: merge them first (`gpt2kit lora merge`, or peft's "
                         "merge_and_unload()), then quantize or pack the merged model")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name.startswith("transformer.h.") or name == "lm_head")]
    if not targets:
        raise ValueError(f"no GPT-2 projections (transformer.h.*, lm_head) in this {type(model).__name__}: pass the "
                         "GPT2LMHeadModel itself, not a GPT2Model or a compiled or wrapped model")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make_layer(getattr(parent, child)))
    return model.eval()


def pack_weights(model: nn.Module) -> nn.Module:
    """Store the projections and the LM head of a GPT-2 model on the CPU in oneDNN's packed layout, in place
    (a tied LM head gets its own packed copy). For inference only, like quantize_int8."""
    if not torch.backends.mkldnn.is_available():
        raise ValueError("pack_weights needs PyTorch built with oneDNN (mkldnn), which this build lacks")
    _replace_linears(model, PackedLinear)
    for module in model.modules():
        if isinstance(module, MLP) and isinstance(module.c_fc, PackedLinear) and isinstance(module.act, nn.GELU):
            module.c_fc.fuse_gelu(module.act.approximate)
            module.act = nn.Identity()
    return model


def describe_weights(model: nn.Module) -> str:
    """The weights' format for humans: "float32", "bfloat16, oneDNN-packed", "int8 weights, float32 activations"."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    kinds = {type(m) for m in model.modules()}
    if Int8Linear in kinds:
        return f"int8 weights, {dtype} activations"
    return f"{dtype}, oneDNN-packed" if PackedLinear in kinds else dtype


def is_inference_only(model: nn.Module) -> bool:
    """True when some weights are int8 or packed: the model can run, not train, save or export."""
    return any(isinstance(m, InferenceLinear) for m in model.modules())


def check_trainable(model: nn.Module, action: str) -> None:
    """Refuse to train (or adapt) int8 or packed weights: they are buffers or opaque tensors that no optimizer
    updates, so a run would change the embeddings and LayerNorms alone and fail at its first checkpoint."""
    if is_inference_only(model):
        raise ValueError(f"{action}: the model's weights are int8-quantized or oneDNN-packed, which are for "
                         "inference only; use the float model (quantize or pack after training)")
