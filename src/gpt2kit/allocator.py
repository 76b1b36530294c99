"""Running under tcmalloc or jemalloc instead of glibc's malloc (Linux), as `gpt2kit --allocator tcmalloc ...`.

A CPU training step allocates and frees hundreds of MB. glibc's malloc returns large freed blocks to the kernel
and hands out blocks that have gone cold, so the step pays for touching fresh memory again; tcmalloc and jemalloc
hand back the block freed last, still warm. On the benchmark machine tcmalloc made gpt2kit's training steps
0-30 % faster (about 10 % typically) and transformers' up to 2.4x (docs/performance.md, "The allocator"). The
allocator has to be loaded before the process starts (LD_PRELOAD), so the CLI starts itself again with it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# name: (the library's name for ctypes.util.find_library, the Debian/Ubuntu package that ships it)
ALLOCATORS = {"tcmalloc": ("tcmalloc", "libgoogle-perftools4"), "jemalloc": ("jemalloc", "libjemalloc2")}
_RESTARTED = "GPT2KIT_ALLOCATOR_RESTARTED"  # set for the restarted process: a second restart would loop


def allocator_in_use() -> str:
    """"tcmalloc" or "jemalloc" when one is mapped into this process, else "glibc malloc"."""
    maps = Path("/proc/self/maps")
    mapped = maps.read_text() if maps.exists() else ""
    return next((name for name, (library, _) in ALLOCATORS.items() if f"lib{library}" in mapped), "glibc malloc")


def preload_allocator(name: str) -> None:
    """Make processes started after this call (exec'd or spawned) allocate through `name`, a key of ALLOCATORS,
    by adding its library to LD_PRELOAD."""
    if not sys.platform.startswith("linux"):
        raise ValueError(f"--allocator {name} works on Linux only (it preloads the library with LD_PRELOAD)")
    library, package = ALLOCATORS[name]
    soname = ctypes.util.find_library(library)
    if soname is None:
        raise ValueError(f"--allocator {name}: lib{library} is not installed (Debian/Ubuntu: apt-get install "
                         f"{package})")
    os.environ["LD_PRELOAD"] = " ".join(filter(None, (os.environ.get("LD_PRELOAD"), soname)))


def restart_with_allocator(name: str, argv: Sequence[str]) -> None:
    """Return if `name` already serves this process; otherwise replace the process by `python -m gpt2kit argv`
    with the allocator preloaded (same pid, so torchrun and shells keep tracking it)."""
    # The mark is this process's alone: its children (a torchrun worker, a subprocess) choose for themselves.
    restarted = os.environ.pop(_RESTARTED, None)
    if allocator_in_use() == name:
        return
    if restarted:
        raise ValueError(f"--allocator {name}: the process was restarted with LD_PRELOAD="
                         f"{os.environ.get('LD_PRELOAD', '')!r} but {name} is not loaded")
    preload_allocator(name)
    os.environ[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gpt2kit", *argv])
