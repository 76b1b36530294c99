"""File helpers shared by the data, training, evaluation and checkpoint code: checksums, JSON, atomic writes."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (corpora and checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read on Linux without setting it (setting it to read it back races with other
    threads creating files meanwhile)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_directory(path: str | os.PathLike, *, overwrite: bool, replaces: bool = False,
                           source: Path | None = None) -> Path:
    """`path` as a Path if a model directory may be written there: new, empty, or non-empty with `overwrite`
    (which writes into it, or with `replaces` replaces it whole), and neither `source` (the model directory being
    exported) nor one of its parents."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    replaced_directory(path)  # the directory is written whole and swapped in: never the working one (first: not
    # "pass --overwrite" for a directory that --overwrite would refuse); nor the source, which it would delete
    if source is not None and path.resolve() in (source.resolve(), *source.resolve().parents):
        raise ValueError(f"{path}: the output would replace the model being exported ({source})")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path}: already exists; pass --overwrite (overwrite=True) to "
                         f"{'replace it (its other files go)' if replaces else 'write into it'}")
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if a file can be written there as far as its name goes: an error names it when it is a
    directory or below a file (checked before long work, so the work is not lost at the end)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; expected the path of a file to write")
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is a file, not a directory")
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk (a file system that cannot sync a directory is
    left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary sibling of `path` to write in the `with` block; it becomes `path` by a rename when the
    block ends, or is removed if it raises: a reader sees the old file or the whole new one, never half of it.
    It gets the permissions open() would give `path` (tempfile makes its files private, 0600, and the rename
    would keep that). Creates the parent directory. Errors of the file system name `path`, not the temporary."""
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise type(err)(err.errno, f"{path}: cannot write in {path.parent} ({err.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fsync_path(tmp)  # on disk before the name points at it: a power cut cannot publish a torn file
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise type(err)(err.errno, f"{path}: cannot replace it ({err.strerror})") from None
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_directories(directory: str | os.PathLike, error: type[Exception] = ValueError) -> None:
    """mkdir -p, with one `error` naming the file in the way instead of errno 17/20 naming only a path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        where = "" if blocker == directory else f" cannot be created: {blocker}"
        raise error(f"{directory}:{where} exists and is not a directory") from None


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs (a staging directory named after it may still be written)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_abandoned(target: Path, kinds: Sequence[str]) -> None:
    """Remove the hidden siblings of `target` that dead processes left: `.NAME.KIND-PID...` for each kind (a
    staging "tmp" or "partial" copy, an "old" one a replacement moved aside), whose PID no longer runs."""
    for kind in kinds:
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = stale.name[len(f".{target.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


def replaced_directory(target: str | os.PathLike) -> Path:
    """The directory that writing `target` atomically replaces: absolute ("." and ".." have no name to make a
    sibling of), the one a symlink points to (the link stays). ValueError for the working directory or one above
    it, which the process (and its shell) would be left standing in."""
    target = Path(os.path.abspath(target))
    if target.is_symlink() and target.is_dir():
        target = target.resolve()
    cwd = Path.cwd()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise ValueError(f"{target}: is the current directory or one above it, which writing replaces; write to "
                         "a directory below it (e.g. ./model)")
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A new hidden sibling directory of `target` to fill in the `with` block; it replaces `target` (see
    replace_directory, and `keep` there) when the block ends, or is removed if it raises. Creates the parent
    directory. A symlink to a directory stays: the directory it points to is replaced."""
    target = replaced_directory(target)
    make_directories(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_directory(tmp, target, keep=keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike, *,
                      keep: Callable[[str], bool] | None = None) -> Path:
    """Make the finished directory `staging` (a sibling of `target`) become `target`. An existing `target`
    is moved aside first and deleted only after the rename, so `target` is never a half-written directory.
    Everything written in it gets the permissions mkdir() and open() give under the umask: tempfile's
    directories and some writers' files (safetensors) are private otherwise, unreadable to, e.g., a service
    serving the model. An existing `target` directory passes its own mode on (a private directory stays private).
    `keep(name)`: the entries of the old `target` to carry into the new one (hard links, permissions unchanged)
    when `staging` has none of that name."""
    staging, target = Path(os.path.abspath(staging)), Path(os.path.abspath(target))
    if target.is_file() and not target.is_symlink():  # never replace a user's file by a directory
        raise FileExistsError(f"{target}: exists and is not a directory")
    umask = _umask()
    for root, _, files in os.walk(staging, topdown=False):  # on disk before the rename publishes them
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
            fsync_path(os.path.join(root, name))
        os.chmod(root, 0o777 & ~umask)
        fsync_path(root)
    if target.is_dir():
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
    if keep is not None and target.is_dir() and not target.is_symlink():
        for entry in target.iterdir():
            if keep(entry.name) and not os.path.lexists(staging / entry.name):
                link_tree(entry, staging / entry.name)
    old = None
    if target.is_symlink() or target.is_file() or (target.is_dir() and any(target.iterdir())):
        # A unique name: one left behind by a killed process (in a container, often the same pid) never blocks.
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)  # replaces an empty directory too
    fsync_path(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    return target


def link_tree(source: Path, destination: Path) -> None:
    """A copy of a file, link or directory tree made of hard links (copies where linking is refused)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=link)
    elif source.is_symlink():
        os.symlink(os.readlink(source), destination)
    else:
        link(str(source), str(destination))


def require_file(path: str | os.PathLike, kind: str) -> Path:
    """`path` as a Path when it is a file; else FileNotFoundError naming it as the `kind` ("data file", ...) and
    saying whether it is missing or a directory."""
    path = Path(path)
    if not path.is_file():
        found = "is a directory, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{path}: {kind} {found}")
    return path


def read_utf8(path: str | os.PathLike, *, error: type[Exception] = ValueError, newlines: bool = True) -> str:
    """A UTF-8 file's text without a leading byte-order mark (spreadsheet and editor exports write one).
    Invalid UTF-8 raises `error` naming the file, line and byte offset. `newlines`: \r\n and \r become \n,
    as Path.read_text does (the csv module wants them kept)."""
    path = Path(path)
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise error(f"{path}:{line}: invalid UTF-8 at byte offset {offset} ({data[offset:offset + 4]!r}...)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if newlines else text


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> Any:
    """The parsed JSON of a UTF-8 file. Invalid JSON or UTF-8 raises `error` naming the file; a missing file
    raises FileNotFoundError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON here (nested deeper than Python's parser goes)") from None


def standard_json(value: Any) -> Any:
    """`value` with floats past JSON's range as the strings "inf", "-inf" and "nan": JSON has no literal for them,
    and Python's `Infinity` extension breaks other readers (browsers, jq)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(item) for item in value]
    return value
