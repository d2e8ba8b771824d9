"""Files the project writes and checks: content digests and durable writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BLOCK = 1 << 24  # bytes read at a time for a digest


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes. The next block is read while this one is hashed (both
    release the GIL), so a file not in the page cache costs about the slower of the two, not
    their sum."""
    from concurrent.futures import ThreadPoolExecutor

    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh, ThreadPoolExecutor(1, thread_name_prefix="sessa-read") as pool:
        pending = pool.submit(fh.read, BLOCK)
        while block := pending.result():
            pending = pool.submit(fh.read, BLOCK)
            digest.update(block)
    return digest.hexdigest()


def block_sha256(paths: list[Path], block_bytes: int, threads: int) -> dict[Path, list[str]]:
    """Hex sha256 of each ``block_bytes`` block of each file, in order (an empty file: one digest,
    of nothing). Every block of every file is one task of a pool of ``threads``, with its own
    descriptor (open only while it runs: a process checking a whole checkpoint of thousands of
    files holds a few): reading (``os.pread``) and hashing both release the GIL, so a file is
    checked by as many cores as the caller gives, where one whole-file sha256 runs on one."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path, start: int, end: int) -> str:
        digest = hashlib.sha256()
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # Linux: the block's read-ahead starts now
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            while start < end:
                block = os.pread(fd, min(BLOCK, end - start), start)
                if not block:
                    raise OSError(f"{path} ended {end - start} bytes early")  # shrank while it was read
                digest.update(block)
                start += len(block)
        finally:
            os.close(fd)
        return digest.hexdigest()

    sizes = {path: os.stat(path).st_size for path in paths}
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sessa-digest") as pool:
        pending = {
            path: [pool.submit(one, path, a, min(a + block_bytes, size)) for a in range(0, size, block_bytes)]
            for path, size in sizes.items()
        }
        return {path: [f.result() for f in fs] or [hashlib.sha256().hexdigest()] for path, fs in pending.items()}


def while_flushing(path: str | Path, work: Callable[[], T]) -> T:
    """``work()`` while ``path`` is flushed to the disk (a file just written: the flush waits on
    the disk while a digest reads the page cache)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="sessa-fsync") as pool:
        flushed = pool.submit(fsync, path)
        result = work()
        flushed.result()
    return result


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


class RunLock:
    """An exclusive claim of a folder by one run: ``<folder>/<name>`` (``.lock``) holding the
    owner's host, pid and job (Slurm's job id, or the id torchrun was given), created atomically
    (O_EXCL).

    A lock is taken over when it is stale: its owner ran on this host and is no longer alive, or
    it belongs to this same job (a restarted worker group, a requeued Slurm job); torchrun's
    default run id ``none``, which every job launched with a fixed rendezvous shares, names no
    job. A lock file left empty or unreadable by a crash between its creation and its first write
    is stale once it is a few seconds old. Otherwise ``acquire`` returns a one-line description
    of the owner (the caller refuses to start)."""

    PARTIAL_S = 5.0  # a lock file still empty after this long was left by a crash

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "run", subject: Path | None = None) -> None:
        self.path = Path(folder) / name
        self.what, self.subject = what, subject or Path(folder)
        self.held = False

    @staticmethod
    def _owner() -> dict:
        import socket
        import time

        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
        job = "" if job == "none" else job
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "started": time.strftime("%F %T")}

    def _stale(self, held: dict, me: dict) -> bool:
        if held.get("job") and held.get("job") != "none" and held.get("job") == me["job"]:
            return True
        if held.get("host") != me["host"]:
            return False
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError, TypeError):
            return False
        return int(held.get("pid", -1)) == me["pid"]

    def _read(self) -> dict | None:
        """The owner a lock file names; None while it is being written (empty, not yet JSON)."""
        import json
        import time

        deadline = time.monotonic() + self.PARTIAL_S
        while True:
            try:
                held = json.loads(self.path.read_text() or "null")
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                held = None
            if isinstance(held, dict) and "pid" in held:
                return held
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return {}
            if age > self.PARTIAL_S or time.monotonic() > deadline:
                return None  # left by a crash mid-write: stale
            time.sleep(0.1)

    def acquire(self) -> str | None:
        """None once this process holds the lock, else who holds it (one line)."""
        import json

        me = self._owner()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held == {}:  # released meanwhile
                    continue
                if held is None or self._stale(held, me):
                    self.path.unlink(missing_ok=True)
                    continue
                return (
                    f"{self.subject} is in use by another {self.what} (pid {held.get('pid')} on {held.get('host')} "
                    f"since {held.get('started')}); if that {self.what} is gone, delete {self.path}"
                )
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self.held = True
            return None
        return f"{self.path} could not be taken over"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_group(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a new file gets under
    the user's umask (0644 / 0755 with the usual 022): libraries that write through temporary
    files (safetensors) leave 0600, which other members of a group cannot read."""
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
