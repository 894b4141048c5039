"""
Files that survive a power cut: write a temporary file, fsync it, rename it
into place, fsync the directory.

These functions block; callers run them through a
L{apicontainer.blocking.Blocking} runner.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping


def fsyncDirectory(directory: Path) -> None:
    """
    Make the creation, rename or removal of entries in C{directory} durable.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _loadSyncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _loadSyncfs()


def syncFilesystem(path: Path) -> None:
    """
    Make everything written to the file system that holds C{path} durable:
    file contents, creations, renames and removals, all with one journal
    commit (Linux C{syncfs}). The group commit of a batch of files: far
    cheaper than an fsync of each file and directory.

    @raise OSError: The file system reported a write-back error.
    """
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def removeFile(path: Path) -> bool:
    """
    Remove C{path}, not durably; a file that is already gone is fine.

    @return: Whether there was a file to remove.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


_WRITE_BYTES = 1 << 20


def writeAll(fd: int, chunks: Iterable[bytes]) -> int:
    """
    Write every chunk to C{fd}, with as few system calls as the kernel
    allows: one C{writev} for each megabyte or so of chunks (all of them,
    for a small file), more only after a short write. Chunks are taken from
    C{chunks} as they are written, so that a stream of them is never held
    whole.

    @return: How many bytes were written.
    """
    views: list[memoryview] = []
    size = written = 0
    for chunk in chunks:
        if len(chunk):
            views.append(memoryview(chunk))
            size += len(chunk)
        if size >= _WRITE_BYTES:
            _writev(fd, views)
            written += size
            views, size = [], 0
    _writev(fd, views)
    return written + size


def _writev(fd: int, views: list[memoryview]) -> None:
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def writeAtomically(
    path: Path,
    chunks: Iterable[bytes],
    syncDirectory: bool = True,
    sync: bool = True,
    temporary: Path | None = None,
) -> None:
    """
    Replace C{path} with C{chunks}, durably: after a crash the file holds
    either its old content or all of the new, never part of it.

    On any error the temporary file is removed and the error raised;
    C{path} is then unchanged.

    @param sync: When false, neither the file nor its directory is fsynced:
        the caller makes it durable with L{syncFilesystem} before relying on
        it, together with the other files of its batch.
    @param temporary: The file to write through, on C{path}'s file system;
        an existing one is written over and then cut to the new length,
        which is cheaper than creating one (and, when it is no shorter than
        the new content, than truncating it first: it keeps its blocks). By
        default C{.tmp-NAME} beside C{path}.
    """
    temporary = temporary or path.with_name(f".tmp-{path.name}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        try:
            os.ftruncate(fd, writeAll(fd, chunks))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        removeFile(temporary)
        raise
    if syncDirectory and sync:
        fsyncDirectory(path.parent)


def writeFile(
    path: Path, chunks: Iterable[bytes], attributes: Mapping[str, bytes] = {}, empty: bool = False
) -> None:
    """
    Create or truncate C{path} and write C{chunks} to it, neither atomically
    nor durably: for a file that nothing refers to until the caller has made
    it durable (with L{syncFilesystem}), so that a crash can tear it only
    while nothing can read it. Cheaper than L{writeAtomically} by a rename.

    @param attributes: Extended attributes to set on the file (C{user.*}
        names); a file system without them raises C{OSError} with
        C{ENOTSUP}.
    @param empty: Whether C{path} is an empty file already (a spare): it is
        then written as it is, since truncating even an empty file is a
        change of its metadata.

    On any error the file is removed and the error raised.
    """
    fd = os.open(path, os.O_WRONLY if empty else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        try:
            writeAll(fd, chunks)
            for name, value in attributes.items():
                os.setxattr(fd, name, value)
        finally:
            os.close(fd)
    except BaseException:
        removeFile(path)
        raise


def removeTemporaries(directory: Path) -> int:
    """
    Remove the temporary files that writes cut short by a crash left in
    C{directory} (blocking; at start-up): none of them was ever renamed into
    place, so none holds anything acknowledged.

    @return: How many were removed.
    """
    removed = sum(removeFile(path) for path in directory.glob(".tmp-*"))
    if removed:
        fsyncDirectory(directory)
    return removed


def removeDurably(path: Path) -> bool:
    """
    Remove C{path} and make the removal durable.

    @return: Whether there was a file to remove.
    """
    if not removeFile(path):
        return False
    fsyncDirectory(path.parent)
    return True


def makeDirectories(path: Path) -> None:
    """
    Create C{path} and its missing parents, making each creation durable.
    """
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsyncDirectory(directory.parent)
