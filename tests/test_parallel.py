"""torch.distributed on CPU: 2 processes with the gloo backend, spawned by the tests.

One spawned job runs every 2-rank scenario and leaves its results in files; the tests compare them with the same
computation in this (single) process. Collectives time out after 60 s and the job after 240 s, so a failure
ends the test instead of hanging it.

Tolerances (float32): losses and gradient norms agree within 1e-5 relative, weights after three AdamW steps within
2e-5 absolute (the ranks sum the same numbers in another order); reloaded checkpoints are bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gpt2kit import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from gpt2kit.checkpoint import CheckpointError
from gpt2kit.generation import generate
from gpt2kit.quantization import pack_weights, quantize_int8
from gpt2kit.training.distributed_checkpoint import (dcp_to_pretrained, gather_full_state,
                                                     load_distributed_checkpoint, save_distributed_checkpoint)
from gpt2kit.training.memory import estimate_memory
from gpt2kit.training.parallel import (ParallelConfig, ParallelConfigError, ParallelState, clip_grad_norm_,
                                       grad_sync, init_distributed, parallelize)

WORLD = 2
STEPS, MICRO_STEPS, BATCH, SEQ = 3, 2, 4, 16
LAYOUTS = {"ddp": ParallelConfig(data=-1), "fsdp": ParallelConfig(data=1, shard=-1),
           "tp": ParallelConfig(data=1, tensor=-1)}


def tiny_lm_config() -> GPT2Config:
    # An odd vocabulary: the vocab-parallel embedding and head must handle uneven shards.
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=509, bos_token_id=508,
                      eos_token_id=508, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def fresh_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_lm_config())
    for name, param in model.named_parameters():  # non-zero biases, so a misplaced bias slice would show
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.02)
    return model


def batches() -> torch.Tensor:
    """(steps, micro_steps, batch, seq + 1) token ids, the same batch every step (so the loss must fall); targets
    are the ids shifted by one."""
    generator = torch.Generator().manual_seed(1)
    step = torch.randint(0, 509, (MICRO_STEPS, BATCH, SEQ + 1), generator=generator)
    return step.expand(STEPS, *step.shape)


def train(state: ParallelState, *, recompute: bool = False, held: list[int] | None = None):
    """A few AdamW steps with gradient accumulation on this rank's rows; returns (model, optimizer, losses,
    grad norms) with the losses averaged over the data-parallel ranks. `held` receives the gradient elements
    this rank holds in .grad after each unsynchronised micro-step."""
    model = fresh_model()
    forward = parallelize(model, state, recompute=recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    per_rank = BATCH // state.data_parallel_size
    rows = slice(state.data_parallel_rank * per_rank, (state.data_parallel_rank + 1) * per_rank)
    losses, norms = [], []
    for step in batches():
        total = torch.zeros(())
        for i, micro in enumerate(step):
            ids = micro[rows]
            with grad_sync(forward, enabled=i == MICRO_STEPS - 1):
                loss = forward(ids[:, :-1], targets=ids[:, 1:]).loss / MICRO_STEPS
                loss.backward()
            if held is not None and i < MICRO_STEPS - 1:
                held.append(sum(getattr(p.grad, "_local_tensor", p.grad).numel() for p in model.parameters()
                                if p.grad is not None))
            total += loss.detach()
        norms.append(float(clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(state.all_reduce_sum(total)) / state.data_parallel_size)
    return model, optimizer, losses, norms


# ---- the spawned job -----------------------------------------------------------------------------------------
def scenario_train_layouts(state: ParallelState, out: Path) -> None:
    """DDP, FSDP (with activation checkpointing) and TP training; FSDP and TP save DCP checkpoints."""
    for name, config in LAYOUTS.items():
        layout = init_distributed(config, device="cpu")
        held: list[int] = []
        model, optimizer, losses, norms = train(layout, recompute=name == "fsdp", held=held)
        full = gather_full_state(model)
        if name in ("fsdp", "tp"):
            save_distributed_checkpoint(out / f"{name}-dcp", model, optimizer)
        local = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
        counts = [None] * WORLD
        torch.distributed.all_gather_object(counts, local)
        if state.is_main:
            torch.save({"losses": losses, "norms": norms, "state": full, "local_parameters": counts,
                        "held_gradients": held}, out / f"{name}.pt")


def windows_nll(model: torch.nn.Module) -> float:
    """Summed negative log-likelihood of a few evaluation windows (gpt2kit.evaluation's scoring)."""
    from gpt2kit.evaluation.scoring import Window, score_windows

    ids = batches()[0, 0].tolist()
    windows = [Window(row, n_scored=n) for row, n in zip(ids, (SEQ, 5, 1, SEQ))]
    return -sum(float(s.logprobs.sum()) for s in score_windows(model, windows, vocab_size=509, batch_size=3,
                                                                 progress=False))


def scenario_evaluate_layouts(state: ParallelState, out: Path) -> None:
    """Evaluation scoring of an FSDP and a tensor-parallel model: their LM heads hold DTensors, which must run
    as modules rather than be multiplied with directly."""
    scores = {}
    for name in ("fsdp", "tp"):
        model = fresh_model()
        parallelize(model, init_distributed(LAYOUTS[name], device="cpu"))
        scores[name] = windows_nll(model)
    if state.is_main:
        (out / "evaluate.json").write_text(json.dumps(scores))


def scenario_reshard_fsdp_into_tp(state: ParallelState, out: Path) -> None:
    """A checkpoint written by FSDP ranks loads into a tensor-parallel model (different sharding)."""
    tp = init_distributed(LAYOUTS["tp"], device="cpu")
    model = GPT2LMHeadModel(tiny_lm_config())
    parallelize(model, tp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    load_distributed_checkpoint(out / "fsdp-dcp", model, optimizer)
    full = gather_full_state(model)
    ids = batches()[0, 0, :, :-1]
    logits = model(ids).logits.detach()
    if state.is_main:
        torch.save({"state": full, "logits": logits}, out / "fsdp-into-tp.pt")


def scenario_failed_load(state: ParallelState, out: Path) -> None:
    """Rank 1 is pointed at a missing checkpoint, then at one with a corrupted shard, then at one with damaged
    metadata: every rank must raise a clear error quickly instead of waiting for the others."""
    errors = {}
    for case, path in (("missing", out / ("fsdp-dcp" if state.rank == 0 else "no-such-dcp")),
                       ("corrupt", out / ("fsdp-dcp" if state.rank == 0 else "corrupt-dcp")),
                       ("metadata", out / ("fsdp-dcp" if state.rank == 0 else "bad-metadata-dcp"))):
        model = GPT2LMHeadModel(tiny_lm_config())
        parallelize(model, state)
        started = time.monotonic()
        try:
            load_distributed_checkpoint(path, model)
            errors[case] = None
        except Exception as err:  # the test checks type and message
            errors[case] = (type(err).__name__, str(err), time.monotonic() - started)
    torch.save(errors, out / f"failed-load-rank{state.rank}.pt")


def classifier_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, so pooling must find each row's last real token."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 509, (4, 12), generator=generator)
    mask = (torch.arange(12) < torch.tensor([[12], [9], [5], [1]])).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def classifier_gradients(model: torch.nn.Module, rows: slice = slice(None)) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, full gradients by name) of one backward on `rows` of the classifier batch."""
    batch = {k: v[rows] for k, v in classifier_batch().items()}
    loss = model(**batch).loss
    loss.backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for name, p in model.named_parameters()}
    return float(loss.detach()), grads


def fresh_classifier() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(dataclasses.replace(tiny_lm_config(), num_labels=3))


def scenario_classifier(state: ParallelState, out: Path) -> None:
    """GPT2ForSequenceClassification (padded rows) under TP and FSDP: same loss and gradients as one process."""
    results = {}
    for name in ("tp", "fsdp"):
        layout = init_distributed(LAYOUTS[name], device="cpu")
        model = fresh_classifier()
        parallelize(model, layout)
        per_rank = 4 // layout.data_parallel_size
        rows = slice(layout.data_parallel_rank * per_rank, (layout.data_parallel_rank + 1) * per_rank)
        loss, grads = classifier_gradients(model, rows)
        results[name] = (float(layout.all_reduce_sum(torch.tensor(loss))) / layout.data_parallel_size, grads)
    if state.is_main:
        torch.save(results, out / "classifier.pt")


def scenario_tensor_parallel_loading(state: ParallelState, out: Path) -> None:
    """`generate --tensor-parallel`'s loader: a bf16 checkpoint stays bf16 (its logits are the single-process
    model's), a classification checkpoint is refused as load_pretrained refuses it, and checkpoint hashing is
    shared by the ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from gpt2kit.training.checkpoints import hash_files
    from gpt2kit.training.parallel import load_tensor_parallel

    mesh = init_device_mesh("cpu", (WORLD,))
    model = load_tensor_parallel(out / "bf16-lm", mesh)
    ids = batches()[0, 0, :2, :-1]
    mixed = load_tensor_parallel(out / "mixed-lm", mesh)
    separate = load_tensor_parallel(out / "separate-head", mesh)
    result = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
              "mixed_dtypes": sorted({str(p.dtype) for p in mixed.parameters()}),
              "logits": model(ids).logits.detach().float(),
              "separate_logits": separate(ids).logits.detach(),
              "hashed": hash_files(out / "bf16-lm", state.rank, WORLD)}
    try:
        load_tensor_parallel(out / "classifier", mesh)
        result["classifier"] = None
    except CheckpointError as err:
        result["classifier"] = str(err)
    # What needs weights held whole is refused by name (it failed deep inside torch).
    result["refusals"] = []
    for attempt in (lambda: quantize_int8(model), lambda: pack_weights(model),
                    lambda: generate(model, ids, max_new_tokens=2, compile=True)):
        try:
            attempt()
            result["refusals"].append(None)
        except ValueError as err:
            result["refusals"].append(str(err))
    torch.save(result, out / f"tp-loading-rank{state.rank}.pt")


SCENARIOS = [scenario_train_layouts, scenario_evaluate_layouts, scenario_reshard_fsdp_into_tp, scenario_failed_load,
             scenario_classifier, scenario_tensor_parallel_loading]


def _prepare_corrupt_copy(out: Path) -> None:
    shutil.copytree(out / "fsdp-dcp", out / "corrupt-dcp")
    for shard in (out / "corrupt-dcp").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    shutil.copytree(out / "fsdp-dcp", out / "bad-metadata-dcp")
    (out / "bad-metadata-dcp" / ".metadata").write_bytes(b"not a pickle")


def _prepare_model_dirs(out: Path) -> None:
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_lm_config()).to(torch.bfloat16).save_pretrained(out / "bf16-lm")
    fresh_classifier().save_pretrained(out / "classifier")
    # bf16 matrices beside float32 LayerNorms and biases, no dtype in config.json: loaded as one dtype.
    from safetensors.torch import load_file, save_file

    shutil.copytree(out / "bf16-lm", out / "mixed-lm")
    state = load_file(out / "mixed-lm" / "model.safetensors")
    save_file({k: v.float() if "ln_" in k or k.endswith(".bias") else v for k, v in state.items()},
              out / "mixed-lm" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "mixed-lm" / "config.json").read_text())
    config.pop("dtype", None)
    (out / "mixed-lm" / "config.json").write_text(json.dumps(config))
    # config.json ties the head, the file holds a different one: loaded untied, as transformers loads it.
    fresh_model().save_pretrained(out / "separate-head")
    state = load_file(out / "separate-head" / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    save_file(state, out / "separate-head" / "model.safetensors", metadata={"format": "pt"})


def _two_rank_job(rank: int, out: Path) -> None:
    state = init_distributed(ParallelConfig(timeout=60), device="cpu")
    for scenario in SCENARIOS:
        if scenario is scenario_failed_load and rank == 0:
            _prepare_corrupt_copy(out)
        if scenario is scenario_tensor_parallel_loading and rank == 0:
            _prepare_model_dirs(out)
        torch.distributed.barrier()
        scenario(state, out)


def _rank_entry(rank: int, world: int, port: int, out: str, body) -> None:
    """What each spawned process runs: torchrun's environment, one thread, then `body(rank, out)`; a failure
    leaves its traceback in `out` for the test report."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        body(rank, Path(out))
    except BaseException:
        (Path(out) / f"traceback-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(body, world: int, out: Path, timeout: float = 240.0) -> Path:
    """Spawn `world` gloo ranks running `body`; fail the test (never hang) if one raises or time runs out."""
    context = mp.spawn(_rank_entry, args=(world, free_port(), str(out), body), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"spawned job did not finish within {timeout:.0f} s")
    except mp.ProcessRaisedException:
        logs = "\n".join(p.read_text() for p in sorted(out.glob("traceback-rank*.txt")))
        pytest.fail(f"a rank of the spawned job failed:\n{logs}")
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    return run_job(_two_rank_job, WORLD, tmp_path_factory.mktemp("two-ranks"))


@pytest.fixture(scope="module")
def reference():
    """The same training in one process: losses, gradient norms, final weights and the optimizer."""
    single = init_distributed(ParallelConfig(), device="cpu")
    model, optimizer, losses, norms = train(single)
    return {"model": model, "optimizer": optimizer, "losses": losses, "norms": norms}


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ---- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_train_like_one_process(job, reference, layout):
    result = load(job / f"{layout}.pt")
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert result["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]  # the steps did train
    expected = reference["model"].state_dict()
    assert set(result["state"]) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(result["state"][key], tensor, rtol=0, atol=2e-5, msg=key)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_evaluation_scores_of_sharded_models_match_one_process(job, layout):
    assert json.loads((job / "evaluate.json").read_text())[layout] == pytest.approx(windows_nll(fresh_model()),
                                                                                     rel=1e-5)


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
def test_classifier_with_padding_matches_one_process(job, layout):
    loss, grads = classifier_gradients(fresh_classifier())
    got_loss, got_grads = load(job / "classifier.pt")[layout]
    assert got_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_checkpoint_saved_on_two_ranks_loads_in_one_process(job, reference, layout):
    saved = load(job / f"{layout}.pt")["state"]
    model = GPT2LMHeadModel(tiny_lm_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    load_distributed_checkpoint(job / f"{layout}-dcp", model, optimizer)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    assert model.lm_head.weight is model.transformer.wte.weight
    # The optimizer moments came along too, in this process's parameter order.
    ours, ref = optimizer.state_dict()["state"], reference["optimizer"].state_dict()["state"]
    assert len(ours) == len(ref)
    for index in ref:
        assert int(ours[index]["step"]) == STEPS
        torch.testing.assert_close(ours[index]["exp_avg"], ref[index]["exp_avg"], rtol=0, atol=1e-6)


def test_fsdp_checkpoint_loads_into_tensor_parallel_ranks(job):
    fsdp = load(job / "fsdp.pt")["state"]
    resharded = load(job / "fsdp-into-tp.pt")
    for key, tensor in fsdp.items():
        assert torch.equal(resharded["state"][key], tensor), key
    model = GPT2LMHeadModel(tiny_lm_config())
    model.load_state_dict(fsdp)
    expected = model(batches()[0, 0, :, :-1]).logits
    torch.testing.assert_close(resharded["logits"], expected, rtol=1e-5, atol=1e-5)


def test_dcp_converts_offline_to_a_pretrained_directory(job, tmp_path, capsys):
    from gpt2kit.cli import main

    assert main(["convert", "--from-dcp", str(job / "tp-dcp"), "--output", str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    saved = load(job / "tp.pt")["state"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key


def test_a_rank_that_cannot_load_fails_every_rank_quickly(job):
    for rank in range(WORLD):
        errors = load(job / f"failed-load-rank{rank}.pt")
        for case in ("missing", "corrupt", "metadata"):
            assert errors[case] is not None, f"rank {rank} loaded a {case} checkpoint"
            name, message, seconds = errors[case]
            assert name in ("CheckpointError", "RuntimeError"), message
            assert "rank 1" in message, message
            assert seconds < 30, f"rank {rank} waited {seconds:.0f} s"
        assert "no-such-dcp" in errors["missing"][1]


def _stalled_peer_job(rank: int, out: Path) -> None:
    """Four ranks as data 2 x shard 2, parallel.timeout = 2 s; rank 1 never joins rank 0's all-reduce on their
    shard group (a group of the mesh, smaller than the job). The other ranks live on until rank 0 reports, for 8 s
    at most: without the timeout rank 0 would wait until then."""
    state = init_distributed(ParallelConfig(data=2, shard=2, timeout=2), device="cpu")
    if rank == 0:
        started = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.ones(1), group=state.mesh["shard"].get_group())
            outcome = "completed"
        except RuntimeError as err:
            outcome = f"failed: {err}"
        torch.save({"outcome": outcome, "seconds": time.monotonic() - started}, out / "stalled.pt")
    else:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not (out / "stalled.pt").exists():
            time.sleep(0.1)


def test_the_timeout_bounds_collectives_on_the_mesh_groups(tmp_path):
    """A mesh's groups are created by torch with its default timeout (30 min for gloo); parallel.timeout must
    apply to them too, or a stalled peer hangs HSDP/TP collectives for half an hour."""
    result = load(run_job(_stalled_peer_job, 4, tmp_path) / "stalled.pt")
    assert result["outcome"].startswith("failed") and result["seconds"] < 6, result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_memory_estimate_counts_the_parameters_each_rank_holds(job, layout):
    estimate = estimate_memory(tiny_lm_config(), LAYOUTS[layout].resolve(WORLD), seq_len=SEQ)
    counts = load(job / f"{layout}.pt")["local_parameters"]
    assert estimate.parameters == pytest.approx(sum(counts) / WORLD, abs=1)
    assert estimate.weights == estimate.gradients == 4 * estimate.parameters
    assert estimate.optimizer == 8 * estimate.parameters


def test_fsdp_accumulates_sharded_gradients_between_micro_steps(job):
    """Without gradient sync FSDP2 kept every parameter's whole gradient on each rank (outside .grad) until the
    last micro-step: 13B over 8 ranks held 48 GiB of gradients where the estimate counts 6. Reduce-scattered on
    every micro-step, each rank's .grad holds its shard from the first one on."""
    result = load(job / "fsdp.pt")
    assert result["held_gradients"] == [result["local_parameters"][0]] * STEPS


@pytest.mark.parametrize("tensor", [1, 2])
def test_memory_estimate_splits_an_untied_head_like_a_tied_one(tensor):
    """Tensor parallelism splits an untied LM head by vocabulary rows, as it splits the embedding: it was counted
    whole on every rank. Autocast copies the head (the fused loss does without TP), never the embedding."""
    tied = tiny_lm_config()
    untied = tied.replace(tie_word_embeddings=False)
    layout = ParallelConfig(tensor=tensor).resolve(tensor)
    a, b = (estimate_memory(config, layout, seq_len=SEQ) for config in (tied, untied))
    assert b.parameters - a.parameters == tied.vocab_size * tied.n_embd / tensor
    assert b.gathered == a.gathered


def test_memory_estimate_of_the_large_configs():
    config = GPT2Config.from_name("gpt2-13b")
    with torch.device("meta"):
        total = GPT2LMHeadModel(config).num_parameters()
    fsdp = estimate_memory(config, ParallelConfig(data=1, shard=8, tensor=1), seq_len=2048)
    assert fsdp.parameters == pytest.approx(total / 8, abs=1)
    # Adding tensor parallelism shrinks activations; adding replicas (HSDP) leaves each GPU's share unchanged.
    tp = estimate_memory(config, ParallelConfig(data=1, shard=4, tensor=2), seq_len=2048)
    hsdp = estimate_memory(config, ParallelConfig(data=4, shard=8, tensor=1), seq_len=2048)
    assert tp.activations < fsdp.activations and hsdp.total == fsdp.total
    # Without recompute the 52B config's activations dominate: 64 blocks x s*b*h*(2 + 2*4 + 14*2) bytes (masks,
    # float32 LayerNorm inputs, bf16 rest), the embedding sum and the final LayerNorm's float32 input.
    big = estimate_memory(GPT2Config.from_name("gpt2-52b"), ParallelConfig(data=1, shard=64, tensor=1),
                          recompute=False)
    assert big.activations == pytest.approx(64 * 1024 * 8192 * 38 + 1024 * 8192 * (2 + 4))
    # fp16 runs leave FSDP's param_dtype unset (the trainer sets bf16 only): float32 gathered copies and a
    # float32 residual stream under recompute, where bf16 has bf16 ones.
    bf16, fp16 = (estimate_memory(config, ParallelConfig(data=1, shard=8, tensor=1), seq_len=2048,
                                  precision=precision) for precision in ("bf16", "fp16"))
    assert fp16.gathered == 2 * bf16.gathered  # parameters and the block's gradients: float32 against bf16
    assert fp16.activations - bf16.activations == config.n_layer * 2048 * config.n_embd * 2


def documented_memory_rows() -> list[tuple[str, list[str]]]:
    """(file, cells) of every memory table row in README.md and docs/distributed.md."""
    rows = []
    for doc in ("README.md", "docs/distributed.md"):
        for line in (Path(__file__).resolve().parents[1] / doc).read_text().splitlines():
            if line.startswith("| gpt2-") and "x" in line:
                rows.append((doc, [cell.strip() for cell in line.strip("|").split("|")]))
    return rows


def test_documented_memory_tables_match_the_estimate():
    """The tables are what `gpt2kit info --parallel` prints (micro-batch 1, bf16, recompute unless 'off')."""
    from gpt2kit.training.memory import GIB

    rows = documented_memory_rows()
    assert len(rows) == 16
    context = {}
    for doc, cells in rows:
        name = cells[0].split()[0]
        context.setdefault(name, int(cells[0].split("(")[1].split()[0]) if "tokens" in cells[0] else None)
        data, shard, tensor = map(int, cells[2].rsplit("(", 1)[1].rstrip(")").split("x"))
        estimate = estimate_memory(GPT2Config.from_name(name), ParallelConfig(data=data, shard=shard, tensor=tensor),
                                   seq_len=context[name], recompute=cells[3] != "off")
        values = [f"{value / GIB:.1f}" for _, value in estimate.rows()]
        if len(cells) == 4:  # README: model, GPUs, layout, total
            assert cells[3] == values[-1], (doc, cells)
        else:
            assert cells[4] == f"{estimate.parameters / 1e9:.2f} B", (doc, cells)
            assert cells[5:-1] + [cells[-1].strip("*")] == values, (doc, cells)


def test_fsdp_beside_tensor_parallel_needs_a_width_the_shards_divide():
    from gpt2kit.training.parallel import check_tensor_parallel

    config = tiny_lm_config()  # n_embd 64
    check_tensor_parallel(config, 2, shard=4)
    check_tensor_parallel(config, 1, shard=3)  # FSDP alone shards unevenly without trouble
    with pytest.raises(ParallelConfigError, match=r"parallel.shard = 3 must divide the model's n_embd \(64\)"):
        check_tensor_parallel(config, 2, shard=3)
    with pytest.raises(ParallelConfigError, match="parallel.shard = 5 must divide"):
        estimate_memory(GPT2Config.from_name("gpt2"), ParallelConfig(data=1, shard=5, tensor=2))


def test_info_prints_the_memory_table(capsys):
    from gpt2kit.cli import main

    assert main(["info", "gpt2-13b", "--parallel", "shard=4,tensor=2", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-13b on 8 GPUs, FSDP 4 + TP 2" in out and "AdamW moments" in out and "total" in out
    assert main(["info", "gpt2-13b", "--parallel", "pipeline=2"]) == 2
    assert "expected comma-separated data=N, shard=N, tensor=N" in capsys.readouterr().err


def test_dcp_conversion_errors_name_the_problem(job, tmp_path):
    with pytest.raises(CheckpointError, match="not a distributed checkpoint"):
        dcp_to_pretrained(tmp_path, tmp_path / "out")
    wider = tiny_lm_config()
    wider.n_layer = 3
    (tmp_path / "config.json").write_text(json.dumps(wider.to_hf_dict()))
    # The config.json beside the shards says what shape they have.
    with pytest.raises(CheckpointError, match=r"another model shape than the checkpoint's .*config.json \(n_layer 2 "
                                              r"-> 3\)"):
        dcp_to_pretrained(job / "tp-dcp", tmp_path / "out", config=tmp_path)
    # Without it (shards copied alone), the tensors themselves are checked.
    bare = tmp_path / "bare"
    shutil.copytree(job / "tp-dcp", bare, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(CheckpointError, match=r"does not hold the weights .*config.json describes .*Missing key in "
                                              r"checkpoint state_dict: model.transformer.h.2"):
        dcp_to_pretrained(bare, tmp_path / "out", config=tmp_path)
    narrower = tiny_lm_config()
    narrower.n_layer = 1  # DCP loads only the tensors asked for: the checkpoint's second layer must not be lost
    (tmp_path / "config.json").write_text(json.dumps(narrower.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"holds weights that .*config.json has no place for \(transformer.h.1"):
        dcp_to_pretrained(bare, tmp_path / "out", config=tmp_path)
    model = GPT2LMHeadModel(narrower)
    with pytest.raises(CheckpointError, match=r"holds weights the model has no place for \(transformer.h.1"):
        load_distributed_checkpoint(job / "tp-dcp", model)
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this runs code: a crafted checkpoint's way in."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _single_process_checkpoint(directory: Path):
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(batches()[0, 0], labels=batches()[0, 0]).loss.backward()
    optimizer.step()
    save_distributed_checkpoint(directory, model, optimizer)
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_with_paths_of_any_python_loads(tmp_path):
    """DCP keeps the checkpoint's path in .metadata, and Python 3.13 pickles pathlib's classes as
    pathlib._local.PosixPath: metadata saved there must load, on any Python."""
    import pathlib
    import pickle

    model, _ = _single_process_checkpoint(tmp_path / "good")
    metadata_file = tmp_path / "good" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # the test's own file
    assert isinstance(metadata.storage_meta.checkpoint_id, pathlib.PosixPath)
    # Protocol 2 names globals as text lines ("c" module "\n" name "\n"), which can be renamed in place.
    as_on_313 = pickle.dumps(metadata, protocol=2).replace(b"cpathlib\nPosixPath\n", b"cpathlib._local\nPosixPath\n")
    assert b"pathlib._local" in as_on_313
    metadata_file.write_bytes(as_on_313)
    reloaded = fresh_model()
    load_distributed_checkpoint(tmp_path / "good", reloaded)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_loading_never_runs_code_a_checkpoint_carries(tmp_path):
    import pickle

    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _single_process_checkpoint(tmp_path / "good")
    reloaded = fresh_model()
    reloaded_optimizer = torch.optim.AdamW(reloaded.parameters(), lr=5.0)
    load_distributed_checkpoint(tmp_path / "good", reloaded, reloaded_optimizer)  # the safe path still loads
    assert reloaded_optimizer.param_groups[0]["lr"] == 1e-3
    assert reloaded_optimizer.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)

    marker = tmp_path / "ran"
    evil = tmp_path / "evil-metadata"
    shutil.copytree(tmp_path / "good", evil)
    (evil / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: not readable .*Path.touch.* not part of DCP's metadata"):
        load_distributed_checkpoint(evil, fresh_model())
    with pytest.raises(CheckpointError, match="not part of DCP's metadata"):
        dcp_to_pretrained(evil, tmp_path / "out")

    # Protocol 4 resolves dotted names: "os.makedirs" inside an admitted module (which imports os) must not pass.
    def text(value: str) -> bytes:
        return b"\x8c" + bytes([len(value.encode())]) + value.encode()  # SHORT_BINUNICODE

    call = (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.makedirs") + b"\x93"
            + text(str(marker)) + b"\x85R.")  # STACK_GLOBAL, then makedirs((marker,))
    (evil / ".metadata").write_bytes(call)
    with pytest.raises(CheckpointError, match=r"refers to torch.distributed.checkpoint.metadata.os.makedirs"):
        dcp_to_pretrained(evil, tmp_path / "out")

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", truncated)
    (truncated / ".metadata").write_bytes((tmp_path / "good" / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"\.metadata: not readable"):
        dcp_to_pretrained(truncated, tmp_path / "out")
    (truncated / ".metadata").write_bytes(pickle.dumps(3))
    with pytest.raises(CheckpointError, match="holds a int, not a distributed checkpoint's metadata"):
        dcp_to_pretrained(truncated, tmp_path / "out")

    # A non-tensor value (an optimizer setting) that runs code when torch.load unpickles it without weights_only.
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = _RunsCode(marker)
    save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp_path / "evil-value", no_dist=True)
    with pytest.raises(CheckpointError, match="loading the distributed checkpoint failed"):
        load_distributed_checkpoint(tmp_path / "evil-value", reloaded, reloaded_optimizer)
    assert not marker.exists()


# ---- degrees -------------------------------------------------------------------------------------------------
def test_parallel_config_fills_the_remaining_ranks():
    assert ParallelConfig().resolve(8) == ParallelConfig(data=8, shard=1, tensor=1)
    assert ParallelConfig(data=2, shard=-1, tensor=2).resolve(16) == ParallelConfig(data=2, shard=4, tensor=2)
    assert ParallelConfig(data=1, shard=1, tensor=-1).resolve(4).tensor == 4
    # One process runs the plain model whatever the config says: the same YAML works on 1 or K processes.
    assert ParallelConfig(data=1, shard=4, tensor=2).resolve(1) == ParallelConfig(data=1, shard=1, tensor=1)
    assert ParallelConfig(data=2, shard=2).resolve(4).describe() == "HSDP 2 x 2"
    assert ParallelConfig(data=1, shard=2, tensor=2).resolve(4).describe() == "FSDP 2 + TP 2"


@pytest.mark.parametrize("config, world, message", [
    (ParallelConfig(data=-1, shard=-1), 4, "only one of"),
    (ParallelConfig(data=1, shard=3), 4, "data x shard x tensor = 1 x 3 x 1 = 3, but the job has 4"),
    (ParallelConfig(shard=3, tensor=1), 4, "cannot be split into groups of 3"),
    (ParallelConfig(tensor=0), 2, "parallel.tensor must be a positive integer or -1"),
])
def test_parallel_config_errors_name_the_problem(config, world, message):
    with pytest.raises(ParallelConfigError, match=message):
        config.resolve(world)


def test_tensor_parallel_loading_keeps_the_checkpoints_dtype_and_refuses_classifiers(job):
    from gpt2kit.training.checkpoints import hash_files

    ranks = [load(job / f"tp-loading-rank{rank}.pt") for rank in range(WORLD)]
    single = GPT2LMHeadModel.from_pretrained(job / "bf16-lm")
    with torch.no_grad():
        expected = single(batches()[0, 0, :2, :-1]).logits.float()
    with pytest.warns(UserWarning, match="loaded untied"):
        separate = GPT2LMHeadModel.from_pretrained(job / "separate-head")
    with torch.no_grad():
        separate_logits = separate(batches()[0, 0, :2, :-1]).logits
    for result in ranks:
        torch.testing.assert_close(result["separate_logits"], separate_logits, rtol=1e-5, atol=1e-5)
        assert result["dtypes"] == ["torch.bfloat16"]
        assert result["mixed_dtypes"] == [str(GPT2LMHeadModel.from_pretrained(job / "mixed-lm").lm_head.weight.dtype)]
        torch.testing.assert_close(result["logits"], expected, rtol=0, atol=0.05)
        assert "a sequence-classification checkpoint (it has score.weight, no LM head)" in result["classifier"]
        assert [refusal and refusal.split(":")[0] for refusal in result["refusals"]] == [
            "the model is sharded (tensor parallel or FSDP", "the model is sharded (tensor parallel or FSDP",
            "compile=True decodes a model held whole by one process; a sharded (tensor-parallel, DTensor) model "
            "decodes eagerly"]
    # The ranks' shares of a directory's hashes are disjoint and together cover every file.
    shares = [result["hashed"] for result in ranks]
    assert not set(shares[0]) & set(shares[1]) and all(shares)
    assert {**shares[0], **shares[1]} == hash_files(job / "bf16-lm")


def test_tensor_parallel_ranks_draw_their_own_attention_dropout_masks():
    """Each rank's attention holds its own heads, so its dropout masks are its own; the shared random stream
    (which the replicated activations' dropout draws from) ends where it would on every rank, and activation
    checkpointing's replay draws the same masks."""
    from torch.utils.checkpoint import checkpoint

    from gpt2kit.model import Block
    from gpt2kit.training.parallel import own_attention_dropout

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, attn_pdrop=0.5, resid_pdrop=0.3)
    torch.manual_seed(0)
    weights = Block(config, 0).state_dict()
    x = torch.randn(2, 8, 32)

    def run(rank: int, recompute: bool = False):
        block = Block(config, 0)
        block.load_state_dict(weights)
        own_attention_dropout(block.attn, rank)
        torch.manual_seed(1)
        inputs = x.clone().requires_grad_()
        forward = (lambda t: block(t, None, True, None))
        y = checkpoint(forward, inputs, use_reentrant=False) if recompute else forward(inputs)
        y.sum().backward()
        return y.detach(), inputs.grad, torch.get_rng_state()

    (y0, grad0, state0), (y1, _, state1) = run(0), run(1)
    assert not torch.equal(y0, y1) and torch.equal(state0, state1)
    y0_again, grad0_again, state0_again = run(0, recompute=True)
    assert torch.equal(y0_again, y0) and torch.equal(grad0_again, grad0) and torch.equal(state0_again, state0)
    block = Block(config, 0).eval()
    own_attention_dropout(block.attn, 1)
    torch.manual_seed(1)
    block(x, None, True, None)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1).get_state())  # evaluation draws nothing


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_saves(precision):
    """Bytes the blocks save for backward (dropout off; weights and autocast's copies of them left out, as the
    estimate counts them elsewhere) against the estimate: under bf16 autocast the LayerNorm inputs and the
    residual stream stay float32."""
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=1000, resid_pdrop=0.0,
                        attn_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and tuple(t.shape) not in weight_shapes:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        model.transformer(torch.randint(0, 1000, (3, 100)))  # 300 rows: no weight has that shape
    estimate = estimate_memory(config, ParallelConfig(data=1, shard=1, tensor=1), micro_batch_size=3, seq_len=100,
                               precision=precision, recompute=False)
    masks = config.n_layer * 2 * 3 * 100 * 64  # the estimate's two dropout masks per block, absent here
    assert sum(saved.values()) == pytest.approx(estimate.activations - masks, rel=0.05)  # + small float32 stats
