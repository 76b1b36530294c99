"""Correctness of the fast paths (speed is the benchmarks' business, never asserted here): the chunked
cross-entropy, the decode-step attention mask, bf16 inference against float32, and the benchmark table."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.generation import generate
from gpt2kit.losses import lm_loss
from gpt2kit.model import build_attention_mask
from gpt2kit.quantization import long_input_dtype

from .conftest import REPO
from .processes import running

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200], [3, 4, 5, 6]]


def reference_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_elements", [10_000, 2 ** 24])  # many chunks (with a ragged last one) and one
def test_chunked_cross_entropy_equals_f_cross_entropy_in_float32(chunk_elements):
    torch.manual_seed(0)
    logits = (torch.randn(3, 50, 997, dtype=torch.float64) * 4).float()
    targets = torch.randint(0, 997, (3, 50))
    targets[0, :7] = -100
    targets[2, -1] = -100
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = lm_loss(ours_in, targets, chunk_elements=chunk_elements), reference_loss(ref_in, targets)
    exact = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(ours.item() - ref.item()) < 1e-6
    assert abs(ours.item() - exact.item()) < 1e-6
    (ours * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-9)
    assert ours_in.grad[0, :7].abs().max() == 0  # ignored positions get no gradient
    torch.testing.assert_close(logits, ours_in.detach())  # the input is not modified in place


def test_chunked_cross_entropy_bf16_logits_match_float32_math_and_keep_their_dtype():
    torch.manual_seed(1)
    logits = (torch.randn(2, 40, 512) * 3).bfloat16()
    targets = torch.randint(0, 512, (2, 40))
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = lm_loss(ours_in, targets, chunk_elements=5000), reference_loss(ref_in, targets)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward()
    ref.backward()
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=1e-2, atol=1e-6)


def test_chunked_cross_entropy_without_grad_and_through_the_model(tiny_config):
    torch.manual_seed(2)
    model = GPT2LMHeadModel(tiny_config).eval()  # no dropout: the passes must see the same network
    ids = torch.randint(0, tiny_config.vocab_size, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert torch.allclose(out.loss, reference_loss(out.logits, ids[:, 1:]), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(ids, labels=ids).loss, reference_loss(out.logits, ids[:, 1:]), atol=1e-6)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids[:, :-1]).logits
    reference_loss(logits, ids[:, 1:]).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_decode_step_mask_equals_the_general_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    fast, is_causal = build_attention_mask(mask, past=5, T=1)
    assert not is_causal
    S = 6
    general = (torch.arange(S) <= 5) & mask.bool()
    general |= (torch.arange(S) == 5) & ~general.any(-1, keepdim=True)  # itself only when nothing real precedes
    assert torch.equal(fast, general[:, None, None, :])
    assert mask[2, -1] == 0  # the caller's mask is left alone


def test_bf16_weights_stay_within_a_bound_of_float32_and_agree_where_float32_is_decisive():
    """bf16 weights give the same greedy tokens on these prompts; their log-probabilities stay within 0.1 of
    float32's, and greedy picks agree wherever float32's top-2 margin exceeds twice the difference."""
    torch.manual_seed(3)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=512)
    fp32 = GPT2LMHeadModel(config).eval()
    for p in fp32.parameters():  # a peaked distribution, as trained models have
        p.data.mul_(4.0) if p.dim() == 2 else None
    bf16 = GPT2LMHeadModel(config).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    for prompt in PROMPTS:
        ids = generate(fp32, torch.tensor([prompt]), max_new_tokens=24, eos_token_id=[])
        assert torch.equal(generate(bf16, torch.tensor([prompt]), max_new_tokens=24, eos_token_id=[]), ids)
        with torch.no_grad():
            ref = fp32(ids).logits[0].log_softmax(-1)
            low = bf16(ids).logits[0].float().log_softmax(-1)
        diff = (ref - low).abs().amax(-1)
        assert diff.max() < 0.1, diff.max()
        top2 = ref.topk(2).values
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * diff
        assert decisive.sum() > len(decisive) // 2
        assert torch.equal(ref.argmax(-1)[decisive], low.argmax(-1)[decisive])


def test_benchmark_table_rows_and_targets():
    from benchmarks.__main__ import table

    hw = {"fp32_flops": 1e11, "bf16_flops": 4e11, "bandwidth": 2e10}
    decode_row = {"section": "decode", "shape": "gpt2", "dtype": "int8", "peer_dtype": "fp32", "batch": 1,
                  "prompt_len": 32, "ours_tok_s": 30.0, "peer_tok_s": 10.0, "ratio": 3.0, "ours_ttft_s": 0.1,
                  "peer_ttft_s": 0.2, "ttft_ratio": 2.0, "weight_bytes": 7.5e8, "cache_bytes": 0.0,
                  "peak_rss_mb": 900.0, "same_tokens": True}
    rows = [decode_row, {**decode_row, "dtype": "fp32", "weight_bytes": 5e8},
            {"section": "train", "shape": "tiny", "precision": "bf16", "batch": 4, "seq_len": 256, "ours_tok_s": 900.0,
             "peer_tok_s": 600.0, "ratio": 1.5, "bound_tok_s": 3000.0, "peak_flops": 2e11,
             "ours_step_mem_mb": 500.0, "peer_step_mem_mb": 750.0}]
    lines = table(rows, hw)
    decode, ttft, fp32_decode, fp32_ttft, train, train_memory = lines
    # The int8 path carries the targets (3x at batch 1, TTFT 1.5x) against transformers in float32.
    assert decode[1] == "gpt2 int8 b1 p32 vs transformers fp32"
    assert decode[5] == 3.0 and decode[6] == 3.0 and decode[7] == pytest.approx(2e10 / 7.5e8)
    assert ttft[3] == pytest.approx(10.0) and ttft[6] == 1.5
    # Same-dtype rows report the bandwidth bound (GB/s over weight bytes), no ratio target.
    assert fp32_decode[6] is None and fp32_decode[7] == pytest.approx(40.0) and fp32_decode[8] == 0.75
    assert fp32_ttft[6] is None
    # The row's cache reads count too: 5e8 weight bytes + 5e8 of keys and values halve the bound.
    assert table([{**rows[1], "cache_bytes": 5e8}], hw)[0][7] == pytest.approx(20.0)
    # The bound is at this run's measured peak (4e11), not the row's own (2e11, gpt2kit's cached best), either way.
    assert train[6] == 2.0 and train[7] == pytest.approx(6000.0) and train[8] == pytest.approx(0.15)
    assert table(rows[2:], {**hw, "bf16_flops": 1e11})[0][7] == pytest.approx(1500.0)
    # Without a measured bf16 peak (a CPU that only emulates bf16), a bf16 row's bound is at its own peak.
    assert table(rows[2:], {"fp32_flops": 1e11, "bandwidth": 2e10})[0][7] == pytest.approx(3000.0)
    assert train_memory[5] == 1.5 and train_memory[6] == 1.0
    # The memory row needs both sides measured alone.
    assert [line[0] for line in table([{k: v for k, v in rows[2].items() if "mem" not in k}], hw)] == ["train"]
    # Prefill and evaluation are held to their arithmetic at the matmul peak of the dtype they multiply in.
    prefill = {**decode_row, "prefill_flops": 2e10, "compute_dtype": "bf16"}
    assert table([prefill], hw)[1][7] == pytest.approx(20.0) and table([prefill], hw)[1][8] == pytest.approx(0.5)
    eval_row = {"section": "eval", "task": "wikitext", "shape": "tiny", "tokens": 1000, "ours_s": 2.0,
                "peer_s": 5.0, "ratio": 2.5, "flops": 1e11}
    (line,) = table([eval_row], hw)
    assert line[5:9] == (2.5, 2.0, pytest.approx(1000.0), pytest.approx(0.5))
    # A float32 path that produced other tokens than transformers did other work: no ratio (int8 may differ).
    other = table([{**rows[1], "same_tokens": False}, {**decode_row, "same_tokens": False}], hw)
    assert other[0][1] == "gpt2 fp32 b1 p32 vs transformers fp32 (other tokens)" and other[0][5] is None
    assert other[2][5] == 3.0
    # Speculative rows compare against transformers' own prompt lookup: no bandwidth bound, target or TTFT line.
    (lookup,) = table([{**decode_row, "prompt_lookup": 10}], hw)
    assert lookup[1] == "gpt2 int8 b1 p32 lookup 10 vs transformers fp32 lookup 10"
    assert lookup[5] == 3.0 and lookup[6] is None and lookup[7] is None
    # A section that failed or was skipped is listed under the table, not in it.
    assert table([{"section": "train", "skipped": "failed: ModuleNotFoundError: lm_eval"}], hw) == []


def test_the_decode_peers_run_the_same_greedy_rule():
    """transformers was given min_new_tokens, which bans the end-of-text token on its side only: with that
    token the greedy choice, the two sides generated different tokens (and the peer paid a logits processor)."""
    import benchmarks.bench_generate as bench_generate

    config = bench_generate.SHAPES["tiny"]
    hf, ours = bench_generate.random_models(GPT2Config(**{**config.to_dict(), "n_layer": 1}))
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = ours.transformer(ids).last_hidden_state[0, -1]
        for model in (hf, ours):  # tied heads: end of text becomes the greedy choice in both
            model.transformer.wte.weight[50256] = 50 * hidden / hidden.norm()
    *_, ours_out = bench_generate.time_ours(ours, ids, 6)
    *_, hf_out = bench_generate.time_hf(hf, ids, 6)
    assert ours_out[0, 8:].tolist() == hf_out[0, 8:].tolist() == [50256] * 6


def test_an_int8_prefill_row_is_bound_by_the_dtype_it_multiplies_in(monkeypatch):
    """Its prefill was labelled bf16 always; on a CPU without bf16 it multiplies in float32 (and the TTFT bound
    is the float32 peak)."""
    import benchmarks.bench_generate as bench_generate

    monkeypatch.setitem(bench_generate.SHAPES, "tiny", GPT2Config(**{**bench_generate.SHAPES["tiny"].to_dict(),
                                                                     "n_layer": 1}))
    [row] = bench_generate.run("tiny", "int8", batch_sizes="1", new_tokens=3, repeats=1, device="cpu")
    product = long_input_dtype(torch.device("cpu"))
    assert row["compute_dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[product]
    assert row["same_tokens"]


def test_forward_flops_count_every_matmul_of_a_forward_pass():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gpt2kit.training.logging import forward_flops

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=300)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 300, (3, 16))
    # The math backend multiplies whole (T x T) score matrices, so attention counts 3 x 16 x 16 pairs.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(ids)
    assert counter.get_total_flops() == forward_flops(config, 3 * 16, 3 * 16, 3 * 16 * 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.transformer(ids)
    assert counter.get_total_flops() == forward_flops(config, 3 * 16, 0, 3 * 16 * 16)


def test_compiled_training_step_matches_eager(tiny_config):
    """train.compile's fast path: the compiled model's fused loss and gradients equal eager's."""
    torch.manual_seed(0)
    # No dropout: its random draws differ between compiled and eager kernels.
    config = dataclasses.replace(tiny_config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    batch = torch.randint(0, tiny_config.vocab_size, (2, 33))
    results = []
    for net in (model, torch.compile(model)):
        loss = net(batch[:, :-1], targets=batch[:, 1:], return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_benchmarks_take_a_device_and_refuse_cpu_only_formats_elsewhere():
    """The suite's device plumbing: rows say where they ran, memory is measured, and formats whose kernels only
    exist on a CPU are refused up front on a GPU (checked before any GPU is touched, so this runs anywhere)."""
    from benchmarks import bench_eval, bench_generate, bench_train
    from benchmarks.devices import default_device
    from benchmarks.sections import measure
    from gpt2kit.allocator import allocator_in_use

    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []  # the suite runs each call in a fresh process and adds the call's peak memory to its rows
    (row,) = measure(rows, torch.device("cpu"), bench_train.run, "tiny", "fp32", seq_len=16, batch_size=1, steps=1,
                     warmup=0, device="cpu")
    assert rows == [row] and row["peak_mem_mb"] > 0 and row["memory"] == "rss"
    assert row["allocator"] == allocator_in_use()  # the measuring process inherits this one's environment
    assert row["device"] == "cpu" and row["ours_tok_s"] > 0
    # A side's memory: that side alone (the suite runs it in a process of its own, as above).
    (alone,) = bench_train.run("tiny", "fp32", seq_len=16, batch_size=1, steps=1, warmup=0, device="cpu", sides="peer")
    assert alone["side"] == "peer" and alone["step_mem_mb"] > 0
    with pytest.raises(ValueError, match="int8-compiled, fp32-packed: CPU-only"):
        bench_generate.run("tiny", "fp32,int8-compiled,fp32-packed", device="cuda")
    with pytest.raises(ValueError, match="packed weights are a CPU layout"):
        bench_eval.run(packed=True, device="cuda")


def test_benchmark_processes_run_with_the_chosen_allocator(monkeypatch):
    """--allocator tcmalloc preloads tcmalloc into every measuring process (CI installs it); where the library is
    missing, the error names the package to install."""
    import ctypes.util

    from benchmarks.sections import measure
    from gpt2kit.allocator import preload_allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)  # restored after the test, with what preload_allocator sets
    if ctypes.util.find_library("tcmalloc") is None:
        with pytest.raises(ValueError, match="apt-get install libgoogle-perftools4"):
            preload_allocator("tcmalloc")
        return
    preload_allocator("tcmalloc")
    rows: list[dict] = []
    measure(rows, torch.device("cpu"), dict, section="probe")
    assert rows[0]["section"] == "probe" and rows[0]["allocator"] == "tcmalloc"


def _touch_then_sleep(path: str) -> None:
    Path(path).touch()
    time.sleep(300)


KILLED_RUN = """
import sys, torch
from benchmarks.sections import measure
from tests.test_performance import _touch_then_sleep
measure([], torch.device("cpu"), _touch_then_sleep, sys.argv[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_benchmark_run_takes_its_measuring_process_with_it(tmp_path):
    """The suite measures in a child process; killing the run (SIGKILL, no cleanup) must not leave that child
    waiting for work forever."""
    started = tmp_path / "started"
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(started)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"})
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert started.exists(), "the measuring process never ran"
    children = [int(pid) for pid in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()]
    assert children
    run.kill()
    run.wait(timeout=30)
    deadline = time.time() + 15
    while any(map(running, children)) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if running(pid)]
    for pid in left:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_nested_gpu_peak_memory_blocks_keep_the_enclosing_peak(monkeypatch):
    """PeakMemory on a GPU resets the allocator's peak per block; an enclosing block (a benchmark row around its
    per-step blocks) must still report the highest peak of the whole row. A fake allocator stands in for CUDA."""
    from benchmarks.devices import PeakMemory

    allocator = {"current": 0, "peak": 0}

    def allocate(size: int) -> None:
        allocator["current"] = size
        allocator["peak"] = max(allocator["peak"], size)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: allocator.update(peak=allocator["current"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    gpu = torch.device("cuda")
    with PeakMemory(gpu) as row:
        allocate(900)  # the row's peak, before its steps
        allocate(100)
        with PeakMemory(gpu) as step:
            allocate(300)
            allocate(100)
        allocate(200)
    assert step.peak == 300 and row.peak == 900


def test_a_serve_ratio_needs_the_same_work_on_both_sides():
    from benchmarks.__main__ import table

    ok = {"errors": [], "first_text": " the", "req_s": 4.0}
    row = {"section": "serve", "results": {"gpt2kit": ok, "transformers-cb": {**ok, "req_s": 2.0}}}
    assert [line[1:6:4] for line in table([row], None)] == [("req/s vs transformers-cb", 2.0)]
    row["results"]["transformers-cb"].update(errors=["ReadTimeout"], first_text=" a")
    (line,) = table([row], None)
    assert line[1] == "req/s vs transformers-cb (transformers-cb 1 errors, different greedy text)" and line[5] is None


def test_a_mask_built_for_a_cached_chunk_is_on_the_queries_device():
    """Without a padding mask, a multi-token forward after a cache builds its mask: on the model's device (a GPU),
    not torch's default."""
    mask, is_causal = build_attention_mask(None, past=2, T=3, device=torch.device("meta"))
    assert mask.device.type == "meta" and mask.shape == (1, 1, 3, 5) and not is_causal


def test_gpu_peaks_for_mfu(monkeypatch):
    """float32 on TF32 tensor cores is measured, not read from the datasheet's fp32 column; GPUs before Ampere
    only emulate bf16, so `precision: auto` takes fp16 there."""
    import gpt2kit.training.logging as logging_module
    from gpt2kit.training.trainer import native_bf16

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(logging_module, "measure_matmul_peak", lambda *a, **k: 1.23e14)
    assert logging_module.peak_flops(cuda, torch.float32) == (19.5e12, "NVIDIA A100-SXM4-40GB datasheet")
    assert logging_module.peak_flops(cuda, torch.bfloat16)[0] == 312e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert logging_module.peak_flops(cuda, torch.float32) == (1.23e14, "NVIDIA A100-SXM4-40GB measured matmul")
    # Names match as whole words: an RTX A1000 is no A100, an H100 NVL is measured (its datasheet differs).
    for name, expected in (("NVIDIA RTX A1000 Laptop GPU", (1.23e14, "NVIDIA RTX A1000 Laptop GPU measured matmul")),
                           ("NVIDIA H100 NVL", (1.23e14, "NVIDIA H100 NVL measured matmul")),
                           ("NVIDIA L4", (121e12, "NVIDIA L4 datasheet"))):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert logging_module.peak_flops(cuda, torch.bfloat16) == expected
    for capability, has_bf16 in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16(cuda) is has_bf16


@pytest.mark.parametrize("device, native, auto", [("cpu", True, "bf16"), ("cpu", False, "fp32"),
                                                   ("cuda", True, "bf16"), ("cuda", False, "fp16")])
def test_precision_auto_takes_bf16_only_where_it_is_native(monkeypatch, device, native, auto):
    from types import SimpleNamespace

    import gpt2kit.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: native)
    trainer = SimpleNamespace(device=torch.device(device))
    assert trainer_module.Trainer._pick_precision(trainer, "auto") == auto
    if native:
        assert trainer_module.Trainer._pick_precision(trainer, "bf16") == "bf16"
    elif device == "cuda":
        with pytest.raises(ValueError, match="this GPU has no bf16; use fp16"):
            trainer_module.Trainer._pick_precision(trainer, "bf16")
    else:
        with pytest.warns(UserWarning, match="this CPU has no bf16 instructions"):
            assert trainer_module.Trainer._pick_precision(trainer, "bf16") == "bf16"


def test_the_allocator_restart_mark_is_not_inherited(monkeypatch):
    """The restarted process drops its mark, so a child of it (a torchrun worker, a subprocess) asking for an
    allocator restarts itself instead of failing; a restart that did not load the allocator is still an error."""
    import gpt2kit.allocator as allocator

    monkeypatch.setenv("GPT2KIT_ALLOCATOR_RESTARTED", "1")
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "tcmalloc")
    allocator.restart_with_allocator("tcmalloc", ["train"])
    assert "GPT2KIT_ALLOCATOR_RESTARTED" not in os.environ
    monkeypatch.setenv("GPT2KIT_ALLOCATOR_RESTARTED", "1")
    with pytest.raises(ValueError, match="--allocator jemalloc: the process was restarted"):
        allocator.restart_with_allocator("jemalloc", ["train"])


def test_the_bench_leaves_out_bf16_rows_where_bf16_is_emulated(monkeypatch, tmp_path):
    """Without bf16 instructions neither training nor decoding plans a bf16 row, every other row stays, and the
    run says why; --emulated-bf16 keeps them."""
    import benchmarks.__main__ as bench
    import gpt2kit.training.trainer as trainer_module

    for full, gpu in ((False, False), (True, False), (True, True)):
        with_bf16 = bench.train_cases(full, gpu, True), bench.decode_cases(full, gpu, True)
        without = bench.train_cases(full, gpu, False), bench.decode_cases(full, gpu, False)
        assert any(case[3] == "bf16" for case in with_bf16[0])
        assert [case for case in with_bf16[0] if case[3] != "bf16"] == without[0]
        assert not any("bf16" in case[2] for case in without[1])
        kept = [(shape, prompt, ",".join(d for d in dtypes.split(",") if "bf16" not in d), *rest)
                for shape, prompt, dtypes, *rest in with_bf16[1]]
        assert [case for case in kept if case[2]] == without[1]
    assert ("gpt2", 512, "bf16", "1,8", None) in bench.decode_cases(True, True, True)
    assert all(case[2] != "" for case in bench.decode_cases(True, True, False))

    # A run on such a CPU: what it would measure (nothing is measured here) and the note it leaves.
    monkeypatch.setattr(trainer_module, "onednn_supports", lambda dtype: dtype == torch.float32)  # native_bf16's
    monkeypatch.setattr(bench, "print_report", lambda *args: None)
    for argv, emulated in (([], False), (["--emulated-bf16"], True)):
        calls, saved = [], tmp_path / f"{emulated}.json"
        monkeypatch.setattr(bench, "measure", lambda rows, where, fn, *args, **kw: calls.append(args) or (
            {"fp32_flops": 1e11, "bandwidth": 1e10} if fn is bench.hardware else []))
        bench.main(["--only", "hardware,train,decode", "--device", "cpu", "--json", str(saved), *argv])
        assert calls[0] == (torch.device("cpu"), emulated)  # the hardware section times bf16 products or not
        saved_rows = json.loads(saved.read_text())["rows"]
        assert not [r for r in saved_rows if "failed" in r.get("skipped", "")]
        assert any("bf16" in str(args) for args in calls[1:]) == emulated
        notes = [r["skipped"] for r in saved_rows if r["section"] == "bf16 rows"]
        assert len(notes) == (not emulated) and all("--emulated-bf16" in note for note in notes)
