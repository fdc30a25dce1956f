"""Where ``purify`` puts its outputs: a local folder or an fsspec destination (an object store), one interface.

An :class:`OutputStore` holds named files (output shards, their ``.stats.json`` done-markers, the manifest).
``outdir`` (plan, leftovers, manifest) and ``finisher`` (publish a finished shard, then its marker) use only
this interface, so the guarantees of ``purify`` are the same for both:

* nothing appears under a final name until it is complete: a shard is written and fsynced in a local
  staging folder (:attr:`OutputStore.staging`), then :meth:`publish` ed: renamed in a local folder; put to an
  object store in one upload, which the store makes visible only once it is complete (S3's PutObject and
  CompleteMultipartUpload, GCS and Azure uploads); on any other fsspec filesystem uploaded to a hidden
  temporary name and moved into place;
* the stats file is written after the shard it describes, and removed before a shard is replaced;
* a shard counts as done on a rerun only if :meth:`output_problem` finds nothing against its stats: a local
  file must have its recorded size (and mtime, else sha256); an object the size and ETag recorded when it
  was uploaded.

:class:`LocalStore` is the folder as before (``fsutil.DirLock``). :class:`RemoteStore` stages in a local
temporary folder (removed at the end; one file per shard in flight) and locks with :class:`ObjectLock`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import EclipseError, InputError, OutputError
from .fsutil import LOCK_NAME, DirLock, file_sha256, write_json
from .storage import alive, explain, filesystem, redact, sweep_stale_temporaries

log = logging.getLogger(__name__)

#: fsspec protocols whose uploads are all-or-nothing (an object is visible only once complete).
ATOMIC_UPLOAD = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
#: how long ObjectLock waits after writing its lock object before it reads it back (see ObjectLock)
LOCK_SETTLE_S = 0.5


@contextlib.contextmanager
def writing(path, what: str = "write"):
    """Turn an OSError (no permission, read-only file system, disk full) into one clear line naming ``path``."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot {what}: {e.strerror or e}") from e


class OutputStore(ABC):
    """The interface (see the module docstring); ``location`` is how OUT is shown."""

    location: str
    staging: Path  # local folder where shards are written until complete

    def partial_path(self, name: str) -> Path:
        """Where a shard is written until it is complete (hidden, owned by this process)."""
        return self.staging / f".{name}.partial-{os.getpid()}"

    def remove_own_partials(self) -> None:
        """After an abort, once no thread writes: remove every partial output of this process still in staging
        (and what a format's writer left beside it), including one whose shard a signal stopped from being
        registered for abort. The pid in the name means no other run's files match."""
        own = re.compile(rf"^\..+\.partial-{os.getpid()}(?!\d)")
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.staging):
                if own.match(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    @abstractmethod
    def shown(self, name: str) -> str:
        """How file ``name`` of OUT is shown to the user (a path, or a URL without credentials)."""

    @abstractmethod
    def lock(self):
        """The lock that makes this run OUT's only writer (a context manager)."""

    def create(self) -> None:  # noqa: B027 (a default that does nothing, not an abstract method)
        """Make OUT exist (a local folder; nothing for an object store)."""

    @abstractmethod
    def remove_leftovers(self, temporary: re.Pattern) -> None:
        """Remove the temporary names (``temporary``) killed runs left; OUT is locked."""

    @abstractmethod
    def read_text(self, name: str) -> str | None:
        """The text of file ``name``, None if there is none."""

    @abstractmethod
    def write_json(self, name: str, obj) -> None:
        """Write JSON atomically (whole or not at all)."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Remove ``name`` if it exists."""

    @abstractmethod
    def publish(self, tmp: Path, name: str) -> dict:
        """Move the complete local file ``tmp`` to ``name``; returns what to record about the output in its
        stats file (beyond its sha256), for :meth:`output_problem`."""

    @abstractmethod
    def output_problem(self, name: str, stats: dict) -> str | None:
        """Why output ``name`` is not the one ``stats`` describes (gone, cut short, replaced), or None."""

    def close(self) -> None:  # noqa: B027
        """Remove the staging folder (if it is not OUT itself)."""


class LocalStore(OutputStore):
    """A local folder: shards are written inside it under hidden names and renamed into place."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.staging = self.folder
        self._created: list[Path] = []  # the folders this run made, OUT first: close() removes the empty ones

    def shown(self, name: str) -> str:
        return str(self.folder / name)

    def lock(self) -> DirLock:
        return DirLock(self.folder)

    def create(self) -> None:
        with writing(self.folder, "create the output folder"):
            missing, p = [], self.folder.absolute()
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = missing

    def remove_leftovers(self, temporary: re.Pattern) -> None:
        for p in sorted(self.folder.iterdir()):  # with OUT locked, no live run owns any of these
            if temporary.match(p.name):
                with writing(p, "remove a leftover temporary file"):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def read_text(self, name: str) -> str | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return path.read_text()
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: unreadable ({e}); use --overwrite to redo this shard") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}") from None

    def write_json(self, name: str, obj) -> None:
        with writing(self.folder / name):
            write_json(self.folder / name, obj)

    def remove(self, name: str) -> None:
        with writing(self.folder / name, "remove the old " + ("stats file" if name.endswith(".json") else "output")):
            (self.folder / name).unlink(missing_ok=True)

    def publish(self, tmp: Path, name: str) -> dict:
        with writing(self.folder / name):
            os.replace(tmp, self.folder / name)
            st = os.stat(self.folder / name)  # a rerun checks these before it trusts the output (output_problem)
        return {"output_size": st.st_size, "output_mtime_ns": st.st_mtime_ns}

    def output_problem(self, name: str, stats: dict) -> str | None:
        """Its size must be the recorded one; when its modification time is the recorded one too, that is
        enough (as for inputs); otherwise (a copy, an edit, or stats of a version that did not record them)
        its sha256 must be the recorded one."""
        output = self.folder / name
        try:
            st = os.stat(output)
        except OSError as e:
            return f"cannot read the output: {e.strerror or e}"
        size = stats.get("output_size")
        if size is not None and st.st_size != size:
            return f"the output is {st.st_size} bytes, {size} when it was written (cut short or changed)"
        if size is not None and stats.get("output_mtime_ns") == st.st_mtime_ns:
            return None
        recorded = stats.get("output_sha256")
        if recorded is not None and file_sha256(output) != recorded:
            return "the output's sha256 is not the one recorded when it was written (cut short or changed)"
        return None

    def close(self) -> None:
        """A run that made OUT and wrote nothing into it (it failed first: a corrupt first shard, a full disk)
        leaves no empty folder behind; ``rmdir`` removes only an empty folder, so nothing written is ever lost."""
        for folder in self._created:  # OUT first, then the parents it needed, while they are empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


class RemoteStore(OutputStore):
    """An fsspec destination (``s3://bucket/prefix``, ...): see the module docstring."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.location = redact(self.url)
        self.fs, root = filesystem(self.url, output=True)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.atomic_upload = protocol in ATOMIC_UPLOAD
        sweep_stale_temporaries()
        self.staging = Path(tempfile.mkdtemp(prefix=f"eclipse-stream-out-{os.getpid()}-"))

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def shown(self, name: str) -> str:
        return f"{self.location}/{name}"

    @contextlib.contextmanager
    def _remote(self, name: str, what: str):
        """Any failure of the store -> OutputError naming the object (credentials never shown)."""
        try:
            yield
        except EclipseError:
            raise
        except Exception as e:  # noqa: BLE001 - every fsspec backend has its own errors
            raise OutputError(f"{self.shown(name)}: cannot {what}: {explain(e)}") from None

    def lock(self) -> ObjectLock:
        return ObjectLock(self)

    def create(self) -> None:
        if self.atomic_upload:  # an object store has no folders; its bucket is never created here
            return
        with self._remote("", "create the output location"):
            self.fs.makedirs(self.root, exist_ok=True)

    def remove_leftovers(self, temporary: re.Pattern) -> None:
        with self._remote("", "list the output location"):
            try:
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False, refresh=True)]
            except FileNotFoundError:
                names = []
        for name in names:
            if temporary.match(name):
                self.remove(name)

    def read_text(self, name: str) -> str | None:
        with self._remote(name, "read"):
            try:
                return self.fs.cat_file(self._path(name)).decode()
            except FileNotFoundError:
                return None

    def _put(self, local: str, name: str) -> None:
        path = self._path(name)
        if self.atomic_upload:
            self.fs.put_file(local, path)
            return
        tmp = self._path(f".{name}.partial-{os.getpid()}")
        try:
            self.fs.put_file(local, tmp)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: a rerun removes a leftover .partial anyway
                self.fs.rm_file(tmp)
            raise

    def write_json(self, name: str, obj) -> None:
        local = self.staging / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            local.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            with self._remote(name, "write"):
                self._put(str(local), name)
        finally:
            local.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        with self._remote(name, "remove"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(name))
            self.fs.invalidate_cache(self._path(name))

    def _info(self, name: str) -> dict | None:
        self.fs.invalidate_cache(self._path(name))
        try:
            return self.fs.info(self._path(name))
        except FileNotFoundError:
            return None

    def publish(self, tmp: Path, name: str) -> dict:
        size = os.path.getsize(tmp)
        with self._remote(name, "upload"):
            self._put(str(tmp), name)
            info = self._info(name)
        if info is None or info.get("size") != size:
            raise OutputError(f"{self.shown(name)}: the upload did not arrive whole ({size} bytes sent, "
                              f"{None if info is None else info.get('size')} stored)")
        os.unlink(tmp)
        return {"output_size": size, "output_etag": _etag(info)}

    def output_problem(self, name: str, stats: dict) -> str | None:
        """Its size and (where recorded) its ETag must be the ones recorded when it was uploaded."""
        with self._remote(name, "read"):
            info = self._info(name)
        if info is None:
            return "the output object is gone"
        recorded = stats.get("output_etag")
        if info.get("size") != stats.get("output_size") or (recorded is not None and _etag(info) != recorded):
            return "the output object is not the one recorded when it was uploaded (replaced or changed)"
        return None

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _etag(info: dict) -> str | None:
    return info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5")


class ObjectLock:
    """The lock of a remote OUT: an object ``<OUT>/.eclipse-stream.lock`` naming its holder (PID, host, time,
    a random token). Object stores have no locks that die with their holder, so:

    * a lock object left by a run of **this** host whose PID is gone (killed, even by SIGKILL) is taken over,
      with a warning; one of another host is never: the error names it and says to delete it if that run is
      dead;
    * taking it is not atomic: the lock object is written, then read back after :data:`LOCK_SETTLE_S`; a run
      that reads back another's token gives up. Two runs that both find no lock and write theirs more than
      that apart from each other's check can both go on (the race window); start one job per OUT.
    """

    def __init__(self, store: RemoteStore):
        self.store = store
        self.token: str | None = None

    def _holder(self) -> dict | None:
        text = self.store.read_text(LOCK_NAME)
        if text is None:
            return None
        try:
            holder = json.loads(text)
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}

    def acquire(self) -> ObjectLock:
        store, me = self.store, socket.gethostname()
        holder = self._holder()
        if holder is not None:
            pid, host = holder.get("pid"), holder.get("host")
            if host == me and isinstance(pid, int) and pid != os.getpid() and not alive(pid):
                log.warning("%s: taking over the lock of PID %s on this host, which is gone", store.location, pid)
            else:
                who = f"PID {pid} on {host}" if pid is not None else "another run"
                since = f" since {holder['since']}" if holder.get("since") else ""
                raise OutputError(f"{store.location}: output in use by {who}{since} (another eclipse-stream purify "
                                  f"writes to it; lock object {store.shown(LOCK_NAME)}); an object store keeps "
                                  "no lock for a dead run: if that run is gone, delete the lock object and rerun")
        token = uuid.uuid4().hex
        store.write_json(LOCK_NAME, {"pid": os.getpid(), "host": me, "token": token,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        time.sleep(LOCK_SETTLE_S)
        now = self._holder()
        if not now or now.get("token") != token:
            raise OutputError(f"{store.location}: another run took the output's lock at the same time "
                              f"({(now or {}).get('host')}, PID {(now or {}).get('pid')}); wait for it to finish")
        self.token = token
        return self

    def release(self) -> None:
        if self.token is None:
            return
        with contextlib.suppress(EclipseError):
            holder = self._holder()
            if holder and holder.get("token") == self.token:
                self.store.remove(LOCK_NAME)
        self.token = None


def open_store(out) -> OutputStore:
    """The store of OUT: an OutputStore as is, a local path or file:// URL, or an fsspec URL."""
    from .storage import kind_of, local_path

    if isinstance(out, OutputStore):
        return out
    kind = kind_of(out)
    if kind == "local":
        return LocalStore(local_path(out, output=True))
    if kind == "stream":
        what = "a pipe" if str(out).startswith("pipe:") else "this URL"
        raise OutputError(f"{redact(out)}: purify cannot write to {what}; write to a local folder or an fsspec URL "
                          "(s3://, gs://, ...)")
    return RemoteStore(os.fspath(out))
