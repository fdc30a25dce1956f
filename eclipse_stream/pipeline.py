"""Shards in, shards out: ``eclipse-stream purify``.

How a sample flows (see docs/architecture.md):

1. **Read + decode** (DataLoader worker processes): one worker reads one whole shard
   (``.tar`` via ``sources.read_tar``, ``.beton`` via ffcv's reader), decodes every image
   field of each sample (``imageio.decode_image``), applies the resolution policy, and groups
   images of the same (padded) size into batches (*bucketing*, per shard, so batches never
   depend on the number of workers). It emits events: ``start``, ``batch``, ``reject``,
   ``members`` (tar members that belong to no sample, copied unchanged), ``shard_error``, ``end``.
2. **Purify** (main process, one device): each batch goes through :class:`Purifier` with
   a generator seeded from ``(seed, shard file name, batch number)``.
3. **Encode + write** (thread pool): purified pixels are cropped back to each image's
   size, re-encoded in the field's own format, and handed to the shard's writer, which
   writes samples (once all their image fields are in) in input order to a temporary file.
   When a shard is complete its file is renamed into place and then its
   ``<shard>.stats.json`` is written: the stats file marks the shard done, so a rerun skips
   it. ``manifest.json`` is written last.

Before any of this, rank 0 refuses an OUT that overlaps the input, locks OUT for the job,
removes what killed runs left and the old manifest (see README, "What purify does to your data").

Memory is bounded by the DataLoader prefetch (a few batches per worker), the encode
queue (``2 x encode_threads`` batches) and, per open shard, the samples waiting for an
earlier sample's batch (at most ``max_pending`` images before buckets are flushed early).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import Denoiser, load_denoiser
from .devices import resolve_device
from .errors import EclipseError, InputError, OutputError, SampleError, ShardError
from .fsutil import DirLock, file_sha256, write_json
from .imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, encode_image, image_fields
from .purifier import Purifier, PurifierConfig
from .sources import expand_shards, read_tar

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
MANIFEST = "manifest.json"
RESOLUTIONS = ("native", "model")


def default_workers() -> int:
    """Decode worker processes: one per core, at most 8 (output does not depend on it)."""
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class PurifyConfig:
    """Options of ``eclipse-stream purify``; everything that decides the output bytes is recorded."""

    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    batch_size: int = 64
    seed: int = 0
    jpeg_quality: int = 95
    image_key: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    resolution: str = "native"
    bucket_multiple: int = 32
    max_batch_pixels: int = 64 * 256 * 256
    on_error: str = "fail"
    # execution only (do not change the output):
    workers: int = field(default_factory=default_workers)
    encode_threads: int = 2
    device: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch size must be >= 1"),
            (1 <= self.jpeg_quality <= 100, "JPEG quality must be in 1..100"),
            (self.max_pixels >= 1, "max pixels must be >= 1"),
            (self.resolution in RESOLUTIONS, f"resolution must be one of {RESOLUTIONS}"),
            (self.bucket_multiple >= 1, "bucket multiple must be >= 1"),
            (self.on_error in ("fail", "skip"), "on-error must be 'fail' or 'skip'"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.encode_threads >= 1, "encode threads must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def fingerprint(self, checkpoint_sha256: str, device_type: str) -> dict:
        """What decides the output bytes: a rerun with a different fingerprint must not mix outputs."""
        d = asdict(self)
        # on_error decides which runs stop, not the bytes of a finished shard: resuming with the other mode is fine
        for k in ("workers", "encode_threads", "device", "overwrite", "on_error"):
            d.pop(k)
        d.update(checkpoint_sha256=checkpoint_sha256, device_type=device_type, package_version=__version__)
        return d


# ---------------------------------------------------------------------------------------
# Stage 1: read, decode and batch one shard (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------

def _resize_for_model(rgb: np.ndarray, size: int) -> np.ndarray:
    """'model' resolution: shorter side to the denoiser's size, aspect ratio kept (bicubic)."""
    h, w = rgb.shape[:2]
    if min(h, w) == size:
        return rgb
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC))


class _Bucketer:
    """Groups a shard's images by padded size into batches, deterministically.

    A bucket is emitted when it holds ``batch_size`` images or ``max_batch_pixels`` pixels;
    if more than ``max_pending`` images wait in all buckets, the bucket holding the oldest
    image is emitted early (so a shard of all-different sizes keeps memory bounded).
    """

    def __init__(self, batch_size: int, multiple: int, max_batch_pixels: int, max_pending: int):
        self.batch_size, self.multiple = batch_size, multiple
        self.max_batch_pixels, self.max_pending = max_batch_pixels, max_pending
        self.buckets: dict[tuple[int, int], list] = {}
        self.pending = 0

    def _padded(self, h: int, w: int) -> tuple[int, int]:
        m = self.multiple
        return -(-h // m) * m, -(-w // m) * m

    def add(self, item: dict, rgb: np.ndarray):
        size = self._padded(*rgb.shape[:2])
        bucket = self.buckets.setdefault(size, [])
        bucket.append((item, rgb))
        self.pending += 1
        full = (len(bucket) >= self.batch_size
                or len(bucket) * size[0] * size[1] >= self.max_batch_pixels)
        if full:
            yield self._emit(size)
        elif self.pending > self.max_pending:
            oldest = min(self.buckets, key=lambda s: self.buckets[s][0][0]["index"])
            yield self._emit(oldest)

    def flush(self):
        while self.buckets:
            yield self._emit(min(self.buckets, key=lambda s: self.buckets[s][0][0]["index"]))

    def _emit(self, size: tuple[int, int]):
        entries = self.buckets.pop(size)
        self.pending -= len(entries)
        ph, pw = size
        pixels = np.stack([np.pad(rgb, ((0, ph - rgb.shape[0]), (0, pw - rgb.shape[1]), (0, 0)), mode="edge")
                           for _, rgb in entries])
        items = [item for item, _ in entries]
        return items, torch.from_numpy(pixels).permute(0, 3, 1, 2)


@dataclass
class _Task:
    index: int
    path: str
    name: str

    @property
    def kind(self) -> str:
        return "beton" if self.name.endswith(".beton") else "tar"


class _Record(NamedTuple):
    """One step of a shard as read: a sample (images to purify, or the reason it is rejected), or tar members
    that belong to no sample (copied unchanged). ``index`` counts both; ``sample_no`` counts samples only."""

    index: int
    key: str | None
    sample_no: int | None = None
    sample: dict | None = None  # the fields written back unchanged (image fields removed)
    images: list | None = None  # [(field, rgb, DecodedImage | None)]: every image field to purify
    error: str | None = None
    members: list | None = None  # tar only: [(TarInfo, bytes | None)] copied as they are


def _tar_records(task: _Task, cfg: PurifyConfig) -> Iterator[_Record]:
    sample_no = 0
    for index, item in enumerate(read_tar(task.path)):
        if item.key is None:
            yield _Record(index, None, members=item.members)
            continue
        no, sample_no = sample_no, sample_no + 1
        fields = item.fields
        try:
            names = image_fields(fields, cfg.image_key)
            if not names:
                raise ImageDecodeError(f"no image field (fields: {sorted(fields)})")
            images = []
            for name in names:
                try:
                    decoded = decode_image(fields[name], max_pixels=cfg.max_pixels)
                except ImageDecodeError as e:  # one bad image rejects the sample: never half-purified
                    raise ImageDecodeError(f"field {name!r}: {e}" if len(names) > 1 else str(e)) from None
                rgb, decoded.rgb = decoded.rgb, None  # the pixels travel in the batch tensor, not twice
                images.append((name, rgb, decoded))
        except (ImageDecodeError, ValueError) as e:
            yield _Record(index, item.key, no, error=str(e))
            continue
        passthrough = {k: v for k, v in fields.items() if k not in names}
        yield _Record(index, item.key, no, passthrough, images)


def _beton_records(task: _Task, cfg: PurifyConfig) -> Iterator[_Record]:
    from .formats.beton import BetonReader
    reader = BetonReader(task.path, max_pixels=cfg.max_pixels)
    names = reader.fields_to_purify(cfg.image_key)
    it = iter(reader)
    index = 0
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except SampleError as e:  # one undecodable image: the reader goes on with the next
            yield _Record(index, e.key, index, error=e.reason)
            index += 1
            continue
        images = [(name, np.ascontiguousarray(sample.pop(name)), None) for name in names]
        yield _Record(index, sample["__key__"], index, sample, images)
        index += 1


def read_shard(task: _Task, cfg: PurifyConfig, model_size: int):
    """Events for one shard, in order: start, (batch | reject | members)*, end  -- or shard_error."""
    try:
        st = os.stat(task.path)
        yield {"type": "start", "shard": task.index, "input_stat": _stat_record(st)}
    except OSError as e:
        yield {"type": "start", "shard": task.index, "input_stat": None}
        yield {"type": "shard_error", "shard": task.index, "reason": f"cannot read: {e.strerror or e}"}
        return
    bucketer = _Bucketer(cfg.batch_size, cfg.bucket_multiple, cfg.max_batch_pixels,
                         max_pending=4 * cfg.batch_size)
    batch_no = 0

    def batch_event(items, pixels):
        nonlocal batch_no
        ev = {"type": "batch", "shard": task.index, "batch": batch_no, "items": items, "pixels": pixels}
        batch_no += 1
        return ev

    count = 0
    records = _tar_records(task, cfg) if task.kind == "tar" else _beton_records(task, cfg)
    try:
        for rec in records:
            count = rec.index + 1
            if rec.members is not None:
                yield {"type": "members", "shard": task.index, "index": rec.index, "members": rec.members}
                continue
            if rec.error is not None:
                yield {"type": "reject", "shard": task.index, "index": rec.index, "sample_no": rec.sample_no,
                       "key": rec.key, "reason": rec.error}
                continue
            for part, (name, rgb, decoded) in enumerate(rec.images):
                rgb = _resize_for_model(rgb, model_size) if cfg.resolution == "model" else rgb
                item = {"index": rec.index, "sample_no": rec.sample_no, "key": rec.key,
                        "sample": rec.sample if part == 0 else None, "image_key": name,
                        "parts": len(rec.images), "decoded": decoded, "size": rgb.shape[:2]}
                for items, pixels in bucketer.add(item, rgb):
                    yield batch_event(items, pixels)
        for items, pixels in bucketer.flush():
            yield batch_event(items, pixels)
    except ShardError as e:
        yield {"type": "shard_error", "shard": task.index, "reason": e.reason}
        return
    except EclipseError as e:  # e.g. ffcv missing
        yield {"type": "shard_error", "shard": task.index, "reason": str(e)}
        return
    yield {"type": "end", "shard": task.index, "count": count}


def _stat_record(st: os.stat_result) -> dict:
    """What tells a changed input apart on a rerun: its size and modification time (as make and rsync do)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _ShardEvents(IterableDataset):
    """Each DataLoader worker reads whole shards: worker w takes tasks w, w + n, ..."""

    def __init__(self, tasks: list[_Task], cfg: PurifyConfig, model_size: int):
        self.tasks, self.cfg, self.model_size = tasks, cfg, model_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for task in self.tasks[wid::nw]:
            yield from read_shard(task, self.cfg, self.model_size)


# ---------------------------------------------------------------------------------------
# Stage 3: ordered, atomic shard writers
# ---------------------------------------------------------------------------------------

class _TarSink:
    """Writes samples byte for byte as webdataset's ``TarWriter(encoder=False, mtime=0)`` does (fields in sorted
    order, mode 0444, owner bigdata, mtime 0), but keeps every field (TarWriter drops names starting with "_")
    and also copies the members that belong to no sample (links, directories, extension-less files)."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="w|")
        except BaseException:
            self._file.close()
            raise

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        for name in sorted(fields):
            data = fields[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0.0, 0o444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(data))

    def write_members(self, members: list) -> None:
        for info, data in members:
            info = copy.copy(info)
            if info.isreg():  # a sparse or contiguous-file member is written back as the plain file it reads as
                info.type = tarfile.REGTYPE
            if data is None:  # links and the like carry no data (some writers still record a size for them)
                info.size = 0
            self._tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def close(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()


class _ShardWriter:
    """Writes one output shard in input order to a temporary file; renames it when complete."""

    def __init__(self, task: _Task, out_dir: Path, cfg: PurifyConfig, input_stat: dict | None = None):
        self.task, self.cfg = task, cfg
        self.input_stat = input_stat  # when the reader opened it: compared again before the shard is marked done
        self.final = out_dir / task.name
        self.tmp = out_dir / f".{task.name}.partial-{os.getpid()}"
        self.lock = threading.Lock()
        self.ready: dict[int, tuple] = {}  # index -> ("sample", key, sample) | ("reject", ...) | ("members", ...)
        self.parts: dict[int, dict] = {}  # index -> the image fields of a sample purified so far
        self.next_index = 0
        self.written = 0
        self.member_groups = 0
        self.members_copied = 0
        self.rejects: list[dict] = []
        self.expected: int | None = None
        self.started = time.time()
        self.closed = False
        self.aborted = False
        self._open()

    def _open(self):
        # A .beton sink needs the input's field layout, and the input may turn out unreadable (a shard_error
        # from the reader worker): it is opened at the first sample that survives, never for an all-bad shard.
        with _writing(self.tmp, "create"):
            self.tmp.unlink(missing_ok=True)
            self.sink = _TarSink(self.tmp) if self.task.kind == "tar" else None

    def _beton_sink(self):
        from .formats.beton import BetonReader, BetonWriter
        return BetonWriter(str(self.tmp), like=BetonReader(self.task.path),
                           jpeg_quality=self.cfg.jpeg_quality, spool_dir=str(self.tmp.parent),
                           seed=stream_seed(self.cfg.seed, self.task.name, "beton") % 2**32)

    def encode(self, item: dict, rgb: np.ndarray):
        """One purified image field as written: re-encoded like its source (tar) or as pixels (beton)."""
        if self.task.kind == "tar":
            return encode_image(rgb, item["decoded"], item["image_key"], jpeg_quality=self.cfg.jpeg_quality)
        return rgb

    def put_image(self, item: dict, value, reason: str | None = None) -> bool:
        """One image field of a sample, purified (``value``) or not encodable (``reason``). The sample is
        written once all its image fields are in, or rejected if any failed. True when the shard is complete."""
        with self.lock:
            if self.aborted:  # a later part of the shard was unreadable: drop what still arrives
                return False
            part = self.parts.setdefault(item["index"], {"sample": None, "fields": {}, "reasons": [], "got": 0})
            if item["sample"] is not None:
                part["sample"] = item["sample"]
            part["got"] += 1
            if reason is None:
                part["fields"][item["image_key"]] = value
            else:
                part["reasons"].append(reason if item["parts"] == 1 else f"field {item['image_key']!r}: {reason}")
            if part["got"] < item["parts"]:
                return False
            del self.parts[item["index"]]
            if part["reasons"]:
                entry = ("reject", item["sample_no"], item["key"], "; ".join(part["reasons"]))
            else:
                entry = ("sample", item["key"], {**part["sample"], **part["fields"]})
            return self._deposit(item["index"], entry)

    def reject(self, index: int, sample_no: int, key: str, reason: str) -> bool:
        with self.lock:
            return False if self.aborted else self._deposit(index, ("reject", sample_no, key, reason))

    def put_members(self, index: int, members: list) -> bool:
        with self.lock:
            return False if self.aborted else self._deposit(index, ("members", members))

    def _deposit(self, index: int, entry: tuple) -> bool:
        """Record one finished step of the shard; write everything now in order. True when complete."""
        self.ready[index] = entry
        while self.next_index in self.ready:
            kind, *rest = self.ready.pop(self.next_index)
            if kind == "reject":
                sample_no, key, reason = rest
                self.rejects.append({"index": sample_no, "key": key, "reason": reason})
            elif kind == "members":
                with _writing(self.tmp):
                    self.sink.write_members(rest[0])
                self.member_groups += 1
                self.members_copied += len(rest[0])
            else:
                key, sample = rest
                with _writing(self.tmp):
                    if self.task.kind == "tar":
                        self.sink.write_sample(key, sample)
                    else:
                        if self.sink is None:
                            self.sink = self._beton_sink()
                        self.sink.write(sample)
                self.written += 1
            self.next_index += 1
        return self._complete()

    def end(self, count: int) -> bool:
        with self.lock:
            self.expected = count
            return self._complete()

    def _complete(self) -> bool:
        return self.expected is not None and self.next_index == self.expected and not self.closed

    def finish(self, fingerprint: dict, rank: int) -> dict:
        """Close, check counts, rename into place, then write the stats file that marks it done."""
        n_rejected = len(self.rejects)
        if self.written + n_rejected + self.member_groups != self.expected:
            raise EclipseError(f"{self.task.path}: internal count mismatch: {self.expected} in, "
                               f"{self.written} written + {n_rejected} rejected + {self.member_groups} other")
        try:
            now = _stat_record(os.stat(self.task.path))
        except OSError as e:
            now = {"error": e.strerror}
        if now != self.input_stat:
            raise InputError(f"{self.task.path}: the input shard changed while it was read (size or modification "
                             f"time); its output is not kept: rerun when it no longer changes")
        # An older stats file (--overwrite, or input changed) must not outlive the output it describes: a kill
        # between the rename below and the new stats file then leaves an unrecorded shard, which a rerun redoes.
        with _writing(stats_path(self.final), "remove the old stats file"):
            stats_path(self.final).unlink(missing_ok=True)
        if self.sink is None:
            # a .beton none of whose samples survived: ffcv cannot write an empty one, so the stats file
            # alone records the shard
            output = None
            with _writing(self.final, "remove the old output"):
                self.final.unlink(missing_ok=True)
        else:
            with _writing(self.final):
                self.sink.close()
                with open(self.tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(self.tmp, self.final)
            output = str(self.final)
        stats = {
            "shard": self.task.name,
            "input": self.task.path,
            "input_size": self.input_stat["size"],
            "input_mtime_ns": self.input_stat["mtime_ns"],
            "output": output,
            "samples_in": self.written + n_rejected,
            "written": self.written,
            "rejected": n_rejected,
            "rejects": sorted(self.rejects, key=lambda r: r["index"]),
            "other_members_copied": self.members_copied,
            "seconds": round(time.time() - self.started, 3),
            "output_sha256": file_sha256(self.final) if output else None,
            "config": fingerprint,
            "package_version": __version__,
            "rank": rank,
        }
        with _writing(stats_path(self.final)):
            write_json(stats_path(self.final), stats)
        self.closed = True  # only now: if anything above fails, the run's error path still aborts this shard
        return stats

    def abort(self) -> None:
        """Drop the partial output; samples still in flight for this shard are ignored."""
        with self.lock:
            self.closed = self.aborted = True
            if self.sink is not None:
                with contextlib.suppress(Exception):  # best effort: we are already failing
                    self.sink.close() if self.task.kind == "tar" else self.sink.abort()
            self.tmp.unlink(missing_ok=True)


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name + STATS_SUFFIX)


def _weights_sha256(model: torch.nn.Module) -> str:
    """A hash of a model's tensors (names and bytes), so two in-memory denoisers never share outputs on resume."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + h.hexdigest()


def stream_seed(*parts) -> int:
    """A 63-bit seed that depends on ``parts`` only (not on process, worker or rank)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_generator(seed: int, shard_name: str, batch_no: int, device: torch.device) -> torch.Generator:
    """The noise source of one batch: a function of (seed, shard file name, batch number) only."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, shard_name, batch_no))


# ---------------------------------------------------------------------------------------
# The run: resume logic, the main loop, distributed coordination, the manifest
# ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    processed: list[dict]
    skipped: list[str]
    failed: list[dict]
    manifest: str | None


def _plan(shards: list[Path], out_dir: Path, fingerprint: dict, overwrite: bool):
    """Which shards still need work; refuse to mix outputs made with different settings."""
    names = [s.name for s in shards]
    dup = {n for n, c in Counter(names).items() if c > 1}
    if dup:
        raise InputError(f"two input shards share the output name(s) {sorted(dup)}: outputs would collide")
    todo, done = [], []
    for i, s in enumerate(shards):
        task = _Task(i, str(s), s.name)
        sp = stats_path(out_dir / s.name)
        if overwrite or not sp.is_file():
            todo.append(task)
            continue
        try:
            stats = json.loads(sp.read_text())
            previous = stats["config"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InputError(f"{sp}: unreadable stats file ({e}); use --overwrite to redo this shard")
        if stats.get("output") and not (out_dir / s.name).is_file():  # output deleted since: redo
            todo.append(task)
            continue
        try:
            now = _stat_record(os.stat(s))
        except OSError as e:
            raise InputError(f"{s}: cannot read: {e.strerror or e}") from e
        if (stats.get("input_size"), stats.get("input_mtime_ns")) != (now["size"], now["mtime_ns"]):
            log.warning("%s changed since its output was made (size or modification time): redoing it", s)
            todo.append(task)  # finish() removes the old stats file before it replaces the output
            continue
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise InputError(f"{out_dir / s.name} was purified with different settings ({', '.join(changed)}); "
                             f"use --overwrite or another output folder")
        done.append(s.name)
    return todo, done


def _check_no_overlap(inputs, shards: list[Path], out_dir) -> None:
    """Refuse an OUT that is, contains or lies inside a folder holding input shards (or named as input).

    Outputs keep their input's file name, so OUT equal to an input folder would replace the input in place;
    nested folders are refused too, as a slip of the same kind (a rerun would read its own output).
    """
    out = Path(os.path.realpath(out_dir))
    folders = {Path(os.path.realpath(s)).parent for s in shards}  # where the bytes really are
    folders |= {Path(os.path.realpath(s.parent)) for s in shards}  # where the user put them (links)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    folders |= {Path(os.path.realpath(i)) for i in items if Path(i).is_dir()}
    for folder in sorted(folders):
        if out == folder or folder in out.parents or out in folder.parents:
            where = "is" if out == folder else "is inside" if folder in out.parents else "contains"
            raise InputError(f"output folder {out} overlaps the input: it {where} the input folder {folder}; "
                             "purify never writes into, below or above its input; choose another output folder")


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def purify_shards(inputs, out_dir, denoiser: str | os.PathLike | Denoiser, cfg: PurifyConfig | None = None, *,
                  progress: bool = True) -> RunResult:
    """Purify every shard of ``inputs`` into ``out_dir``; under torchrun each rank takes shards[rank::world].

    ``denoiser`` is a checkpoint path or an already loaded :class:`Denoiser` (moved to the device).
    """
    cfg = cfg or PurifyConfig()
    rank, world = _dist_info()
    device = cfg.resolved_device()
    if device.type == "cuda":
        # cuda:LOCAL_RANK must also be the current device: NCCL collectives and default streams use it
        torch.cuda.set_device(device)
    dist = None
    owns_group = False
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # --device cpu on a GPU box: gloo
            owns_group = True
    shards = expand_shards(inputs)
    _check_no_overlap(inputs, shards, out_dir)
    den = denoiser.to(device) if isinstance(denoiser, Denoiser) else load_denoiser(denoiser, device=device)
    out_dir = Path(out_dir)
    purifier = Purifier(den, cfg.purifier)
    ckpt_sha = den.sha256 or _weights_sha256(den.model)  # in memory: the weights stand for the file
    fingerprint = cfg.fingerprint(ckpt_sha, device.type)

    # The lock on OUT belongs to the job: rank 0 takes it, tidies OUT and tells the other ranks whether to go on.
    lock = DirLock(out_dir) if rank == 0 else None
    try:
        problem = error = None
        if rank == 0:
            try:
                _prepare_out(out_dir, lock, shards, fingerprint, cfg.overwrite)
            except EclipseError as e:
                problem, error = (e.exit_code, str(e)), e
        if dist is not None:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if error is not None:
            raise error
        if problem is not None:
            raise _RankZeroError(*problem)

        todo, done = _plan(shards, out_dir, fingerprint, cfg.overwrite)
        mine = [t for t in todo if t.index % world == rank]
        processed, failed = _run(mine, out_dir, purifier, cfg, fingerprint, rank, progress, len(shards))

        manifest = None
        if dist is not None:
            gathered = [None] * world
            dist.all_gather_object(gathered, failed)
            failed = [f for part in gathered for f in part]
        if rank == 0 and not failed:
            with _writing(out_dir / MANIFEST):
                manifest = str(_write_manifest(shards, out_dir, den.path, ckpt_sha, fingerprint, world))
        if dist is not None:
            dist.barrier()  # every rank is done with OUT: rank 0 may release the lock
    finally:
        if lock is not None:
            lock.release()
    if dist is not None and owns_group:
        # A process group left for interpreter exit can abort the process ("terminate called without an
        # active exception": gloo's threads outlive Python). Only on success: after an error the other
        # ranks may still be in a collective, and torchrun tears them down anyway.
        dist.destroy_process_group()
    return RunResult(processed, done, failed, manifest)


class _RankZeroError(EclipseError):
    """Rank 0's refusal (OUT in use, unwritable, other settings), raised on the other ranks too."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


#: Temporary names this tool creates in OUT (partial shards, .beton spools, atomic JSON writes) and its lock.
_TEMPORARY = re.compile(r"^\..+\.partial-\d+(\.spool-.+)?$"
                        r"|^\.(.+\.stats\.json|manifest\.json)\.\d+\.[0-9a-f]{8}\.tmp$")


def _prepare_out(out_dir: Path, lock: DirLock, shards, fingerprint: dict, overwrite: bool) -> None:
    """Rank 0, before any rank writes: create and lock OUT, remove what killed runs left, check the plan,
    and invalidate the manifest (it is rewritten when every shard is done)."""
    with _writing(out_dir, "create the output folder"):
        out_dir.mkdir(parents=True, exist_ok=True)  # only once inputs and checkpoint are known good
    lock.acquire()
    for p in sorted(out_dir.iterdir()):  # with OUT locked, no live run owns any of these
        if _TEMPORARY.match(p.name):
            with _writing(p, "remove a leftover temporary file"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    _plan(shards, out_dir, fingerprint, overwrite)  # refuses other settings before the manifest goes
    with _writing(out_dir / MANIFEST, "remove the old manifest"):
        (out_dir / MANIFEST).unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(path, what: str = "write"):
    """Turn an OSError (no permission, read-only file system, disk full) into one clear line naming ``path``."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot {what}: {e.strerror or e}") from e


def _reader_worker_init(_worker_id: int, parent: int) -> None:
    """In each reader worker: die with the main process, whatever kills it; SIGTERM just ends the worker
    (the main process, which gets it too, cleans up)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the inherited handler of the CLI's main process
    with contextlib.suppress(Exception):  # Linux only: PR_SET_PDEATHSIG = 1
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def _as_is(event: dict) -> dict:
    """DataLoader collate that leaves events alone (the default turns numpy fields into tensors)."""
    return event


def _run(tasks, out_dir, purifier, cfg, fingerprint, rank, progress, total_shards):
    """The main loop: events from reader workers -> device -> encode threads -> writers."""
    processed: list[dict] = []
    failed: list[dict] = []
    if not tasks:
        return processed, failed
    device = purifier.device
    model_size = purifier.model.config.image_size
    loader = DataLoader(_ShardEvents(tasks, cfg, model_size), batch_size=None, collate_fn=_as_is,
                        num_workers=cfg.workers, worker_init_fn=functools.partial(_reader_worker_init, parent=os.getpid()) if cfg.workers else None,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=False)
    by_index = {t.index: t for t in tasks}
    writers: dict[int, _ShardWriter] = {}
    errors: list[BaseException] = []
    slots = threading.BoundedSemaphore(2 * cfg.encode_threads)
    pool = ThreadPoolExecutor(cfg.encode_threads, thread_name_prefix="eclipse-encode")
    bar = tqdm(total=None, unit="sample", desc=f"purify[{rank}]" if rank else "purify", disable=not progress,
               dynamic_ncols=True)
    completed: queue.SimpleQueue[int] = queue.SimpleQueue()  # shards whose last sample is written

    def finish_completed():
        """Close, rename and record finished shards -- on the main thread (ffcv's writer forks)."""
        while not completed.empty():
            writer = writers[completed.get()]
            if writer.closed:
                continue
            stats = writer.finish(fingerprint, rank)
            processed.append(stats)
            done_images = sum(s["samples_in"] for s in processed)
            bar.total = round(done_images / len(processed) * len(tasks))
            bar.set_postfix(shards=f"{len(processed)}/{len(tasks)}", refresh=False)

    def encode(shard: int, items: list[dict], out: torch.Tensor, ready: torch.cuda.Event | None):
        try:
            if ready is not None:  # the device -> host copy was queued without blocking the main loop
                ready.synchronize()
            w = writers[shard]
            for item, img in zip(items, out):
                h, wd = item["size"]
                rgb = img[:, :h, :wd].permute(1, 2, 0).numpy()
                try:
                    value = w.encode(item, rgb)
                except (ValueError, OSError) as e:
                    reason = f"cannot encode purified image: {e}"
                    if cfg.on_error == "fail":
                        where = f"field {item['image_key']!r}: " if item["parts"] > 1 else ""
                        raise SampleError(w.task.path, item["key"], where + reason)
                    complete = w.put_image(item, None, reason)
                else:
                    complete = w.put_image(item, value)
                if complete:
                    completed.put(shard)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
        finally:
            slots.release()

    events = iter(loader)
    try:
        for ev in events:
            if errors:
                raise errors[0]
            kind, shard = ev["type"], ev["shard"]
            task = by_index[shard]
            if kind == "start":
                writers[shard] = _ShardWriter(task, out_dir, cfg, ev["input_stat"])
            elif kind == "batch":
                gen = batch_generator(cfg.seed, task.name, ev["batch"], device)
                out = purifier(ev["pixels"].to(device, non_blocking=True), generator=gen)
                slots.acquire()
                out, ready = _to_host(out)
                bar.update(sum(item["sample"] is not None for item in ev["items"]))  # samples, not image fields
                pool.submit(encode, shard, ev["items"], out, ready)
            elif kind == "members":
                if writers[shard].put_members(ev["index"], ev["members"]):
                    completed.put(shard)
            elif kind == "reject":
                if cfg.on_error == "fail":
                    raise SampleError(task.path, ev["key"], ev["reason"])
                log.warning("%s: skipping sample %r: %s", task.path, ev["key"], ev["reason"])
                bar.update(1)  # a rejected sample is done too: the bar reaches the shard's sample count
                if writers[shard].reject(ev["index"], ev["sample_no"], ev["key"], ev["reason"]):
                    completed.put(shard)
            elif kind == "shard_error":
                if cfg.on_error == "fail":
                    raise ShardError(task.path, ev["reason"])
                log.error("%s: shard failed: %s", task.path, ev["reason"])
                writers[shard].abort()
                failed.append({"shard": task.name, "input": task.path, "reason": ev["reason"]})
            elif kind == "end" and writers[shard].end(ev["count"]):
                completed.put(shard)
            finish_completed()
        pool.shutdown(wait=True)
        if errors:
            raise errors[0]
        finish_completed()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            if not w.closed:
                w.abort()
        raise
    finally:
        bar.close()
        # Stop the reader workers now, also on an error or SIGTERM/SIGINT: left to garbage collection they can
        # outlive this process, blocked on a queue nobody reads.
        shutdown = getattr(events, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    for w in writers.values():
        if not w.closed:
            raise EclipseError(f"{w.task.path}: shard did not complete ({w.next_index} of {w.expected} samples)")
    return processed, failed


def _to_host(out: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Copy a result to host memory; on CUDA without waiting (pinned buffer + an event to wait on)."""
    if out.device.type != "cuda":
        return out.cpu(), None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(out.device))  # the stream the copy was queued on
    return host, ready


def _write_manifest(shards, out_dir: Path, denoiser, ckpt_sha: str, fingerprint: dict, world: int) -> Path:
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
    write_json(path, manifest)
    return path
