"""Training throughput: gpt2kit vs transformers' GPT2LMHeadModel, same shapes, optimizer and batch, same run.

One training step = forward + loss + backward + gradient clipping + fused AdamW step (decay/no-decay groups),
under fp32 or bf16 autocast. Prints tokens/s, MFU (model FLOPs / measured peak, see gpt2kit.training.logging)
and the gpt2kit / transformers ratio. Runs on a CUDA GPU when there is one (--device): the clocks then wait for
the GPU, memory is the CUDA allocator's peak, and float32 matmuls use TF32 on both sides, as gpt2kit's Trainer
sets on a GPU.

    python benchmarks/bench_train.py                       # tiny and gpt2 (124M) shapes, fp32 and bf16
    python benchmarks/bench_train.py --shapes gpt2 --seq-len 1024 --batch-size 4 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.training.config import OptimArgs
from gpt2kit.training.logging import flops_per_token, peak_flops, synchronize
from gpt2kit.training.optim import build_optimizer
from gpt2kit.training.trainer import enable_tf32

if __package__:
    from .devices import PeakMemory, default_device
else:  # run as a script: benchmarks/ is on sys.path
    from devices import PeakMemory, default_device

SHAPES = {  # name: (preset, default seq_len, default batch); the shapes the performance targets are stated at
    "tiny": ("gpt2-mini", 256, 8),  # 6 layers, n_embd 384
    "gpt2": ("gpt2", 256, 4),
}


def build_models(preset: str, seq_len: int, device: torch.device, sides: str = "both"):
    """(config, gpt2kit model, transformers model) of a shape; with `sides` "ours" or "peer" the other is None
    (never built: its memory stays out of a one-sided measurement)."""
    import transformers

    config = GPT2Config.from_name(preset, n_positions=max(seq_len, 256), resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).to(device).train() if sides != "peer" else None
    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items()
                                           if k not in ("architectures", "model_type")})
    theirs = transformers.GPT2LMHeadModel(hf_config).to(device).train() if sides != "ours" else None
    return config, ours, theirs


def time_training(runs: list[tuple[torch.nn.Module, object, torch.Tensor]], *, precision: str, steps: int,
                  warmup: int, device: torch.device) -> tuple[list[float], list[int]]:
    """Median seconds per optimizer step of each (model, loss function, batch), and the peak memory (bytes, see
    PeakMemory) during its timed steps (not the warm-up, which may compile). The models take turns step by step,
    so load from other processes on a shared machine hits both alike. Every model in `runs` is resident during
    every step: a side's own memory is measured with it alone (run(..., sides=...))."""
    optimizers = [build_optimizer(model, OptimArgs(lr=1e-4)) for model, _, _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    peaks = [0] * len(runs)
    for i in range(warmup + steps):
        for side, ((model, step_loss, batch), optimizer, record) in enumerate(zip(runs, optimizers, times)):
            synchronize(device)
            start = time.perf_counter()
            with PeakMemory(device) as memory:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = step_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= warmup:
                record.append(time.perf_counter() - start)
                peaks[side] = max(peaks[side], memory.peak)
    return [statistics.median(t) for t in times], peaks


def ours_loss(model, batch):
    return model(batch[:, :-1], targets=batch[:, 1:], return_logits=False).loss


def theirs_loss(model, batch):
    return model(batch, labels=batch).loss


def run(shapes: str = "tiny,gpt2", precisions: str = "fp32,bf16", seq_len: int | None = None,
        batch_size: int | None = None, steps: int = 3, warmup: int = 1, compiled: bool = False,
        device: torch.device | str | None = None, sides: str = "both") -> list[dict]:
    """One row per shape x precision: tokens/s and MFU of both sides, ratio = gpt2kit / transformers.
    `compiled` runs gpt2kit's model through torch.compile (what `train.compile: true` does; transformers stays
    eager, as its own Trainer runs by default); the first two steps, which compile, are not timed. `device`
    defaults to the GPU when there is one. `sides` "ours" or "peer": that side alone, for its memory (a row of
    {"side", "step_mem_mb"} per shape x precision; run it in a fresh process, as the suite does)."""
    if sides not in ("both", "ours", "peer"):
        raise ValueError(f"sides must be both, ours or peer, got {sides!r}")
    device = torch.device(device) if device else default_device()
    enable_tf32(device)  # as gpt2kit's Trainer does on a GPU; process-wide, so both sides get it
    rows = []
    for shape in shapes.split(","):
        preset, default_seq, default_batch = SHAPES[shape]
        seq, batch_n = seq_len or default_seq, batch_size or default_batch
        config, ours, theirs = build_models(preset, seq, device, sides)
        model = torch.compile(ours) if compiled and ours is not None else ours
        batch = torch.randint(0, config.vocab_size, (batch_n, seq + 1), generator=torch.Generator().manual_seed(0))
        batch = batch.to(device)
        if sides != "both":
            run_ = (model, ours_loss, batch) if sides == "ours" else (theirs, theirs_loss, batch[:, :seq])
            for precision in precisions.split(","):
                _, (memory,) = time_training([run_], precision=precision, steps=steps,
                                             warmup=max(warmup, 2) if compiled else warmup, device=device)
                rows.append({"shape": shape, "precision": precision, "side": sides, "step_mem_mb": memory / 1e6})
            continue
        tokens = batch_n * seq
        matmul_params = ours.num_parameters() - ours.transformer.wpe.weight.numel()
        flops = flops_per_token(config, matmul_params, seq) * tokens
        for precision in precisions.split(","):
            peak, _ = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
            # Both forward seq positions: ours with aligned targets, HF with labels it shifts itself.
            (t_ours, t_theirs), _ = time_training(
                [(model, ours_loss, batch), (theirs, theirs_loss, batch[:, :seq])], precision=precision,
                steps=steps, warmup=max(warmup, 2) if compiled else warmup, device=device)
            rows.append({"device": device.type, "shape": shape, "precision": precision, "compiled": compiled,
                         "batch": batch_n, "seq_len": seq,
                         "ours_tok_s": tokens / t_ours, "peer_tok_s": tokens / t_theirs,
                         "ours_mfu": flops / t_ours / peak, "peer_mfu": flops / t_theirs / peak,
                         "peak_flops": peak, "bound_tok_s": peak / (flops / tokens), "ratio": t_theirs / t_ours})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--seq-len", type=int, default=None, help="default per shape (256)")
    parser.add_argument("--batch-size", type=int, default=None, help="default per shape")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile gpt2kit's model (train.compile)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    if args.threads:
        torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; step = fwd + bwd + clip + fused AdamW")
    header = (f"{'shape':<6} {'prec':<5} {'batch':>9} | {'gpt2kit tok/s':>13} {'MFU':>6} | "
              f"{'transformers tok/s':>18} {'MFU':>6} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for r in run(args.shapes, args.precisions, args.seq_len, args.batch_size, args.steps, args.warmup, args.compile,
                 device):
        print(f"{r['shape']:<6} {r['precision']:<5} {r['batch']:>3}x{r['seq_len']:<5} | {r['ours_tok_s']:>13,.0f} "
              f"{r['ours_mfu']:>6.1%} | {r['peer_tok_s']:>18,.0f} {r['peer_mfu']:>6.1%} | {r['ratio']:>5.2f}",
              flush=True)
    print("ratio = gpt2kit tokens/s / transformers tokens/s; MFU against the device's matmul peak (measured on a "
          "CPU, the datasheet's on a known GPU)")


if __name__ == "__main__":
    main()
