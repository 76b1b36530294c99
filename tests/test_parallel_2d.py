"""2-D layouts on 4 CPU processes (gloo): FSDP x TP, HSDP (replicate x shard) and replicated TP, each trained
against the single-process run, and a 2-D checkpoint loaded in one process. Same tolerances as test_parallel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2kit import GPT2LMHeadModel
from gpt2kit.training.distributed_checkpoint import (gather_full_state, load_distributed_checkpoint,
                                                     save_distributed_checkpoint)
from gpt2kit.training.parallel import ParallelConfig, init_distributed

from .test_parallel import STEPS, load, run_job, tiny_lm_config, train

WORLD = 4
LAYOUTS = {"fsdp-tp": ParallelConfig(data=1, shard=2, tensor=2, timeout=60),
           "hsdp": ParallelConfig(data=2, shard=2, tensor=1, timeout=60),
           "replicated-tp": ParallelConfig(data=2, shard=1, tensor=2, timeout=60)}


def _four_rank_job(rank: int, out: Path) -> None:
    for name, config in LAYOUTS.items():
        state = init_distributed(config, device="cpu")
        model, optimizer, losses, norms = train(state)
        full = gather_full_state(model)
        if name == "fsdp-tp":
            save_distributed_checkpoint(out / f"{name}-dcp", model, optimizer)
        if state.is_main:
            torch.save({"losses": losses, "norms": norms, "state": full}, out / f"{name}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return run_job(_four_rank_job, WORLD, tmp_path_factory.mktemp("four-ranks"))


@pytest.fixture(scope="module")
def reference():
    model, _, losses, norms = train(init_distributed(ParallelConfig(), device="cpu"))
    return {"model": model, "losses": losses, "norms": norms}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_four_ranks_train_like_one_process(job, reference, layout):
    result = load(job / f"{layout}.pt")
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert result["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    for key, tensor in reference["model"].state_dict().items():
        torch.testing.assert_close(result["state"][key], tensor, rtol=0, atol=2e-5, msg=key)


def test_fsdp_tp_checkpoint_loads_in_one_process(job):
    saved = load(job / "fsdp-tp.pt")["state"]
    model = GPT2LMHeadModel(tiny_lm_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    load_distributed_checkpoint(job / "fsdp-tp-dcp", model, optimizer)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    assert all(int(s["step"]) == STEPS for s in optimizer.state_dict()["state"].values())
