"""
What emptying and reusing a spool spare costs, truncated or zeroed.

    .venv/bin/python -m bench.spares [--files 300] [--rounds 3] [--dir DIR]

The journal keeps a removed spool file as a spare: it empties it, and a
later spool write goes through it. This times both steps with the process's
CPU clock, per file, for files of a 1 KiB request's spool frame, in a
folder of C{DIR} (by default the current folder: put it on the disk whose
cost you want to know):

  - C{truncate}: as the spool did before: the spare is truncated to
    nothing, and the write opens it with C{O_TRUNC}, writes the new frame
    and renames it into place (its block is freed, then a new one
    allocated);
  - C{zero}: as the spool does it: zeros are written over the spare's
    bytes in place (L{apicontainer.storage._spool.emptyFile}), and
    L{apicontainer.storage._durable.writeAtomically} writes through it: over them,
    cut to the new frame's length, renamed into place (it keeps its
    block).

The two alternate, C{--rounds} times each, on fresh files; each step ends
with a sync of the file system, not counted in the CPU times (its time on
the wall clock is printed beside them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from apicontainer.storage._durable import syncFilesystem, writeAll, writeAtomically
from apicontainer.storage._spool import emptyFile

FRAME = 1200  # bytes: the spool frame of a request with a 1 KiB body


def _files(folder: Path, count: int) -> list[Path]:
    paths = []
    for n in range(count):
        path = folder / str(n)
        path.write_bytes(os.urandom(FRAME))
        paths.append(path)
    syncFilesystem(folder)
    return paths


def _writeTruncating(path: Path, frame: bytes, temporary: Path) -> None:
    # What durable.writeAtomically (sync=False) did before spares were
    # zeroed: the temporary opened with O_TRUNC, written, renamed.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        writeAll(fd, [frame])
    finally:
        os.close(fd)
    os.rename(temporary, path)


def measure(kind: str, folder: Path, count: int) -> dict[str, float]:
    """
    Per-file CPU microseconds to empty C{count} spares and to write a frame
    through each, and the wall-clock milliseconds of each step's sync.
    """
    paths = _files(folder, count)
    frame = os.urandom(FRAME - 100)
    started = time.process_time()
    for path in paths:
        if kind == "truncate":
            os.truncate(path, 0)
        else:
            emptyFile(path)
    emptied = time.process_time()
    wall = time.perf_counter()
    syncFilesystem(folder)
    emptySync = time.perf_counter() - wall
    targets = [path.with_name(f"{path.name}.uow") for path in paths]
    started2 = time.process_time()
    for path, target in zip(paths, targets):
        if kind == "truncate":
            _writeTruncating(target, frame, path)
        else:
            writeAtomically(target, [frame], sync=False, temporary=path)
    written = time.process_time()
    wall = time.perf_counter()
    syncFilesystem(folder)
    writeSync = time.perf_counter() - wall
    for target in targets:
        target.unlink()
    return {
        "empty_us": 1e6 * (emptied - started) / count,
        "write_us": 1e6 * (written - started2) / count,
        "empty_sync_ms": 1e3 * emptySync,
        "write_sync_ms": 1e3 * writeSync,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("."))
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="spares-", dir=options.dir))
    try:
        totals: dict[str, list[float]] = {"truncate": [], "zero": []}
        for n in range(options.rounds):
            for kind in ("truncate", "zero"):
                result = measure(kind, folder, options.files)
                totals[kind].append(result["empty_us"] + result["write_us"])
                print(
                    f"round {n + 1} {kind:8s}: empty {result['empty_us']:5.1f} us,"
                    f" write {result['write_us']:5.1f} us a file (CPU);"
                    f" syncs {result['empty_sync_ms']:.1f} and {result['write_sync_ms']:.1f} ms"
                    f" for {options.files} files",
                    flush=True,
                )
        truncate, zero = (sorted(totals[kind])[len(totals[kind]) // 2] for kind in ("truncate", "zero"))
        print(f"median CPU a file, both steps: truncate {truncate:.1f} us, zero {zero:.1f} us ({zero / truncate:.2f}x)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
