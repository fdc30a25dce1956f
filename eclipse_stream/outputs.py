"""Where a command may write: never on or inside its input. One check, one wording, for every command.

* :func:`check_output_folder` (purify's OUT): the folder is not, does not contain and does not lie inside a
  folder holding input shards or named as input. Outputs keep their input's file name, so OUT equal to an
  input folder would replace the inputs in place; nesting is the same slip one level off (a rerun would read
  its own output).
* :func:`check_output_files` (scan's ``--report`` / ``--plot``, preview's ``-o``, train's ``-o`` / ``--state``):
  each file is not an input file, not inside a folder named as input, not an existing folder, and no two
  outputs are the same file. These outputs are local files: a ``file://`` URL is taken as its path, any
  other URL (``s3://``, ``https://``, ``pipe:``, also one with a slash lost, ``s3:/b/x``) is refused, never
  written to a local folder named ``s3:`` (:func:`local_output`). purify's OUT may be an object store
  (``outstore``).

Paths are compared after resolving symbolic links (an output that is a link to an input, or lies in a folder
that links to one, is refused) and, for files that exist, by device and inode (a hard link). Both run before
a command reads its data or creates anything, and both raise :class:`~eclipse_stream.errors.InputError`
(exit 2).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

from braceexpand import braceexpand

from .errors import InputError
from .storage import local_path, redact, scheme_of

__all__ = ["check_output_files", "check_output_folder", "local_output"]

_SLASH_LOST = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/")  # "s3:/bucket/x": a URL after os.path/Path normalising


def _real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _named(inputs) -> list[str]:
    """The paths ``inputs`` name: each existing path as it is, a brace or glob pattern expanded."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found = []
    for item in items:
        item = os.fspath(item)
        if os.path.lexists(item):
            found.append(item)
            continue
        for name in braceexpand(item):
            found += glob.glob(name) if any(c in name for c in "*?[") else [name]
    return [p for p in found if os.path.lexists(p)]


def _refuse(what: str, out, relation: str, inp, command: str, noun: str) -> InputError:
    return InputError(f"{what} {out} overlaps the input: it {relation} {inp}; {command} never writes on or "
                      f"inside its input: choose another {noun}")


def check_output_folder(out_dir, inputs, shards: Iterable = (), command: str = "purify") -> None:
    """Refuse an output folder that is, contains or lies inside a folder holding input shards (``shards``) or
    named in ``inputs``."""
    out = _real(out_dir)
    folders: dict[Path, str] = {}  # folder -> how the message names it
    for s in shards:  # where the bytes really are, and where the user put them (links)
        for folder in (_real(s).parent, _real(Path(s).parent)):
            folders.setdefault(folder, f"the folder {folder} holding input shard {s}")
    for i in _named(inputs):
        if os.path.isdir(i):
            folders[_real(i)] = f"the input folder {_real(i)}"
    for folder in sorted(folders):
        if out == folder or folder in out.parents or out in folder.parents:
            relation = "is" if out == folder else "is inside" if folder in out.parents else "contains"
            raise _refuse("output folder", out, relation, folders[folder], command, "output folder")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def local_output(what: str, path, command: str) -> str:
    """The local path an output option (``what``) names: a path as it is, a ``file://`` URL as its path. Any
    other URL is an InputError (exit 2) naming it: this output is written locally, and a URL taken as a path
    would create a folder named after its scheme."""
    text = os.fspath(path)
    scheme = scheme_of(text)
    if scheme == "file":
        return local_path(text)  # InputError for a file:// URL that names no absolute local path
    if scheme is None and not _SLASH_LOST.match(text):
        return text
    shown = redact(text)
    kind = f"{scheme}://" if scheme not in (None, "pipe") else "pipe:" if scheme else f"{_SLASH_LOST.match(text)[1]}:"
    raise InputError(f"{what} {shown}: {command} writes this file on the local disk, not to a URL ({kind}); "
                     "name a local path (and copy it to object storage after, e.g. with aws s3 cp)")


def check_output_files(outputs: dict, inputs, command: str) -> dict:
    """Refuse output files (``{what: path}``, None entries ignored) that are URLs (:func:`local_output`), land
    on or inside ``inputs`` (files, folders or patterns), are existing folders, or name the same file twice.
    Returns ``{what: local path}`` (a ``file://`` URL as its path; None kept): what to write to."""
    named = _named(inputs)
    seen: dict[Path, str] = {}
    local: dict = {}
    for what, path in outputs.items():
        if path is None:
            local[what] = None
            continue
        if not os.fspath(path).strip():
            raise InputError(f"{what}: empty path")
        path = local[what] = local_output(what, path, command)
        out = _real(path)
        for inp in named:
            real = _real(inp)
            if out == real or _same_file(path, inp):
                raise _refuse(what, path, "is the input", inp, command, "path")
            if os.path.isdir(inp) and real in out.parents:
                raise _refuse(what, path, "is inside the input folder", inp, command, "path")
        if out.is_dir():
            raise InputError(f"{what} {path} is a folder; name a file")
        if out in seen:
            raise InputError(f"{what} {path} is the same file as {seen[out]}; name two different files")
        seen[out] = f"{what} {path}"
    return local
