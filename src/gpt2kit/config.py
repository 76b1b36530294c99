"""GPT2Config: the model's shape, with HuggingFace `config.json` field names, plus named presets."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_text, read_json

# Keys HF writes into a GPT-2 config.json that describe nothing about the network itself.
_HF_BOOKKEEPING_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "task_specific_params",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "use_cache", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "n_ctx",
    "add_cross_attention", "problem_type", "gradient_checkpointing", "_attn_implementation_autoset",
}
# The generic names HF's GPT2Config also accepts for its fields (its attribute_map), and n_ctx, GPT-2's first
# name for the context.
_HF_ALIASES = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
               "max_position_embeddings": "n_positions", "n_ctx": "n_positions"}


# The config fields that decide the weights' shapes.
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "mlp_dim", "n_positions", "vocab_size", "tie_word_embeddings")


@dataclass
class GPT2Config:
    """Shape and regularisation of a GPT-2 network. Field names equal HF's `GPT2Config`."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    # Sequence classification head.
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, written back unchanged

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_labels"):
            value = getattr(self, name)
            if not (type(value) is int and value >= 1) and not (name == "n_inner" and value is None):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not (type(value) in (int, float) and 0 <= value < 1):
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings"):
            if type(getattr(self, name)) is not bool:  # "false" would read as true
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (type(self.layer_norm_epsilon) in (int, float) and self.layer_norm_epsilon > 0):
            raise ValueError(f"layer_norm_epsilon must be a number > 0, got {self.layer_norm_epsilon!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported: GPT-2 uses the tanh "
                "approximation of GELU ('gelu_new'); exact GELU ('gelu') is supported too")
        # reorder_and_upcast_attn is accepted: it only makes transformers compute half-precision attention scores
        # in float32, which gpt2kit's attention (SDPA, accumulating in float32, or written out in float32) does anyway.
        for name, supported, meaning in (
                ("scale_attn_weights", True, "scores not divided by sqrt(head_dim)"),
                ("scale_attn_by_inverse_layer_idx", False, "scores also divided by the layer's number"),
                ("add_cross_attention", False, "cross-attention blocks of an encoder-decoder model")):
            value = getattr(self, name) if name != "add_cross_attention" else self.extra.get(name, False)
            if value != supported:
                raise ValueError(f"{name}={value} ({meaning}) is not supported: gpt2kit implements GPT-2's "
                                 f"attention ({name}={supported})")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ValueError(f"id2label must map class ids to names, got {self.id2label!r}")
            try:
                self.id2label = {int(k): v for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ValueError(f"id2label's keys must be class ids (integers), got {list(self.id2label)}") from None
            self.num_labels = len(self.id2label)

    def replace(self, **overrides: Any) -> GPT2Config:
        """A copy with some fields changed, checked as a new config is; an unknown name is a ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; expected some of {sorted(known - {'extra'})}")
        labels = self.id2label if "id2label" not in overrides else overrides["id2label"]
        if "num_labels" in overrides and labels is not None and overrides["num_labels"] != len(labels):
            raise ValueError(f"num_labels={overrides['num_labels']} but id2label names {len(labels)} classes; "
                             f"give id2label=None with it, or new id2label")
        # Deep copies: a copy must never share the mutable extra/label dicts with its original (a preset's).
        copies = {name: copy.deepcopy(getattr(self, name)) for name in ("extra", "id2label", "label2id")}
        return dataclasses.replace(self, **{**copies, **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    # ---- dict / json -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True, source: str = "config") -> GPT2Config:
        """Build from a mapping. `strict` rejects unknown keys (YAML configs); HF config.json keys are kept."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key in known:
                kwargs[key] = value
            elif key in _HF_BOOKKEEPING_KEYS or key in _HF_ALIASES or not strict:
                extra[key] = value
            else:
                raise ValueError(f"{source}: unknown model field {key!r}; expected one of {sorted(known)}")
        # An alias means its field: left in `extra`, a num_attention_heads would be ignored and the heads wrong.
        for alias, name in _HF_ALIASES.items():
            if alias in extra:
                value = extra.pop(alias)
                if kwargs.setdefault(name, value) != value and alias != "n_ctx":
                    raise ValueError(f"{source}: {alias} ({value!r}) and {name} ({kwargs[name]!r}) disagree")
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values}

    def shape_changes(self, other: GPT2Config, *, classifier: bool = False) -> list[str]:
        """"field this -> other" for each field deciding the weights' shapes (and a classifier's num_labels)
        that differs: weights saved under one config load into the other only when this is empty."""
        fields = SHAPE_FIELDS + (("num_labels",) if classifier else ())
        return [f"{name} {getattr(self, name)} -> {getattr(other, name)}" for name in fields
                if getattr(self, name) != getattr(other, name)]

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json HF transformers (and llama.cpp's converter, which needs n_ctx) reads."""
        values = self.to_dict()
        if values["id2label"] is None:
            values.pop("id2label")
            values.pop("label2id")
        else:
            values.pop("num_labels")  # HF derives it from id2label
        values.update(model_type="gpt2", n_ctx=self.n_positions)
        values.setdefault("architectures", ["GPT2LMHeadModel"])
        return values

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPT2Config:
        path = Path(path)
        try:
            values = read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object")
        if values.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{path}: model_type is {values['model_type']!r}, expected 'gpt2'")
        return cls.from_dict(values, strict=False, source=str(path))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> GPT2Config:
        """transformers' call: the config of a model directory (or of a model in the local HF cache, or the one a
        LoRA run's directory adapts), with fields overridden."""
        from .checkpoint import load_config, resolve_model_dir
        return load_config(resolve_model_dir(name_or_path)).replace(**overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json as transformers writes it (and reads it back) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "config.json", json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named preset (see PRESETS), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)


PRESETS: dict[str, GPT2Config] = {
    # OpenAI's released shapes.
    "gpt2": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
    # MindFormers' large shapes: 13B is the Cerebras-GPT-13B shape (context 2048); 52B follows MindFormers'
    # gpt2_52b model config (64 layers, hidden 8192, 32 heads of 256, MLP x4, context 1024).
    "gpt2-13b": GPT2Config(n_layer=40, n_embd=5120, n_head=40, n_positions=2048),
    "gpt2-52b": GPT2Config(n_layer=64, n_embd=8192, n_head=32, n_positions=1024),
    # CPU-sized shapes for demos and tests.
    "gpt2-tiny": GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256),
    "gpt2-mini": GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=512),
}
