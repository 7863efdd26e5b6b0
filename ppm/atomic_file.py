"""Crash-safe file writes shared by the pipeline's sinks.

Readers of a file written with :func:`write_atomically` see the old file or the whole new
one, never a torn one, even after a crash or a power cut. Appended logs are cut back to their
checkpointed length on restore with :func:`truncate_to`, so a replay does not repeat lines.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object] | bytes) -> None:
    """Write ``path`` through a temporary file, fsync, rename, and fsync the folder.

    ``write`` is the content (bytes) or a function that writes it to the open file, e.g.
    ``lambda fh: pyarrow.parquet.write_table(table, fh)``.
    """
    # A name of this writer's own: two processes writing the same path (workers recording
    # the same thing) must not truncate each other's temporary file before its rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "xb") as fh:
        if isinstance(write, bytes):
            fh.write(write)
        else:
            write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    # The rename lives in the directory: sync it too, or a power cut can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_line(path: Path, line: bytes) -> None:
    """Append one line (a newline is added) and flush it to the OS."""
    with open(path, "ab") as fh:
        fh.write(line + b"\n")


def size_of(path: Path) -> int:
    """The file's length in bytes; 0 when it does not exist."""
    return path.stat().st_size if path.exists() else 0


def truncate_to(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes if it is longer (nothing when absent)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as fh:
            fh.truncate(size)
