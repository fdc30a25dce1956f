"""The end of a shard, off the device loop: close, fsync, rename, stats -- on a thread of its own.

:func:`finish_shard` completes one :class:`~eclipse_stream.assembly.OutputShard`: it checks the counts and
that the input did not change while it was read, lets the format's writer complete the file (a tar is hashed
as it is written; a ``.beton`` is built by ffcv in the format's builder process), removes the old stats file,
publishes the output (a rename; an upload to an object store, see ``outstore``) and then writes
``<shard>.stats.json``, which marks the shard done.
:class:`Finisher` runs these one at a time on a thread, so the device loop never waits on the disk; an error
there is raised again on the main thread at its next look (:meth:`Finisher.check`).
"""

from __future__ import annotations

import queue
import threading
import time

from . import __version__
from .assembly import DONE, OutputShard
from .errors import EclipseError, InputError
from .outdir import STATS_SUFFIX, input_record
from .outstore import LocalStore, OutputStore, writing
from .storage import identity

__all__ = ["Finisher", "finish_shard"]


def finish_shard(shard: OutputShard, fingerprint: dict, rank: int, stop: threading.Event | None = None,
                 store: OutputStore | None = None) -> dict:
    """Complete, publish (rename or upload) into place, then write the stats file that marks the shard done;
    returns the stats. ``store``: where OUT is (default: the local folder of the shard's temporary file)."""
    store = store if store is not None else LocalStore(shard.tmp.parent)
    n_rejected = len(shard.rejects)
    task = shard.task
    if shard.written + n_rejected + shard.member_groups != shard.expected:
        raise EclipseError(f"{task.shown}: internal count mismatch: {shard.expected} in, "
                           f"{shard.written} written + {n_rejected} rejected + {shard.member_groups} other")
    try:
        now = identity(task.path)
    except (OSError, EclipseError) as e:
        now = {"error": getattr(e, "strerror", None) or str(e)}
    if now != shard.input_stat:
        raise InputError(f"{task.shown}: the input shard changed while it was read ({', '.join(shard.input_stat)}); "
                         "its output is not kept: rerun when it no longer changes")
    name, stats_name = task.name, task.name + STATS_SUFFIX
    with writing(store.shown(name)):
        sha256 = shard.writer.finish(stop)  # closed and fsynced at its temporary name
    # An older stats file (--overwrite, or input changed) must not outlive the output it describes: a kill
    # between the publish below and the new stats file then leaves an unrecorded shard, which a rerun redoes.
    store.remove(stats_name)
    published = {}
    if sha256 is None:  # the format wrote no file (a .beton none of whose samples survived)
        store.remove(name)
    else:
        published = store.publish(shard.tmp, name)  # a rename, or one upload that is visible only once complete
    stats = {
        "shard": task.name,
        "input": task.shown,
        **input_record(shard.input_stat),
        **published,
        "output": store.shown(name) if sha256 is not None else None,
        "samples_in": shard.written + n_rejected,
        "written": shard.written,
        "rejected": n_rejected,
        "rejects": sorted(shard.rejects, key=lambda r: r["index"]),
        "other_members_copied": shard.members_copied,
        "seconds": round(time.time() - shard.started, 3),
        "output_sha256": sha256,
        "config": fingerprint,
        "package_version": __version__,
        "rank": rank,
    }
    store.write_json(stats_name, stats)
    shard.state = DONE  # only now: if anything above fails, the run's error path still aborts this shard
    return stats


class Finisher:
    """Finishes complete shards one at a time on a thread; ``on_done(stats)`` is called there after each."""

    def __init__(self, fingerprint: dict, rank: int, on_done, store: OutputStore | None = None):
        self.fingerprint, self.rank, self.on_done, self.store = fingerprint, rank, on_done, store
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
                self.on_done(finish_shard(shard, self.fingerprint, self.rank, self.stop, self.store))
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
