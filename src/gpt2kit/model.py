"""GPT-2 in plain PyTorch, readable top to bottom.

Parameter names equal HuggingFace's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so checkpoints map 1:1;
projections are `nn.Linear` (HF stores them as transposed Conv1D; checkpoint.py transposes at the boundary), as
`cpu_matmul.Linear`, which multiplies float32 through oneDNN on CPUs where that is faster.
The model knows nothing of ranks, devices or parallelism: training/parallel.py wraps it from outside.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import GPT2Config
from .cpu_matmul import Linear, is_plain, is_transformed
from .losses import TiedEmbeddingGradient, linear_cross_entropy, lm_loss, tied_embedding


class KVCache:
    """Preallocated keys and values of every layer, filled in place during incremental decoding.

    Tensors are (n_layer, batch, n_head, max_length, head_dim); `length` counts the positions written so far.
    Preallocation keeps decode free of per-step concatenation and allocation.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (config.n_layer, batch_size, config.n_head, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (batch, n_head, T, head_dim) after the filled part; return all keys/values so far."""
        if k.dtype != self.keys.dtype and not torch.is_autocast_enabled(k.device.type):  # autocast: SDPA casts
            raise ValueError(f"the KV cache holds {self.keys.dtype} but the model computes in {k.dtype}: make the "
                             f"cache with KVCache(..., dtype={k.dtype})")
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write_at(self, layer: int, k: Tensor, v: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Static-shape `update`: write k/v (batch, n_head, T, head_dim) at the cache positions `index` (T,) and
        return the layer's whole keys/values (max_length positions). The position is data, not shape, so the
        step can be compiled once; `length` is the caller's to advance."""
        # The layer is indexed by a tensor too: an int would first take a view, and a compiled write into a view
        # of an input copies the whole layer's cache every step instead of writing T positions in place.
        at = (torch.tensor([layer], device=index.device), slice(None), slice(None), index)
        self.keys[at] = k.permute(2, 0, 1, 3)  # advanced indices first: (T, batch, n_head, head_dim)
        self.values[at] = v.permute(2, 0, 1, 3)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: Tensor) -> None:
        """Keep (and repeat) batch rows by index, e.g. to drop finished sequences or follow beams. With as many
        rows as before, in place: only the rows that change, over the written positions only (beam search does
        it every step, and most beams usually keep their own row)."""
        if index.numel() == self.batch_size:
            moved = (index != torch.arange(len(index), device=index.device)).nonzero().squeeze(1)
            if len(moved):
                end = self.length
                self.keys[:, moved, :, :end] = self.keys[:, index[moved], :, :end]
                self.values[:, moved, :, :end] = self.values[:, index[moved], :, :end]
            return
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache: KVCache | None,
                cache_index: Tensor | None = None, attentions: list[Tensor] | None = None) -> Tensor:
        """With `cache_index` (static decoding) k/v are written there and attention spans the whole cache,
        which `attn_mask` restricts to the filled positions. A list as `attentions` receives this layer's
        attention weights (B, n_head, T, keys), which SDPA does not give: attention is then written out."""
        B, T, _ = x.shape
        # Widths come from c_attn's output, not x: under tensor parallelism a rank holds a slice of the heads.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = (cache.update(self.layer_idx, k, v) if cache_index is None
                    else cache.write_at(self.layer_idx, k, v, cache_index))
        if cache_index is not None or attentions is not None:
            # The compiled decode step: one query per row over the whole cache. Written out, inductor fuses the
            # scores, mask and softmax (CPU: 10.5 against 13.3 ms per GPT-2 small int8 step); SDPA stays opaque.
            if attn_mask is None and is_causal:  # the queries are the last T of the keys
                attn_mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - T)
            # In float32, as SDPA's half-precision kernels and transformers' reorder_and_upcast_attn compute them:
            # a float16 product of large queries and keys overflows to inf (NaN after the softmax).
            scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = F.dropout(torch.softmax(scores, -1, dtype=torch.float32), self.attn_pdrop, self.training)
            if attentions is not None:
                attentions.append(probs.to(q.dtype))
            y = probs.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim)
        # GPT-2's weights were trained with the tanh approximation ("gelu_new"); "gelu" is the exact one (nanoGPT's).
        self.act = nn.GELU(approximate="none" if config.activation_function == "gelu" else "tanh")
        self.c_proj = Linear(config.mlp_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = True,
                cache: KVCache | None = None, cache_index: Tensor | None = None,
                attentions: list[Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache, cache_index, attentions)
        return x + self.mlp(self.ln_2(x))


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that skip padding: left-padded rows start counting at their first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_inputs(config: GPT2Config, input_ids: Tensor, attention_mask: Tensor | None,
                 past_key_values: KVCache | None) -> int:
    """Check that the new tokens fit the context and the cache and that `attention_mask` is (batch, past + new);
    return past, the number of cached positions. Shared with the ONNX backend (export.OnnxLMHeadModel)."""
    B, T = input_ids.shape
    past = past_key_values.length if past_key_values is not None else 0
    if past + T > config.n_positions:
        raise ValueError(f"sequence of {past + T} positions exceeds the model's context of "
                         f"{config.n_positions} (n_positions)")
    if past_key_values is not None and past + T > past_key_values.max_length:
        raise ValueError(f"KV cache holds {past_key_values.max_length} positions, {past + T} needed")
    if attention_mask is not None and attention_mask.shape != (B, past + T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
    return past


def build_attention_mask(attention_mask: Tensor | None, past: int, T: int,
                         device: torch.device | None = None) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for SDPA. A boolean (B, 1, T, past+T) mask is built only when padding or a cache
    needs it; otherwise SDPA's fused causal path is used. A padding query sees the real tokens before it, as in
    transformers; one with none (left padding) sees itself, so no row is fully masked (which would give NaN).
    `device`: where a mask built without `attention_mask` goes (the queries' device)."""
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0:
            return None, True
        if T == 1:
            return None, False  # a single new token sees every cached position
        attention_mask = None
    S = past + T
    if T == 1 and attention_mask is not None:
        # Decode step with padding: the causal part is trivial, so the mask is the padding mask, plus itself for a
        # query with no real key (as below: a padding query after real tokens sees only those).
        allowed = attention_mask[:, None, None, :S].to(torch.bool, copy=True)  # copy: the caller's mask stays
        allowed[..., -1] |= ~allowed.any(-1)
        return allowed, False
    device = attention_mask.device if attention_mask is not None else device  # the queries' (a GPU's)
    q_pos = torch.arange(past, S, device=device).view(T, 1)
    k_pos = torch.arange(S, device=device).view(1, S)
    allowed = (k_pos <= q_pos).unsqueeze(0)  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :S].bool()
        # A query with no real key before it (left padding) attends to itself: a fully masked row gives NaN.
        allowed |= (k_pos == q_pos) & ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1), False


class GPT2PreTrainedModel(nn.Module):
    """Weight initialisation and HuggingFace-style loading/saving shared by the GPT-2 models."""

    config: GPT2Config

    @property
    def device(self) -> torch.device:
        """Where the weights are (transformers' model.device)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (transformers' model.dtype); int8 or packed layers keep their activations in it."""
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each transformer block's activations in backward instead of storing them (transformers' call;
        train.recompute in a run config). The block's own forward is wrapped in place, so parameter names and
        saved checkpoints do not change and FSDP's hooks, which run around the forward, still see the block;
        dropout masks are reproduced, as checkpoint() replays the RNG state. Enabling it twice changes nothing."""
        blocks = self.h if isinstance(self, GPT2Model) else self.transformer.h
        for block in blocks:
            if not isinstance(block.forward, partial):
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return (self if isinstance(self, GPT2Model) else self.transformer).wte

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self, "lm_head", None)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' call after tokenizer.add_tokens: the token embedding and an untied LM head get
        `new_num_tokens` rows (default: as many as now), rounded up to a multiple of `pad_to_multiple_of`, and
        config.vocab_size follows. The modules stay (their hooks too) and get new parameters of the new shape with
        the old ones' requires_grad, tied as before. Kept rows keep their values. New rows start at the
        mean of the old ones (`mean_resizing`, transformers' default, which adds noise of 1e-9 times their
        covariance), so a new token starts out as an average token and the output distribution barely moves;
        without it they are drawn as the model initialises. Returns the embedding."""
        embedding, head = self.get_input_embeddings(), self.get_output_embeddings()
        rows = embedding.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of:
            rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if rows < 1:
            raise ValueError(f"new_num_tokens must be at least 1, got {rows}")
        if rows == embedding.num_embeddings and (head is None or head.weight.shape[0] == rows):
            return embedding  # as transformers: the same parameters, which an optimizer may already hold
        for module in filter(None, (embedding, head)):
            weight = getattr(module, "weight", None)  # int8 and packed heads hold theirs as buffers
            if not (isinstance(weight, Tensor) and is_plain(weight) and weight.is_floating_point()):
                raise ValueError("resize_token_embeddings needs float weights held whole; resize before "
                                 "quantizing or sharding the model")

        def resized(weight: nn.Parameter) -> nn.Parameter:
            # A new parameter, not new .data: autograd keeps the old shape for a parameter a live graph has used.
            new = weight.new_empty(rows, weight.shape[1])
            kept = min(rows, weight.shape[0])
            new[:kept] = weight[:kept]
            if mean_resizing:
                new[kept:] = weight.float().mean(0).to(weight.dtype)
            else:
                nn.init.normal_(new[kept:], mean=0.0, std=self.config.initializer_range)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        with torch.no_grad():
            tied = head is not None and head.weight is embedding.weight
            embedding.weight = resized(embedding.weight)
            if head is not None:
                head.weight = embedding.weight if tied else resized(head.weight)
        embedding.num_embeddings = rows
        if head is not None:
            head.out_features = rows
        self.config.vocab_size = rows
        return embedding

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def _apply(self, fn, recurse=True):
        # A layer that cannot follow a move or cast (quantization.PackedLinear) refuses it before any layer moves:
        # refused halfway, the layers before it would already be cast.
        for module in self.modules():
            if module is not self and hasattr(module, "check_apply"):
                module.check_apply(fn)
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        # Likewise for loading: a layer that cannot take what it is given (quantization's int8 and packed layers)
        # refuses before any layer loads.
        for name, module in self.named_modules():
            if hasattr(module, "check_load"):
                module.check_load(state_dict, f"{name}.")
        # And float weights refuse an int8 model's integer ones: copied in, they would read as weights of +-127
        # (a tied head's into the embedding too), with strict=False without any error.
        own = dict(self.named_parameters(remove_duplicate=False))
        for key, value in state_dict.items():
            if key in own and own[key].is_floating_point() and not value.is_floating_point():
                raise ValueError(f"{key}: {value.dtype} weights (an int8-quantized model's state_dict?) cannot load "
                                 "into float weights; load the float weights, then quantize_int8")
        return super().load_state_dict(state_dict, strict, assign)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied LM head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def count_parameters(cls, config: GPT2Config) -> int:
        """num_parameters of this architecture at `config`, counted without allocating any (on the meta device).
        Also what an int8 or packed model stands for: those layers hold their weights as buffers."""
        with torch.device("meta"):
            return cls(config).num_parameters()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", torch_dtype: torch.dtype | str | None = None,
                        **config_overrides):
        """Load an HF-format directory (or a model found in the local HF cache; never the network). `dtype`: a
        torch dtype or its name ("bfloat16"); None or "auto" keeps the checkpoint's, as transformers does
        (`torch_dtype` is transformers' older name for it)."""
        from .checkpoint import load_pretrained

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("give dtype or its older name torch_dtype, not both")
            dtype = torch_dtype
        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str | None = None) -> None:
        """Write config.json + model.safetensors (sharded with an index when `max_shard_size` is given)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory, max_shard_size=max_shard_size)


class GPT2Model(GPT2PreTrainedModel):
    """Embeddings, the stack of blocks and the final LayerNorm; returns a BaseModelOutputWithPast."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if type(self) is GPT2Model:
            self._init_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, token_type_ids: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None
                ) -> BaseModelOutputWithPast | tuple[Any, ...]:
        """`attention_mask` (B, past+T) marks real tokens with 1; it covers cached positions too. `inputs_embeds`
        (B, T, C), when given, replaces the token embeddings wte(input_ids); `token_type_ids` (B, T) add their
        rows of wte, as in transformers' GPT-2. `use_cache=True` without `past_key_values` starts a KVCache of the
        whole context (returned as past_key_values, to pass back; a KVCache of your own can be smaller);
        `return_dict=False` returns `to_tuple()`. `output_hidden_states` also returns
        each block's input and the final output (transformers' n_layer + 1 tensors); `output_attentions` each
        block's attention weights (B, n_head, T, past+T), attention then written out instead of SDPA's kernel.
        A padding position's query attends to the real tokens before it, as in transformers, or to itself when
        there are none (left padding; transformers' weights there are meaningless too)."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("give input_ids (B, T) or inputs_embeds (B, T, n_embd)")
        if input_ids is not None and inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)} and input_ids "
                             f"{tuple(input_ids.shape)}: they must agree in (batch, length)")
        tokens = inputs_embeds[..., 0] if input_ids is None else input_ids  # (B, T): what the checks read
        B, T = tokens.shape
        if use_cache and past_key_values is None:
            weight = self.wte.weight
            past_key_values = KVCache(self.config, B, self.config.n_positions, dtype=weight.dtype,
                                      device=weight.device)
        past = check_inputs(self.config, tokens, attention_mask, past_key_values)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=tokens.device).unsqueeze(0)
        attn_mask, is_causal = build_attention_mask(attention_mask, past, T, tokens.device)

        tokens = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = tokens + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.drop(x)
        hidden_states: list[Tensor] = []
        attentions: list[Tensor] | None = [] if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                hidden_states.append(x)
            x = block(x, attn_mask, is_causal, past_key_values, attentions=attentions)
        if past_key_values is not None:
            past_key_values.length = past + T
        x = self.ln_f(x)
        out = BaseModelOutputWithPast(x, past_key_values, (*hidden_states, x) if output_hidden_states else None,
                                      tuple(attentions) if output_attentions else None)
        return out.to_tuple() if return_dict is False else out


class ModelOutput:
    """transformers' ways into a model's output dataclass: a field by name (`out.logits`, `out["logits"]`) or, the
    fields left None skipped, by position (`out[0]`), and `keys()`, `to_tuple()`, `"loss" in out`."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.keys())

    def __getitem__(self, key: str | int | slice) -> Any:
        if not isinstance(key, str):
            return self.to_tuple()[key]
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    """What GPT2Model returns (transformers' names): the final hidden states (B, T, C), the cache, and with
    output_hidden_states the embeddings' and every block's output, the last after ln_f; with output_attentions
    every block's attention weights."""
    last_hidden_state: Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Tensor | None = None  # first, as in transformers: out[0] is the loss when there is one
    logits: Tensor | None = None  # None when the loss was fused with the LM head (return_logits=False)
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # with output_hidden_states: see BaseModelOutputWithPast
    attentions: tuple[Tensor, ...] | None = None  # with output_attentions: see BaseModelOutputWithPast


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while generating, scoring or exporting (a Trainer may pass its model mid-training); the
    model's mode is restored afterwards, also after an error (and also when something inside changed it: the ONNX
    exporter restores its wrapper's training mode onto the wrapped model)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def inference(model: nn.Module) -> contextlib.AbstractContextManager:
    """eval_mode for one call of a model in training mode (a generator may interleave with training or with another
    generator, and must not leave the model in the wrong mode); nothing, no walk over the modules, otherwise."""
    return eval_mode(model) if model.training else contextlib.nullcontext()


def plain_head_weight(head: nn.Module) -> Tensor | None:
    """The (vocab, n_embd) weight of an LM head that is exactly an nn.Linear without bias holding a plain tensor,
    which callers may multiply with directly; None for any other head (a DTensor, LoRA or int8 layers), which
    must run as its own module."""
    if type(head) in (nn.Linear, Linear) and head.bias is None and is_plain(head.weight):
        return head.weight
    return None


class GPT2LMHeadModel(GPT2PreTrainedModel):
    """GPT-2 with the language-modelling head tied to the token embedding."""

    # transformers' declaration of the tie, which peft reads: trainable token rows of the embedding (LoRA with
    # added tokens) then reach the tied head too.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        # Generation defaults (generate, pipelines, chat) beside GenerationConfig's: generation_config.json's
        # settings, read by from_pretrained and written by save_pretrained.
        self.generation_config: dict[str, Any] = {}
        self.transformer = GPT2Model(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self._init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, targets: Tensor | None = None,
                past_key_values: KVCache | None = None, logits_to_keep: int | Tensor = 0,
                return_logits: bool = True, output_hidden_states: bool = False,
                output_attentions: bool = False, inputs_embeds: Tensor | None = None,
                token_type_ids: Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None) -> CausalLMOutput | tuple[Any, ...]:
        """Loss from `labels` (HF convention: equal to input_ids, shifted inside) or `targets` (already shifted:
        targets[:, t] is the token after input_ids[:, t], as gpt2kit's datasets yield). `logits_to_keep=n`
        computes logits for the last n positions only (generation needs just the last one); a tensor of
        positions, those positions' (as transformers). `output_hidden_states` adds the embeddings' and every
        block's output (transformers' tuple, n_layer + 1), `output_attentions` every block's attention weights;
        `inputs_embeds`, `token_type_ids`, `use_cache` and `return_dict` as in GPT2Model.

        With a loss and `return_logits=False` (training), the LM head is fused into the loss
        (`linear_cross_entropy`): no (tokens x vocab) logits are kept, `logits` is None and `logits_to_keep` is
        ignored. A head that is not a plain nn.Linear with a plain weight (tensor-parallel DTensor, LoRA or int8
        layers) takes the unfused path, and then the logits are returned as usual."""
        weight = None
        if (labels is not None or targets is not None) and not return_logits and not is_transformed():
            weight = plain_head_weight(self.lm_head)
        fused = weight is not None
        tied = None
        wte = self.transformer.wte  # a plain lookup only: hooks or an Embedding subclass must still run
        plain_lookup = (type(wte) is nn.Embedding and not (wte._forward_hooks or wte._forward_pre_hooks)
                        and wte.padding_idx is None and wte.max_norm is None and not wte.scale_grad_by_freq)
        if (fused and plain_lookup and inputs_embeds is None and token_type_ids is None and weight is wte.weight
                and weight.requires_grad and torch.is_grad_enabled()):
            # The head's and the lookup's gradients of the shared weight are summed in one tensor (see losses.py).
            tied = TiedEmbeddingGradient()
            inputs_embeds = tied_embedding(input_ids, weight, tied)
        out = self.transformer(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                               output_hidden_states, output_attentions, token_type_ids, use_cache)
        hidden, cache = out.last_hidden_state, out.past_key_values
        if fused:
            if labels is not None:
                hidden, targets = hidden[:, :-1], labels[:, 1:]
            loss = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), tied=tied)
            result = CausalLMOutput(loss, None, cache, out.hidden_states, out.attentions)
            return result.to_tuple() if return_dict is False else result
        if isinstance(logits_to_keep, Tensor) or logits_to_keep:
            if labels is not None or targets is not None:  # as transformers refuses it
                raise ValueError("logits_to_keep computes the last positions' logits only; the loss of labels or "
                                 "targets needs them all")
            hidden = hidden[:, logits_to_keep if isinstance(logits_to_keep, Tensor) else slice(-logits_to_keep, None)]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        elif targets is not None:
            loss = lm_loss(logits, targets)
        result = CausalLMOutput(loss, logits, cache, out.hidden_states, out.attentions)
        return result.to_tuple() if return_dict is False else result

    def decode_step(self, input_ids: Tensor, position_ids: Tensor, cache_index: Tensor, attn_mask: Tensor,
                    cache: KVCache) -> Tensor:
        """Logits (B, V) of one decode step whose shapes never change, so torch.compile captures it once
        (and CUDA graphs can replay it). input_ids, position_ids (B, 1); cache_index (1,): the cache position
        written; attn_mask (B, 1, 1, max_length) bool: True at each row's real cached tokens and at cache_index.
        Unlike forward() nothing is checked and nothing branches on tensor values; cache.length is not advanced."""
        t = self.transformer
        x = t.drop(t.wte(input_ids) + t.wpe(position_ids))
        for block in t.h:
            x = block(x, attn_mask, False, cache, cache_index)
        return self.lm_head(t.ln_f(x))[:, -1]

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options) -> Any:
        """Prompt + new tokens (KV-cached decoding); options as `gpt2kit.generation.generate`."""
        from .generation import generate
        return generate(self, input_ids, attention_mask, **options)

    def compute_transition_scores(self, sequences: Tensor, scores: tuple[Tensor, ...],
                                  beam_indices: Tensor | None = None, normalize_logits: bool = False) -> Tensor:
        """Each generated token's score (B, steps), as transformers' call: see generation.compute_transition_scores."""
        from .generation import compute_transition_scores
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None  # first, as in transformers: out[0] is the loss when there is one
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # with output_hidden_states: see BaseModelOutputWithPast
    attentions: tuple[Tensor, ...] | None = None  # with output_attentions: see BaseModelOutputWithPast


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def classification_loss(logits: Tensor, labels: Tensor, problem_type: str | None) -> Tensor:
    """transformers' sequence-classification loss. config.json's `problem_type` picks it; without one, one label
    is regression, integer labels are single-label classes and float labels a multi-label target."""
    if problem_type is None:
        problem_type = ("regression" if logits.shape[-1] == 1 else "single_label_classification"
                        if not labels.is_floating_point() else "multi_label_classification")
    if problem_type == "regression":
        if logits.shape[-1] == 1:  # labels (B,) or (B, 1) alike, as transformers squeezes both
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().reshape(logits.shape[:-1]))
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)}, got {problem_type!r}")


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """GPT-2 with a linear classifier on the hidden state of each row's last real (non-pad) token."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        self._init_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, inputs_embeds: Tensor | None = None,
                token_type_ids: Tensor | None = None, return_dict: bool | None = None
                ) -> SequenceClassifierOutput | tuple[Any, ...]:
        """Logits of each row's last real token: by `attention_mask`, else the last that is not pad_token_id,
        else (inputs_embeds alone, as transformers) the last position. Other inputs as in GPT2Model."""
        out = self.transformer(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                               output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                               token_type_ids=token_type_ids)
        hidden = out.last_hidden_state
        B, T = hidden.shape[:2]
        if attention_mask is not None:
            real = attention_mask.bool()
        elif self.config.pad_token_id is not None and input_ids is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        # Rightmost real token of each row: works for left and right padding alike.
        last = (torch.arange(T, device=hidden.device) * real).argmax(-1)
        logits = self.score(hidden[torch.arange(B, device=hidden.device), last])
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.config.extra.get("problem_type"))
        result = SequenceClassifierOutput(logits=logits, loss=loss, hidden_states=out.hidden_states,
                                          attentions=out.attentions)
        return result.to_tuple() if return_dict is False else result
