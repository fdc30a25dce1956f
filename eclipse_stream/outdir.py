"""The output folder: what a run may write there, what is already done, and the manifest.

* :func:`check_no_overlap`: OUT never is, contains or lies inside a folder holding input shards.
* :func:`prepare_out` (rank 0, OUT locked): remove what killed runs left, check the plan, drop the manifest.
* :func:`plan`: which shards still need work (a shard is done when its stats file records the current
  settings and the input's current size and mtime, and its output still has the size, and mtime or sha256,
  recorded); other settings are refused, a changed input or a cut output is redone.
* :func:`write_manifest`: after every shard of every rank is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import InputError, OutputError
from .formats import FORMATS, ShardFormat, format_for
from .fsutil import DirLock, file_sha256, write_json
from .outputs import check_output_folder

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Task:
    """One input shard: its position in the run's shard list, path and (output) file name."""

    index: int
    path: str
    name: str

    @property
    def format(self) -> ShardFormat:
        return format_for(self.name)


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name + STATS_SUFFIX)


def stat_record(st: os.stat_result) -> dict:
    """What tells a changed input apart on a rerun: its size and modification time (as make and rsync do)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@contextlib.contextmanager
def writing(path, what: str = "write"):
    """Turn an OSError (no permission, read-only file system, disk full) into one clear line naming ``path``."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot {what}: {e.strerror or e}") from e


def plan(shards: list[Path], out_dir: Path, fingerprint: dict, overwrite: bool,
         quiet: bool = False) -> tuple[list[Task], list[str]]:
    """(tasks to do, names of shards done); refuses to mix outputs made with different settings.

    A shard is done when its stats file records the current settings and the input's current size and mtime,
    and its output is still the one written (:func:`output_problem`); a changed input or a cut output is redone,
    with a warning (``quiet``: none, for the ranks that plan again after rank 0)."""
    names = [s.name for s in shards]
    dup = {n for n, c in Counter(names).items() if c > 1}
    if dup:
        raise InputError(f"two input shards share the output name(s) {sorted(dup)}: outputs would collide")
    warn = (lambda *a: None) if quiet else log.warning
    todo, done = [], []
    for i, s in enumerate(shards):
        task = Task(i, str(s), s.name)
        sp = stats_path(out_dir / s.name)
        if overwrite or not sp.is_file():
            todo.append(task)
            continue
        stats = read_stats(sp)
        previous = stats["config"]
        if stats.get("output") and not (out_dir / s.name).is_file():  # output deleted since: redo
            todo.append(task)
            continue
        try:
            now = stat_record(os.stat(s))
        except OSError as e:
            raise InputError(f"{s}: cannot read: {e.strerror or e}") from e
        if (stats.get("input_size"), stats.get("input_mtime_ns")) != (now["size"], now["mtime_ns"]):
            warn("%s changed since its output was made (size or modification time): redoing it", s)
            todo.append(task)  # the finisher removes the old stats file before it replaces the output
            continue
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise InputError(f"{out_dir / s.name} was purified with different settings ({', '.join(changed)}); "
                             f"use --overwrite or another output folder")
        problem = output_problem(out_dir / s.name, stats) if stats.get("output") else None  # None: no file
        if problem:
            warn("%s: %s: redoing it", out_dir / s.name, problem)
            todo.append(task)
            continue
        done.append(s.name)
    return todo, done


def read_stats(path: Path) -> dict:
    """A shard's stats file as a dict with a ``config`` object; InputError (suggesting --overwrite) otherwise."""
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable stats file ({e}); use --overwrite to redo this shard") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the stats file: {e.strerror or e}") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("config"), dict):
        what = "no settings ('config')" if isinstance(stats, dict) else f"a JSON {type(stats).__name__}"
        raise InputError(f"{path}: not a stats file of eclipse-stream (it holds {what}, not an object with the "
                         "shard's settings); use --overwrite to redo this shard")
    return stats


def output_problem(output: Path, stats: dict) -> str | None:
    """Why a finished output cannot be trusted any more, or None. Its size must be the recorded one; when its
    modification time is the recorded one too, that is enough (as for inputs); otherwise (a copy, an edit, or
    stats of a version that did not record them) its sha256 must be the recorded one."""
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
    if recorded is None:
        return None  # nothing to compare with (no version wrote an output without its sha256)
    if file_sha256(output) != recorded:
        return "the output's sha256 is not the one recorded when it was written (cut short or changed)"
    return None


def check_no_overlap(inputs, shards: list[Path], out_dir) -> None:
    """Refuse an OUT that is, contains or lies inside a folder holding input shards (or named as input): the
    check every command shares (:func:`~eclipse_stream.outputs.check_output_folder`)."""
    check_output_folder(out_dir, inputs, shards, "purify")


def partial_path(out_dir: Path, name: str) -> Path:
    """Where a shard is written until it is complete (hidden, owned by this process)."""
    return out_dir / f".{name}.partial-{os.getpid()}"


def _temporary() -> re.Pattern:
    """Temporary names this tool creates in OUT: partial shards (and what their formats' writers leave beside
    them, e.g. a .beton spool), atomic JSON writes."""
    extra = "|".join(p for p in (f.temporary_names() for f in FORMATS.values()) if p)
    partial = rf"^\..+\.partial-\d+({extra})?$" if extra else r"^\..+\.partial-\d+$"
    return re.compile(partial + rf"|^\.(.+\.stats\.json|{re.escape(MANIFEST)})\.\d+\.[0-9a-f]{{8}}\.tmp$")


def prepare_out(out_dir: Path, lock: DirLock, shards, fingerprint: dict, overwrite: bool):
    """Rank 0, before any rank writes: create and lock OUT, remove what killed runs left, check the plan,
    and invalidate the manifest (it is rewritten when every shard is done); returns the plan."""
    with writing(out_dir, "create the output folder"):
        out_dir.mkdir(parents=True, exist_ok=True)  # only once inputs and checkpoint are known good
    lock.acquire()
    temporary = _temporary()
    for p in sorted(out_dir.iterdir()):  # with OUT locked, no live run owns any of these
        if temporary.match(p.name):
            with writing(p, "remove a leftover temporary file"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    planned = plan(shards, out_dir, fingerprint, overwrite)  # refuses other settings before the manifest goes
    with writing(out_dir / MANIFEST, "remove the old manifest"):
        (out_dir / MANIFEST).unlink(missing_ok=True)
    return planned


def write_manifest(shards, out_dir: Path, denoiser, ckpt_sha: str, fingerprint: dict, world: int) -> Path:
    entries, totals = [], {"samples_in": 0, "written": 0, "rejected": 0}
    for s in shards:
        st = json.loads(stats_path(out_dir / s.name).read_text())
        entries.append({k: st[k] for k in ("shard", "input", "samples_in", "written", "rejected",
                                           "output_sha256")})
        for k in totals:
            totals[k] += st[k]
    manifest = {
        "package_version": __version__,
        "denoiser": {"path": str(denoiser), "sha256": ckpt_sha},
        "config": fingerprint,
        "world_size": world,
        "shards": entries,
        "totals": totals,
    }
    path = out_dir / MANIFEST
    with writing(path):
        write_json(path, manifest)
    return path
