"""Files that readers never see half-written: atomic text writes and atomic folder swaps.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from dsformer.files import atomic_folder, atomic_write_text
    >>> root = Path(tempfile.mkdtemp())
    >>> atomic_write_text(root / "a.txt", "hello").read_text()
    'hello'
    >>> with atomic_folder(root / "model", manifest="done.json") as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"...")
    ...     write_manifest(tmp, "done.json", {})
    >>> sorted(p.name for p in (root / "model").iterdir())
    ['done.json', 'weights.bin']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsformer.errors import CheckpointError, DsformerError


def check_output(
    path: str | os.PathLike, manifest: str | tuple[str, ...] | None, source: str | os.PathLike | None = None
) -> Path:
    """Refuse an output that would destroy anything but an earlier output of ours.

    ``path`` may be absent, an empty folder, or a folder that dsformer wrote: its ``manifest`` (a JSON
    file) lists every other file in it, and nothing else is there. A folder holding anything more (a
    user's notes, a repository, a file dsformer did not write) is refused; ``manifest=None`` replaces
    any folder (dsformer's own working folders). ``source``, the folder being read, is never an output.
    """
    dest = Path(path)
    if source is not None and Path(source).exists() and dest.exists() and dest.resolve() == Path(source).resolve():
        raise CheckpointError(f"output {dest} is the input folder; choose another --output")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise CheckpointError(f"output {dest} exists and is not a folder; choose another --output")
    if dest.exists() and manifest is not None and any(dest.iterdir()) and not _only_listed(dest, manifest):
        raise CheckpointError(
            f"output folder {dest} is not empty and holds more than a dsformer output; choose another --output"
        )
    return dest


def _only_listed(folder: Path, manifest: str | tuple[str, ...]) -> bool:
    """Whether ``folder`` holds a manifest and exactly the files that manifest lists."""
    for name in (manifest,) if isinstance(manifest, str) else manifest:
        try:
            listed = json.loads((folder / name).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(listed, list) and {p.name for p in folder.iterdir()} == {name, *map(str, listed)}:
            return True
    return False


def write_manifest(folder: Path, name: str, data: dict[str, Any]) -> None:
    """Write ``data`` as the folder's manifest ``name``, listing every other file in the folder (written last)."""
    write_json(folder / name, {**data, "files": sorted(p.name for p in folder.iterdir() if p.name != name)})


_HELD: dict[Path, int] = {}  # outputs this process holds the lock of, and how many times


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output ``path`` (``.<name>.lock`` beside it) for the block; a second process that
    asks for it while it is held gets a one-line error at once. Re-entrant within a process."""
    dest = Path(path).absolute()
    if _HELD.get(dest):
        _HELD[dest] += 1
        try:
            yield
        finally:
            _HELD[dest] -= 1
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DsformerError(
            f"another dsformer process is writing {dest}; wait for it to finish or choose another --output"
        ) from None
    _HELD[dest] = 1
    try:
        yield
    finally:
        del _HELD[dest]
        lock.unlink(missing_ok=True)  # while still held: a process that opens it next creates a new one
        handle.close()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, manifest: str | tuple[str, ...] | None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one atomic swap.

    The destination is checked by :func:`check_output` first, so a mistyped path never deletes a
    user's files, and its lock is held throughout (see :func:`exclusive`); temporary folders that an
    earlier writer of it left behind (killed mid-save) are removed.
    """
    dest = check_output(path, manifest)
    with exclusive(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
            if stale.is_dir() and stale.suffix in (".tmp", ".old"):  # ours, and no writer holds them now
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            yield tmp
            _usual_permissions(tmp)
            check_output(dest, manifest)  # the destination may have changed while the folder was written
            if not dest.exists():
                tmp.rename(dest)
            elif not _exchange(tmp, dest):  # no atomic swap here: two renames, the old folder set aside first
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                dest.rename(old)  # onto the empty folder mkdtemp made: a name no other writer holds
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the replaced folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``), so no reader or crash ever
    finds ``b`` missing; False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library from before glibc 2.28
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file beside ``path`` and move it into place in one rename, so readers never see half of it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file owner-only: keep the mode of the file it replaces, else a normal file's
        os.chmod(tmp, dest.stat().st_mode & 0o777 if dest.exists() else 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def check_file_output(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse a file to write that cannot be one (a folder, or below a file), before the work that fills it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DsformerError(f"{flag} {path} is a folder; give a file name")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DsformerError(f"{flag} {path}: {parent} is a file, so no folder can be made there")


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, flushed to the disk (inside a folder that an atomic swap publishes)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path, limit: int | None = None) -> str:
    """The SHA-256 of a file's first ``limit`` bytes (all of it by default)."""
    digest, left = hashlib.sha256(), limit if limit is not None else float("inf")
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(int(min(1 << 20, left)))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _usual_permissions(folder: Path) -> None:
    """mkdtemp and some writers create owner-only files; give them the permissions of a normal save."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def cache_dir() -> Path:
    """Where dsformer keeps per-machine state: kernel timings and the compiled native kernel
    (``$DSFORMER_CACHE``; unset or empty: ``~/.cache/dsformer``)."""
    return Path(os.environ.get("DSFORMER_CACHE") or Path.home() / ".cache" / "dsformer")
