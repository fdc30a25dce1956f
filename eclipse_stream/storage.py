"""Where shards live: local paths, ``file://`` URLs, and (later in this module) remote URLs.

:func:`scheme_of` tells a URL from a path; :func:`local_path` turns a path or a ``file://`` URL into a local
path (None for anything remote); :func:`redact` is how a URL is shown (never with credentials).
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import InputError, OutputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


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
    user, at, host = parts.netloc.rpartition("@")
    if at:
        host = "***@" + host
    return urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))
