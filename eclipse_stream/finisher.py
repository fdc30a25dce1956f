"""The end of a shard, off the device loop: close, fsync, rename, stats -- on a thread of its own.

:func:`finish_shard` completes one :class:`~eclipse_stream.assembly.OutputShard`: it checks the counts and
that the input did not change while it was read, lets the format's writer complete the file (a tar is hashed
as it is written; a ``.beton`` is built by ffcv in the format's builder process), removes the old stats file,
renames the output into place and then writes ``<shard>.stats.json``, which marks the shard done.
:class:`Finisher` runs these one at a time on a thread, so the device loop never waits on the disk; an error
there is raised again on the main thread at its next look (:meth:`Finisher.check`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from . import __version__
from .assembly import DONE, OutputShard
from .errors import EclipseError, InputError
from .fsutil import write_json
from .outdir import stat_record, stats_path, writing

__all__ = ["Finisher", "finish_shard"]

log = logging.getLogger(__name__)


def finish_shard(shard: OutputShard, fingerprint: dict, rank: int, stop: threading.Event | None = None) -> dict:
    """Complete, rename into place, then write the stats file that marks the shard done; returns the stats."""
    n_rejected = len(shard.rejects)
    task = shard.task
    if shard.written + n_rejected + shard.member_groups != shard.expected:
        raise EclipseError(f"{task.path}: internal count mismatch: {shard.expected} in, "
                           f"{shard.written} written + {n_rejected} rejected + {shard.member_groups} other")
    try:
        now = stat_record(os.stat(task.path))
    except OSError as e:
        now = {"error": e.strerror}
    if now != shard.input_stat:
        raise InputError(f"{task.path}: the input shard changed while it was read (size or modification "
                         f"time); its output is not kept: rerun when it no longer changes")
    final, stats_file = shard.final, stats_path(shard.final)
    with writing(final):
        sha256 = shard.writer.finish(stop)  # closed and fsynced at its temporary name
    # An older stats file (--overwrite, or input changed) must not outlive the output it describes: a kill
    # between the rename below and the new stats file then leaves an unrecorded shard, which a rerun redoes.
    with writing(stats_file, "remove the old stats file"):
        stats_file.unlink(missing_ok=True)
    written = {}
    if sha256 is None:  # the format wrote no file (a .beton none of whose samples survived)
        with writing(final, "remove the old output"):
            final.unlink(missing_ok=True)
    else:
        with writing(final):
            os.replace(shard.tmp, final)
            st = os.stat(final)  # a rerun checks these before it trusts the output (outdir.output_problem)
        written = {"output_size": st.st_size, "output_mtime_ns": st.st_mtime_ns}
    stats = {
        "shard": task.name,
        "input": task.path,
        "input_size": shard.input_stat["size"],
        "input_mtime_ns": shard.input_stat["mtime_ns"],
        "output": str(final) if sha256 is not None else None,
        "samples_in": shard.written + n_rejected,
        "written": shard.written,
        "rejected": n_rejected,
        "rejects": sorted(shard.rejects, key=lambda r: r["index"]),
        "converted": shard.converted,  # image fields read as 8-bit from 16-bit, written in input order
        "other_members_copied": shard.members_copied,
        "seconds": round(time.time() - shard.started, 3),
        "output_sha256": sha256,
        "output_size": written.get("output_size"),
        "output_mtime_ns": written.get("output_mtime_ns"),
        "config": fingerprint,
        "package_version": __version__,
        "rank": rank,
    }
    with writing(stats_file):
        write_json(stats_file, stats)
    if shard.converted:
        log.warning("%s: %d image field(s) read as 8-bit from 16-bit (%s ...), recorded under 'converted' in %s",
                    task.path, len(shard.converted), shard.converted[0]["how"], stats_file)
    shard.state = DONE  # only now: if anything above fails, the run's error path still aborts this shard
    return stats


class Finisher:
    """Finishes complete shards one at a time on a thread; ``on_done(stats)`` is called there after each."""

    def __init__(self, fingerprint: dict, rank: int, on_done):
        self.fingerprint, self.rank, self.on_done = fingerprint, rank, on_done
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="eclipse-finish", daemon=True)
        self._thread.start()

    def submit(self, shard: OutputShard) -> None:
        self._queue.put(shard)

    def _loop(self) -> None:
        while (shard := self._queue.get()) is not None:
            if self.error is not None or self.stop.is_set():
                continue  # the run is failing: the main thread aborts what is left
            try:
                self.on_done(finish_shard(shard, self.fingerprint, self.rank, self.stop))
            except BaseException as e:  # noqa: BLE001 - raised again on the main thread
                self.error = e

    def check(self) -> None:
        """Raise, on the calling thread, the error a finish met."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finish every shard handed over, then stop; raises the first error."""
        self._queue.put(None)
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        """Stop now: a finish under way is asked to give up (a .beton build is killed), queued ones are left."""
        self.stop.set()
        self._queue.put(None)
        self._thread.join()
