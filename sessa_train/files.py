"""Files the project writes and checks: content digests and durable writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """Publish ``tmp`` as ``final``: flushed, renamed, and the rename flushed (a node crash
    leaves the old ``final`` or the new one, complete)."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)
