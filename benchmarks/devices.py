"""What the benchmarks need to measure work on a CPU or a CUDA GPU alike: the default device and the peak memory
of a block of work (process RSS on a CPU, the CUDA allocator's peak on a GPU). Clocks around GPU work are read
after gpt2kit.training.logging.synchronize."""

from __future__ import annotations

import threading
from typing import ClassVar

import psutil
import torch


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


class PeakMemory:
    """Peak memory (bytes) while the `with` block runs on `device`: the CUDA caching allocator's peak of tensor
    memory on a GPU (weights included), the process's peak RSS (see PeakRSS) on a CPU. Blocks nest as PeakRSS's
    do: resetting the allocator's peak for an inner block first hands the peak so far to the enclosing ones."""

    _active: ClassVar[list[PeakMemory]] = []  # the GPU blocks being measured, outermost first

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._rss = None if device.type == "cuda" else PeakRSS()
        self._reached = 0  # the allocator's peak before an inner block reset it

    def __enter__(self) -> PeakMemory:
        if self._rss is not None:
            self._rss.__enter__()
            return self
        torch.cuda.synchronize(self.device)
        for outer in self._active:
            outer._reached = max(outer._reached, torch.cuda.max_memory_allocated(outer.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        self._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._rss is not None:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak
            return
        torch.cuda.synchronize(self.device)
        self._active.remove(self)
        self.peak = max(self._reached, torch.cuda.max_memory_allocated(self.device))
