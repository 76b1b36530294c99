"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards, and a
checkpoint saved with one layout loads into another (2 processes -> 1, FSDP -> plain, TP -> FSDP, ...).

A DCP directory holds `.metadata` + `__<rank>_<n>.distcp` files with the model's and (optionally) the optimizer's
state under the keys of `torch.distributed.checkpoint.state_dict.get_state_dict` (parameter names, whatever the
wrapping), plus the model's `config.json`, so `dcp_to_pretrained` can turn it into an HF directory offline.
DCP needs a filesystem every rank sees (one machine, or a shared/NFS path across nodes).

DCP stores its `.metadata` as a pickle and non-tensor values (the optimizer's hyper-parameters) through
torch.save, and torch reads them back with plain `pickle.load` / `torch.load(weights_only=False)`, which would
run code a crafted checkpoint carries. Loading here goes through a reader and a planner of `_load` instead:
the metadata may name DCP's own metadata classes and nothing else, and values load with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import CONFIG_NAME, CheckpointError, save_pretrained
from ..config import GPT2Config
from ..files import replace_directory
from ..tokenizer import GPT2Tokenizer, has_tokenizer_files
from .checkpoints import STATE_DIR
from .parallel import raise_if_any_rank_failed

METADATA_NAME = ".metadata"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process whenever no process group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and tensor parallelism change the model in place)."""
    return getattr(model, "module", model)


# ---- layout adaptation -------------------------------------------------------------------------------------
def _map_tree(tree: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(tree, dict):
        return {key: _map_tree(value, fn) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_map_tree(value, fn) for value in tree]
    return fn(tree)


def _map_tree_pair(loaded: Any, original: Any) -> Any:
    """`loaded` (a tree shaped like `original`) with each DTensor back in the placements `original` has."""
    if isinstance(loaded, dict):
        return {key: _map_tree_pair(value, original[key]) for key, value in loaded.items()}
    if isinstance(loaded, list):
        return [_map_tree_pair(value, orig) for value, orig in zip(loaded, original)]
    return _restore_layout(loaded, original)


def _storable_placements(tensor) -> list | None:
    """Placements DCP can store for this DTensor, or None when it stores it as is. The fused q/k/v projection is
    strided over the tensor-parallel ranks (see parallel.py): each rank's rows are three separate pieces, which
    DCP cannot describe as one chunk, so it is stored as a plain row shard."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(tensor, DTensor):
        return None
    names = tensor.device_mesh.mesh_dim_names or ()
    placements = list(tensor.placements)
    changed = False
    for i, placement in enumerate(placements):
        if isinstance(placement, _StridedShard) and i < len(names) and names[i] == "tensor":
            placements[i] = Shard(placement.dim)
            changed = True
    return placements if changed else None


def _to_storable(tensor):
    placements = _storable_placements(tensor)
    return tensor if placements is None else tensor.redistribute(placements=placements)


def _restore_layout(loaded, original):
    placements = _storable_placements(original)
    return loaded if placements is None else loaded.redistribute(placements=original.placements)


# ---- reading without running a checkpoint's code --------------------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata (dataclasses of torch.distributed.checkpoint, sizes, dtypes, paths) and refuses
    every other global, e.g. os.system in a crafted file. Names are exact: a dotted one ("os.system" looked up in
    a module that imports os) is refused too."""

    NAMES = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout")} | {  # paths: Python 3.13 pickles them from pathlib._local
        (module, name) for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.NAMES or (
                module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)):
            # pathlib re-exports its classes on every Python; pathlib._local exists from 3.13 on only
            return super().find_class("pathlib" if module == "pathlib._local" else module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not part of DCP's metadata")


def read_metadata(directory: Path):
    """The Metadata of the DCP checkpoint in `directory`, read without running code; CheckpointError when it is
    truncated, corrupt or refers to anything but DCP's metadata classes."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = directory / METADATA_NAME
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except OSError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, KeyError, ...)
        raise CheckpointError(f"{path}: not readable as a distributed checkpoint's metadata "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not a distributed checkpoint's metadata")
    return metadata


def _load(state: dict[str, Any], directory: Path, *, no_dist: bool) -> None:
    # torch.distributed.checkpoint is imported here, not with gpt2kit: it takes seconds on a slow CPU.
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DefaultLoadPlanner.load_bytes with weights_only=True: these are plain numbers, strings and tuples.
            data = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], data)
            else:
                self.state_dict[read_item.dest_index.fqn] = data

    with _single_process_quiet():
        load(state, storage_reader=SafeReader(directory), planner=SafeLoadPlanner(), no_dist=no_dist)


# ---- save / load ---------------------------------------------------------------------------------------------
def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _write_config(model: nn.Module, directory: Path) -> None:
    """config.json beside the shards, so the checkpoint can be converted without the run config."""
    from ..model import GPT2ForSequenceClassification

    values = unwrap(model).config.to_hf_dict()
    if isinstance(unwrap(model), GPT2ForSequenceClassification):
        values["architectures"] = ["GPT2ForSequenceClassification"]
    (directory / CONFIG_NAME).write_text(json.dumps(values, indent=2) + "\n")


def save_distributed_checkpoint(directory: str | os.PathLike, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Collective: every rank writes its shards of the model (and optimizer) state into `directory`. The files
    go to a temporary sibling that replaces `directory` once all ranks are done, so a crash never leaves a
    directory that looks complete. Works the same in a single process."""
    from torch.distributed.checkpoint import save

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.partial")
    if not _distributed() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_config(model, tmp)
    _barrier()
    state = _map_tree(_training_state(model, optimizer), _to_storable)
    with _single_process_quiet():
        save(state, checkpoint_id=tmp, no_dist=not _distributed())
    _barrier()
    if not _distributed() or dist.get_rank() == 0:
        replace_directory(tmp, directory)
    _barrier()
    return directory


def load_distributed_checkpoint(directory: str | os.PathLike, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: load a DCP checkpoint into `model` (and `optimizer`), whatever layout either was saved or is
    now in. A rank that cannot read its part makes every rank raise CheckpointError (DCP gathers the errors)."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    directory = Path(directory)
    missing = None
    if not (directory / METADATA_NAME).is_file():
        missing = CheckpointError(f"{directory}: not a distributed checkpoint (no {METADATA_NAME})")
    raise_if_any_rank_failed(missing, "loading a distributed checkpoint", CheckpointError)
    original = _training_state(model, optimizer)
    try:  # every rank reads the metadata; one that cannot must not leave the others waiting in a collective
        extra = _unexpected_tensors(directory, original["model"])
        mismatch = CheckpointError(f"{directory}: holds weights the model has no place for ({', '.join(extra[:5])})"
                                   "; was it saved from a larger model config?") if extra else None
    except (CheckpointError, OSError) as err:
        mismatch = err
    raise_if_any_rank_failed(mismatch, "loading a distributed checkpoint", CheckpointError)
    storable = _map_tree(original, _to_storable)
    try:
        _load(storable, directory, no_dist=not _distributed())
    except CheckpointException as err:
        raise CheckpointError(f"{directory}: loading the distributed checkpoint failed ({_failures(err)})") from None
    restored = {section: _map_tree_pair(storable[section], original[section]) for section in original}
    if optimizer is None:
        set_model_state_dict(model, restored["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=restored["model"], optim_state_dict=restored["optim"])
    if hasattr(unwrap(model), "tie_weights"):
        unwrap(model).tie_weights()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Collective: load complete weights and a plain `optimizer.state_dict()` (as one process or DDP saves them;
    every rank passes the same) into a sharded model, each rank keeping its part. The saved optimizer numbers
    its parameters in the order `optimizer` lists them, which is how they are matched to names here."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    names = {param: name for name, param in unwrap(model).named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    by_name = {"state": {order[index]: value for index, value in optimizer_state["state"].items()},
               "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _unexpected_tensors(directory: Path, model_state: dict[str, Any]) -> list[str]:
    """Model tensors in the checkpoint with no place in `model_state`: DCP loads only what it is asked for, so a
    larger model's checkpoint would otherwise load silently (a missing tensor is an error already)."""
    saved = read_metadata(directory).state_dict_metadata
    return sorted(key.removeprefix("model.") for key in saved
                  if key.startswith("model.") and key.removeprefix("model.") not in model_state)


def _failures(err) -> str:
    """One line per failed rank of a DCP CheckpointException (which pairs each exception with its traceback)."""
    lines = []
    for rank, failure in sorted(err.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        lines.append(f"rank {rank}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    return "; ".join(lines)


# ---- HF export -----------------------------------------------------------------------------------------------
def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the model's complete weights on CPU on rank 0 (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _distributed():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                      max_shard_size: int | str | None = None) -> Path:
    """Collective: gather a (possibly sharded) model and write one HF-format directory from rank 0."""
    state = gather_full_state(model)
    directory = Path(directory)
    if not _distributed() or dist.get_rank() == 0:
        save_pretrained(unwrap(model), directory, max_shard_size=max_shard_size, state=state)
    _barrier()
    return directory


def dcp_to_pretrained(dcp_dir: str | os.PathLike, output: str | os.PathLike, *,
                      config: str | os.PathLike | None = None, max_shard_size: int | str | None = None) -> Path:
    """Offline, one process: merge the model part of a DCP checkpoint (any layout, optimizer state ignored) into
    one HF-format directory. The config comes from `config` (a config.json or a model directory), else the
    config.json written beside the shards or in the parent directory; the tokenizer of a run's checkpoint comes
    along."""
    from torch.distributed.checkpoint import CheckpointException

    from ..model import GPT2ForSequenceClassification, GPT2LMHeadModel

    dcp_dir = Path(dcp_dir).resolve()  # a relative "dcp" still finds the run's training_state/ and tokenizer
    if not (dcp_dir / METADATA_NAME).is_file():
        raise CheckpointError(f"{dcp_dir}: not a distributed checkpoint (no {METADATA_NAME})")
    candidates = [Path(config)] if config is not None else [dcp_dir / CONFIG_NAME, dcp_dir.parent / CONFIG_NAME]
    candidates = [c / CONFIG_NAME if c.is_dir() else c for c in candidates]
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        raise CheckpointError(f"{dcp_dir}: no model config found (looked for {', '.join(map(str, candidates))}); "
                              "pass --config")
    model_config = GPT2Config.from_json_file(config_path)
    classifier = "GPT2ForSequenceClassification" in (model_config.extra.get("architectures") or [])
    if config_path.parent != dcp_dir and (dcp_dir / CONFIG_NAME).is_file():  # a config given for these shards
        changed = GPT2Config.from_json_file(dcp_dir / CONFIG_NAME).shape_changes(model_config, classifier=classifier)
        if changed:
            raise CheckpointError(f"{config_path}: another model shape than the checkpoint's {dcp_dir / CONFIG_NAME} "
                                  f"({', '.join(changed)}); its weights would load into the wrong places")
    with torch.device("meta"):
        model = (GPT2ForSequenceClassification if classifier else GPT2LMHeadModel)(model_config)
    model.to_empty(device="cpu")  # memory without initialisation: every tensor comes from the checkpoint
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    state = {"model": model.state_dict()}
    extra = _unexpected_tensors(dcp_dir, state["model"])
    if extra:
        raise CheckpointError(f"{dcp_dir}: holds weights that {config_path} has no place for ({', '.join(extra[:5])})")
    try:
        _load(state, dcp_dir, no_dist=True)
    except CheckpointException as err:  # e.g. a tensor the config implies but the checkpoint lacks
        raise CheckpointError(f"{dcp_dir}: does not hold the weights {config_path} describes "
                              f"({_failures(err)})") from None
    model.load_state_dict(state["model"])
    # A run's checkpoint (step-N/training_state/dcp) keeps the run's tokenizer in step-N: carried along (in the
    # same atomic write), so the model directory reads text as the run did.
    run_checkpoint = dcp_dir.parent.parent
    tokenizer = None
    if dcp_dir.parent.name == STATE_DIR and has_tokenizer_files(run_checkpoint):
        tokenizer = GPT2Tokenizer.from_file(run_checkpoint)
    return save_pretrained(model, output, max_shard_size=max_shard_size, tokenizer=tokenizer)
