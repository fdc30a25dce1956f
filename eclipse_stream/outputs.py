"""Where a command may write: never on or inside its input. One check, one wording, for every command.

* :func:`check_output_folder` (purify's OUT): the folder is not, does not contain and does not lie inside a
  folder holding input shards or named as input. Outputs keep their input's file name, so OUT equal to an
  input folder would replace the inputs in place; nesting is the same slip one level off (a rerun would read
  its own output).
* :func:`check_output_files` (scan's ``--report`` / ``--plot``, preview's ``-o``, train's ``-o`` / ``--state``):
  each file is not an input file, not inside a folder named as input, not an existing folder, and no two
  outputs are the same file.

Paths are compared after resolving symbolic links (an output that is a link to an input, or lies in a folder
that links to one, is refused) and, for files that exist, by device and inode (a hard link). Both run before
a command reads its data or creates anything, and both raise :class:`~eclipse_stream.errors.InputError`
(exit 2).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from braceexpand import braceexpand

from .errors import InputError

__all__ = ["check_output_files", "check_output_folder"]


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
    folders = {_real(s).parent for s in shards}  # where the bytes really are
    folders |= {_real(Path(s).parent) for s in shards}  # where the user put them (links)
    folders |= {_real(i) for i in _named(inputs) if os.path.isdir(i)}
    for folder in sorted(folders):
        if out == folder or folder in out.parents or out in folder.parents:
            relation = "is" if out == folder else "is inside" if folder in out.parents else "contains"
            raise _refuse("output folder", out, f"{relation} the input folder", folder, command, "output folder")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_files(outputs: dict, inputs, command: str) -> None:
    """Refuse output files (``{what: path}``, None entries ignored) that land on or inside ``inputs`` (files,
    folders or patterns), that are existing folders, or that name the same file twice."""
    named = _named(inputs)
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        if not os.fspath(path).strip():
            raise InputError(f"{what}: empty path")
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
