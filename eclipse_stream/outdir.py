"""The output (a local folder or an fsspec destination, through ``outstore``): what a run may write there,
what is already done, and the manifest.

* :func:`check_no_overlap`: OUT never is, contains or lies inside a folder (or prefix) holding input shards.
* :func:`claim_out` (rank 0): create and lock OUT; :func:`prepare_out` (rank 0, OUT locked): remove what killed
  runs left, check the plan, drop the manifest.
* :func:`earlier_settings`: the settings OUT's finished shards were made with (what a resumed run keeps).
* :func:`plan`: which shards still need work (a shard is done when its stats file records the current
  settings and the input's current identity (``storage.identity``), and its output is still the one written
  (``OutputStore.output_problem``: size, and mtime or sha256, locally; size and ETag on an object store); other
  settings are refused, a changed input or a cut output is redone.
* :func:`write_manifest`: after every shard of every rank is done.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import InputError
from .formats import FORMATS, ShardFormat, format_for, suffixes
from .outputs import check_output_folder
from .outstore import OutputStore, open_store, writing  # noqa: F401  (writing: used by assembly, finisher)
from .storage import identity, is_remote, local_path, redact, shard_name

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Task:
    """One input shard: its position in the run's shard list, path or URL, and (output) file name."""

    index: int
    path: str  # what opens it: may hold a URL's credentials, so messages show ``shown``
    name: str

    @property
    def format(self) -> ShardFormat:
        return format_for(self.name)

    @property
    def shown(self) -> str:
        return redact(self.path)


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name + STATS_SUFFIX)


def stat_record(st: os.stat_result) -> dict:
    """What tells a changed local input apart on a rerun: its size and modification time (as make and rsync
    do); ``storage.identity`` gives it for any location."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_record(ident: dict) -> dict:
    """An input's identity as its output's stats file records it (``input_size``, ``input_mtime_ns``, ...)."""
    return {f"input_{k}": v for k, v in ident.items()}


def plan(shards: list, out, fingerprint: dict, overwrite: bool,
         quiet: bool = False) -> tuple[list[Task], list[str]]:
    """(tasks to do, names of shards done); refuses to mix outputs made with different settings.
    ``out``: an OutputStore, or a local folder.

    A shard is done when its stats file records the current settings and the input's current identity, and
    its output is still the one written (:meth:`OutputStore.output_problem`); a changed input or a cut output
    is redone, with a warning (``quiet``: none, for the ranks that plan again after rank 0)."""
    store = open_store(out)
    names = [shard_name(s, suffixes()) for s in shards]
    dup = {n for n, c in Counter(names).items() if c > 1}
    if dup:
        raise InputError(f"two input shards share the output name(s) {sorted(dup)}: outputs would collide")
    warn = (lambda *a: None) if quiet else log.warning
    todo, done = [], []
    for i, (s, name) in enumerate(zip(shards, names)):
        task = Task(i, str(s), name)
        stats_name = name + STATS_SUFFIX
        text = None if overwrite else store.read_text(stats_name)
        if text is None:
            todo.append(task)
            continue
        stats = read_stats(text, store.shown(stats_name))
        previous = stats["config"]
        if stats.get("output") and (problem := store.output_problem(name, stats)):  # deleted, cut or replaced
            warn("%s: %s: redoing it", store.shown(name), problem)
            todo.append(task)
            continue
        try:
            now = identity(task.path, fresh=False)  # an object: as this run's listing gave it
        except OSError as e:
            raise InputError(f"{task.shown}: cannot read: {e.strerror or e}") from e
        if {k: stats.get(k) for k in input_record(now)} != input_record(now):
            warn("%s changed since its output was made (%s): redoing it", task.shown, ", ".join(now))
            todo.append(task)  # the finisher removes the old stats file before it replaces the output
            continue
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise InputError(f"{store.shown(name)} was purified with different settings ({', '.join(changed)}); "
                             f"use --overwrite or another output folder")
        done.append(name)
    return todo, done


def earlier_settings(shards: list, out) -> dict | None:
    """The settings (stats ``config``) of the first shard already purified into ``out`` (an OutputStore or a
    local folder) from its input as it is now, or None: what a resumed run keeps (``purify --deblur auto``
    reuses the kernels fitted when OUT was begun). Unreadable stats files are passed over (:func:`plan` reports
    them)."""
    store = open_store(out)
    for s in shards:
        name = shard_name(s, suffixes())
        try:
            text = store.read_text(name + STATS_SUFFIX)
            if text is None:
                continue
            stats = read_stats(text, store.shown(name + STATS_SUFFIX))
            now = identity(str(s), fresh=False)
        except (InputError, OSError):
            continue
        if {k: stats.get(k) for k in input_record(now)} == input_record(now):
            return stats["config"]
    return None


def read_stats(text: str, shown: str) -> dict:
    """A shard's stats file (its text) as a dict with a ``config`` object; InputError (suggesting --overwrite)
    otherwise."""
    try:
        stats = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{shown}: unreadable stats file ({e}); use --overwrite to redo this shard") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("config"), dict):
        what = "no settings ('config')" if isinstance(stats, dict) else f"a JSON {type(stats).__name__}"
        raise InputError(f"{shown}: not a stats file of eclipse-stream (it holds {what}, not an object with the "
                         "shard's settings); use --overwrite to redo this shard")
    return stats


def check_no_overlap(inputs, shards: list, out_dir) -> None:
    """Refuse an OUT that is, contains or lies inside a folder holding input shards (or named as input): the
    check every command shares (:func:`~eclipse_stream.outputs.check_output_folder`). A remote OUT is compared
    with the prefixes of the input URLs of the same store."""
    if isinstance(out_dir, OutputStore):
        out_dir = getattr(out_dir, "url", None) or out_dir.location
    if is_remote(out_dir):
        _check_no_remote_overlap(shards, str(out_dir))
        return
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    check_output_folder(local_path(out_dir, output=True), [local_path(i) for i in map(str, items) if not is_remote(i)],
                        [Path(s) for s in shards if not is_remote(s)], "purify")


def _check_no_remote_overlap(shards: list, out_url: str) -> None:
    out = out_url.rstrip("/")
    for s in shards:
        s = str(s)
        if not is_remote(s) or s.split("://", 1)[0] != out.split("://", 1)[0]:
            continue
        folder = s.rsplit("/", 1)[0]
        if out == folder or out.startswith(folder + "/") or folder.startswith(out + "/"):
            where = "is" if out == folder else "is inside" if out.startswith(folder + "/") else "contains"
            raise InputError(f"output {redact(out)} overlaps the input: it {where} the input prefix {redact(folder)}; "
                             "purify never writes into, below or above its input; choose another output location")


def partial_path(out_dir: Path, name: str) -> Path:
    """Where a shard is written until it is complete (hidden, owned by this process)."""
    return out_dir / f".{name}.partial-{os.getpid()}"


def _temporary() -> re.Pattern:
    """Temporary names this tool creates in OUT: partial shards (and what their formats' writers leave beside
    them, e.g. a .beton spool), atomic JSON writes."""
    extra = "|".join(p for p in (f.temporary_names() for f in FORMATS.values()) if p)
    partial = rf"^\..+\.partial-\d+({extra})?$" if extra else r"^\..+\.partial-\d+$"
    return re.compile(partial + rf"|^\.(.+\.stats\.json|{re.escape(MANIFEST)})\.\d+\.[0-9a-f]{{8}}\.tmp$")


def claim_out(out, lock) -> None:
    """Rank 0, once inputs and checkpoint are known good: create OUT and take its lock (``OutputStore.lock()``);
    a second run into the same OUT stops here, before any work."""
    open_store(out).create()
    lock.acquire()


def prepare_out(out, shards, fingerprint: dict, overwrite: bool):
    """Rank 0, OUT claimed (:func:`claim_out`), before any rank writes: remove what killed runs left, check the
    plan, and invalidate the manifest (it is rewritten when every shard is done); returns the plan. ``out``: an
    OutputStore or a local folder."""
    store = open_store(out)
    store.remove_leftovers(_temporary())  # with OUT locked, no live run owns any of these
    planned = plan(shards, store, fingerprint, overwrite)  # refuses other settings before the manifest goes
    store.remove(MANIFEST)
    return planned


def write_manifest(shards, out, denoiser, ckpt_sha: str, fingerprint: dict, world: int) -> str:
    """manifest.json in ``out`` (an OutputStore or a local folder) from every shard's stats; returns where."""
    store = open_store(out)
    entries, totals = [], {"samples_in": 0, "written": 0, "rejected": 0}
    for s in shards:
        st = json.loads(store.read_text(shard_name(s, suffixes()) + STATS_SUFFIX))
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
    store.write_json(MANIFEST, manifest)
    return store.shown(MANIFEST)
