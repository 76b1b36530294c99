"""HuggingFace-format model directories: find, read, convert and write GPT-2 weights.

One on-disk model format: config.json + model.safetensors (or shards + model.safetensors.index.json).
HF stores the attention/MLP projections as Conv1D with (in, out) weights; we use nn.Linear (out, in), so
`hf_to_gpt2kit` / `gpt2kit_to_hf` transpose them at this boundary and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .config import PRESETS, GPT2Config
from .files import atomic_directory, read_json
from .tokenizer import has_tokenizer_files, is_tokenizer_file

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"  # transformers' file of a model's generation defaults
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

_CONV1D_WEIGHTS = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# What write_hf_directory owns in a model directory (replaced on every save; any other file stays).
_MODEL_FILE = re.compile(r"config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_HF_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")  # causal-mask buffers in old HF checkpoints

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A model directory or weight file that cannot be used, with the reason."""


# ---- locating a model ---------------------------------------------------------------------------------------
def hf_cache_dirs() -> list[Path]:
    """Where the local HuggingFace hub cache lives, resolved as huggingface_hub does: HF_HUB_CACHE, else the
    older HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, HF_HOME defaulting to $XDG_CACHE_HOME/huggingface
    (~/.cache/huggingface); "~" and $VARIABLES in them expanded."""
    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return [expand(os.environ[variable])]
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return [expand(os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")) / "hub"]


def _cached_snapshot(repo: Path) -> Path | None:
    """The snapshot of a cached repo that its refs/main names, as huggingface_hub picks it; else the newest."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        named = repo / "snapshots" / ref.read_text().strip()
        if (named / CONFIG_NAME).exists():
            return named
    candidates = sorted((d for d in (repo / "snapshots").glob("*") if (d / CONFIG_NAME).exists()),
                        key=lambda d: d.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """An existing directory, or the snapshot of `name` in the local HF cache. Never the network."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory (config.json + weights), got a file")
    name = str(name_or_path)
    repo_ids = [name] if "/" in name else [name, f"openai-community/{name}"]
    searched = []
    for cache in hf_cache_dirs():
        for repo_id in repo_ids:
            repo = cache / f"models--{repo_id.replace('/', '--')}"
            searched.append(str(repo / "snapshots"))
            snapshot = _cached_snapshot(repo)
            if snapshot is not None:
                return snapshot
    hint = (f" ('{name}' is a preset: build it with GPT2LMHeadModel(GPT2Config.from_name('{name}')) for random "
            "weights)") if name in PRESETS else ""
    raise CheckpointError(
        f"no model directory or local HF cache entry for {name!r}{hint}. gpt2kit never downloads: put "
        f"config.json + model.safetensors in a directory and pass its path, or fill the HF cache "
        f"(searched: {', '.join(searched)})")


# ---- reading weights ----------------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return {key: state[key] for key in sorted(state)}  # the order transformers lists them in (see state_dtype)


def unpickling_reason(err: Exception) -> str:
    """The reason in torch.load(weights_only=True)'s error, without its advice to load with weights_only=False
    (which would run the file's code)."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith(advice))
    return reason.split(" Please use ")[0] or type(err).__name__  # nor its advice to allow the file's functions


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors does: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[8:] == b'{"'


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a .bin is a pickle and must never run code from the file.
        # mmap needs torch's zip format; older files (torch < 1.6, some hub uploads) are read whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if _is_safetensors(path):
            raise CheckpointError(f"{path}: is a safetensors file; name it model.safetensors") from None
        raise CheckpointError(f"{path}: holds more than tensors and plain containers, which loading never runs "
                              f"({unpickling_reason(err)})") from None
    except Exception as err:  # torch raises many types for bad pickles; report them all the same way
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # e.g. a training checkpoint {"model": {...}, "step": 10}
            raise CheckpointError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor; expected a model's "
                                  "state dict (names -> tensors)")
    return state


def load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weight file not found")
    return _load_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path)


def _load_shards(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = read_json(index_path, error=CheckpointError)["weight_map"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(err).__name__}: {err})") from None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_weight_file(index_path.parent / shard))
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but absent from the shards: {sorted(missing)[:5]}")
    return state


def load_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-format directory, whatever the layout (single file, shards, .bin or safetensors).
    A directory holding several layouts (a hub repo given safetensors beside its .bin files) is read in
    transformers' order: safetensors before pickles, a single file before shards."""
    path = _weights_path(Path(model_dir))
    if path is None:
        raise CheckpointError(f"{model_dir}: no weights found (expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
                              f"{BIN_NAME} or {BIN_INDEX_NAME})")
    return _load_shards(path) if path.name.endswith(".index.json") else load_weight_file(path)


def _weights_path(model_dir: Path) -> Path | None:
    """The weight file or shard index a directory is read from, in transformers' order."""
    return next((model_dir / name for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME)
                 if (model_dir / name).exists()), None)


# ---- HF <-> gpt2kit names -----------------------------------------------------------------------------------
# The heads transformers' GPT-2 classes put beside the backbone: LM, sequence classification, multiple choice,
# token classification, question answering.
_HF_HEADS = ("lm_head.", "score.", "multiple_choice_head.", "classifier.", "qa_outputs.")


def hf_to_gpt2kit(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an HF GPT-2 state dict (a bare GPT2Model or any of transformers' GPT-2 heads) onto `model`'s names."""
    names = model.state_dict().keys()
    has_transformer = any(k.startswith("transformer.") for k in names)
    out = {}
    for key, tensor in state.items():
        if _HF_BUFFERS.search(key) or (key.startswith(_HF_HEADS) and key not in names):
            continue  # a head this model does not have, as transformers skips it (an LM file into GPT2Model)
        if has_transformer and not key.startswith(("transformer.", *_HF_HEADS)):
            key = "transformer." + key  # a bare GPT2Model checkpoint
        elif not has_transformer:
            key = key.removeprefix("transformer.")
        if _CONV1D_WEIGHTS.search(key):
            tensor = tensor.t()
        out[key] = tensor
    if model.config.tie_word_embeddings and has_transformer:
        # One matrix, stored under either name: HF ties the head to the embedding whichever the file holds.
        if "transformer.wte.weight" not in out and "lm_head.weight" in state:
            out["transformer.wte.weight"] = state["lm_head.weight"]
        if "lm_head.weight" in names and "transformer.wte.weight" in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def has_separate_head(state: dict[str, torch.Tensor]) -> bool:
    """Whether an HF state dict holds an LM head that differs from its token embedding: transformers then keeps
    the two apart whatever config.json's tie_word_embeddings says (tied files store one of them, or equal ones)."""
    head = state.get("lm_head.weight")
    wte = state.get("transformer.wte.weight", state.get("wte.weight"))
    return head is not None and wte is not None and not (head.shape == wte.shape and torch.equal(head, wte))


def is_model_file(name: str) -> bool:
    """Whether a file of this name in a model directory is its config or (a shard of) its weights."""
    return _MODEL_FILE.fullmatch(name) is not None


def is_adapter_file(name: str) -> bool:
    """Whether a file of this name in a model directory is a LoRA adapter's or the adapted model's config."""
    return name.startswith("adapter_") or name == ADAPTED_CONFIG_NAME


def is_saved_model_file(name: str) -> bool:
    """Whether a file of this name is part of a saved model directory: its config and weights, its tokenizer, or
    its LoRA adapters and the adapted model's config (what writing a model there replaces)."""
    return is_model_file(name) or is_tokenizer_file(name) or is_adapter_file(name)


def untied_if_separate(config: GPT2Config, state: dict[str, torch.Tensor], model_dir: Path) -> GPT2Config:
    """`config` untied (with a warning) when it ties the head but `state` holds a separate one (has_separate_head):
    the model transformers loads from such a directory."""
    if config.tie_word_embeddings and has_separate_head(state):
        warnings.warn(f"{model_dir}: config.json ties the LM head to the token embedding, but the weights hold an "
                      f"lm_head.weight of their own; loaded untied, as transformers does", stacklevel=4)
        return config.replace(tie_word_embeddings=False)
    return config


def gpt2kit_to_hf(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict in HF's layout: Conv1D weights transposed, the tied LM head left out (HF re-ties it).
    `state` replaces model.state_dict(), e.g. full weights gathered from a sharded model."""
    out = {}
    for key, tensor in (model.state_dict() if state is None else state).items():
        key = key.replace("_orig_mod.", "")  # never leak torch.compile's wrapper into saved weights
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if _CONV1D_WEIGHTS.search(key):
            tensor = tensor.t()
        out[key] = tensor.detach().contiguous()
    return out


# ---- loading a model ----------------------------------------------------------------------------------------
# A LoRA run's output (gpt2kit.training.lora): the adapters, the adapted model's GPT2Config (a classifier's labels,
# the run's overrides), no weights of its own.
ADAPTER_CONFIG_NAME, ADAPTED_CONFIG_NAME = "adapter_config.json", "model_config.json"


def is_adapter_dir(model_dir: Path) -> bool:
    return (model_dir / ADAPTER_CONFIG_NAME).is_file() and not (model_dir / CONFIG_NAME).exists()


def load_config(model_dir: str | os.PathLike) -> GPT2Config:
    """A model directory's config; for LoRA adapters, the config of the model they adapt."""
    path = Path(model_dir) / CONFIG_NAME
    if is_adapter_dir(Path(model_dir)):
        path = Path(model_dir) / ADAPTED_CONFIG_NAME
        if not path.exists():  # an adapter written by peft itself
            raise CheckpointError(f"{model_dir}: LoRA adapters without the adapted model's {ADAPTED_CONFIG_NAME}; "
                                  "fold them into their base first: gpt2kit lora merge --adapter DIR --base BASE "
                                  "--output OUT")
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no {CONFIG_NAME} (an HF-format model directory needs one)")
    try:
        return GPT2Config.from_json_file(path)
    except ValueError as err:  # its messages name the file
        raise CheckpointError(str(err)) from None


def named_config(name_or_path: str | os.PathLike) -> GPT2Config:
    """The config of what a name means to from_pretrained and --model: a directory that exists (even one named
    like a preset), else a preset, else a model in the local HF cache."""
    if str(name_or_path) in PRESETS and not Path(name_or_path).is_dir():
        return GPT2Config.from_name(str(name_or_path))
    try:
        return load_config(resolve_model_dir(name_or_path))
    except CheckpointError as err:
        raise CheckpointError(f"{err} (presets: {', '.join(PRESETS)})") from None


def classification_checkpoint_error(model_dir: Path) -> CheckpointError:
    """For a checkpoint with a classification head loaded as a language model: it would predict with the bare
    embedding, silently."""
    return CheckpointError(f"{model_dir}: a sequence-classification checkpoint (it has score.weight, no LM head); "
                           f"load it with GPT2ForSequenceClassification")


def state_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor (None without any): what transformers takes for a file's
    dtype, in the order load_state_dict lists the tensors (a .bin's own order; safetensors sorted by name, shard
    after shard)."""
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def config_dtype(config: GPT2Config, source: Path) -> torch.dtype | None:
    """config.json's `dtype` (`torch_dtype` before transformers 4.56) when it names one."""
    named = config.extra.get("dtype") or config.extra.get("torch_dtype")
    if not isinstance(named, str) or named == "auto":
        return None
    dtype = getattr(torch, named, None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{source / CONFIG_NAME}: dtype {named!r} is not a floating-point torch dtype")
    return dtype


def checkpoint_dtype(config: GPT2Config, state: dict[str, torch.Tensor], source: Path) -> torch.dtype | None:
    """The dtype transformers gives a checkpoint's weights: config.json's when it names one, else the file's,
    one for all (a model computes in one dtype: a file of several gets its first tensor's)."""
    return config_dtype(config, source) or state_dtype(state.values())


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "bf16", ...); None and "auto" stay None (the
    checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_pretrained(cls: type[M], name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu", **config_overrides) -> M:
    dtype = parse_dtype(dtype)  # before any weight is read
    model_dir = resolve_model_dir(name_or_path)
    config = load_config(model_dir)
    if is_adapter_dir(model_dir):
        return _load_adapted(cls, model_dir, dtype=dtype, device=device, **config_overrides)
    labels, names = config_overrides.get("num_labels"), config.id2label
    if labels is not None and names is not None and len(names) != labels and "id2label" not in config_overrides:
        # Another number of classes starts without the file's class names, as in transformers (configs of older
        # transformers, distilgpt2's among them, name one class: LABEL_0).
        config_overrides = {"id2label": None, "label2id": None, **config_overrides}
    try:
        config = config.replace(**config_overrides)
    except ValueError as err:
        raise CheckpointError(f"{model_dir}: {err}") from None
    state = load_state_dict(model_dir)
    if cls.__name__ == "GPT2LMHeadModel" and "score.weight" in state:
        raise classification_checkpoint_error(model_dir)
    stored_dtype = checkpoint_dtype(config, state, model_dir)  # of the file as it is: old mask buffers count too
    config = untied_if_separate(config, state, model_dir)
    with torch.device("meta"):
        model = cls(config)  # no memory, no init: every tensor comes from the checkpoint
    state = hf_to_gpt2kit(state, model)
    if cls.__name__ == "GPT2ForSequenceClassification" and "score.weight" not in state:
        # A language model under a new head, as transformers starts one; asked for by naming the classes, so that
        # an LM directory given to classify (eval, pipeline) is an error rather than random predictions.
        if not {"num_labels", "id2label"} & set(config_overrides):
            raise CheckpointError(f"{model_dir}: no classification head (score.weight); finetune one first, or pass "
                                  "num_labels= (or id2label=) to start a new one to train")
        state["score.weight"] = torch.empty(config.num_labels, config.n_embd).normal_(0, config.initializer_range)
        warnings.warn(f"{model_dir}: no classification head: score.weight ({config.num_labels} classes) starts from "
                      "random values; train it before use", stacklevel=3)
    _check_state(model, state, model_dir)
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device=device, dtype=dtype or stored_dtype)
    if hasattr(model, "generation_config"):
        model.generation_config = read_generation_config(model_dir)
    return model.eval()


def _load_adapted(cls: type[M], model_dir: Path, *, dtype: torch.dtype | None,
                  device: torch.device | str, **config_overrides) -> M:
    """A LoRA run's output loaded as the model it stands for: its base with the adapters folded in (peft)."""
    from .training.lora import load_merged

    try:
        classifier = json.loads((model_dir / ADAPTER_CONFIG_NAME).read_text()).get("task_type") == "SEQ_CLS"
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{model_dir / ADAPTER_CONFIG_NAME}: not a JSON object ({err})") from None
    wanted = "classifier" if cls.__name__ == "GPT2ForSequenceClassification" else "language model"
    if cls.__name__ != "GPT2Model" and classifier != (wanted == "classifier"):
        raise CheckpointError(f"{model_dir}: LoRA adapters of a {'classifier' if classifier else 'language model'}, "
                              f"not of a {wanted}: load them with "
                              f"{'GPT2ForSequenceClassification' if classifier else 'GPT2LMHeadModel'}")
    try:
        model = load_merged(model_dir, dtype=dtype, **config_overrides)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if cls.__name__ == "GPT2Model":  # the transformer alone, as from a full checkpoint
        model = model.transformer
    return model.to(device=device).eval()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            # Shapes as the file stores them (HF's Conv1D weights are (in, out)), and the shard that holds it.
            stored = (lambda shape: tuple(shape)[::-1]) if _CONV1D_WEIGHTS.search(key) else tuple
            raise CheckpointError(f"{_file_holding(source, key)}: {key} has shape {stored(tensor.shape)}, "
                                  f"config.json implies {stored(expected[key].shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{_file_holding(source, key)}: {key} is {tensor.dtype}, expected floating-point "
                                  "weights")


def _file_holding(model_dir: Path, key: str) -> Path:
    """The weight file of `model_dir` that holds `key` (a gpt2kit name: HF's may lack "transformer.")."""
    path = _weights_path(model_dir)
    if path is None or not path.name.endswith(".index.json"):
        return path or model_dir
    weight_map = read_json(path, error=CheckpointError)["weight_map"]
    shard = weight_map.get(key) or weight_map.get(key.removeprefix("transformer."))
    return model_dir / shard if shard else model_dir


# ---- writing ------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'2GB', '500MB', '10KiB' or a byte count."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"size {size!r} is less than one byte")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; expected e.g. 2GB, 500MB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    size_bytes = int(float(number) * base ** " KMGT".index(unit.upper() or " "))
    if size_bytes < 1:  # 0 would put every tensor in a shard of its own
        raise ValueError(f"size {size!r} is less than one byte")
    return size_bytes


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    if shard:
        yield shard


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with tensors that share memory with an earlier one copied: safetensors refuses shared tensors
    (e.g. an untied head a .bin file stored as a view of the embedding)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


def write_hf_directory(directory: str | os.PathLike, config: GPT2Config, state: dict[str, torch.Tensor], *,
                       max_shard_size: int | str | None = None, weights_format: str = "safetensors",
                       companions: Path | None = None, record_dtype: bool = True,
                       tokenizer: Any = None, generation_config: dict[str, Any] | None = None) -> Path:
    """Write config.json + weights atomically: files go to a temporary sibling folder which then replaces
    `directory`, so a crash never leaves a directory that looks complete but is not. `companions`: a model
    directory whose other top-level files (tokenizer, generation_config.json, README) are copied in too;
    `tokenizer` (a GPT2Tokenizer) is saved in as well, and `generation_config` (the model's generation defaults)
    as generation_config.json. `record_dtype`: config.json's dtype becomes the tensors' (else it stays what
    `config` says)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    # The directory's other files (tokenizer, README, ...) stay, as with transformers; old weights do not, nor LoRA
    # adapters (transformers with peft would load the base plus them), nor old vocabulary files when a tokenizer is
    # written or copied in (a loader would read a stale tokenizer.json first).
    new_tokenizer = tokenizer is not None or (companions is not None and has_tokenizer_files(companions))

    def keep(name: str) -> bool:
        # Nor an old generation_config.json when the model's own settings are given: none means none.
        return not (is_model_file(name) or is_adapter_file(name) or new_tokenizer and is_tokenizer_file(name)
                    or generation_config is not None and name == GENERATION_CONFIG_NAME)

    with atomic_directory(directory, keep=keep) as tmp:
        for file in sorted(companions.iterdir()) if companions is not None else []:
            if file.is_file() and not is_model_file(file.name):
                shutil.copyfile(file, tmp / file.name)  # a hub snapshot's symlinks: their contents
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = _unshared(state) if weights_format == "safetensors" else state
        shards = list(_shards(state, parse_size(max_shard_size))) if max_shard_size else [state]
        if weights_format == "safetensors":
            single, index_name, suffix = SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, "safetensors"
        elif weights_format == "bin":
            single, index_name, suffix = BIN_NAME, BIN_INDEX_NAME, "bin"
        else:
            raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = single if len(shards) == 1 else f"{single.split('.')[0]}-{i:05d}-of-{len(shards):05d}.{suffix}"
            if suffix == "safetensors":
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
            else:
                torch.save(shard, tmp / name)
            weight_map.update(dict.fromkeys(shard, name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        values = config.to_hf_dict()
        dtype = state_dtype(state.values()) if record_dtype else None
        if dtype is not None:  # what the tensors are now, not what the source directory said (transformers loads this)
            values["dtype"] = str(dtype).removeprefix("torch.")
            if "torch_dtype" in values:
                values["torch_dtype"] = values["dtype"]
        (tmp / CONFIG_NAME).write_text(json.dumps(values, indent=2) + "\n")
        write_generation_config(tmp, generation_config)
    return directory


def write_generation_config(directory: Path, settings: dict[str, Any] | None) -> None:
    """generation_config.json in `directory` (a model's generation defaults), when there are any."""
    if settings:
        (directory / GENERATION_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """generation_config.json's settings that gpt2kit's GenerationConfig knows (transformers' file of a model's
    generation defaults: EOS ids, sampling settings, lengths); {} without the file. Other keys (transformers'
    own bookkeeping, options gpt2kit lacks) are left out; a value gpt2kit refuses is an error naming the file. A
    file giving both lengths keeps max_new_tokens, which transformers lets win over max_length."""
    from .generation import GenerationConfig

    path = model_dir / GENERATION_CONFIG_NAME
    if not path.is_file():
        return {}
    values = read_json(path, error=CheckpointError)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object of generation settings")
    known = {f.name for f in dataclasses.fields(GenerationConfig)} - {"seed", "compile", "stop"}
    settings = {k: v for k, v in values.items() if k in known and v is not None}
    if "max_new_tokens" in settings:
        settings.pop("max_length", None)
    try:
        GenerationConfig().replace(**settings)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return settings


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
                    state: dict[str, torch.Tensor] | None = None, tokenizer: Any = None) -> Path:
    """Write `model` (or `state`, its weights gathered elsewhere) as an HF-format directory, with `tokenizer`'s
    files when one is given (in the same atomic write)."""
    from .model import GPT2ForSequenceClassification, GPT2Model
    from .quantization import is_inference_only

    if is_inference_only(model):
        raise ValueError("an int8-quantized or packed model is for inference only; save the model it was made from")
    # The architecture the files hold, as transformers records it (isinstance: FSDP subclasses models in place).
    architecture = ("GPT2ForSequenceClassification" if isinstance(model, GPT2ForSequenceClassification) else
                    "GPT2Model" if isinstance(model, GPT2Model) else "GPT2LMHeadModel")
    config = model.config.replace(extra={**model.config.extra, "architectures": [architecture]})
    return write_hf_directory(directory, config, gpt2kit_to_hf(model, state), max_shard_size=max_shard_size,
                              tokenizer=tokenizer, generation_config=getattr(model, "generation_config", None))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, weights_format: str = "safetensors",
            max_shard_size: int | str | None = None) -> Path:
    """Re-write an HF-format directory as safetensors or .bin, sharded or merged (tensors are unchanged), with
    its other files (tokenizer, generation_config.json, ...)."""
    src_dir = resolve_model_dir(src)
    config = load_config(src_dir)
    loaded = load_state_dict(src_dir)
    if config_dtype(config, src_dir) is None and (dtype := state_dtype(loaded.values())) is not None:
        # Named, as the source's file order decided it: the output's order (safetensors sorts by name) may not.
        config = config.replace(extra={**config.extra, "dtype": str(dtype).removeprefix("torch.")})
    state = {k: v.contiguous() for k, v in loaded.items() if not _HF_BUFFERS.search(k)}
    if config.tie_word_embeddings and not has_separate_head(state):  # a separate head is kept, as loading does
        head = state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; HF re-ties on load
        if head is not None and not any(k.endswith("wte.weight") for k in state):
            state["transformer.wte.weight"] = head  # the file's one copy of the tied matrix (see hf_to_gpt2kit)
    return write_hf_directory(dst, config, state, max_shard_size=max_shard_size, weights_format=weights_format,
                              companions=src_dir, record_dtype=False)  # the tensors and the dtype they load in
