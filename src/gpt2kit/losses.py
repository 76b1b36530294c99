"""Language-model losses: mean cross-entropy over next-token targets, computed a chunk of rows at a time.

`lm_loss` takes logits the model already computed; `linear_cross_entropy` fuses the LM head into the loss so that
no (tokens x vocab) tensor is ever kept, which is what training uses. Targets equal to -100 are ignored, as in
F.cross_entropy; a batch without scored targets has loss 0 (F.cross_entropy would give NaN, which would poison
a weighted sum of micro-batch losses even at weight 0).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_matmul import is_transformed, mm, weight_gradient

IGNORE_INDEX = -100
# Logits per chunk: 32 MiB in float32. Large enough for efficient matmuls; larger float32 blocks are mmapped afresh
# for every chunk by glibc's malloc on CPU, and page-faulting them in cost more than the softmax itself.
CHUNK_ELEMENTS = 2 ** 23
# Bytes of logits per chunk of the fused LM head + loss (in the matmuls' dtype), at most: 256 MiB, e.g. 2668 rows of
# GPT-2's padded vocabulary in bf16. A chunk's three matmuls run on all its rows at once and every chunk pays a pass
# over the (vocab x C) weight gradient, so fewer, larger chunks are faster (1024 rows: 2 x 512 took 430 ms, 500 +
# 500 + 24 took 490 ms); the rows are split into equal chunks.
FUSED_CHUNK_BYTES = 2 ** 28
# Logits per slice of the float32 softmax inside a chunk: 32 MiB. Large enough to amortize per-op overhead.
SLICE_ELEMENTS = 2 ** 23
# The fused LM head runs its matmuls on the vocabulary padded to a multiple of this (GPT-2's 50257 -> 50304):
# odd matrix sizes fall off the GEMM kernels' fast tiles (measured here: the float32 LM-head matmuls of a training
# step 25 % faster; nanoGPT reports the same on GPUs). The padding exists only inside the loss.
VOCAB_MULTIPLE = 128
UNDERFLOW_LOG_PROBABILITY = -100 * math.log(2)  # see _softmax_loss
FLOAT16_PRODUCT_LIMIT = 2.0 ** 14  # a float16 chunk product stays below this bound (float16's max is 65504)


def _check_targets(targets: Tensor, vocab: int) -> None:
    """Every target in [0, vocab) or ignored, else one error naming the id (an added special token the model has
    no row for). The fused loss pads the vocabulary: unchecked, an id just past it would be scored against a -inf
    column, a loss of inf rather than F.cross_entropy's error. On a GPU the check is queued, not waited for."""
    outside = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    message = f"a target id is outside the model's vocabulary of {vocab} ids (0..{vocab - 1}, or {IGNORE_INDEX})"
    if targets.device.type != "cpu":
        torch._assert_async(~outside.any(), message)
    elif outside.any():
        raise ValueError(f"{message}: {int(targets[outside][0])}")


def _scored(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """(valid mask (N, 1), number of valid targets, targets (N, 1) with ignored ones replaced by index 0)."""
    _check_targets(targets, vocab)
    valid = (targets != IGNORE_INDEX).unsqueeze(1)
    return valid, valid.sum(), targets.unsqueeze(1).masked_fill(~valid, 0)


def _softmax_loss(logits: Tensor, vocab: int, targets: Tensor, valid: Tensor,
                  out: Tensor) -> tuple[Tensor, Tensor]:
    """float32 softmax of a slice of rows over their first `vocab` columns (padded columns after them get 0),
    written into `out`, and the slice's summed loss -log p[target] over its valid rows, in float64. One pass of
    exponentials where log_softmax followed by exp takes two; a target probability too small for its logarithm to
    keep float32's precision (below 2^-100, a loss above 69) is scored as log-sum-exp - logit instead."""
    probs = out.copy_(logits)
    probs[:, vocab:] = float("-inf")
    probs = torch.softmax(probs, -1, out=probs)
    log_probs = probs.gather(1, targets).log_()
    tiny = (log_probs < UNDERFLOW_LOG_PROBABILITY).squeeze(1)
    if tiny.any():
        scores = logits[tiny, :vocab].float()
        log_probs[tiny] = scores.gather(1, targets[tiny]) - scores.logsumexp(1, keepdim=True)
    return probs, -(log_probs * valid).sum(dtype=torch.float64)


def _mean(total: Tensor, n_valid: Tensor) -> Tensor:
    return (total / n_valid.clamp(min=1)).float()


def _reference_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The same mean loss from PyTorch's differentiable ops (float32 logits (N, V), targets (N,))."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows of (N, V) logits, computed in float32 a chunk of rows at a time.

    F.cross_entropy on bf16 logits first makes a float32 copy of the whole (N, V) matrix and keeps float32
    log-probabilities of it for backward. Here each chunk is upcast, reduced and its gradient (softmax - one_hot)
    / n_valid computed at once, stored in the logits' dtype: backward is a single multiply, and no float32
    (N, V) tensor ever exists."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_rows: int) -> Tensor:
        valid, n_valid, targets = _scored(labels, logits.shape[-1])
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        # float32 logits: work directly in the gradient's rows, saving a copy of the chunk.
        in_place = grad is not None and grad.dtype == torch.float32
        float_buffer = None if in_place else scratch_buffer(
            "chunk", (min(chunk_rows, logits.shape[0]), logits.shape[1]), torch.float32, logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = logits[rows]
            probs, loss = _softmax_loss(chunk, chunk.shape[1], targets[rows], valid[rows],
                                        grad[rows] if in_place else float_buffer[:chunk.shape[0]])
            total += loss
            if grad is not None:  # (softmax - one_hot) / n_valid; ignored rows 0
                scale = valid[rows] / n_valid.clamp(min=1)
                probs.mul_(scale).scatter_add_(1, targets[rows], -scale)
                if not in_place:
                    grad[rows] = probs
        ctx.save_for_backward(grad, logits, labels)  # logits, labels: references, for second-order gradients
        return _mean(total, n_valid)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        grad, logits, labels = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient again, from differentiable ops (HVPs, penalties)
            return torch.autograd.grad(_reference_loss(logits, labels), logits, grad_output, create_graph=True)[0], \
                None, None
        # A 0-dim float32 factor keeps grad's dtype and, on CPU, is applied in float32.
        return grad * grad_output, None, None


def lm_loss(logits: Tensor, targets: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Mean cross-entropy of logits[:, t] against targets[:, t] (already aligned); target -100 is ignored.
    Computed in float32 over chunks of about `chunk_elements` logits (see _ChunkedCrossEntropy)."""
    flat = logits.flatten(0, 1)
    if is_transformed():  # torch.func / forward-mode AD: PyTorch's own loss, which they know how to transform
        return _reference_loss(flat, targets.flatten())
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad mode: a detached input keeps the gradient from being computed.
        flat = flat.detach()
    return _ChunkedCrossEntropy.apply(flat, targets.flatten(), max(1, chunk_elements // flat.shape[-1]))


def padded_vocab_size(vocab_size: int) -> int:
    """The vocabulary the fused loss multiplies with: rounded up to a multiple of VOCAB_MULTIPLE."""
    return vocab_size + -vocab_size % VOCAB_MULTIPLE


def fused_chunk_rows(vocab_size: int, rows: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows per chunk of `linear_cross_entropy` by default: `rows` split into the fewest equal chunks of at most
    FUSED_CHUNK_BYTES of `dtype` logits."""
    most = max(1, FUSED_CHUNK_BYTES // (vocab_size * dtype.itemsize))
    return max(1, -(-rows // -(-rows // most))) if rows else 1


_workspace = threading.local()  # per thread: name -> the buffer last used under that name


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized scratch tensor that, on a CPU, is the same memory from call to call (per thread, while the
    shape, dtype and device stay the same). The logits blocks of the fused loss and of evaluation are tens to
    hundreds of MB: glibc hands out blocks over 32 MB as fresh mmaps, and faulting their pages in again on every
    training step cost about a third of the loss's time. On a GPU the caching allocator already reuses memory:
    allocate normally."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffers[name] = None  # drop the old block before allocating the new one
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            buffer = buffers[name] = torch.empty(shape, dtype=dtype)
    return buffer


def _padded(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight in `dtype` with zero rows appended up to padded_vocab_size: the weight itself when it needs
    neither, else one copy into a scratch buffer (the result lives only inside one call of the loss)."""
    vocab, size = weight.shape[0], padded_vocab_size(weight.shape[0])
    if size == vocab and weight.dtype == dtype:
        return weight
    padded = scratch_buffer("weight", (size, weight.shape[1]), dtype, weight.device)
    padded[:vocab] = weight
    padded[vocab:] = 0
    return padded


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T against targets, a chunk of rows at a time.

    Each chunk's logits are computed in one matmul, reduced in float32 a slice of rows at a time and turned into
    g = softmax - one_hot in place, which is then pushed through the two gradient matmuls: grad_hidden's rows are
    g @ weight, and the chunk's g.T @ hidden is the weight's gradient (added up in float32 over chunks). The
    1/n_valid factor and the mask of ignored rows are applied to those small results, never to the (rows, V)
    chunk. Only the two gradients are kept for backward, which just scales them: no (N, V) tensor outlives its
    chunk. Autocast is applied here, since backward runs outside the autocast context."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int,
                tied: TiedEmbeddingGradient | None) -> Tensor:
        device, device_type = hidden.device, hidden.device.type
        hidden_dtype, weight_dtype = hidden.dtype, weight.dtype
        dtype = weight_dtype
        if torch.is_autocast_enabled(device_type):  # as F.linear would under autocast
            dtype = torch.get_autocast_dtype(device_type)
            hidden = hidden.to(dtype)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        vocab = weight.shape[0]
        weight = _padded(weight, dtype)
        valid, n_valid, targets = _scored(targets, vocab)
        scale = valid / n_valid.clamp(min=1)  # (N, 1) float32: 1/n_valid, 0 for ignored rows
        grad_hidden = torch.empty_like(hidden, dtype=hidden_dtype) if want_hidden else None
        grad_weight = None
        # Scratch buffers reused by every chunk (see scratch_buffer): the chunk's logits in the matmuls' dtype,
        # which become g; a float32 slice for the softmax (the logits stay intact to score an underflowed target);
        # the weight gradient's product in the matmuls' dtype and, from a second chunk on, its float32 upcast (on
        # CPU, adding a low-precision tensor to a float32 one would make a fresh float32 copy of it; CUDA casts
        # in-kernel).
        low_precision = dtype != torch.float32
        logits_buffer = scratch_buffer("logits", (min(chunk_rows, hidden.shape[0]), weight.shape[0]), dtype,
                                       device)
        slice_rows = max(1, SLICE_ELEMENTS // weight.shape[0])
        float_buffer = scratch_buffer("float", (min(slice_rows, logits_buffer.shape[0]), weight.shape[0]),
                                      torch.float32, device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                x = hidden[rows]
                logits = mm(x, weight.T, out=logits_buffer[:x.shape[0]])
                for at in range(0, x.shape[0], slice_rows):
                    part = logits[at:at + slice_rows]
                    chunk_part = slice(start + at, start + at + part.shape[0])
                    probs, loss = _softmax_loss(part, vocab, targets[chunk_part], valid[chunk_part],
                                                float_buffer[:part.shape[0]])
                    total += loss
                    if want_hidden or want_weight:  # g = softmax - one_hot, in the matmuls' dtype
                        part.copy_(probs.scatter_add_(1, targets[chunk_part], -valid[chunk_part].float()))
                if want_hidden:
                    grad_hidden[rows] = mm(logits, weight) * scale[rows]
                if want_weight:
                    # Ignored rows are masked out of the product; padded columns of g are 0.
                    x = x.masked_fill(~valid[rows], 0)
                    if not low_precision:  # all padded rows (zero; sliced off below): oneDNN takes whole rows
                        grad_weight = weight_gradient(logits, x, add_to=grad_weight)
                    else:
                        shift = _float16_shift(x) if dtype == torch.float16 else 1.0
                        product = torch.mm(logits.T, x.mul_(shift) if shift != 1.0 else x,
                                           out=scratch_buffer("product", weight.shape, dtype, device))[:vocab]
                        if grad_weight is None:
                            grad_weight = product.to(torch.float32).div_(shift)
                        elif device_type == "cpu":
                            upcast = scratch_buffer("upcast", product.shape, torch.float32, device)
                            grad_weight.add_(upcast.copy_(product), alpha=1 / shift)
                        else:
                            grad_weight.add_(product, alpha=1 / shift)
        if grad_weight is not None:
            grad_weight = grad_weight[:vocab]
        # The weight gradient is a tensor of its own, never a view of a scratch buffer: autograd may keep it as the
        # parameter's .grad, and the tied embedding lookup adds into it. 1/n_valid is applied in backward, except
        # for low-precision weights: their float32 sum is averaged before rounding, as it could exceed fp16's range.
        n_scale = n_valid.clamp(min=1)
        if grad_weight is not None and weight_dtype != torch.float32:
            grad_weight = grad_weight.div_(n_scale).to(weight_dtype)
            n_scale = torch.ones_like(n_scale)
        ctx.save_for_backward(grad_hidden, grad_weight, n_scale)
        ctx.used, ctx.tied = False, tied
        return _mean(total, n_valid)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        # The gradients were made for this call alone: scale them in place rather than allocate their size again.
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss (retain_graph); "
                               "compute the loss again instead")
        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy (the loss fused with the LM head, return_logits=False) has no "
                               "second-order gradients (create_graph=True): compute the loss with return_logits=True")
        ctx.used = True
        grad_hidden, grad_weight, n_scale = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight.mul_(grad_output / n_scale)
            if ctx.tied is not None:  # the token lookup's backward adds its part and returns the sum
                ctx.tied.grad, grad_weight = grad_weight, None
        return None if grad_hidden is None else grad_hidden.mul_(grad_output), grad_weight, None, None, None


def _float16_shift(x: Tensor) -> float:
    """A power of two (exact to multiply by and to divide out) that keeps the float16 product g.T @ x in range:
    g's elements lie in [-1, 1], so each element of the product is at most rows x max|x| in magnitude. Many rows
    of one token with large hidden states would otherwise overflow it to inf, outside GradScaler's loss scale."""
    bound = x.shape[0] * float(x.abs().amax())
    if bound <= FLOAT16_PRODUCT_LIMIT or not math.isfinite(bound):  # non-finite inputs: nothing to save
        return 1.0
    return 2.0 ** -math.ceil(math.log2(bound / FLOAT16_PRODUCT_LIMIT))


class TiedEmbeddingGradient:
    """Hands the fused loss's gradient for an LM head tied to the token embedding over to the embedding lookup
    (`tied_embedding`), which runs later in backward: the lookup adds its rows into it and returns the weight's
    whole gradient. Otherwise autograd would give the lookup a zero-filled (vocab x C) gradient of its own and add
    the two (GPT-2 small on CPU: 150-300 ms per step, mostly page faults of the fresh 150 MB)."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, tied: TiedEmbeddingGradient) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, Tensor, None]:
        (ids,) = ctx.saved_tensors
        grad, ctx.tied.grad = ctx.tied.grad, None
        if grad is None:  # the loss gave no gradient (its backward did not run): the lookup's part alone
            grad = grad_output.new_zeros(ctx.weight_shape)
        return None, grad.index_add_(0, ids.flatten(), grad_output.flatten(0, -2).to(grad.dtype)), None


# torch.compiler.disable, with torch._dynamo imported at the first call rather than with gpt2kit: importing it
# costs every command (`gpt2kit --help` too) seconds on a slow CPU.
@torch._disable_dynamo  # its backward meets the loss's through a Python object
def tied_embedding(ids: Tensor, weight: Tensor, tied: TiedEmbeddingGradient) -> Tensor:
    """F.embedding(ids, weight) for a weight that `linear_cross_entropy(..., tied=tied)` also uses as its LM
    head: the weight's gradient is then one (vocab x C) tensor, the loss's with the lookup's rows added."""
    return _TiedEmbedding.apply(ids, weight, tied)


@torch._disable_dynamo  # runs eagerly inside a compiled model: its scratch buffers persist between calls
def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None,
                         tied: TiedEmbeddingGradient | None = None) -> Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T (hidden (N, C), weight (V, C)) against targets (N,),
    as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100) but without materializing the (N, V)
    logits or their gradient. Rows are processed `chunk_rows` at a time (default: the fewest equal chunks of at
    most 256 MiB of logits), on the vocabulary padded with zero rows to a multiple of VOCAB_MULTIPLE (masked out of
    the softmax).
    The loss is a float32 scalar; under autocast the matmuls run in the autocast dtype, and the gradients come
    back in the inputs' dtypes. With `tied`, the weight's gradient goes to the `tied_embedding` lookup of the same
    weight, which returns it with its own part added."""
    if not torch.is_grad_enabled():  # as in lm_loss: no gradients computed under no_grad
        hidden, weight = hidden.detach(), weight.detach()
    if chunk_rows is None:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        chunk_rows = fused_chunk_rows(padded_vocab_size(weight.shape[0]), hidden.shape[0], dtype)
    rows = max(1, chunk_rows)
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows, tied)
