"""Training metrics: model FLOPs utilisation (MFU), a JSONL metrics file, TensorBoard and the loss-curve PNG.

MFU = achieved model FLOPs / peak FLOPs of the device. Model FLOPs per token follow the PaLM appendix:
6 x (parameters used in matmuls) + 12 x layers x width x sequence (attention scores and mix), forward + backward,
without recomputation. The peak comes from a per-device table on GPUs and from a timed matmul on CPUs (measured
at startup; the best result per CPU, thread count and dtype is cached), never from one hard-coded accelerator.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..config import GPT2Config
from ..cpu_matmul import cpuinfo, onednn_linear, onednn_supports
from ..files import atomic_file, atomic_write_text, read_json, standard_json

# Dense peak TFLOP/s (no sparsity) by GPU name fragment: (bf16/fp16 tensor cores, fp32).
# Matched as whole words of torch.cuda.get_device_name ("A100" is not "RTX A1000"), first match wins; None: a
# variant whose datasheet differs from its family's (H100 NVL), measured like an unknown GPU.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float] | None] = {
    "H100 NVL": None, "H100 SXM": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5), "A800": (312.0, 19.5), "L40S": (362.0, 91.6), "L40": (181.0, 90.5), "L4": (121.0, 30.3),
    "A10G": (70.0, 31.2), "A10": (125.0, 31.2), "A6000": (154.8, 38.7), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
    "RTX 4090": (165.2, 82.6), "RTX 3090": (35.6, 35.6),
}


def flops_per_token(config: GPT2Config, matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a GPT-2 with `matmul_params` weights in matmuls."""
    return 6.0 * matmul_params + 12.0 * config.n_layer * config.n_embd * seq_len


def forward_flops(config: GPT2Config, positions: int, head_rows: int, attention_pairs: float) -> float:
    """Matmul FLOPs of an inference forward pass: the blocks' projections at `positions` token positions, the LM
    head at `head_rows` of them, attention's two products over `attention_pairs` (query, key) pairs (a causal
    window of T tokens has T(T+1)/2). The least arithmetic any implementation does, so the time it takes at the
    matmul peak bounds the speed of prefill and evaluation."""
    d = config.n_embd
    return (24.0 * config.n_layer * d * d * positions + 2.0 * config.vocab_size * d * head_rows
            + 4.0 * config.n_layer * d * attention_pairs)


def _cpu_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: a GPU runs asynchronously, so clocks are read after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 3,
                        device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of a square matmul on `device` (the fastest of `repeats` timed runs). On a CPU with oneDNN
    both PyTorch's default kernel and oneDNN's are timed and the faster counts: for float32 the default is MKL,
    which runs at less than half oneDNN's speed on some CPUs (see cpu_matmul)."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    kernels = [torch.mm]
    if a.device.type == "cpu" and onednn_supports(dtype):
        kernels.append(lambda a, b: onednn_linear(a, b.T))
    best = float("inf")
    inner = 4
    for kernel in kernels:
        kernel(a, b)  # warm up (thread pool, oneDNN or cuBLAS kernels)
        for _ in range(repeats):
            synchronize(a.device)
            start = time.perf_counter()
            for _ in range(inner):
                kernel(a, b)
            synchronize(a.device)
            best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * size ** 3 / best


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "gpt2kit" / "matmul_peak.json"


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for training in `dtype` on `device`."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = not low_precision and torch.get_float32_matmul_precision() != "highest"
        peaks = next((peaks for fragment, peaks in GPU_PEAK_TFLOPS.items()
                      if re.search(rf"\b{re.escape(fragment)}\b", name)), None)
        if peaks is not None and not tf32:  # float32 on TF32 tensor cores: measured below
            return (peaks[0] if low_precision else peaks[1]) * 1e12, f"{name} datasheet"
        # An unknown GPU, or float32 on TF32 tensor cores: measure like on a CPU rather than guess.
        return measure_matmul_peak(dtype, size=4096, device=device), f"{name} measured matmul"
    key = f"{_cpu_name()}|{torch.get_num_threads()} threads|{dtype}|torch {torch.__version__}"
    cache = _cache_file()
    try:
        known = read_json(cache)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):  # a damaged cache is measured anew, never a failed run
        known = {}
    # Other processes on the machine slow a measurement down, never speed it up: keep the best one seen.
    # float16 products run at about 1 GFLOP/s on CPUs without native float16 (emulated): a 1024-square product
    # would take a minute to time, a 256-square one well under a second.
    measured = measure_matmul_peak(dtype, size=256 if dtype == torch.float16 else 1024)
    previous = known.get(key)
    if not (isinstance(previous, (int, float)) and math.isfinite(previous)) or measured > previous:
        known[key] = measured
        try:
            atomic_write_text(cache, json.dumps(known, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return float(known[key]), f"best measured {dtype} matmul on {torch.get_num_threads()} CPU threads"


class MetricsLogger:
    """Writes each record to `metrics.jsonl` (one JSON object per line) and to TensorBoard.

    When a run resumes from step S, records after S (written by the interrupted run after its last checkpoint)
    are dropped, so the file always describes one uninterrupted run."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int = 0,
                 enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._file, self.writer = None, None
        if not enabled:  # ranks other than 0 of a distributed run: the same numbers, written once
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json_line(r) for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events an interrupted run wrote after the checkpoint we resume from, and all
            # events of an earlier run in this out_dir when starting afresh (as metrics.jsonl is trimmed).
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else 0)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json_line({"step": step, **values}))
        self._file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(tensorboard_tag(key), value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: val_loss -> val/loss, val_subset_loss -> val/subset_loss,
    train_loss -> train/loss, lr -> train/lr."""
    if "/" in key:
        return key
    for split in ("train", "val"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key.removeprefix(split + '_')}"
    return f"train/{key}"


def json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line: standard JSON, a non-finite number (an fp16 overflow step's gradient norm) as the
    string "inf" or "nan"."""
    return json.dumps(standard_json(record), allow_nan=False) + "\n"


def _number(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file, "inf" and "nan" read back as floats; a torn last line (the process was
    killed mid-write) is ignored."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            records.append({key: _number(value) for key, value in json.loads(line).items()})
        except (json.JSONDecodeError, AttributeError):
            continue
    return records


def plot_losses(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "",
                unit: str = "token") -> Path | None:
    """Train and validation loss (nats per `unit`: a classifier's are per example) against step as a PNG (written
    atomically); None when nothing was logged."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    subset = [(r["step"], r["val_subset_loss"]) for r in records if "val_subset_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val and not subset:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:  # one point is a marker (a line through one point draws nothing)
        ax.plot(*zip(*train), "o-" if len(train) == 1 else "-", label="train", linewidth=1.0, alpha=0.8)
    if subset:
        ax.plot(*zip(*subset), "s--", label="validation (eval_batches)", linewidth=1.0, markersize=3)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats / {unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path
