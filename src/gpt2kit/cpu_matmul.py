"""Float32 matrix products on CPUs where oneDNN is faster than PyTorch's default, MKL.

PyTorch multiplies float32 matrices on a CPU with MKL and low-precision ones with oneDNN. On AMD CPUs MKL takes
a generic code path: on a 2-core AMD EPYC (Zen 5, AVX-512) its float32 products ran at 190-210 GFLOP/s where
oneDNN ran the same shapes at 430-470 (training and prefill shapes of GPT-2), and its matrix-vector products
(batch-1 decoding) took 1.4-2.4x oneDNN's time. There gpt2kit's linear layers (`Linear`, the model's
projections and LM head), the fused training loss and evaluation's LM head multiply through oneDNN, forward and
backward. The arithmetic stays float32 in another summation order, as with `pack_weights`: results differ from
MKL's in the last bits (about 1e-6 relative), and a run is reproducible as long as the choice stays the same.

The choice is made once per process: oneDNN for float32 on AMD CPUs with AVX-512 (where it was measured),
PyTorch's default elsewhere. `GPT2KIT_FLOAT32_MATMUL=onednn` or `=default` overrides it, as does
`use_onednn_float32()`. Low-precision products, autocast, GPUs, DTensors and code being traced
(`torch.compile` and the exporters see PyTorch's own ops) are never affected.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

_ENV = "GPT2KIT_FLOAT32_MATMUL"


def cpuinfo(field: str) -> str | None:
    """A field of /proc/cpuinfo's first processor ("vendor_id", "model name"); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def _default_choice() -> bool:
    choice = os.environ.get(_ENV, "auto").strip().lower()
    if choice not in ("auto", "onednn", "default"):
        raise ValueError(f"{_ENV} must be auto, onednn or default, got {choice!r}")
    if not torch.backends.mkldnn.is_available():
        return False
    if choice != "auto":
        return choice == "onednn"
    amd = cpuinfo("vendor_id") == "AuthenticAMD" or "AMD" in platform.processor()
    return amd and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# Decided at the first float32 product rather than at import: a mistyped environment value is then an error of
# the command that multiplies, not a traceback of `import gpt2kit` (and of `gpt2kit --help`).
_onednn_float32: bool | None = None


def use_onednn_float32(enabled: bool | None = None) -> bool:
    """Whether float32 products on the CPU go through oneDNN; with `enabled`, set it first (None keeps it)."""
    global _onednn_float32
    if enabled is not None:
        if enabled and not torch.backends.mkldnn.is_available():
            raise ValueError("oneDNN float32 products need PyTorch built with oneDNN (mkldnn), which this build lacks")
        _onednn_float32 = enabled
    elif _onednn_float32 is None:
        _onednn_float32 = _default_choice()
    return _onednn_float32


def is_plain(tensor: Tensor) -> bool:
    """A tensor that holds all its values here, not a DTensor shard of a tensor-parallel or FSDP model. The exact
    type avoids importing torch.distributed here to recognize a DTensor."""
    return type(tensor) in (Tensor, nn.Parameter)


def _dense(tensor: Tensor) -> bool:
    """Contiguous, or a transposed view of a contiguous matrix: oneDNN's fast kernels take these layouts. Rows with
    gaps (a column slice) send it to a reference kernel that took minutes for one GPT-2-sized product."""
    return tensor.is_contiguous() or (tensor.dim() == 2 and tensor.T.is_contiguous())


def is_transformed() -> bool:
    """Inside torch.func's grad, vmap or jvp, or forward-mode AD: a custom autograd.Function without their rules
    (setup_context, jvp, vmap) must step aside for PyTorch's own ops there."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _applies(*tensors: Tensor) -> bool:
    """oneDNN takes these float32 CPU tensors: plain (not DTensors or other subclasses), non-empty and dense (see
    _dense), outside autocast and outside code being traced (torch.compile, torch.export, the ONNX exporter),
    transformed (torch.func's grad, vmap, jvp; forward-mode AD) or watched by a dispatch mode (FlopCounterMode, fake
    tensors), which should see PyTorch's own ops."""
    return (not torch.jit.is_tracing() and not torch.compiler.is_compiling() and use_onednn_float32()
            and _get_current_dispatch_mode() is None and not torch.is_autocast_enabled("cpu") and not is_transformed()
            and all(is_plain(t) and t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0
                    and _dense(t) for t in tensors))


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs products of `dtype` on this CPU: float32 wherever PyTorch has oneDNN, bfloat16 only
    where the CPU has bf16 instructions (AVX512-BF16, AMX); elsewhere oneDNN refuses to build the kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias through oneDNN: x (rows, in), weight (out, in); either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b of 2-D tensors, through oneDNN where it applies. `out` is where PyTorch's kernel writes the result
    (a kept buffer); oneDNN returns a tensor of its own and leaves `out` alone."""
    if _applies(a, b):
        return onednn_linear(a, b.T)
    return torch.mm(a, b, out=out)


def weight_gradient(grad: Tensor, x: Tensor, add_to: Tensor | None = None) -> Tensor:
    """grad.T @ x, contiguous, or added into `add_to` (and that returned): a linear layer's weight gradient from
    its output's gradient (rows, out) and its input (rows, in). oneDNN computes the (in, out) product x.T @ grad
    faster when out >= in (2x at GPT-2's vocabulary), so that one is computed and read transposed then."""
    if not _applies(grad, x):
        return grad.T @ x if add_to is None else add_to.addmm_(grad.T, x)
    product = onednn_linear(x.T, grad.T).T if grad.shape[1] >= x.shape[1] else onednn_linear(grad.T, x.T)
    return product.contiguous() if add_to is None else add_to.add_(product)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad, rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if not _dense(grad):  # a gradient with gaps between rows (a slice's) would take oneDNN's reference kernel
            grad = grad.contiguous()
        want_x, want_weight, want_bias = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True (Hessian-vector products): products autograd can follow
            grad_x = linear(grad, weight.T).view(x.shape) if want_x else None
            grad_weight = linear(grad.T, rows.T) if want_weight else None
        else:
            grad_x = onednn_linear(grad, weight.T).view(x.shape) if want_x else None
            grad_weight = weight_gradient(grad, rows) if want_weight else None
        grad_bias = grad.sum(0) if want_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN (forward and backward) where it applies."""
    if _applies(x, weight, *(() if bias is None else (bias,))):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products may run through oneDNN (see the module's docstring). Same parameters,
    same state dict; LoRA, quantization and tensor parallelism treat it as the nn.Linear it is."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
