"""
Where the filesystem stash puts a document, and how it reads one back.

For the key C{/items/42}::

    root/items/42.doc          the current version (a hard link to it): cat it
    root/items/42.v17          the body written by UOW 17; in extended
                               attributes, user.uow names its write ("v17",
                               "d17" for a deletion's empty version) and
                               user.content_type holds its content type,
                               when it had one

Where the file system takes no user extended attributes, C{42.doc} is a
symlink to the version instead, and the content type is in the file
C{42.v17.type} beside it; a deletion writes no version, and its symlink
points at a C{.d17} name that does not exist. Either form is read wherever
it is found.

Each key segment is percent-encoded (every byte but letters, digits, C{-}
and C{_}), so a segment is never C{.} or C{..}, never contains C{/}, and
never collides with the C{.doc}/C{.v} names; an over-long segment is replaced
by a hash. No key can name a path outside C{root}.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from ..storage import fsyncDirectory, makeDirectories, removeDurably, removeFile, writeFile
from ..uow import Document

_SAFE = "-_"
CONTENT_TYPE_ATTRIBUTE = "user.content_type"
# Short, so that it fits in the inode beside a content type (on ext4): a
# value that does not costs a block of its own.
UOW_ATTRIBUTE = "user.uow"
_MAX_SEGMENT = 120
VERSION_NAME = re.compile(r"^(?P<stem>[A-Za-z0-9%_~-]+)\.(?P<kind>[vd])(?P<uow>[0-9]+)$")


def replaceName(create: Callable[[], None], path: Path) -> None:
    """
    Run C{create}, which makes the name C{path}, replacing what a crash left
    there.
    """
    try:
        create()
    except FileExistsError:
        os.unlink(path)
        create()


def symlink(target: str, path: Path) -> None:
    """
    Create the symlink C{path} to C{target}, replacing one that a crash
    left there.
    """
    replaceName(lambda: os.symlink(target, path), path)


def currentVersion(pointer: Path) -> str | None:
    """
    The name of the version that the document C{pointer} (a C{.doc} path)
    holds, in either form; L{None} if it has none.
    """
    try:
        return os.readlink(pointer)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return f"{pointer.name[: -len('.doc')]}.{os.getxattr(pointer, UOW_ATTRIBUTE).decode('ascii')}"


def ownName(target: str) -> bytes:
    """
    What a version C{target} holds in C{user.uow}: C{v17} for C{42.v17}.
    """
    return target.rsplit(".", 1)[1].encode("ascii")


def takesAttributes(directory: Path) -> bool:
    """
    Whether files in C{directory} take user extended attributes.
    """
    probe = directory / ".tmp-attributes"
    try:
        writeFile(probe, [], {UOW_ATTRIBUTE: b"v0"})
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return False
    removeFile(probe)
    return True


def encodeSegment(segment: str) -> str:
    """
    A key segment as a file name that is always safe and never special.
    """
    encoded = quote(segment, safe=_SAFE).replace(".", "%2E").replace("~", "%7E")
    if not encoded or len(encoded) > _MAX_SEGMENT:
        return "~" + hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()
    return encoded


class LocalRoot:
    """
    What a filesystem stash, in the server or in a child process, keeps on
    this machine's disk (L{ILocalStorage}): everything under C{root}.
    """

    root: Path

    @property
    def location(self) -> Path:
        return self.root

    @property
    def files(self) -> tuple[Path, ...]:
        return ()

    def bytesFor(self, size: int) -> int:
        # The new version's file beside the one it replaces, and the undo
        # record and directory entries beside them.
        return size + 64 * 1024


def pointTo(pointer: Path, target: str | None) -> None:
    """
    Make C{pointer} link to C{target} (remove it for L{None}), atomically
    and durably.
    """
    if target is None:
        removeDurably(pointer)
        return
    try:
        linked = os.getxattr(pointer.with_name(target), UOW_ATTRIBUTE) == ownName(target)
    except OSError:
        linked = False  # a version, or a deletion, without its name
    linkTo(pointer, target, linked)
    fsyncDirectory(pointer.parent)

def linkTo(pointer: Path, target: str, linked: bool) -> None:
    """
    Make C{pointer} a hard link to the version C{target} (a symlink to
    it, unless C{linked}), atomically (not yet durably).
    """
    temporary = pointer.with_name(f".tmp-{pointer.name}")
    if linked:
        replaceName(lambda: os.link(pointer.with_name(target), temporary), temporary)
    else:
        symlink(target, temporary)
    os.rename(temporary, pointer)

def removeVersion(directory: Path, target: str | None) -> None:
    if target is None:
        return
    for name in (target, target + ".type"):
        removeFile(directory / name)


def readVersion(pointer: Path, target: str, uowId: int) -> Document | None:
    """
    The document the version C{target} beside C{pointer} holds (written by
    UOW C{uowId}); L{None} for a deletion's.
    """
    if VERSION_NAME.match(target)["kind"] == "d":  # type: ignore[index]
        return None
    version = pointer.with_name(target)
    contentType: str | None
    try:
        contentType = os.getxattr(version, CONTENT_TYPE_ATTRIBUTE).decode("utf-8")
    except OSError:
        try:
            contentType = version.with_name(target + ".type").read_text("utf-8")
        except FileNotFoundError:
            contentType = None
    return Document(version.read_bytes(), contentType, uowId)


class Spares:
    """
    Empty files in C{.spares/}, made while the stash is idle, up to
    C{limit}, each taken (renamed into place) by a later version or journal
    instead of a new file: creating a file is the costliest system call a
    write makes here. With none left, a write creates its file as before.
    """

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self._spares: list[Path] = []
        self._made = False

    def open(self) -> None:
        """
        Take up the spares an earlier process left (blocking).
        """
        self._spares = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.stat().st_size:
                removeFile(Path(entry.path))  # not one of ours: a spare is always empty
            else:
                self._spares.append(Path(entry.path))

    def prepare(self) -> bool:
        """
        Make one spare, if fewer than the limit wait (blocking).

        @return: Whether it made one.
        """
        if len(self._spares) >= self.limit:
            return False
        path = self.directory / os.urandom(8).hex()
        try:
            if not self._made:
                makeDirectories(self.directory)
                self._made = True
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        except OSError:
            self._made = False
            return False
        self._spares.append(path)
        return True

    def take(self, path: Path) -> bool:
        """
        Give C{path} the inode of a spare, if one waits, so that writing it
        creates no file.

        @return: Whether C{path} is now an empty spare.
        """
        if self._spares:
            try:
                os.rename(self._spares.pop(), path)
                return True
            except OSError:
                pass
        return False
