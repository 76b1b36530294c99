"""File helpers shared by the data, training, evaluation and checkpoint code: checksums, JSON, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (corpora and checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a hidden temporary sibling and a rename: a reader sees the old
    file or the whole new one, never half of it. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make the finished directory `staging` (a sibling of `target`) become `target`. An existing `target`
    is moved aside first and deleted only after the rename, so `target` is never a half-written directory."""
    staging, target = Path(staging), Path(target)
    old = None
    if target.is_symlink() or target.is_file() or (target.is_dir() and any(target.iterdir())):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)  # replaces an empty directory too
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    return target


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> Any:
    """The parsed JSON of a UTF-8 file. Invalid JSON or UTF-8 raises `error` naming the file; a missing file
    raises FileNotFoundError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
