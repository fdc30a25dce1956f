"""Where shards live: local paths, URLs WebDataset opens, and fsspec URLs (object stores).

Three kinds of location, told apart by :func:`kind_of`:

* ``local``: a path, or a ``file://`` URL (:func:`local_path`). Read with ``open``.
* ``stream``: what WebDataset's ``gopen`` opens as a stream: ``pipe:CMD`` (a shell command writing the
  shard to stdout) and ``http(s)://``, ``sftp://``, ``ftps://``, ``scp://`` (through ``curl``, as WebDataset
  does). Read front to back, never stored locally; a ``.beton`` (random access) is staged (:func:`staged`).
* ``fsspec``: every other URL (``s3://``, ``gs://``, ``az://``, ...), through fsspec with the user's usual
  credentials (environment, config files, instance roles) and the options of :func:`set_options`
  (``--storage-options``). Needs the ``cloud`` extra (fsspec + s3fs; ``gcsfs``, ``adlfs`` for others).

:func:`open_input` opens any of them for reading (an object in range requests, read ahead on a thread;
:class:`ReadOrder` also starts the next shard while one is decoded), :func:`identity` says what tells a
changed input apart on a rerun (size and mtime, ETag, Last-Modified), :func:`list_shards` expands a folder,
prefix or glob of an object store and keeps what the listing says of each object, so that a reader asks no
HEAD. Every failure becomes an :class:`~eclipse_stream.errors.InputError` (or ``OutputError``) that
names the location as :func:`redact` shows it: never with a user, password or query string (a signed URL's
signature). A ``pipe:`` command is shown as given: keep secrets out of it (use the environment).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from .defaults import READ_AHEAD_MIB
from .errors import EclipseError, InputError, OutputError

__all__ = ["RemoteError", "filesystem", "identity", "kind_of", "list_shards", "local_path", "open_input",
           "ReadOrder", "read_in_order", "redact", "scheme_of", "set_options", "shard_name", "staged"]

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
    text = _scrub(e.strerror if isinstance(e, OSError) and e.errno is not None and e.strerror else str(e))
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

#: What this process last learnt of each fsspec input (its identity, with its size): from the listing of
#: :func:`list_shards` or the latest :func:`identity`. A reader uses it instead of asking the store again
#: (``identity(fresh=False)``, :func:`open_input`); reader worker processes, forked after the listing, inherit it.
_KNOWN: dict[str, dict] = {}


def _info_identity(info: dict) -> dict:
    """An fsspec ``info`` (or listing entry) as an identity: size and ETag (an object's content tag, the same in
    a listing and a HEAD); without an ETag, size and modification time (as UTC ISO text: listings and HEAD
    requests give it in different types and time zones)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5")
    found = {"size": info.get("size"), "etag": etag}
    if etag is None:
        mtime = next((info[k] for k in ("LastModified", "last_modified", "updated", "mtime", "created")
                      if info.get(k) is not None), None)
        found["mtime"] = _utc(mtime)
    return {k: v for k, v in found.items() if v is not None}


def _utc(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat()
    return str(value)


def list_shards(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The shards an fsspec URL names: the object itself, every shard under a prefix ("folder"), or the
    matches of a glob; sorted, as URLs with the input's protocol. InputError if there are none. What the
    listing says of each (size, ETag) is kept as its identity for this run's readers (``_KNOWN``)."""
    fs, path = filesystem(url)
    protocol = scheme_of(url)
    try:
        fs.invalidate_cache(path)  # what the store holds now, not a listing cached earlier in this process
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path, detail=True).items())
            if not found:
                raise InputError(f"{redact(url)}: no objects match this pattern")
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise InputError(f"{redact(url)}: no such shard (not found)") from None
            if info.get("type") != "directory":
                _KNOWN[os.fspath(url)] = _info_identity(info)
                return [url]
            found = sorted((i["name"], i) for i in fs.ls(path, detail=True) if i["name"].endswith(suffixes))
            if not found:
                raise InputError(f"{redact(url)}: no {' or '.join(suffixes)} shards under this prefix")
    except EclipseError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend has its own errors
        raise InputError(f"{redact(url)}: cannot list: {explain(e)}") from None
    urls = []
    for p, info in found:
        if not p.endswith(suffixes):
            raise InputError(f"{protocol}://{p}: not a shard (expected a {' or '.join(suffixes)} file)")
        urls.append(fs.unstrip_protocol(p))
        _KNOWN[urls[-1]] = _info_identity(info)
    return urls


def identity(location: str, *, fresh: bool = True) -> dict:
    """What tells a changed input apart on a rerun: a local file's size and mtime (as make and rsync do), an
    object's size and ETag (its modification time where it has no ETag), an HTTP resource's Content-Length,
    ETag and Last-Modified (a server that answers no HEAD gives none). A ``pipe:`` command gives {} : its
    output cannot be checked without running it. Raises RemoteError (InputError for a missing object) when it
    cannot be reached.

    ``fresh`` False: for an fsspec object, what this process's listing (or last look) said, if anything, so
    a reader does not ask the store again; the check that an input did not change while it was read asks
    afresh (``finisher``)."""
    kind = kind_of(location)
    if kind == "local":
        st = os.stat(local_path(location))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if kind == "fsspec":
        location = os.fspath(location)
        if not fresh and location in _KNOWN:
            return dict(_KNOWN[location])
        fs, path = filesystem(location)
        try:
            fs.invalidate_cache(path)  # a HEAD, never an earlier listing
            found = _info_identity(fs.info(path))
        except Exception as e:  # noqa: BLE001
            raise RemoteError(explain(e)) from None
        _KNOWN[location] = found
        return dict(found)
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

    def read1(self, n: int = -1) -> bytes:
        """What the process has written so far, up to ``n`` bytes (waiting only for the first); b"" at the end."""
        if self.eof:
            return b""
        try:
            data = self.pipe.stream.read1(n)
            self.pipe.check_status()
        except OSError as e:
            raise self._why(e) from None
        if not data:
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

    def kill(self) -> None:
        """End the process now: a read blocked on it returns (``close`` tidies up after)."""
        with contextlib.suppress(Exception):
            self.pipe.proc.kill()

    def close(self) -> None:
        if self.eof:
            return
        self.eof = True
        with contextlib.suppress(Exception):  # abandoned early (an error elsewhere): the exit status says nothing
            self.pipe.proc.kill()
            self.pipe.stream.close()
            self.pipe.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: bytes per request when an object is read front to back: a CIFAR-sized shard of 1,000 images (4.6 MB) is
#: one GET; at most half the read-ahead, so that one block is read while the one before is decoded
READ_BLOCK = 8 << 20
#: the first request of an object opened when its turn comes (not started early): the reader waits for it
FIRST_BLOCK = 1 << 20
_ORDER = threading.local()  # the read_in_order plan of this thread, if any


def open_input(location: str | os.PathLike, *, read_ahead: bool = True):
    """A binary file object reading ``location`` front to back: a local file, a gopen stream, or an fsspec
    object read in ranges of :data:`READ_BLOCK` (one request each; its size from the listing, else one
    HEAD), ahead of the reader on a thread (:class:`_ReadAhead`, ``READ_AHEAD_MIB``). Inside
    :func:`read_in_order`, a location of the plan comes already started, and the next one is started.
    ``read_ahead`` False: no thread and no plan (a few small reads, e.g. a file's header). Not seekable.
    Raises RemoteError (an OSError) if it cannot be opened or read."""
    kind = kind_of(location)
    if kind == "local":
        return open(local_path(location), "rb")
    location = os.fspath(location)
    plan = getattr(_ORDER, "plan", None)
    if read_ahead and plan is not None and (f := plan.take(location)) is not None:
        return f
    if not read_ahead:
        return _open_source(location)
    if kind == "stream":  # curl or the command already runs ahead of us, in its own process
        return _open_source(location)
    return _ReadAhead(location, READ_AHEAD_MIB << 20, FIRST_BLOCK)


def _open_source(location: str, block: int = 0):
    """The remote location as an object with ``read(n)`` and ``close()``: a gopen stream or object ranges
    (requests of at least ``block`` bytes)."""
    if kind_of(location) == "stream":
        from webdataset.gopen import gopen

        try:
            return _Stream(location, gopen(location, "rb"))
        except (OSError, ValueError) as e:
            raise RemoteError(_scrub(str(e))) from None
    fs, path = filesystem(location)
    size = identity(location, fresh=False).get("size")
    if size is None:  # a filesystem that gives no size: its own file object, read front to back
        try:
            return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none")
        except Exception as e:  # noqa: BLE001
            raise RemoteError(explain(e)) from None
    return _Ranges(fs, path, size, block)


class _Ranges:
    """An fsspec object read front to back by range requests (``cat_file(path, start, end)``: one GET each,
    no HEAD: the size is known), each of at least ``block`` bytes (the rest kept for the next reads). An
    object that turns out shorter or longer than its known size (replaced since it was listed) is a
    RemoteError saying so; one replaced by another of the same size is caught by the finisher's fresh
    identity check (the ETag) before its shard is marked done."""

    def __init__(self, fs, path: str, size: int, block: int = 0):
        self.fs, self.path, self.size, self.block = fs, path, size, block
        self.pos = 0  # of the next request
        self.buf = b""

    def _fetch(self, n: int) -> bytes:
        end = min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        last = end == self.size  # ask for one byte more: an object grown since it was listed shows it
        try:
            data = self.fs.cat_file(self.path, start=self.pos, end=end + last)
        except Exception as e:  # noqa: BLE001 - every backend has its own errors
            raise RemoteError(explain(e)) from None
        if not data:
            raise RemoteError(f"the object changed since it was listed: it ends at byte {self.pos}, not at "
                              f"{self.size}")
        if len(data) > end - self.pos:
            raise RemoteError(f"the object changed since it was listed: it is longer than the {self.size} bytes "
                              "listed")
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts, self.buf = [self.buf], b""
            while self.pos < self.size:
                parts.append(self._fetch(self.size - self.pos))
            return b"".join(parts)
        if len(self.buf) < n:
            self.buf += self._fetch(max(n - len(self.buf), self.block))
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ReadAhead:
    """A remote location read front to back by a thread, ahead of the reader, so that requests (or curl's
    output) overlap with decoding. The thread opens the location itself (a slow or failing open does not stop
    the caller: the failure is raised, explained, by the first read), then reads blocks of at most
    :data:`READ_BLOCK` (half of ``budget``) while the blocks held, the one being read included, stay within
    ``budget`` bytes. Not seekable. Failures are raised by the read that reaches them."""

    def __init__(self, location: str, budget: int, first_block: int | None = None):
        self._location, self._budget = location, max(1, budget)
        self._block = max(1 << 16, min(READ_BLOCK, self._budget // 2))
        self._first = min(first_block or self._block, self._block)  # waited for: smaller, the reader starts sooner
        self._source = None
        self._chunks: collections.deque = collections.deque()
        self._held = 0  # bytes of the blocks queued and of the one being read
        self._cond = threading.Condition()
        self._stop = False
        self._buf, self._pos, self._eof = b"", 0, False
        self._thread = threading.Thread(target=self._run, name="eclipse-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._source = _open_source(self._location)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._put(e if isinstance(e, EclipseError | RemoteError) else RemoteError(explain(e)))
            return
        read = getattr(self._source, "read1", None) or self._source.read  # a stream: what has come so far
        size = self._first
        while True:
            with self._cond:
                while not self._stop and self._held and self._held + self._block > self._budget:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                data = read(size)
                size = self._block
            except Exception as e:  # noqa: BLE001 - handed to the reader
                data = e if isinstance(e, EclipseError | RemoteError) else RemoteError(explain(e))
            self._put(data)
            if not isinstance(data, bytes) or not data:
                return

    def _put(self, item) -> None:
        with self._cond:
            self._chunks.append(item)
            if isinstance(item, bytes):
                self._held += len(item)
            self._cond.notify_all()

    def _next(self) -> None:
        with self._cond:
            self._held -= len(self._buf)  # the block read to its end is let go
            self._buf, self._pos = b"", 0
            self._cond.notify_all()
            while not self._chunks:
                self._cond.wait()
            item = self._chunks.popleft()
        if not isinstance(item, bytes):
            self._eof = True
            raise item
        self._buf = item
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
            parts.append(self._buf[self._pos:self._pos + take] if take < len(self._buf) else self._buf)
            self._pos += take
            if n is not None and n >= 0:
                n -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read1(self, n: int = -1) -> bytes:
        """The rest of the block at hand, or the next one (at most ``n`` bytes if n >= 0); b"" at the end.
        A whole block comes without a copy."""
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            self._next()
        return self.read(len(self._buf) - self._pos if n is None or n < 0 else min(n, len(self._buf) - self._pos))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        source = self._source
        if isinstance(source, _Stream):
            source.kill()  # a read blocked on curl or the command returns
        self._thread.join(timeout=30)  # at most one request in flight
        with contextlib.suppress(Exception):
            (self._source or source).close()
        self._chunks.clear()
        self._buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Plan:
    """The remote locations one reader opens, in order (see :func:`read_in_order`)."""

    def __init__(self, locations: list[str], budget: int):
        self.order = locations
        self.index = {loc: i for i, loc in reversed(list(enumerate(locations)))}
        self.budget = budget
        self.ahead: dict[int, _ReadAhead] = {}

    def take(self, location: str):
        i = self.index.get(location)
        if i is None:
            return None
        if self.budget <= 0:
            return _open_source(location, READ_BLOCK)
        for j in [j for j in self.ahead if j < i]:  # started, then never opened (e.g. its shard failed first)
            self.ahead.pop(j).close()
        f = self.ahead.pop(i, None) or _ReadAhead(location, self.budget, FIRST_BLOCK)  # not started early
        if i + 1 < len(self.order) and i + 1 not in self.ahead:
            self.ahead[i + 1] = _ReadAhead(self.order[i + 1], self.budget)
        return f

    def close(self) -> None:
        for f in self.ahead.values():
            f.close()
        self.ahead.clear()


class ReadOrder:
    """The remote locations one reader opens, in this order: while :meth:`active`, this thread's
    :func:`open_input` of one of them returns it read ahead by a thread (at most ``read_ahead_mib`` MiB held),
    and starts the location after it in the same way, so the next shard's first bytes (a whole CIFAR-sized
    shard) arrive while this one is decoded and its first request costs no time. Memory: at most two streams
    of ``read_ahead_mib`` each. Local files are left to the operating system's read-ahead. ``read_ahead_mib``
    0: each location is opened when it is read, without a thread (curl still streams ahead in its process).
    :meth:`close` stops everything started and not read.

    A generator that reads (``reading.ShardEvents``) makes it active only while it runs, not across its
    yields: the plan belongs to the reading code, not to whatever else runs on the thread meanwhile."""

    def __init__(self, locations, read_ahead_mib: int = READ_AHEAD_MIB):
        remote = [os.fspath(loc) for loc in locations if kind_of(loc) != "local"]
        self._plan = _Plan(remote, max(0, read_ahead_mib) << 20) if remote else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        previous = getattr(_ORDER, "plan", None)
        _ORDER.plan = self._plan
        try:
            yield
        finally:
            _ORDER.plan = previous

    def close(self) -> None:
        if self._plan is not None:
            self._plan.close()


@contextlib.contextmanager
def read_in_order(locations, read_ahead_mib: int = READ_AHEAD_MIB) -> Iterator[None]:
    """A :class:`ReadOrder` of ``locations``, active for the block and closed after it (for a plain loop)."""
    order = ReadOrder(locations, read_ahead_mib)
    try:
        with order.active():
            yield
    finally:
        order.close()


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
