"""Training throughput: gpt2kit vs transformers' GPT2LMHeadModel, same shapes, optimizer and batch, same run.

One training step = forward + loss + backward + gradient clipping + fused AdamW step (decay/no-decay groups),
under fp32 or bf16 autocast. Prints tokens/s, MFU (model FLOPs / measured peak, see gpt2kit.training.logging)
and the gpt2kit / transformers ratio.

    python benchmarks/bench_train.py                       # tiny and gpt2 (124M) shapes, fp32 and bf16
    python benchmarks/bench_train.py --shapes gpt2 --seq-len 1024 --batch-size 4 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.training.config import OptimArgs
from gpt2kit.training.logging import flops_per_token, peak_flops
from gpt2kit.training.optim import build_optimizer

SHAPES = {  # name: (preset, default seq_len, default batch)
    "tiny": ("gpt2-tiny", 256, 4),
    "gpt2": ("gpt2", 256, 1),
}


def build_models(preset: str, seq_len: int):
    import transformers

    config = GPT2Config.from_name(preset, n_positions=max(seq_len, 256), resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config).train()
    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items()
                                           if k not in ("architectures", "model_type")})
    theirs = transformers.GPT2LMHeadModel(hf_config).train()
    return config, ours, theirs


def time_training(runs: list[tuple[torch.nn.Module, object, torch.Tensor]], *, precision: str, steps: int,
                  warmup: int) -> list[float]:
    """Median seconds per optimizer step of each (model, loss function, batch). The models take turns step by
    step, so load from other processes on a shared machine hits both alike."""
    optimizers = [build_optimizer(model, OptimArgs(lr=1e-4)) for model, _, _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + steps):
        for (model, step_loss, batch), optimizer, record in zip(runs, optimizers, times):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                loss = step_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def ours_loss(model, batch):
    return model(batch[:, :-1], targets=batch[:, 1:]).loss


def theirs_loss(model, batch):
    return model(batch, labels=batch).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--seq-len", type=int, default=None, help="default per shape (256)")
    parser.add_argument("--batch-size", type=int, default=None, help="default per shape")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; step = fwd + bwd + clip + fused AdamW")
    header = (f"{'shape':<6} {'prec':<5} {'batch':>9} | {'gpt2kit tok/s':>13} {'MFU':>6} | "
              f"{'transformers tok/s':>18} {'MFU':>6} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        preset, default_seq, default_batch = SHAPES[shape]
        seq_len, batch_size = args.seq_len or default_seq, args.batch_size or default_batch
        config, ours, theirs = build_models(preset, seq_len)
        batch = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1),
                              generator=torch.Generator().manual_seed(0))
        tokens = batch_size * seq_len
        matmul_params = ours.num_parameters() - ours.transformer.wpe.weight.numel()
        flops = flops_per_token(config, matmul_params, seq_len) * tokens
        for precision in args.precisions.split(","):
            peak, _ = peak_flops(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32)
            # Both forward seq_len positions: ours with aligned targets, HF with labels it shifts itself.
            t_ours, t_theirs = time_training([(ours, ours_loss, batch), (theirs, theirs_loss, batch[:, :seq_len])],
                                             precision=precision, steps=args.steps, warmup=args.warmup)
            print(f"{shape:<6} {precision:<5} {batch_size:>3}x{seq_len:<5} | {tokens / t_ours:>13,.0f} "
                  f"{flops / t_ours / peak:>6.1%} | {tokens / t_theirs:>18,.0f} {flops / t_theirs / peak:>6.1%} | "
                  f"{t_theirs / t_ours:>5.2f}", flush=True)
    print("ratio = gpt2kit tokens/s / transformers tokens/s; MFU against the best measured CPU matmul peak")


if __name__ == "__main__":
    main()
