"""Per-GPU memory of training a GPT-2 with a given parallel layout, computed from the model's shape.

What each GPU holds, for AdamW training as gpt2kit runs it (training/parallel.py):
- weights: float32 master weights of this rank's shard (tensor parallel splits the matrices, the token embedding
  and the LM head, tied or not; FSDP/HSDP splits everything over `shard`; DDP keeps a full copy);
- gradients: float32, sharded like the weights;
- optimizer: AdamW's two float32 moments, sharded like the weights;
- gathered: FSDP's unsharded working copies, in bf16 with bf16 (FSDP's param_dtype), else float32: the root
  module (embeddings, final LayerNorm; kept gathered through forward and backward), two blocks in flight (the
  current one and the prefetched one), and the unsharded gradients of one block, in the same dtype; with bf16
  but without FSDP, autocast's bf16 copies of the matrices
  (not of an untied embedding, which is only looked up, and without tensor parallelism not of the head: the
  fused loss makes its own, counted under logits);
- activations: saved for backward over one micro-batch, per block s*b*h*(2 + 2*4 + (2 + 12/t) * a) bytes, where a
  is 2 (bf16) or 4 (fp32) bytes and t the tensor-parallel degree: Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", Table 2) without the attention-score terms, which PyTorch's fused
  scaled_dot_product_attention never stores; 2 bytes are the two dropout masks, 2*4 the two LayerNorm inputs,
  which autocast keeps in float32. With activation checkpointing ("recompute") a block keeps only its input, the
  residual stream (float32 under autocast; bf16 with FSDP's bf16 parameters, which fp16 runs do not use: the
  trainer sets FSDP's param_dtype for bf16 only), and one block's full set exists
  at a time during backward; beside the blocks, the embedding sum (a bytes) and the final LayerNorm's float32
  input;
- logits: without tensor parallelism the LM head is fused into the loss (gpt2kit.losses.linear_cross_entropy):
  one chunk of at most FUSED_CHUNK_BYTES of logits of the padded vocabulary P exists at a time (in the compute
  dtype; in bf16 with a float32 slice of SLICE_ELEMENTS for the softmax), plus P*h*(4 + a) bytes for the head's
  float32 gradient and its padded copy in the compute dtype, and in bf16 P*h*2 more for a chunk's bf16 product
  (P*h*6 when there are several chunks: their float32 upcast). With tensor parallelism the (s, b, vocab) logits
  are gathered on every rank, with their float32 copy for the loss and its gradient: s*b*V*(a + 8) bytes.
Allocator fragmentation, communication buffers and the CUDA context (about 1-3 GB) are not included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import GPT2Config
from ..losses import SLICE_ELEMENTS, fused_chunk_rows, padded_vocab_size
from .parallel import ParallelConfig, check_tensor_parallel

GIB = 2**30
# Parameters split by tensor parallelism (see apply_tensor_parallel); the rest are replicated on its ranks.
_TENSOR_PARALLEL = re.compile(r"(attn\.c_attn\.weight|attn\.c_proj\.weight|mlp\.c_fc\.(weight|bias)|"
                              r"mlp\.c_proj\.weight|transformer\.wte\.weight|lm_head\.weight)$")


@dataclass
class MemoryEstimate:
    """Bytes per GPU (see the module docstring for what each term holds)."""

    config: GPT2Config
    parallel: ParallelConfig
    micro_batch_size: int
    seq_len: int
    precision: str
    recompute: bool
    parameters: int  # parameters whose master copy lives on this GPU
    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.logits

    def rows(self) -> list[tuple[str, float]]:
        return [("weights (fp32 master)", self.weights), ("gradients (fp32)", self.gradients),
                ("AdamW moments (fp32)", self.optimizer), ("gathered / cast copies", self.gathered),
                ("activations", self.activations), ("logits + loss", self.logits), ("total", self.total)]


def _parameter_split(config: GPT2Config) -> tuple[int, int, int, int]:
    """(tensor-parallel-split parameters, replicated parameters, of which in one block: split, replicated)."""
    from ..model import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    split = replicated = block_split = block_replicated = 0
    for name, param in model.named_parameters():  # the tied head is listed once, as the token embedding
        is_split = bool(_TENSOR_PARALLEL.search(name))
        if is_split:
            split += param.numel()
        else:
            replicated += param.numel()
        if name.startswith("transformer.h.0."):
            block_split += param.numel() if is_split else 0
            block_replicated += 0 if is_split else param.numel()
    return split, replicated, block_split, block_replicated


def estimate_memory(config: GPT2Config, parallel: ParallelConfig, *, micro_batch_size: int = 1,
                    seq_len: int | None = None, precision: str = "bf16", recompute: bool = True) -> MemoryEstimate:
    """Per-GPU memory of AdamW training with the resolved degrees `parallel` (data x shard x tensor GPUs)."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if min(parallel.data, parallel.shard, parallel.tensor) < 1:
        raise ValueError("estimate_memory needs resolved degrees (no -1): call ParallelConfig.resolve(world_size)")
    if seq_len is not None and seq_len > config.n_positions:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context (n_positions={config.n_positions})")
    t, shard = parallel.tensor, parallel.shard
    check_tensor_parallel(config, t, shard)
    s = seq_len or config.n_positions
    b, h, v, layers = micro_batch_size, config.n_embd, config.vocab_size, config.n_layer
    act = 4 if precision == "fp32" else 2

    split, replicated, block_split, block_replicated = _parameter_split(config)
    per_tensor_rank = split / t + replicated  # one tensor-parallel rank's parameters
    local = per_tensor_rank / shard
    block = block_split / t + block_replicated
    root = per_tensor_rank - layers * block
    fsdp_bytes = 2 if precision == "bf16" else 4  # FSDP gathers bf16 (param_dtype) for bf16 only
    if shard > 1:
        gathered = (root + 3 * block) * fsdp_bytes  # the block's unsharded gradients are in the param dtype too
    elif act == 2:
        # autocast's bf16 copies of the matrices: not of an untied embedding (only looked up), and not of the head
        # without TP (the fused loss casts it itself)
        gathered = (split - (0 if config.tie_word_embeddings else v * h) - (v * h if t == 1 else 0)) / t * act
    else:
        gathered = 0.0

    per_block = s * b * h * (2 + 2 * 4 + (2 + 12 / t) * act)
    residual = 2 if fsdp_bytes == 2 and shard > 1 else 4  # the blocks' input: float32 unless FSDP computes in bf16
    if recompute:
        activations = layers * s * b * h * residual + per_block
    else:
        activations = layers * per_block
    activations += s * b * h * (act + 4)  # embedding sum and final LayerNorm input
    if t == 1:
        compute = torch.bfloat16 if act == 2 else torch.float32
        padded = padded_vocab_size(v)
        rows = fused_chunk_rows(padded, s * b, compute)
        logits = rows * padded * act + padded * h * (4 + act)
        if act == 2:
            logits += SLICE_ELEMENTS * 4 + padded * h * (2 if rows == s * b else 6)
    else:
        logits = s * b * v * (act + 8)
    return MemoryEstimate(config, parallel, micro_batch_size, s, precision, recompute, parameters=round(local),
                          weights=4 * local, gradients=4 * local, optimizer=8 * local, gathered=gathered,
                          activations=activations, logits=logits)


def format_memory_estimate(name: str, estimate: MemoryEstimate) -> str:
    p = estimate.parallel
    gpus = p.data * p.shard * p.tensor
    title = (f"memory per GPU: {name} on {gpus} GPUs, {p.describe()} (data={p.data} shard={p.shard} "
             f"tensor={p.tensor}); micro-batch {estimate.micro_batch_size} x {estimate.seq_len} tokens, "
             f"{estimate.precision}, recompute {'on' if estimate.recompute else 'off'}")
    lines = [title, f"  {'parameters on this GPU':<26}{estimate.parameters / 1e9:>10.3f} B"]
    lines += [f"  {label:<26}{value / GIB:>10.2f} GiB" for label, value in estimate.rows()]
    return "\n".join(lines)


def parse_degrees(text: str) -> ParallelConfig:
    """'shard=8,tensor=2' -> ParallelConfig(data=1, shard=8, tensor=2); degrees not named are 1."""
    degrees, given = {"data": 1, "shard": 1, "tensor": 1}, set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in degrees or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--parallel {text!r}: expected comma-separated data=N, shard=N, tensor=N with N >= 1, "
                             f"got {item!r}")
        if key.strip() in given:
            raise ValueError(f"--parallel {text!r}: {key.strip()} is given twice")
        given.add(key.strip())
        degrees[key.strip()] = int(value)
    return ParallelConfig(**degrees)


def memory_report(model: str, parallel: str, *, micro_batch_size: int = 1, seq_len: int | None = None,
                  precision: str = "bf16", recompute: bool = True) -> str:
    """`gpt2kit info MODEL --parallel shard=8,tensor=2`: the per-GPU memory table of a preset or model directory."""
    from ..checkpoint import named_config

    config = named_config(model)
    degrees = parse_degrees(parallel)
    estimate = estimate_memory(config, degrees, micro_batch_size=micro_batch_size, seq_len=seq_len,
                               precision=precision, recompute=recompute)
    return format_memory_estimate(model, estimate)
