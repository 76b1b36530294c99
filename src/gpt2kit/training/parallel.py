"""Scale-out on PyTorch's own distributed engine, applied to the model from outside (model.py knows no ranks).

Launch with torchrun. `ParallelConfig(data, shard, tensor)` lays the world's ranks out on a 3-D device mesh
("data", "shard", "tensor"), tensor innermost so that tensor-parallel groups share a node's fast links:

- tensor > 1: DTensor tensor parallelism. c_attn and c_fc are column-parallel, the two c_proj row-parallel
  (one all-reduce per attention and per MLP), the token embedding and the tied LM head vocab-parallel; every
  other parameter becomes a replicated DTensor, so that all parameters live on one mesh (fused AdamW, gradient
  clipping and FSDP need that).
- shard > 1: FSDP2 (`fully_shard` per block, then the root); with data > 1 as well, hybrid sharding (HSDP:
  shard within groups of `shard` ranks, replicate across `data` groups). Combined with tensor > 1 this is the
  2-D (or 3-D) layout of large-model training.
- data > 1 alone: DDP.

Gradient accumulation synchronises only on the last micro-step (`grad_sync`); activation checkpointing wraps each
block (the model's `gradient_checkpointing_enable`). A single process runs the plain model whatever the degrees
say, so the same run config works on 1 or K processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MESH_DIMS = ("data", "shard", "tensor")


class ParallelConfigError(ValueError):
    """Parallel degrees that do not fit the model or the number of processes."""


@dataclass
class ParallelConfig:
    """How the ranks of a torchrun job are used. Exactly one degree may be -1: it takes the remaining ranks."""

    data: int = -1  # replicas: DDP, or the replicate dimension of hybrid sharding (HSDP)
    shard: int = 1  # FSDP2 shard group size; shard > 1 with data > 1 is HSDP
    tensor: int = 1  # tensor-parallel group size (heads, MLP columns and vocabulary split across it)
    timeout: float = 600.0  # seconds a collective may wait for the other ranks before the run fails

    def validate(self) -> None:
        """ParallelConfigError for degrees no number of processes could satisfy."""
        if self.timeout <= 0:
            raise ParallelConfigError(f"parallel.timeout must be positive, got {self.timeout}")
        for name in MESH_DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise ParallelConfigError(f"parallel.{name} must be a positive integer or -1, got {value!r}")
        fill = [name for name in MESH_DIMS if getattr(self, name) == -1]
        if len(fill) > 1:
            raise ParallelConfigError(f"parallel: only one of data/shard/tensor may be -1, got {', '.join(fill)}")

    @property
    def shards_model(self) -> bool:
        """Whether ranks hold different parts of the model (FSDP/HSDP or tensor parallel), as opposed to
        full copies (one process, DDP): sharded models are saved with distributed checkpoints."""
        return self.shard > 1 or self.tensor > 1

    def resolve(self, world_size: int) -> ParallelConfig:
        """Degrees for `world_size` processes (-1 filled in); ParallelConfigError when they cannot multiply to it.
        One process always resolves to 1 x 1 x 1: the same config then runs the plain model."""
        self.validate()
        if world_size == 1:
            return dataclasses.replace(self, data=1, shard=1, tensor=1)
        degrees = {name: getattr(self, name) for name in MESH_DIMS}
        fill = [name for name, value in degrees.items() if value == -1]
        known = math.prod(value for value in degrees.values() if value != -1)
        if fill:
            if world_size % known:
                raise ParallelConfigError(
                    f"parallel: {world_size} processes cannot be split into groups of {known} "
                    f"({' x '.join(f'{k}={v}' for k, v in degrees.items() if v != -1)})")
            degrees[fill[0]] = world_size // known
        if math.prod(degrees.values()) != world_size:
            raise ParallelConfigError(
                f"parallel: data x shard x tensor = {degrees['data']} x {degrees['shard']} x {degrees['tensor']} = "
                f"{math.prod(degrees.values())}, but the job has {world_size} processes; set one degree to -1 to "
                "fill the rest")
        return dataclasses.replace(self, **degrees)

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different samples (tensor-parallel ranks of a group read the same ones)."""
        return self.data * self.shard

    def describe(self) -> str:
        parts = []
        if self.shard > 1:
            parts.append(f"HSDP {self.data} x {self.shard}" if self.data > 1 else f"FSDP {self.shard}")
        elif self.data > 1:
            parts.append(f"DDP {self.data}" if self.tensor == 1 else f"replicate {self.data}")
        if self.tensor > 1:
            parts.append(f"TP {self.tensor}")
        return " + ".join(parts) or "single process"


@dataclass
class ParallelState:
    """This process's place in the job: rank, device, resolved degrees and the device mesh (None alone)."""

    config: ParallelConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_rank(self) -> int:
        if self.mesh is None:
            return 0
        data, shard, _ = self.mesh.get_coordinate()
        return data * self.config.shard + shard

    @property
    def data_parallel_size(self) -> int:
        return self.config.data_parallel_size

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The body runs on rank 0 first, then on the other ranks: work that writes an output they share (raw
        text tokenized into out_dir, a trained tokenizer) is done once, and the others find it done. The others
        wait for at most parallel.timeout; an error on rank 0 stops them with one that says so."""
        if not self.distributed:
            yield
            return
        if not self.is_main:
            failed = self.broadcast(None)
            if failed:
                raise ValueError(f"rank 0 stopped: {failed}")
            yield
            return
        try:
            yield
        except BaseException as err:
            self.broadcast(str(err) or type(err).__name__)
            raise
        self.broadcast(None)

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object) on every rank, in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def shared_seed(self, seed: int | None) -> int:
        """Collective: rank 0's `seed` (drawn there when None) on every rank, so ranks that must sample the same
        tokens (a sharded model's collective forward passes) draw the same random numbers."""
        return self.broadcast(random.randrange(2 ** 63) if seed is None else seed)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the data-parallel ranks (tensor-parallel ranks hold equal copies: counted once)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.config.tensor if value.is_floating_point() else value // self.config.tensor


def launched_world_size() -> int:
    """Processes in this job as torchrun announces them (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: ParallelConfig | None = None, *, device: str | torch.device | None = None
                     ) -> ParallelState:
    """Join the torchrun job (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment): process
    group (NCCL on GPUs, gloo on CPUs) with `config.timeout`, one GPU per local rank, and the device mesh.
    Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the state is rank 0 of 1."""
    config = config or ParallelConfig()
    world_size = launched_world_size()
    config = config.resolve(world_size)
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if world_size == 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # cuda:N: what torch's own defaults (pin-memory thread) run on
        return ParallelState(config, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=config.timeout),
                                device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.distributed_c10d import _set_pg_timeout  # no public way for a mesh's groups

    mesh = init_device_mesh(device.type, (config.data, config.shard, config.tensor), mesh_dim_names=MESH_DIMS)
    for name in MESH_DIMS:  # the mesh's own groups get torch's default timeout (30 min gloo, 10 min NCCL)
        _set_pg_timeout(timedelta(seconds=config.timeout), mesh[name].get_group())
    return ParallelState(config, device, rank=rank, world_size=world_size, local_rank=local_rank, mesh=mesh)


def raise_if_any_rank_failed(error: BaseException | None, what: str,
                             error_type: type[Exception] = RuntimeError) -> None:
    """Collective: every rank learns whether any rank failed `what`, and all raise the same clear `error_type`
    (instead of the healthy ranks waiting in their next collective until the timeout)."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise error_type(f"{what} failed on {len(failed)} of {len(messages)} ranks: {details}") from error


# ---- activation checkpointing --------------------------------------------------------------------------------
# ---- tensor parallel -----------------------------------------------------------------------------------------
def _fused_qkv_style():
    """ColwiseParallel for GPT-2's fused q/k/v projection. A plain column split would hand rank 0 all of q and
    half of k; a strided shard (split factor 3) gives each rank the rows of its own heads in q, k and v, so its
    output reshapes into those heads. The bias stays replicated: DTensor adds the matching slice locally, and a
    1-D strided bias could not be sharded again by FSDP."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class FusedQKVColwiseParallel(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            for param_name, param in list(module.named_parameters()):
                placement = _StridedShard(0, split_factor=3) if param_name == "weight" else Replicate()
                sharded = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
                module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            return outputs.to_local()  # already this rank's q, k, v columns, in the order the model reshapes

    return FusedQKVColwiseParallel()


def _replicate_remaining(model: nn.Module, mesh) -> None:
    """Turn every parameter not yet sharded (position embedding, LayerNorms, a classifier head) into a replicated
    DTensor on the tensor-parallel mesh; the module's tensor inputs become replicated DTensors and its output a
    local tensor again. Each rank computes the same values; gradients of these parameters are reduced by DTensor
    where partial."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs_to_dtensor(module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def output_to_local(module, output, device_mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    for module in list(model.modules()):
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            distribute_module(module, mesh, input_fn=inputs_to_dtensor, output_fn=output_to_local)


def check_tensor_parallel(config, degree: int, shard: int = 1) -> None:
    """ParallelConfigError unless the model's heads, width and MLP split evenly over `degree` ranks, and, with
    FSDP beside tensor parallelism (`shard` ranks), the width over `shard` too (see _fsdp_placement)."""
    for name, value in (("n_head", config.n_head), ("n_embd", config.n_embd), ("MLP width", config.mlp_dim)):
        if value % degree:
            raise ParallelConfigError(f"parallel.tensor = {degree} must divide the model's {name} ({value})")
    if degree > 1 and config.n_embd % shard:
        raise ParallelConfigError(f"parallel.shard = {shard} must divide the model's n_embd ({config.n_embd}) "
                                  "with tensor parallelism: FSDP splits the fused q/k/v weight along its input")


def own_attention_dropout(attention: nn.Module, rank: int) -> None:
    """Give a tensor-parallel rank's attention dropout masks of its own. The rank holds its own heads, and with
    the one random stream that all ranks share (the replicated activations' dropout must draw the same numbers
    everywhere) head h of every rank got the same mask. Before each training forward of `attention` its
    device's default generator is reseeded from its own state and `rank`: a pure function of that state, so
    activation checkpointing's replay draws the same masks. Before `c_proj` (after the attention's dropout,
    before the replicated residual dropout) the shared state is put back and advanced by one draw, so the next
    layer's masks are not this one's."""
    saved: list[torch.Tensor] = []

    def generator() -> torch.Generator:
        device = next(attention.parameters()).device
        return torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.default_generator

    def reseed(module: nn.Module, args: tuple) -> None:
        if module.training and module.attn_pdrop > 0:
            gen = generator()
            saved[:] = [gen.get_state()]
            digest = hashlib.blake2b(saved[0].numpy().tobytes() + rank.to_bytes(8, "little"), digest_size=8).digest()
            gen.manual_seed(int.from_bytes(digest, "little") >> 1)

    def restore(module: nn.Module, args: tuple) -> None:
        if module.training and saved:  # (a recompute that checkpointing stopped early may leave one behind)
            gen = generator()
            gen.set_state(saved.pop())
            torch.randint(2, (1,), generator=gen, device=gen.device)

    attention.register_forward_pre_hook(reseed)
    attention.c_proj.register_forward_pre_hook(restore)


def apply_tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard a GPT2LMHeadModel or GPT2ForSequenceClassification across the 1-D tensor-parallel `mesh`, in place.
    The attention modules' head count is set to the heads of this rank (the model reads it from `n_head`)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    degree = mesh.size()
    config = model.config
    check_tensor_parallel(config, degree)
    # Vocabulary-parallel embedding: each rank looks up its rows; the partial sums are all-reduced.
    plan: dict[str, Any] = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}."
        plan[prefix + "attn.c_attn"] = _fused_qkv_style()
        plan[prefix + "attn.c_proj"] = RowwiseParallel()
        plan[prefix + "mlp.c_fc"] = ColwiseParallel()
        plan[prefix + "mlp.c_proj"] = RowwiseParallel()
        block.attn.n_head = config.n_head // degree
        if config.attn_pdrop > 0:
            own_attention_dropout(block.attn, mesh.get_local_rank())
    if hasattr(model, "lm_head"):
        # Vocabulary-parallel head; logits are gathered because the loss and generation run on whole rows.
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # both halves of the tie are sharded by vocabulary rows: one parameter again
    _replicate_remaining(model, mesh)
    return model


# ---- data parallel -------------------------------------------------------------------------------------------
def _fsdp_placement(param: nn.Parameter):
    """FSDP shards dim 0 by default; a parameter already strided on dim 0 by tensor parallelism (fused q/k/v) is
    sharded on dim 1 instead, which keeps its DTensor layout exact."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
        return Shard(1)
    return None


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: each block is one all-gather / reduce-scatter unit, the root holds the embeddings, final
    LayerNorm and head. A 2-D `mesh` (replicate, shard) gives hybrid sharding. `param_dtype` (bf16 on GPUs)
    computes in that dtype while the sharded master weights and the gradient reduction stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, shard_placement_fn=_fsdp_placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, shard_placement_fn=_fsdp_placement)
    return model


def parallelize(model: nn.Module, state: ParallelState, *, recompute: bool = False,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to run forward/backward with: activation checkpointing (when `recompute`), tensor parallel,
    then FSDP2/HSDP or DDP as `state.config` says. FSDP and TP change `model` in place (its parameters become
    DTensors); DDP returns a wrapper around it. The model must already be on `state.device`."""
    if recompute:
        model.gradient_checkpointing_enable()
    if not state.distributed:
        return model
    c, mesh = state.config, state.mesh
    if c.tensor > 1 or c.shard > 1:
        # A model loaded from an HF directory holds its projections as transposed views of the file's Conv1D
        # weights: FSDP refuses such parameters, and tensor parallelism shards them into gradients of another
        # layout than the weights', which the fused optimizer then applies to the wrong elements.
        with torch.no_grad():
            for param in model.parameters():
                if not param.is_contiguous():
                    param.data = param.data.contiguous()
    if c.tensor > 1:
        check_tensor_parallel(model.config, c.tensor, c.shard)
        apply_tensor_parallel(model, mesh["tensor"])
    if c.shard > 1 or (c.tensor > 1 and c.data > 1):
        # Replicas of a tensor-parallel model use FSDP2's replicate dimension (shard groups of one if shard == 1).
        return apply_fsdp(model, mesh["data", "shard"] if c.data > 1 else mesh["shard"], param_dtype=param_dtype)
    if c.data > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[state.device.index] if state.device.type == "cuda" else None,
                                       process_group=mesh["data"].get_group(), gradient_as_bucket_view=True)
    return model


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-step's forward + backward: gradients are reduced across data-parallel ranks only when
    `enabled` (the last micro-step of an optimizer step); earlier micro-steps accumulate locally. Under FSDP they
    are still reduce-scattered on every micro-step, so that they accumulate sharded: skipping it would keep every
    parameter's whole float32 gradient on each rank until the last micro-step (13B over 8 ranks: 48 GiB instead
    of 6). Only HSDP's all-reduce across replicas waits for the last micro-step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, FSDPModule):
        module.set_requires_all_reduce(enabled)
        yield
    elif isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also returns a plain tensor for sharded (DTensor) gradients: the norm
    over the whole model, equal on every rank."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---- tensor-parallel inference -------------------------------------------------------------------------------
def _hf_tensors(model_dir, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of an HF directory one tensor at a time, so a rank never holds the whole model (safetensors;
    .bin files are pickles that load whole); `only`: just these names."""
    from safetensors import SafetensorError, safe_open

    from ..checkpoint import SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, CheckpointError, load_state_dict

    index = model_dir / SAFETENSORS_INDEX_NAME
    if (model_dir / SAFETENSORS_NAME).is_file():  # first, as load_state_dict and transformers read it
        files = [SAFETENSORS_NAME]
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a valid shard index ({type(err).__name__}: {err})") from None
    else:
        yield from ((key, value) for key, value in load_state_dict(model_dir).items() if only is None or key in only)
        return
    for name in files:
        try:
            with safe_open(str(model_dir / name), framework="pt") as handle:
                for key in handle.keys():
                    if only is None or key in only:
                        yield key, handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{model_dir / name}: not a readable safetensors file ({err})") from None


def load_tensor_parallel(model_dir, mesh, *, dtype: torch.dtype | None = None):
    """A GPT2LMHeadModel from an HF-format directory, sharded over the 1-D tensor-parallel `mesh` as it loads:
    each rank reads one tensor at a time and keeps only its shard. Logits come out whole on every rank.

    `model.config` then describes this rank's shard (n_head, n_embd and n_inner divided by the degree) so that
    generation's KV cache holds only the local heads; the model is for inference, not for saving."""
    from torch.distributed.tensor import distribute_tensor

    from ..checkpoint import (CheckpointError, classification_checkpoint_error, config_dtype, hf_to_gpt2kit,
                              load_config, read_generation_config, resolve_model_dir, untied_if_separate)
    from ..model import GPT2LMHeadModel

    model_dir = resolve_model_dir(model_dir)
    config = load_config(model_dir)
    if config.tie_word_embeddings:  # a separate head in the file unties it, as in load_pretrained
        heads = dict(_hf_tensors(model_dir, only={"lm_head.weight", "transformer.wte.weight", "wte.weight"}))
        config = untied_if_separate(config, heads, model_dir)
    dtype = dtype or config_dtype(config, model_dir)  # else each tensor's own, unified below
    degree = mesh.size()
    check_tensor_parallel(config, degree)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    apply_tensor_parallel(model, mesh)
    targets = dict(model.named_parameters())  # the tied LM head appears once, as transformer.wte.weight
    state: dict[str, torch.Tensor] = {}
    stored_dtype = None  # the file's first floating-point tensor's, as load_pretrained takes it
    for hf_key, tensor in _hf_tensors(model_dir):
        if hf_key.startswith("score."):
            raise classification_checkpoint_error(model_dir)
        if stored_dtype is None and tensor.is_floating_point():
            stored_dtype = tensor.dtype
        for key, value in hf_to_gpt2kit({hf_key: tensor}, model).items():
            if key not in targets:
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                raise CheckpointError(f"{model_dir}: unexpected tensor {hf_key} for a GPT-2 LM")
            target = targets[key]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{model_dir}: {key} has shape {tuple(value.shape)}, config.json implies "
                                      f"{tuple(target.shape)}")
            # Every rank has the whole tensor: each keeps its slice, nothing is sent.
            state[key] = distribute_tensor(value if dtype is None else value.to(dtype), mesh, target.placements,
                                           src_data_rank=None)
    missing = sorted(set(targets) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: weights do not match the config: missing {missing[:5]}")
    if dtype is None:  # a file of mixed dtypes: one for all, as load_pretrained gives them
        state = {key: value.to(stored_dtype) if value.is_floating_point() else value for key, value in state.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    mlp = config.n_inner // degree if config.n_inner else None
    model.config = dataclasses.replace(config, n_head=config.n_head // degree, n_embd=config.n_embd // degree,
                                       n_inner=mlp)
    model.generation_config = read_generation_config(model_dir)  # its generation defaults, as from_pretrained's
    return model.eval()


def generate_tensor_parallel(model: str | os.PathLike, prompt: str | None, *, tensor_parallel: int,
                             tokenizer: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                             device: str | torch.device | None = None, return_full_text: bool = True,
                             stream_to=None, **options) -> list[str] | None:
    """`torchrun --nproc-per-node T -m gpt2kit generate --tensor-parallel T ...`: every rank loads its shard of
    the HF directory and runs the same decoding (identical logits on every rank, so identical tokens); rank 0
    streams and returns the texts, the other ranks return None. Rank 0's `prompt` is used (others may pass None)."""
    from ..checkpoint import CheckpointError, resolve_model_dir
    from ..checkpoint import parse_dtype
    from ..pipeline import generate_text
    from ..tokenizer import has_tokenizer_files

    world = launched_world_size()
    if world != tensor_parallel:
        raise ParallelConfigError(
            f"--tensor-parallel {tensor_parallel} needs {tensor_parallel} processes, this job has {world}: "
            f"launch with torchrun --nproc-per-node {tensor_parallel} -m gpt2kit generate ...")
    state = init_distributed(ParallelConfig(data=1, shard=1, tensor=tensor_parallel), device=device)
    error, lm = None, None
    try:
        model_dir = resolve_model_dir(model)
        lm = load_tensor_parallel(model_dir, state.mesh["tensor"], dtype=parse_dtype(dtype))
    except (OSError, ValueError) as err:
        error = err
    raise_if_any_rank_failed(error, f"loading {model} for tensor-parallel generation", CheckpointError)
    if tokenizer is None and has_tokenizer_files(model_dir):
        tokenizer = model_dir
    # The ranks must decode the same rows with the same draws: rank 0's prompt (only it reads standard input)
    # and, for an unseeded sample, rank 0's seed.
    prompt = state.broadcast(prompt)
    options["seed"] = state.shared_seed(options.get("seed"))
    texts = generate_text(lm, prompt, tokenizer=tokenizer, return_full_text=return_full_text,
                          stream_to=stream_to if state.is_main else None, **options)
    return texts if state.is_main else None
