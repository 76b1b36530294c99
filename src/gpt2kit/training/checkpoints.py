"""The on-disk layout of training checkpoints: write-then-rename directories sealed by a COMPLETE manifest.

    OUT_DIR/checkpoints/step-00000200/
        config.json, model.safetensors, tokenizer files     the model, HF layout (or LoRA adapters)
        training_state/state.pt                              optimizer, scheduler, scaler, RNG (tensors only)
        training_state/trainer_state.json                    step, sampler position, config, metrics
        training_state/dcp/                                  sharded runs: model + optimizer via DCP
        COMPLETE                                             written last: size and SHA-256 of every file

A directory without a valid COMPLETE (a run killed mid-save, a truncated copy) is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..files import link_tree, replace_directory, sha256_file

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "training_state"
DCP_DIR = "dcp"  # in STATE_DIR: model + optimizer of a sharded (FSDP / TP) run
COMPLETE_NAME = "COMPLETE"


def hash_files(directory: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every `world_size`-th file of a checkpoint directory, from the `rank`-th. The ranks of
    a sharded run hash its files together: rank 0 alone (624 GB of state for the 52B shape) kept the others
    waiting in their next collective past its timeout."""
    return {name: _record(directory / name) for name in _checkpoint_files(directory)[rank::world_size]}


def _checkpoint_files(directory: Path) -> list[str]:
    """The files a manifest records: every file below `directory` but the manifest, by path."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != COMPLETE_NAME)


def _record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: Path, step: int, hashed: dict[str, dict[str, Any]] | None = None) -> None:
    """Seal a fully written checkpoint directory: record every file's size and SHA-256 (those in `hashed`, from
    hash_files on each rank, are not read again). The directory is then published with files.replace_directory,
    which flushes every file, the record too, to disk first."""
    hashed = hashed or {}
    files = {name: hashed.get(name) or _record(directory / name) for name in _checkpoint_files(directory)}
    (directory / COMPLETE_NAME).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def rewrite_trainer_state(checkpoint: Path, changes: dict[str, Any]) -> None:
    """Update fields of a sealed checkpoint's trainer_state.json: a copy of the directory made of hard links, the
    new state and manifest written in it, swapped in whole (the checkpoint stays valid if this is interrupted)."""
    manifest = json.loads((checkpoint / COMPLETE_NAME).read_text())
    name = f"{STATE_DIR}/trainer_state.json"
    state = json.loads((checkpoint / name).read_text())
    if all(state.get(key) == value for key, value in changes.items()):
        return
    staging = checkpoint.parent / f".{checkpoint.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    link_tree(checkpoint, staging)
    for changed in (name, COMPLETE_NAME):
        (staging / changed).unlink()  # hard links: writing through them would change the sealed files
    (staging / name).write_text(json.dumps({**state, **changes}, indent=2) + "\n")
    write_manifest(staging, manifest["step"], {k: v for k, v in manifest["files"].items() if k != name})
    replace_directory(staging, checkpoint)


def verify_checkpoint(path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The trainer state of a checkpoint directory after checking its COMPLETE manifest (every file present
    with the recorded size and SHA-256). Raises CheckpointError naming what is wrong. The ranks of a job may
    share the hashing: each checks every file's size and the SHA-256 of every `world_size`-th, from the
    `rank`-th (see hash_files)."""
    path = Path(path)
    manifest_path = path / COMPLETE_NAME
    if not manifest_path.is_file():
        if (path.parent / COMPLETE_NAME).is_file():  # a folder inside a checkpoint was given
            raise CheckpointError(f"{path}: a part of the checkpoint {path.parent}; resume from {path.parent}")
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_NAME} marker; the run was probably "
                              "interrupted while saving)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not (isinstance(files, dict) and all(isinstance(info, dict) and isinstance(info.get("size"), int)
                                                and isinstance(info.get("sha256"), str) for info in files.values())):
            raise TypeError('"files" must map each file to its {"size", "sha256"}')
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for i, (name, info) in enumerate(sorted(files.items())):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, expected {info['size']}")
        if i % world_size == rank and sha256_file(file) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupted (SHA-256 mismatch)")
    return json.loads((path / STATE_DIR / "trainer_state.json").read_text())


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (partial ones included; see verify_checkpoint)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("step-*") if p.is_dir() and _step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=_step_of)


def restore_interrupted_swaps(out_dir: str | os.PathLike) -> None:
    """Put back a checkpoint that a kill took out of its place: a run killed between the two renames that swap
    in a sealed directory (a save, or rewrite_trainer_state) leaves step-N missing, and beside it the sealed new
    copy (.step-N.partial-*, with its manifest) and for a rewrite the old one (.step-N.old-*). The new copy is
    preferred; resuming verifies whichever it was."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    for aside in _set_aside(root):
        name = aside.name[1:].split(".partial-" if ".partial-" in aside.name else ".old-")[0]
        if (aside / COMPLETE_NAME).is_file() and not (root / name).exists():
            os.replace(aside, root / name)


def _set_aside(root: Path) -> list[Path]:
    """The hidden copies of checkpoints in `root` (.step-N.partial-* being written, .step-N.old-* being replaced)."""
    found = sorted(root.glob(".step-*.partial-*")) + sorted(root.glob(".step-*.old-*")) if root.is_dir() else []
    return [p for p in found if _step_of(p) is not None]


def _step_of(path: Path) -> int | None:
    """N of step-N, .step-N.partial-* or .step-N.old-*; None for other names."""
    digits = path.name.lstrip(".")[5:].split(".")[0]
    return int(digits) if path.name.lstrip(".").startswith("step-") and digits.isdigit() else None


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int | None) -> None:
    """Remove what a run killed while saving left behind, and all but the newest `keep_last` complete ones."""
    restore_interrupted_swaps(out_dir)
    root = Path(out_dir) / CHECKPOINTS_DIR
    # Half-written (the checkpoint, or a LoRA adapter staged beside it), or set aside while being replaced.
    for pattern in (".step-*.partial-*", "..step-*.partial-*", ".step-*.old-*"):
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last is None:
        return
    complete = [p for p in list_checkpoints(out_dir) if (p / COMPLETE_NAME).is_file()]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_checkpoints_after(out_dir: str | os.PathLike, step: int) -> list[Path]:
    """Remove the checkpoints past `step`, which an earlier run left in out_dir: a run starting at `step`
    writes its own, and keeping them would let pruning or `--resume auto` mix the two runs. Returns them. Copies
    a kill left hidden count too: the first save would put a sealed one back in its place."""
    found = list_checkpoints(out_dir) + _set_aside(Path(out_dir) / CHECKPOINTS_DIR)
    stale = [p for p in found if _step_of(p) > step]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resume_candidates(out_dir: str | os.PathLike, resume: str) -> list[Path]:
    """The checkpoints `resume` may mean, to try in order: the given directory, or for "auto" out_dir's, newest
    first."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
        return [path]
    return list(reversed(list_checkpoints(out_dir)))


def find_resume_checkpoint(out_dir: str | os.PathLike, resume: str, verify: Callable[[Path], Any] = verify_checkpoint,
                           report: bool = True, candidates: list[Path] | None = None) -> Path | None:
    """The checkpoint to resume from: a given directory (must be valid) or, for "auto", the newest valid one
    in out_dir; invalid ones are skipped, with a message when `report`. `verify` raises for an invalid one (the
    ranks of a job pass one that checks together, with rank 0's `candidates`; see verify_checkpoint)."""
    for path in resume_candidates(out_dir, resume) if candidates is None else candidates:
        try:
            verify(path)
            return path
        except (CheckpointError, OSError, ValueError) as err:
            if resume != "auto":
                raise
            if report:
                print(f"skipping checkpoint {path}: {err}", file=sys.stderr)
    return None
