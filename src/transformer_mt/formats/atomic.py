"""Atomic writes: a reader (or a crash) sees the old file or the new one, never a partial one.

Every file, directory and link the package writes goes through here: a temporary sibling
is written and fsynced, then renamed over the target, and the rename is made durable by
fsyncing the parent directory.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_directory",
    "atomic_link",
    "atomic_write_bytes",
    "atomic_write_text",
    "directory_lock",
]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``. A crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def atomic_link(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are unsupported), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling (yielded) that replaces ``target`` when the
    ``with`` block ends without an error; on an error it is deleted and ``target`` is
    untouched. An existing ``target`` is removed only once the new one is in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        _replace_dir(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def directory_lock(directory: Path | str) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``directory`` (waiting, with a message, while another process
    holds it), then remove the temporary siblings (``.<name>.*.tmp``/``.old``) that writers of
    ``directory`` killed mid-write left: with the lock held, no live writer owns them. The lock
    file is removed on release (a waiter that then holds a removed file retries)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f".{directory.name}.lock"
    while True:
        lock = open(lock_path, "a+b")  # noqa: SIM115 (closed below, after the unlink)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another writer of {directory} ({lock_path})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                break  # the file still in place: the lock is ours
        except FileNotFoundError:
            pass
        lock.close()  # its holder removed it on release: take the new one
    try:
        for pattern in (f".{directory.name}.*.tmp", f".{directory.name}.*.old"):
            for stale in directory.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still holding it
        lock.close()


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``. An existing ``target`` is swapped with ``new`` in one step
    where the system can (Linux), then removed; elsewhere it is moved aside first and removed
    only once ``new`` is in place (restored if the rename fails; a kill between the two renames
    leaves it as a hidden ``.<name>.*.old`` sibling)."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):  # ``new`` now names the old target
        if new.is_symlink() or not new.is_dir():
            new.unlink()
        else:
            shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.replace(target, old / "dir")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "dir", target)
        raise
    finally:
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if sys.platform != "linux":
        return None
    try:
        renameat2 = ctypes.CDLL(None).renameat2
    except (AttributeError, OSError):
        return None
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    return renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False
    where it fails for any reason (no such call, a kernel, filesystem or sandbox without it,
    no permission): the caller's two-rename fallback then runs and raises a real error."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
