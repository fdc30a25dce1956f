"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a rerun after a crash) sees either the old file or the complete new one,
never a half-written file under the final name.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import uuid
import contextlib
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name does (power loss, kernel crash)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj, sort_keys: bool = True) -> None:
    """Atomically write ``obj`` as indented JSON (keys sorted unless ``sort_keys=False``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


LOCK_NAME = ".eclipse-stream.lock"


_HELD: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds


class DirLock:
    """An exclusive lock on ``<folder>/.eclipse-stream.lock``, released (and the file removed) on exit.

    It is a POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to this process alone, so reader
    workers forked while it is held do not keep it alive after this process dies. The kernel drops it when
    its holder dies, even by SIGKILL, so a stale lock file never blocks a rerun. A second holder gets
    :class:`OutputError` naming the PID (and host) written in the file.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        while True:
            try:  # POSIX locks do not conflict within a process (and closing any descriptor of the file would
                st = os.stat(self.path)  # drop ours), so this process's own locks are checked first
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) in _HELD:
                raise OutputError(f"{self.folder}: output folder in use by PID {os.getpid()} (this process "
                                  "already writes to it)")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"{self.folder}: cannot write to this output folder ({self.path}): "
                                  f"{e.strerror or e}") from e
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.path}: cannot lock the output folder: {e.strerror or e}") from e
                raise OutputError(f"{self.folder}: output folder in use by {holder} (another eclipse-stream "
                                  "purify writes to it); wait for it to finish or stop it, then rerun") from None
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.fd = fd
            st = os.fstat(fd)
            _HELD.add((st.st_dev, st.st_ino))
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            st = os.fstat(self.fd)
            _HELD.discard((st.st_dev, st.st_ino))
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: a waiter then retries on a fresh file
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'PID 1234 on host' from a lock file's text, or 'another process' if it says nothing usable."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if text and text[0].isdigit():
        return f"PID {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")
    return "another process"


class HashingFile:
    """A file written front to back whose sha256 is computed as it is written (no second read at the end).

    ``finish()`` flushes, fsyncs and closes it and returns the hex digest; ``close()`` just closes it.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        n = self._file.write(data)
        self._hash.update(data)
        return n

    def tell(self) -> int:
        return self._file.tell()

    def finish(self) -> str:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())  # the bytes reach the disk before the name does
        finally:
            self._file.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        self._file.close()
