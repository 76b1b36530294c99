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
import threading
import time
from typing import ClassVar

import psutil
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.training.config import OptimArgs
from gpt2kit.training.logging import flops_per_token, peak_flops
from gpt2kit.training.optim import build_optimizer

SHAPES = {  # name: (preset, default seq_len, default batch)
    "tiny": ("gpt2-tiny", 256, 4),
    "gpt2": ("gpt2", 256, 1),
}


def _reset_high_water_mark() -> bool:
    """Reset this process's peak RSS (VmHWM) where Linux allows it; False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakRSS:
    """Peak resident memory (this process and its children) while the `with` block runs.

    This process's peak is the kernel's exact high-water mark, reset on entry (an enclosing PeakRSS keeps the
    mark reached so far); a thread samples the children (and this process, where the mark cannot be reset)
    every `interval` seconds. A coarse interval matters: a thread waking every few milliseconds takes the GIL
    from the decode loop being measured."""

    _active: ClassVar[list[PeakRSS]] = []  # the blocks being measured, outermost first

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._reached = 0  # this process's mark before an inner block reset it

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = sum(c.memory_info().rss for c in me.children(recursive=True))
                rss += 0 if self._exact else me.memory_info().rss
            except psutil.Error:  # a child exited while being read
                continue
            self._sampled = max(self._sampled, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        for outer in self._active:
            outer._reached = max(outer._reached, _high_water_mark())
        self._exact, self._sampled = _reset_high_water_mark(), 0
        self._active.append(self)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._active.remove(self)
        own = max(self._reached, _high_water_mark()) if self._exact else 0
        self.peak = self._sampled + own


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
                  warmup: int) -> tuple[list[float], list[int]]:
    """Median seconds per optimizer step of each (model, loss function, batch), and the peak RSS (bytes) during
    its steps. The models take turns step by step, so load from other processes on a shared machine hits both
    alike; both stay in memory throughout, so the RSS difference is the difference of their step's memory."""
    optimizers = [build_optimizer(model, OptimArgs(lr=1e-4)) for model, _, _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    peaks = [0] * len(runs)
    for i in range(warmup + steps):
        for side, ((model, step_loss, batch), optimizer, record) in enumerate(zip(runs, optimizers, times)):
            start = time.perf_counter()
            with PeakRSS() as rss:
                with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                    loss = step_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                record.append(time.perf_counter() - start)
            peaks[side] = max(peaks[side], rss.peak)
    return [statistics.median(t) for t in times], peaks


def ours_loss(model, batch):
    return model(batch[:, :-1], targets=batch[:, 1:], return_logits=False).loss


def theirs_loss(model, batch):
    return model(batch, labels=batch).loss


def run(shapes: str = "tiny,gpt2", precisions: str = "fp32,bf16", seq_len: int | None = None,
        batch_size: int | None = None, steps: int = 3, warmup: int = 1, compiled: bool = False) -> list[dict]:
    """One row per shape x precision: tokens/s and MFU of both sides, ratio = gpt2kit / transformers.
    `compiled` runs gpt2kit's model through torch.compile (what `train.compile: true` does; transformers stays
    eager, as its own Trainer runs by default); the first two steps, which compile, are not timed."""
    rows = []
    for shape in shapes.split(","):
        preset, default_seq, default_batch = SHAPES[shape]
        seq, batch_n = seq_len or default_seq, batch_size or default_batch
        config, ours, theirs = build_models(preset, seq)
        model = torch.compile(ours) if compiled else ours
        batch = torch.randint(0, config.vocab_size, (batch_n, seq + 1), generator=torch.Generator().manual_seed(0))
        tokens = batch_n * seq
        matmul_params = ours.num_parameters() - ours.transformer.wpe.weight.numel()
        flops = flops_per_token(config, matmul_params, seq) * tokens
        for precision in precisions.split(","):
            peak, _ = peak_flops(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32)
            # Both forward seq positions: ours with aligned targets, HF with labels it shifts itself.
            (t_ours, t_theirs), (m_ours, m_theirs) = time_training(
                [(model, ours_loss, batch), (theirs, theirs_loss, batch[:, :seq])], precision=precision,
                steps=steps, warmup=max(warmup, 2) if compiled else warmup)
            rows.append({"shape": shape, "precision": precision, "compiled": compiled, "batch": batch_n, "seq_len": seq,
                         "ours_tok_s": tokens / t_ours, "peer_tok_s": tokens / t_theirs,
                         "ours_mfu": flops / t_ours / peak, "peer_mfu": flops / t_theirs / peak,
                         "peak_flops": peak, "bound_tok_s": peak / (flops / tokens), "ratio": t_theirs / t_ours,
                         "ours_step_rss_mb": m_ours / 1e6, "peer_step_rss_mb": m_theirs / 1e6})
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; step = fwd + bwd + clip + fused AdamW")
    header = (f"{'shape':<6} {'prec':<5} {'batch':>9} | {'gpt2kit tok/s':>13} {'MFU':>6} | "
              f"{'transformers tok/s':>18} {'MFU':>6} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for r in run(args.shapes, args.precisions, args.seq_len, args.batch_size, args.steps, args.warmup, args.compile):
        print(f"{r['shape']:<6} {r['precision']:<5} {r['batch']:>3}x{r['seq_len']:<5} | {r['ours_tok_s']:>13,.0f} "
              f"{r['ours_mfu']:>6.1%} | {r['peer_tok_s']:>18,.0f} {r['peer_mfu']:>6.1%} | {r['ratio']:>5.2f}",
              flush=True)
    print("ratio = gpt2kit tokens/s / transformers tokens/s; MFU against the best measured CPU matmul peak")


if __name__ == "__main__":
    main()
