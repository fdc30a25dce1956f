"""Where shards live: local paths, URLs WebDataset opens, and fsspec URLs (object stores).

Three kinds of location, told apart by :func:`kind_of`:

* ``local``: a path, or a ``file://`` URL (:func:`local_path`). Read with ``open``.
* ``stream``: what WebDataset's ``gopen`` opens as a stream: ``pipe:CMD`` (a shell command writing the
  shard to stdout) and ``http(s)://``, ``sftp://``, ``ftps://``, ``scp://`` (through ``curl``, as WebDataset
  does). Read front to back, never stored locally; a ``.beton`` (random access) is staged (:func:`staged`).
* ``fsspec``: every other URL (``s3://``, ``gs://``, ``az://``, ...), through fsspec with the user's usual
  credentials (environment, config files, instance roles) and the options of :func:`set_options`
  (``--storage-options``). Needs the ``cloud`` extra (fsspec + s3fs; ``gcsfs``, ``adlfs`` for others).

:func:`open_input` opens any of them for reading, :func:`identity` says what tells a changed input apart on
a rerun (size and mtime, ETag, Last-Modified), :func:`list_shards` expands a folder, prefix or glob of an
object store. Every failure becomes an :class:`~eclipse_stream.errors.InputError` (or ``OutputError``) that
names the location as :func:`redact` shows it: never with a user, password or query string (a signed URL's
signature). A ``pipe:`` command is shown as given: keep secrets out of it (use the environment).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import EclipseError, InputError, OutputError

__all__ = ["RemoteError", "filesystem", "identity", "kind_of", "list_shards", "local_path", "open_input",
           "redact", "scheme_of", "set_options", "shard_name", "staged"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: URL schemes WebDataset's gopen streams through curl (``gs://`` is left to fsspec: random access, listing).
STREAM_SCHEMES = ("http", "https", "sftp", "ftps", "scp")
CLOUD_HINT = "install the cloud extra: pip install 'eclipse-stream[cloud]' (fsspec + s3fs; gcsfs for gs://)"
_OPTIONS: dict = {}


class RemoteError(OSError):
    """A remote location could not be opened or read; the message is safe to show (redacted)."""


def scheme_of(location: str | os.PathLike) -> str | None:
    """The URL scheme of ``location`` ('https', 's3', 'file', 'pipe', ...), or None for a local path."""
    text = os.fspath(location)
    if not isinstance(text, str):
        return None
    if text.startswith("pipe:"):
        return "pipe"
    if text[:5].lower() == "file:":  # file:/abs, file:///abs (RFC 8089)
        return "file"
    m = _SCHEME.match(text)
    return m.group(1).lower() if m else None


def kind_of(location: str | os.PathLike) -> str:
    """'local', 'stream' (pipe:, http(s):// and the other schemes gopen streams) or 'fsspec'."""
    scheme = scheme_of(location)
    if scheme in (None, "file"):
        return "local"
    return "stream" if scheme == "pipe" or scheme in STREAM_SCHEMES else "fsspec"


def is_remote(location) -> bool:
    return kind_of(location) != "local"


def local_path(location: str | os.PathLike, *, output: bool = False) -> str | None:
    """The local path named by ``location`` (a path, or a ``file://`` URL), or None if it is remote.

    ``file:///abs/out`` and ``file://localhost/abs/out`` name ``/abs/out``; a ``file://`` URL with another host
    or a relative path is refused (InputError, or OutputError when ``output``), never taken as a folder name.
    """
    scheme = scheme_of(location)
    if scheme is None:
        return os.fspath(location)
    if scheme != "file":
        return None
    text = os.fspath(location)
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        error = OutputError if output else InputError
        raise error(f"{redact(text)}: a file:// URL names an absolute local path (file:///abs/path); "
                    "this one does not")
    return unquote(parts.path)


def redact(location: str | os.PathLike) -> str:
    """``location`` as it may be shown: no user or password, no query string (signed URLs carry their
    signature there); local paths and ``pipe:`` commands unchanged."""
    text = os.fspath(location)
    scheme = scheme_of(text)
    if scheme in (None, "pipe", "file"):
        return text
    parts = urlsplit(text)
    _, at, host = parts.netloc.rpartition("@")
    if at:
        host = "***@" + host
    return urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))


_URL_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+)")


def _scrub(text: str) -> str:
    """A message from a library with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(1)), text)


def shard_name(location: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> str:
    """The file name of a shard: a path's or URL's last part (no query); for ``pipe:CMD`` the last word of
    the command that ends in one of ``suffixes`` (``pipe:curl -s https://host/a-000.tar`` -> ``a-000.tar``)."""
    text = os.fspath(location)
    kind = scheme_of(text)
    if kind is None:
        return os.path.basename(text)
    if kind == "pipe":
        for word in reversed(text[5:].split()):
            base = os.path.basename(urlsplit(word.strip("'\"")).path if "://" in word else word.strip("'\""))
            if suffixes and base.endswith(suffixes):
                return base
        return ""
    if kind == "file":
        return os.path.basename(local_path(text) or "")
    return os.path.basename(urlsplit(text).path.rstrip("/"))


# --------------------------------------------------------------------------------------------------------
# fsspec
# --------------------------------------------------------------------------------------------------------

def set_options(options: dict | None) -> None:
    """Keyword arguments for every fsspec filesystem opened from now on (``--storage-options``), e.g.
    ``{"endpoint_url": "http://localhost:9000"}`` or ``{"anon": true}`` for S3. Reader worker processes
    forked later inherit them. None or {} clears them (fsspec's own configuration still applies)."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"storage options must be a JSON object, not {type(options).__name__}")
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def options() -> dict:
    return dict(_OPTIONS)


def filesystem(url: str, *, output: bool = False):
    """(fsspec filesystem, path inside it) of an fsspec URL; a missing package is a clear error."""
    error = OutputError if output else InputError
    try:
        import fsspec.core
    except ImportError:
        raise error(f"{redact(url)}: reading or writing {scheme_of(url)}:// URLs needs fsspec; {CLOUD_HINT}") from None
    try:
        return fsspec.core.url_to_fs(url, **_OPTIONS)
    except ImportError as e:  # a known protocol whose package is missing (s3fs, gcsfs, ...)
        raise error(f"{redact(url)}: {scheme_of(url)}:// needs a package that is not installed ({e}); "
                    f"{CLOUD_HINT}") from None
    except ValueError as e:  # "Protocol not known"
        raise error(f"{redact(url)}: {_scrub(str(e))}") from None
    except TypeError as e:  # an option the filesystem does not take
        raise error(f"{redact(url)}: bad --storage-options for {scheme_of(url)}://: {_scrub(str(e))}") from None


def explain(e: BaseException) -> str:
    """Why a remote operation failed, in words, without credentials."""
    name = type(e).__name__
    text = _scrub(str(e))
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "no such bucket"
    if isinstance(e, FileNotFoundError):
        return "not found (no such object or file)"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"permission denied ({text or name}); check your credentials and the bucket's policy"
    if "NoCredentials" in name or "Unable to locate credentials" in text or "PartialCredentials" in name:
        return ("no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass "
                "--storage-options '{\"anon\": true}' for a public bucket)")
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "ExpiredToken" in text:
        return f"credentials refused ({text})"
    if ("Connect" in name or "EndpointConnection" in name or isinstance(e, (ConnectionError, TimeoutError))
            or getattr(e, "errno", None) in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT)):
        return f"cannot connect ({text or name})"
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------------------------------------
# Listing and identity
# --------------------------------------------------------------------------------------------------------

def list_shards(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The shards an fsspec URL names: the object itself, every shard under a prefix ("folder"), or the
    matches of a glob; sorted, as URLs with the input's protocol. InputError if there are none."""
    fs, path = filesystem(url)
    protocol = scheme_of(url)
    try:
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
            if not found:
                raise InputError(f"{redact(url)}: no objects match this pattern")
            paths = found
        elif fs.isfile(path):
            return [url]
        elif fs.isdir(path):
            paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffixes))
            if not paths:
                raise InputError(f"{redact(url)}: no {' or '.join(suffixes)} shards under this prefix")
        else:
            raise InputError(f"{redact(url)}: no such shard (not found)")
    except EclipseError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend has its own errors
        raise InputError(f"{redact(url)}: cannot list: {explain(e)}") from None
    urls = []
    for p in paths:
        if not p.endswith(suffixes):
            raise InputError(f"{protocol}://{p}: not a shard (expected a {' or '.join(suffixes)} file)")
        urls.append(fs.unstrip_protocol(p))
    return urls


def identity(location: str) -> dict:
    """What tells a changed input apart on a rerun: a local file's size and mtime (as make and rsync do), an
    object's size, ETag and modification time, an HTTP resource's Content-Length, ETag and Last-Modified (a
    server that answers no HEAD gives none). A ``pipe:`` command gives {} : its output cannot be checked
    without running it. Raises RemoteError (InputError for a missing object) when it cannot be reached."""
    kind = kind_of(location)
    if kind == "local":
        st = os.stat(local_path(location))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if kind == "fsspec":
        fs, path = filesystem(location)
        try:
            info = fs.info(path)
        except Exception as e:  # noqa: BLE001
            raise RemoteError(explain(e)) from None
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5")
        mtime = info.get("LastModified") or info.get("last_modified") or info.get("updated") or info.get("mtime")
        found = {"size": info.get("size"), "etag": etag, "mtime": str(mtime) if mtime is not None else None}
        return {k: v for k, v in found.items() if v is not None}
    if scheme_of(location) in ("http", "https"):
        return _http_identity(location)
    return {}


def _http_identity(url: str) -> dict:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            headers = response.headers
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise RemoteError(f"not found (HTTP {e.code})") from None
        return {}  # e.g. 403/405 to a HEAD of a signed GET URL: the GET itself decides
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, OSError) and reason.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
            raise RemoteError(f"cannot connect ({reason.strerror})") from None
        if "Name or service not known" in str(reason) or "nodename nor servname" in str(reason) or \
                "Temporary failure in name resolution" in str(reason):
            raise RemoteError("host not found") from None
        return {}
    except (OSError, ValueError):
        return {}
    found = {"size": int(headers["Content-Length"]) if headers.get("Content-Length", "").isdigit() else None,
             "etag": headers.get("ETag"), "mtime": headers.get("Last-Modified")}
    return {k: v for k, v in found.items() if v is not None}


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

_CURL_EXIT = {6: "host not found", 7: "cannot connect", 18: "the transfer ended early",
              22: "the server answered with an HTTP error (4xx/5xx: e.g. not found or forbidden)",
              28: "timed out", 35: "TLS handshake failed", 47: "too many redirects",
              52: "the server sent nothing", 56: "the connection broke", 60: "the server's certificate "
              "was not accepted", 67: "login refused"}


class _Stream:
    """A gopen stream (a ``Pipe`` around curl or a shell command) whose failures read as
    :class:`RemoteError` saying why, without the URL's credentials."""

    def __init__(self, location: str, pipe):
        self.location, self.pipe, self.eof = location, pipe, False

    def _why(self, e: BaseException) -> RemoteError:
        status = getattr(self.pipe, "status", None)
        if scheme_of(self.location) == "pipe":
            return RemoteError(f"the command exited with status {status}" if status is not None else str(e))
        reason = _CURL_EXIT.get(status, f"curl exited with status {status}")
        return RemoteError(reason)

    def read(self, n: int = -1) -> bytes:
        if self.eof:
            return b""
        try:
            data = self.pipe.read(n)
        except OSError as e:
            raise self._why(e) from None
        if not data or (n is not None and 0 <= len(data) < n):
            self._finish_check()
        return data

    def _finish_check(self) -> None:
        """At the end of the data: the process must have ended well, or the data is not the whole shard."""
        if self.eof:
            return
        self.eof = True
        try:
            self.pipe.stream.close()
            self.pipe.status = self.pipe.proc.wait()
            self.pipe.wait_for_child()
        except OSError as e:
            raise self._why(e) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.eof:
            return
        self.eof = True
        with contextlib.suppress(Exception):  # abandoned early (an error elsewhere): the exit status says nothing
            self.pipe.stream.close()
            self.pipe.proc.kill()
            self.pipe.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_input(location: str | os.PathLike):
    """A binary file object reading ``location`` front to back: a local file, a gopen stream, or an fsspec
    file read ahead on a thread (4 MiB requests, 3 ahead; the last two are not seekable). Raises RemoteError
    (an OSError) if it cannot be opened or read."""
    kind = kind_of(location)
    if kind == "local":
        return open(local_path(location), "rb")
    location = os.fspath(location)
    if kind == "stream":
        from webdataset.gopen import gopen

        try:
            return _Stream(location, gopen(location, "rb"))
        except (OSError, ValueError) as e:
            raise RemoteError(_scrub(str(e))) from None
    fs, path = filesystem(location)
    try:
        return _Prefetch(fs.open(path, "rb", block_size=_CHUNK, cache_type="none"))
    except Exception as e:  # noqa: BLE001
        raise RemoteError(explain(e)) from None


_CHUNK = 4 << 20  # bytes per request when an object is read front to back


class _Prefetch:
    """An fsspec file read front to back by a thread, up to ``depth`` chunks ahead of the reader, so the
    requests overlap with decoding (as curl's process does for a gopen stream). Not seekable; memory stays
    within ``depth`` + 1 chunks. Failures of the thread are raised, explained, by the next read."""

    def __init__(self, f, chunk: int = _CHUNK, depth: int = 3):
        self._f, self._chunk = f, chunk
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf, self._pos, self._eof = b"", 0, False
        self._thread = threading.Thread(target=self._run, name="eclipse-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        size = min(self._chunk, 1 << 18)  # a small first request: the reader starts sooner
        while not self._stop.is_set():
            try:
                data = self._f.read(size)
                size = self._chunk
            except Exception as e:  # noqa: BLE001 - handed to the reader
                data = RemoteError(explain(e))
            while not self._stop.is_set():
                try:
                    self._queue.put(data, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(data, bytes) or not data:
                return

    def _next(self) -> None:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._buf, self._pos = item, 0
        if not item:
            self._eof = True

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n is None or n < 0 or n > 0:
            if self._pos >= len(self._buf):
                if self._eof:
                    break
                self._next()
                continue
            take = len(self._buf) - self._pos if n is None or n < 0 else min(n, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos:self._pos + take])
            self._pos += take
            if n is not None and n >= 0:
                n -= take
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMPORARY = re.compile(r"^eclipse-stream-(stage|out)-(\d+)-")


@functools.cache
def sweep_stale_temporaries() -> None:
    """Once per process: remove the staged inputs and output staging folders that killed runs of this user
    left in the temporary folder (their PID is gone)."""
    root = Path(tempfile.gettempdir())
    for p in root.glob("eclipse-stream-*"):
        m = _TEMPORARY.match(p.name)
        with contextlib.suppress(OSError):
            if m and p.lstat().st_uid == os.getuid() and not alive(int(m.group(2))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


@contextlib.contextmanager
def staged(location: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A local path holding ``location``'s bytes: the file itself if local, else a copy in the temporary folder
    (``TMPDIR``), removed when the block ends (also on errors). One copy per call: the space needed is the
    size of the shards being read at once (one per reader worker)."""
    if kind_of(location) == "local":
        yield local_path(location)
        return
    sweep_stale_temporaries()
    fd, tmp = tempfile.mkstemp(prefix=f"eclipse-stream-stage-{os.getpid()}-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out, open_input(location) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
