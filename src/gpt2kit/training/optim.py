"""AdamW with decay / no-decay parameter groups, and the warmup + cosine/linear learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .config import OptimArgs


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings are decayed; biases and LayerNorm parameters (all 1-D) are not, as in GPT-2/3.
    Frozen parameters (LoRA's base weights) are left out; a tied weight appears once."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, args: OptimArgs) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel when every parameter's device supports it (CPU and CUDA
    in current PyTorch), else the multi-tensor (foreach) path."""
    groups = param_groups(model, args.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, **kwargs)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, decay: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr` over `warmup_steps`, then cosine
    or linear decay reaching `min_lr` at `decay_steps` (counted from step 0), then constant `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if decay == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - min_lr) * progress  # linear (MindFormers' polynomial decay with power 1)


def _ratio(step: int, base_lr: float, **kwargs) -> float:
    return lr_at(step, **kwargs) / base_lr if base_lr else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimArgs, max_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at`; its state (step count) goes into checkpoints like the optimizer's."""
    decay_steps = args.decay_steps or max_steps
    try:
        warmup = args.warmup_for(decay_steps)
    except ValueError as err:
        raise ValueError(f"optim.warmup_steps: {err}") from None
    schedule = partial(_ratio, base_lr=args.lr, lr=args.lr, min_lr=args.min_lr, warmup_steps=warmup,
                       decay_steps=decay_steps, decay=args.decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@contextmanager
def configured_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
                               ) -> Iterator[None]:
    """Loading a checkpoint's optimizer and scheduler state inside this block restores their step counts and
    moments but keeps the hyperparameters they were built with from the config: a run resumed with a new
    optim.lr, weight_decay, betas or eps uses them, at its schedule's learning rate for the restored step."""
    kept = [{k: g[k] for k in ("betas", "eps", "weight_decay", "initial_lr") if k in g}
            for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    yield
    scheduler.base_lrs = base_lrs
    for group, values, base, factor in zip(optimizer.param_groups, kept, base_lrs, scheduler.lr_lambdas):
        group.update(values)
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
