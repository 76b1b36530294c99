"""Weight-only int8 quantization for inference.

Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory bandwidth: GPT-2 small
reads 497 MB per token in float32, 249 MB in bf16 and 124 MB in int8. `quantize_int8` stores each projection
and the LM head as int8 with one scale per output row (symmetric, round to nearest); the matrix products run
in bf16 on those weights, everything else (embeddings, LayerNorms, biases, the residual stream, attention and
the KV cache) keeps the model's dtype. The difference from float32 is the rounding of the weights (at most
half a step, |w|max/254 of the row) and of the products' inputs to bf16; tests bound it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Up to this many rows (batch x new tokens) the fused int8 kernel wins: it reads 1 byte per weight. Above it
# the product is compute-bound and dequantizing into one bf16 matmul is faster (measured: 2.5x at 512 rows).
_INT8_KERNEL_MAX_ROWS = 16
_COMPUTE_DTYPE = torch.bfloat16  # what the int8 kernel multiplies in (its scales and inputs share this dtype)


class Int8Linear(nn.Module):
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
        """The weight this layer multiplies by, (out, in) in bf16."""
        return self.weight.to(_COMPUTE_DTYPE) * self.scale.to(_COMPUTE_DTYPE)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        # Few tensor ops per call: at batch 1 this wrapper runs 49 times per GPT-2 token.
        if x.device.type == "cpu" and x.numel() <= _INT8_KERNEL_MAX_ROWS * self.in_features:
            inputs = x.reshape(-1, self.in_features).to(_COMPUTE_DTYPE).contiguous()
            scale = self.scale.to(_COMPUTE_DTYPE)  # a no-op unless the model was cast after quantizing
            y = torch._weight_int8pack_mm(inputs, self.weight, scale).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x.to(_COMPUTE_DTYPE), self.dequantized())
        # Adding the bias (in the model's dtype) also casts the bf16 product back to that dtype.
        return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8, compute=bf16"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize, in place, every nn.Linear of the transformer blocks and the LM head of a GPT-2 model to int8.
    A tied LM head gets its own int8 copy; the embedding stays as it is for lookups. For inference only: the
    result cannot be trained or saved (load the original weights for that)."""
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name.startswith("transformer.h.") or name == "lm_head")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(linear.weight, linear.bias))
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
