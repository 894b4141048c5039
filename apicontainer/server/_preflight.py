"""
Checks of a configuration's paths that change nothing, run by
C{apicontainer check-config}. The server checks its data directory the
same way before it opens it; a stash's path that is wrong at start is, like
a destination that is down, a stash that failed to start (an alarm on
C{/_health}, its UOWs queued), so that a restart during such an outage
still serves the other routes and keeps every write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..config import Config
from ..interfaces import ILocalStorage, IStash

# File systems that hold no data of ours: a directory there cannot be made,
# or would not keep what is written.
VIRTUAL = frozenset(
    {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs", "tracefs",
     "configfs", "pstore", "bpf", "mqueue", "fusectl", "binfmt_misc"}
)


def fileSystemType(path: Path, mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """
    The type of the file system that holds C{path} (an existing path), from
    the mount table; L{None} where there is none to read.
    """
    try:
        table = mounts.read_text()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def directoryProblem(path: Path) -> str | None:
    """
    Why C{path} cannot be, or be made, a directory the server writes in;
    L{None} if it can. Nothing is created.
    """
    path = Path(os.path.abspath(path))
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "a file" if existing.is_file() else "not a directory"
        if existing == path:
            return f"{path} is {what}, not a directory"
        return f"{path} cannot be made: {existing} is {what}"
    kind = fileSystemType(existing)
    if kind in VIRTUAL:
        return f"{path} is on a {kind} file system, which cannot keep data"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def fileProblem(path: Path) -> str | None:
    """
    Why C{path} cannot be a file the server writes; L{None} if it can.
    """
    path = Path(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory, not a file"
    return directoryProblem(path.parent)


def dataDirProblem(config: Config) -> str | None:
    """
    Why the data directory cannot be used, naming the key; L{None} if it
    can.
    """
    problem = directoryProblem(config.dataDir)
    return f"{config.source}: data_dir: {problem}" if problem else None


def pathProblems(config: Config, stashes: Mapping[str, IStash]) -> list[str]:
    """
    Every problem with the data directory and the stashes' local paths, one
    line each, naming the configuration key.
    """
    problem = dataDirProblem(config)
    problems = [problem] if problem else []
    for name, stash in stashes.items():
        if not ILocalStorage.providedBy(stash):
            continue
        spec = config.stashes[name]
        where = f"{config.source}:{spec.options.line}" if spec.options is not None else str(config.source)
        found = [fileProblem(Path(f)) for f in stash.files] + [directoryProblem(Path(stash.location))]
        for problem in dict.fromkeys(p for p in found if p):
            problems.append(f"{where}: stashes.{name}: {problem}")
    return problems
