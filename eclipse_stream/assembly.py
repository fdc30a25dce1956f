"""One output shard, assembled in input order from whatever finishes first.

Purified images come back from the encode threads in any order, and a sample with several image fields is
complete only when all of them are in. :class:`OutputShard` holds finished steps until every earlier one is
written, then hands them to the format's writer in input order: samples, rejects (recorded, not written) and
other members. It says when the shard is complete (exactly once), for the finisher to take it from there.
Thread-safe; it never touches the device or a DataLoader, so it is tested on its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .events import Item
from .formats import ShardFormat, ShardWriter, WritePolicy
from .outdir import Task, writing

__all__ = ["OutputShard"]

OPEN, FINISHING, DONE, ABORTED = "open", "finishing", "done", "aborted"


class OutputShard:
    """The output of one input shard while it is written (see the module docstring)."""

    def __init__(self, task: Task, fmt: ShardFormat, writer: ShardWriter, tmp: Path, policy: WritePolicy,
                 input_stat: dict | None):
        self.task, self.format, self.writer, self.tmp, self.policy = task, fmt, writer, tmp, policy
        self.input_stat = input_stat  # when the reader opened it: compared again before the shard is marked done
        self.lock = threading.Lock()
        # index -> ("sample", key, fields, converted) | ("reject", ...) | ("members", ...)
        self.ready: dict[int, tuple] = {}
        self.parts: dict[int, dict] = {}  # index -> the image fields of a sample purified so far
        self.next_index = 0
        self.written = self.member_groups = self.members_copied = 0
        self.rejects: list[dict] = []
        self.converted: list[dict] = []  # image fields changed on reading (16-bit read as 8-bit), as written
        self.expected: int | None = None
        self.started = time.time()
        self.state = OPEN

    @classmethod
    def create(cls, task: Task, out_dir: Path, tmp: Path, policy: WritePolicy, input_stat: dict | None):
        fmt = task.format
        with writing(tmp, "create"):
            tmp.unlink(missing_ok=True)
            writer = fmt.open_writer(str(tmp), task.path, policy)
        return cls(task, fmt, writer, tmp, policy, input_stat)

    @property
    def final(self) -> Path:
        return self.tmp.parent / self.task.name

    def encode(self, item: Item, rgb):
        """One purified image field as the writer takes it (runs on an encode thread)."""
        return self.format.encode(item.image, rgb, self.policy)

    def put_image(self, item: Item, value, reason: str | None = None) -> bool:
        """One image field of a sample, purified (``value``) or not encodable (``reason``). The sample is
        written once all its image fields are in, or rejected if any failed. True when the shard is complete."""
        with self.lock:
            if self.state == ABORTED:  # a later part of the shard was unreadable: drop what still arrives
                return False
            part = self.parts.setdefault(item.index, {"fields": None, "images": {}, "reasons": [], "got": 0,
                                                      "converted": []})
            if item.fields is not None:
                part["fields"] = item.fields
            part["got"] += 1
            if reason is None:
                part["images"][item.image.field] = value
                note = getattr(item.image.source, "converted", None)
                if note:
                    part["converted"].append({"index": item.sample_no, "key": item.key, "field": item.image.field,
                                              "how": note})
            else:
                part["reasons"].append(reason if item.parts == 1 else f"field {item.image.field!r}: {reason}")
            if part["got"] < item.parts:
                return False
            del self.parts[item.index]
            if part["reasons"]:
                entry = ("reject", item.sample_no, item.key, "; ".join(part["reasons"]))
            else:
                entry = ("sample", item.key, {**part["fields"], **part["images"]}, part["converted"])
            return self._deposit(item.index, entry)

    def reject(self, index: int, sample_no: int, key: str, reason: str) -> bool:
        with self.lock:
            return self.state != ABORTED and self._deposit(index, ("reject", sample_no, key, reason))

    def put_members(self, index: int, members: list) -> bool:
        with self.lock:
            return self.state != ABORTED and self._deposit(index, ("members", members))

    def end(self, count: int) -> bool:
        """The reader's last word: the shard has ``count`` steps. True when the shard is complete."""
        with self.lock:
            self.expected = count
            return self._complete()

    def _deposit(self, index: int, entry: tuple) -> bool:
        """Record one finished step; write everything now in order. True when the shard is complete."""
        self.ready[index] = entry
        while self.next_index in self.ready:
            kind, *rest = self.ready.pop(self.next_index)
            if kind == "reject":
                sample_no, key, reason = rest
                self.rejects.append({"index": sample_no, "key": key, "reason": reason})
            elif kind == "members":
                with writing(self.tmp):
                    self.writer.write_members(rest[0])
                self.member_groups += 1
                self.members_copied += len(rest[0])
            else:
                key, fields, converted = rest
                with writing(self.tmp):
                    self.writer.write_sample(key, fields)
                self.written += 1
                self.converted += converted
            self.next_index += 1
        return self._complete()

    def _complete(self) -> bool:
        """True once: when every step is in (the shard then belongs to the finisher)."""
        if self.state == OPEN and self.expected is not None and self.next_index == self.expected:
            self.state = FINISHING
            return True
        return False

    def abort(self) -> None:
        """Drop the partial output; samples still in flight for this shard are ignored."""
        with self.lock:
            if self.state == DONE:
                return
            self.state = ABORTED
            try:
                self.writer.abort()
            except Exception:  # noqa: BLE001 - best effort: we are already failing
                pass
            self.tmp.unlink(missing_ok=True)
