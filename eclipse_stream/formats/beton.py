"""FFCV ``.beton`` files as a streaming source and sink, built on ffcv's own reader, writer and fields.

Reading. :class:`BetonReader` parses the header and the field table with ffcv's ``Reader``, but
memory-maps the per-sample metadata and the allocation table (ffcv loads both whole with
``np.fromfile``) and reads sample bytes through a memory map of the file, so memory does not grow
with the file. Raw images are copied out; JPEG images are decoded with ffcv's own turbojpeg binding
(``ffcv.libffcv.imdecode``), giving exactly the pixels ffcv's ``SimpleRGBImageDecoder`` gives.

Writing. ffcv's ``DatasetWriter`` needs the sample count up front and cannot append, so
:class:`BetonWriter` spools each sample (pickled, pixels raw) to an append-only file with an
(offset, length) index, and :meth:`BetonWriter.close` runs ``DatasetWriter`` over an indexed dataset
that reads one record at a time back from the spool. The spool needs about as much free disk as the
samples' raw pixels; spooling pixels rather than JPEG bytes avoids compressing twice. It is a hidden
folder named after the output (``.<output name>.spool-*``), so a rerun can find and remove the spool
of a killed run. ffcv's ``proportion`` mode picks the images to compress with numpy's global RNG in
its writer process; the writer seeds it there with its ``seed``, so the output bytes are repeatable.

Image storage. A ``.beton`` keeps none of ``RGBImageField``'s arguments (its ``to_binary`` is all
zeros), only each sample's storage mode (raw or jpg) and size. :meth:`BetonReader.image_info` infers
the write mode from those, and the writer stores the image field the same way:

* every sample raw -> ``raw``: pixels are stored exactly;
* every sample JPEG -> ``jpg`` at the writer's ``jpeg_quality``;
* both, split by size (each raw image smaller than each JPEG one, as ``smart`` writes) -> ``smart``
  with ``smart_threshold`` = the largest raw image's byte count, so images of unchanged size keep
  their input's storage mode;
* both, otherwise (as ``proportion`` writes) -> ``proportion`` with the input's JPEG fraction.

``max_resolution`` and the input's JPEG quality are not recorded in the file; the writer never resizes.
Every RGBImageField is written this way, so a second, JPEG-stored image field is re-compressed.

Limitation: if DatasetWriter's worker process dies (an encoder error, the disk filling up, the OOM
killer), ffcv waits for it forever. The writer therefore checks every value in :meth:`BetonWriter.write`
and sizes pages for the largest sample, which leaves only the environmental failures.
ffcv is imported inside functions only, so this module imports without it.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import functools
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Iterator

import numpy as np

from ..errors import EclipseError, InputError, SampleError, ShardError
from ..storage import RemoteError, is_remote, open_input, redact, staged, sweep_stale_temporaries

INSTALL_HINT = ("install it with: apt-get install pkg-config libopencv-dev libturbojpeg0-dev"
                " && pip install 'eclipse-stream[ffcv]'")

_SCAN_CHUNK = 1 << 20  # metadata records per step when scanning a whole column
_JPEG_SLACK = 1 << 16  # headroom over 2x the raw size when bounding a JPEG's size
_SPOOL_ENTRY = struct.Struct("<QQ")  # (offset, length) of one spooled sample


def require_ffcv(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` naming ``path`` if ffcv cannot be imported, saying how to install it."""
    try:
        import ffcv  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: ffcv present but a native library missing
        raise InputError(f"{os.fspath(path)}: .beton files need FFCV, which cannot be imported ({exc}); "
                         + INSTALL_HINT) from exc


class BetonReader:
    """Sequential, memory-mapped reading of one FFCV ``.beton``: one dict per sample, in file order.

    Each sample is ``{"__key__": f"{index:09d}", "__index__": index, <field>: value, ...}``: the
    image field as a uint8 H x W x 3 RGB array, IntField as int, FloatField as float, NDArrayField
    as an array of its dtype and shape, BytesField as a uint8 array, JSONField as the decoded object.
    """

    def __init__(self, path: str | os.PathLike, image_field: str | None = None, max_pixels: int | None = None,
                 *, head_only: bool = False):
        self.path = str(path)
        self.max_pixels = max_pixels  # images over it raise SampleError from the metadata, before any decode
        require_ffcv(self.path)
        # head_only: a file holding only the bytes before the data (see _head): the field layout, no samples
        self._reader = _open_reader(self.path, head_only)
        self.field_names: list[str] = list(self._reader.field_names)
        if len(set(self.field_names)) < len(self.field_names):  # names are cut to 16 bytes in the file
            raise ShardError(self.path, f"duplicate field names {self.field_names}; they cannot be told apart")
        self._field_types = _field_types(self._reader)
        self.num_samples = int(self._reader.num_samples)
        self.image_field = self._choose_image_field(image_field)
        self._raw_mode, self._jpg_mode = _image_modes()
        self._data_start = self._reader.metadata_start + self._reader.metadata.nbytes
        self._data_end = int(self._reader.header["alloc_table_ptr"])
        self._allocations: _AllocationSizes | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[dict]:
        return _SampleIterator(self)

    def image_info(self) -> dict:
        """How the image field is stored, inferred from the samples (see the module docstring).

        Keys: ``write_mode`` ('raw', 'jpg', 'smart' or 'proportion'), ``smart_threshold`` and
        ``compress_probability`` (None unless that mode), ``num_raw``, ``num_jpg``, and
        ``max_resolution`` and ``jpeg_quality``, always None: the file does not record them.
        """
        return self._storage_info(self.image_field)

    def _storage_info(self, name: str) -> dict:
        metadata = self._reader.metadata
        column = metadata[metadata.dtype.names[self.field_names.index(name)]]
        return _image_storage(column, self._raw_mode)

    def fields_to_purify(self, requested: str | None = None) -> list[str]:
        """The RGBImageFields ``eclipse-stream purify`` purifies: those named in ``requested`` (comma-separated),
        else every one, so that no image of a sample is left unpurified."""
        from ffcv.fields import RGBImageField

        if requested is None:
            return [name for name in self.field_names if self._field_types[name] is RGBImageField]
        return sorted({self._choose_image_field(name.strip()) for name in requested.split(",") if name.strip()})

    def _choose_image_field(self, requested: str | None) -> str:
        """The RGBImageField to purify: ``requested``, or the first one in field order."""
        from ffcv.fields import RGBImageField

        types = self._field_types
        images = [name for name in self.field_names if types[name] is RGBImageField]
        if requested is None and images:
            return images[0]
        if requested is None:
            raise InputError(f"{self.path}: no RGBImageField among the fields {self.field_names}")
        if requested not in types:
            raise InputError(f"{self.path}: no field named {requested!r} (fields: {self.field_names})")
        if requested not in images:
            raise InputError(f"{self.path}: field {requested!r} has type {types[requested].__name__}, "
                             f"not RGBImageField")
        return requested

    def _sample(self, data: np.ndarray, index: int) -> dict:
        """Sample ``index`` as a dict; ``data`` is a memory map of the whole file."""
        key = f"{index:09d}"
        row = self._reader.metadata[index]
        sample = {"__key__": key, "__index__": index}
        for position, name in enumerate(self.field_names):
            sample[name] = self._value(name, row[position], data, key)
        return sample

    def _value(self, name: str, meta, data: np.ndarray, key: str):
        """Field ``name``'s value from its metadata record ``meta`` and the bytes it points to."""
        from ffcv import fields

        field_type = self._field_types[name]
        if field_type is fields.IntField:
            return int(meta)
        if field_type is fields.FloatField:
            return float(meta)
        if field_type is fields.RGBImageField:
            return self._image(meta, data, key)
        if issubclass(field_type, fields.NDArrayField):  # TorchTensorField values are arrays too
            handler = self._reader.handlers[name]
            raw = self._bytes(data, int(meta), int(handler.element_size), key)
            return raw.view(handler.dtype).reshape(tuple(int(n) for n in handler.shape))
        raw = self._bytes(data, int(meta["ptr"]), int(meta["size"]), key)
        if field_type is fields.JSONField:
            return self._json(name, raw, key)
        return raw  # BytesField, the last type in ffcv's TYPE_ID_HANDLER

    def _image(self, meta, data: np.ndarray, key: str) -> np.ndarray:
        """The RGB pixels of one image record, copied (raw) or decoded (jpg)."""
        return self._decode(*self._image_bytes(meta, data, key), key)

    def _image_bytes(self, meta, data: np.ndarray, key: str) -> tuple[int, int, int, np.ndarray]:
        """(mode, height, width, a copy of the stored bytes) of one image record, checked."""
        mode, height, width, ptr = (int(meta[f]) for f in ("mode", "height", "width", "data_ptr"))
        if height == 0 or width == 0:
            raise SampleError(self.path, key, f"empty image ({width} x {height})")
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise SampleError(self.path, key, f"image is {width} x {height} = {height * width} pixels, over the "
                                              f"limit of {self.max_pixels} (raise --max-pixels to allow it)")
        if mode == self._raw_mode:
            return mode, height, width, self._bytes(data, ptr, height * width * 3, key)
        if mode != self._jpg_mode:
            raise SampleError(self.path, key, f"unknown image storage mode {mode}")
        return mode, height, width, self._bytes(data, ptr, self._jpeg_size(ptr, key), key)

    def _decode(self, mode: int, height: int, width: int, stored: np.ndarray, key: str) -> np.ndarray:
        if mode == self._raw_mode:
            return stored.reshape(height, width, 3)
        image = _decode_jpeg(stored, height, width)
        if image is None:
            raise SampleError(self.path, key, f"its {width} x {height} JPEG image cannot be decoded")
        return image

    def _json(self, name: str, raw: np.ndarray, key: str):
        """A JSONField value: UTF-8 JSON text, NUL-terminated as ffcv writes it."""
        try:
            return json.loads(raw.tobytes().split(b"\0", 1)[0].decode("utf8"))
        except ValueError as exc:
            raise SampleError(self.path, key, f"field {name!r} is not valid JSON: {exc}") from exc

    def _bytes(self, data: np.ndarray, ptr: int, size: int, key: str) -> np.ndarray:
        """A copy of ``size`` bytes at ``ptr``; SampleError if they are not inside the data region."""
        if ptr < self._data_start or ptr + size > self._data_end:
            raise SampleError(self.path, key, f"its data ({size} bytes at {ptr}) lies outside the data region "
                                              f"[{self._data_start}, {self._data_end}): the file is corrupt")
        return np.array(data[ptr:ptr + size])

    def _jpeg_size(self, ptr: int, key: str) -> int:
        """A JPEG's byte count; ffcv records it only in the allocation table."""
        if self._allocations is None:
            self._allocations = _AllocationSizes(self._reader.alloc_table)
        size = self._allocations.size_at(ptr)
        if size is None:
            raise SampleError(self.path, key, "its JPEG data is missing from the allocation table")
        return size


class _SampleIterator:
    """Samples of a BetonReader in order. Unlike a generator it goes on after raising SampleError,
    so a caller can record a bad sample and continue with the next one."""

    def __init__(self, reader: BetonReader):
        self._reader = reader
        self._data = np.memmap(reader.path, dtype=np.uint8, mode="r")
        self._next = 0

    def __iter__(self) -> _SampleIterator:
        return self

    def __next__(self) -> dict:
        index = self._next
        if index >= self._reader.num_samples:
            raise StopIteration
        self._next += 1
        return self._reader._sample(self._data, index)


class BetonWriter:
    """Writes a ``.beton`` with the fields (names, types, order) of ``like``, one sample at a time.

    Samples are spooled to disk (in ``spool_dir``, default the folder of ``path``) and the file is
    written at :meth:`close`; memory stays bounded by a few samples. Images are stored as the
    module docstring describes; all other values are written unchanged.
    """

    def __init__(self, path: str | os.PathLike, like: BetonReader, *, jpeg_quality: int = 95,
                 spool_dir: str | None = None, seed: int = 0):
        self.path = str(path)
        self.seed = seed  # numpy's global RNG in the writer process: which images 'proportion' compresses
        require_ffcv(self.path)
        if not 1 <= jpeg_quality <= 100:
            raise InputError(f"{self.path}: jpeg_quality must be between 1 and 100, not {jpeg_quality}")
        self._fields = _output_fields(like, jpeg_quality)
        parent = spool_dir if spool_dir is not None else os.path.dirname(os.path.abspath(self.path))
        self._spool = _Spool(parent, self.path)
        self._largest_sample = 0  # bytes, an upper bound: sizes DatasetWriter's pages
        self._state = "open"
        self._output_started = False

    def write(self, sample: dict) -> None:
        """Spool one sample, laid out as BetonReader yields it (keys such as ``__key__`` are ignored).

        Values are checked here, with ffcv's own encoders where possible, so that a bad one raises
        SampleError now: inside DatasetWriter's worker an exception leaves ffcv waiting forever.
        """
        from ffcv.writer import MAX_PAGE_SIZE

        self._require_open()
        key = str(sample.get("__key__", self._spool.count))
        values, nbytes = [], 0
        for name, field in self._fields.items():
            value, size = self._checked(name, field, sample, key)
            values.append(value)
            nbytes += size
        if nbytes > MAX_PAGE_SIZE // 2:
            raise SampleError(self.path, key, f"sample needs up to {nbytes} bytes, too many for a .beton page")
        self._largest_sample = max(self._largest_sample, nbytes)
        self._spool.append(pickle.dumps(tuple(values), protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> int:
        """Write the ``.beton`` at ``path`` from the spool, remove the spool, return the sample count.

        On failure the spool and any partial output are removed before the error propagates.
        Closing again returns the count again.
        """
        if self._state == "closed":
            return self._spool.count
        self._require_open()
        try:
            if self._spool.count == 0:
                raise InputError(f"{self.path}: no samples to write; FFCV cannot write an empty .beton")
            self._run_dataset_writer()
        except BaseException:
            self.abort()
            raise
        self._spool.remove()
        self._state = "closed"
        return self._spool.count

    def close_in(self, builder: BetonBuilder, stop=None) -> str:
        """As :meth:`close`, but ffcv's writer runs in ``builder``'s process; returns the output's sha256.

        ``stop`` (a threading.Event) set while the build runs kills the builder and raises EclipseError.
        """
        self._require_open()
        try:
            if self._spool.count == 0:
                raise InputError(f"{self.path}: no samples to write; FFCV cannot write an empty .beton")
            self._output_started = True
            sha256 = builder.build((self.path, self._fields, self._page_size(), self._spool.dataset(self.seed)),
                                   stop)
        except BaseException:
            self.abort()
            raise
        self._spool.remove()
        self._state = "closed"
        return sha256

    def abort(self) -> None:
        """Remove the spool and any partial output; does nothing once closed (the output is complete)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._spool.remove()
        if self._output_started:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.path}: this BetonWriter is already {self._state}")

    def _checked(self, name: str, field, sample: dict, key: str) -> tuple[object, int]:
        """``sample[name]`` ready for ``field.encode``, and an upper bound on the bytes it allocates."""
        from ffcv.fields import RGBImageField

        if name not in sample:
            raise SampleError(self.path, key, f"missing field {name!r}")
        if isinstance(field, RGBImageField):
            return self._checked_image(name, field, sample[name], key)
        value = _for_encoder(field, sample[name])
        try:
            return value, _trial_encode(field, value)
        except Exception as exc:  # anything ffcv's encoder rejects is a bad value in this sample
            raise SampleError(self.path, key, f"field {name!r}: {type(exc).__name__}: {exc}") from exc

    def _checked_image(self, name: str, field, image, key: str) -> tuple[np.ndarray, int]:
        """A contiguous uint8 H x W x 3 image and a bound on its stored size (JPEG can exceed raw)."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
            raise SampleError(self.path, key, f"field {name!r}: expected a uint8 H x W x 3 array, got {got}")
        height, width = image.shape[:2]
        if not (0 < height <= 0xFFFF and 0 < width <= 0xFFFF):
            raise SampleError(self.path, key, f"image is {width} x {height}; a .beton stores 1 to 65535 "
                                              "pixels a side")
        bound = image.nbytes if field.write_mode == "raw" else 2 * image.nbytes + _JPEG_SLACK
        return np.ascontiguousarray(image), bound

    def _page_size(self) -> int:
        """DatasetWriter's default page size, doubled until the largest sample fits."""
        from ffcv.writer import MIN_PAGE_SIZE

        page_size = 4 * MIN_PAGE_SIZE  # DatasetWriter's default
        while page_size < self._largest_sample:
            page_size *= 2
        return page_size

    def _run_dataset_writer(self) -> None:
        """ffcv's DatasetWriter over the spool, in this process."""
        self._output_started = True
        _build_beton(self.path, self._fields, self._page_size(), self._spool.dataset(self.seed))


def _build_beton(path: str, fields: dict, page_size: int, dataset) -> None:
    """ffcv's DatasetWriter over a spooled dataset, one worker, pages of ``page_size`` bytes."""
    from ffcv.writer import DatasetWriter

    DatasetWriter(path, fields, page_size=page_size, num_workers=1).from_indexed_dataset(dataset)


class BetonBuilder:
    """A dedicated process that runs ffcv's DatasetWriter for the pipeline's ``.beton`` outputs, one at a time.

    ffcv's writer forks a worker process; forking from a thread of a busy multi-threaded process risks
    deadlocks, and the build is long (it re-encodes every sample), so it runs here, in a process forked
    from the main thread before the run's threads start. A build is a message with the output path, the
    ffcv fields, the page size and the spooled dataset (each reads its records back from disk); the reply
    is the output's sha256 or the error. The process dies with its parent (PR_SET_PDEATHSIG) and lives in
    its own process group, so :meth:`kill` also ends ffcv's worker.
    """

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_builder_main, args=(child, os.getpid()),  # not daemonic: ffcv forks
                                 name="eclipse-beton-builder")
        self._proc.start()
        child.close()

    def build(self, job: tuple, stop=None) -> str:
        path = job[0]
        self._conn.send(job)
        while not self._conn.poll(0.1):
            if stop is not None and stop.is_set():
                self.kill()
                raise EclipseError(f"{path}: stopped while ffcv wrote it")
            if not self._proc.is_alive():
                raise EclipseError(f"{path}: the .beton writer process died (exit code {self._proc.exitcode})")
        kind, *rest = self._conn.recv()
        if kind == "ok":
            return rest[0]
        if kind == "os":
            raise OSError(*rest)
        raise EclipseError(f"{path}: ffcv could not write it: {rest[0]}")

    def alive(self) -> bool:
        return self._proc.is_alive() and not self._conn.closed

    def close(self) -> None:
        """Let the process end (it exits when the pipe closes); kill it if it does not."""
        if self._conn.closed:
            return
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self.kill()

    def kill(self) -> None:
        self._conn.close()
        with contextlib.suppress(OSError):
            os.killpg(self._proc.pid, 9)
        self._proc.join(timeout=10)


def _builder_main(conn, parent: int) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: the parent stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # not torch DataLoader's handler, if the parent had one
    os.setpgid(0, 0)  # kill(): this process and ffcv's worker
    with contextlib.suppress(Exception):  # Linux only: PR_SET_PDEATHSIG = 1
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    from ..fsutil import file_sha256

    while True:
        try:
            path, fields, page_size, dataset = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            _build_beton(path, fields, page_size, dataset)
            reply = ("ok", file_sha256(path))
        except OSError as exc:
            reply = ("os", exc.errno, exc.strerror or str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


class _Spool:
    """Append-only on-disk store of pickled samples: a records file and an (offset, length) index."""

    def __init__(self, parent: str, owner: str):
        # named after the file it feeds (".<name>.spool-*"), so whoever cleans up after <name> finds it too
        base = os.path.basename(owner)
        self.owner = owner
        try:
            self.directory = tempfile.mkdtemp(prefix=f"{'' if base.startswith('.') else '.'}{base}.spool-",
                                              dir=parent)
        except OSError as exc:
            raise InputError(f"{parent}: cannot create the spool for {owner}: {exc.strerror or exc}") from exc
        self._records_path = os.path.join(self.directory, "records")
        self._index_path = os.path.join(self.directory, "index")
        self._records = open(self._records_path, "wb")
        self._index = open(self._index_path, "wb")
        self._offset = 0
        self.count = 0

    def append(self, payload: bytes) -> None:
        try:
            self._records.write(payload)
            self._index.write(_SPOOL_ENTRY.pack(self._offset, len(payload)))
        except OSError as exc:  # most likely the disk is full: the spool holds about the raw pixels
            raise EclipseError(f"{self.owner}: cannot spool a sample to {self.directory}: "
                               f"{exc.strerror or exc}") from exc
        self._offset += len(payload)
        self.count += 1

    def dataset(self, seed: int) -> _SpoolDataset:
        """The spooled samples as an indexable dataset (the files are flushed and closed first)."""
        self._close_files()
        return _SpoolDataset(self._records_path, self._index_path, self.count, seed)

    def remove(self) -> None:
        self._close_files()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _close_files(self) -> None:
        self._records.close()
        self._index.close()


class _SpoolDataset:
    """A finished spool as the indexable dataset DatasetWriter wants: item ``i`` is read from disk
    when asked for. Files open on first use in each process, so the object also pickles into a
    spawned worker. That first use also seeds numpy's global RNG, which ffcv's 'proportion' image
    mode draws from in the worker: the output does not depend on the parent's random state."""

    def __init__(self, records_path: str, index_path: str, count: int, seed: int):
        self._records_path, self._index_path, self._count, self._seed = records_path, index_path, count, seed
        self._records = self._index = None
        self._pid = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i) -> tuple:
        if self._pid != os.getpid():
            self._records = open(self._records_path, "rb")
            self._index = open(self._index_path, "rb")
            self._pid = os.getpid()
            np.random.seed(self._seed)
        self._index.seek(int(i) * _SPOOL_ENTRY.size)
        offset, length = _SPOOL_ENTRY.unpack(self._index.read(_SPOOL_ENTRY.size))
        self._records.seek(offset)
        return pickle.loads(self._records.read(length))


class _AllocationSizes:
    """Size of the allocation at a data pointer, by binary search over the allocation table.

    The table is searched in place (memory-mapped) when its pointers ascend, as in files written by a
    single DatasetWriter worker like ours; otherwise a sorted copy of pointers and sizes is made
    (16 bytes per allocation), as ffcv's own memory managers do.
    """

    def __init__(self, table: np.ndarray):
        ptrs, sizes = table["ptr"], table["size"]
        if not _ascending(ptrs):
            order = np.argsort(ptrs, kind="stable")
            ptrs, sizes = ptrs[order], sizes[order]
        self._ptrs, self._sizes = ptrs, sizes

    def size_at(self, ptr: int) -> int | None:
        """The size allocated at ``ptr``, or None. An empty BytesField value gets a zero-byte allocation
        at the next one's address, so the largest allocation starting at ``ptr`` is the one meant."""
        low = bisect.bisect_left(self._ptrs, ptr)
        high = bisect.bisect_right(self._ptrs, ptr, low)
        return int(np.max(self._sizes[low:high])) if high > low else None


def _open_reader(path: str, head_only: bool = False):
    """ffcv's Reader (memory-mapped variant) for ``path``; every way the file can be bad -> ShardError.
    ``head_only``: the file ends where the data starts (no allocation table is read)."""
    from ffcv.types import HeaderType

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ShardError(path, f"cannot open: {exc.strerror or exc}") from exc
    if size < HeaderType.itemsize:
        raise ShardError(path, f"not an FFCV .beton file: {size} bytes, shorter than its "
                               f"{HeaderType.itemsize}-byte header")
    try:
        return _mapped_reader_class(head_only)(path)
    except (AssertionError, KeyError, UnicodeDecodeError) as exc:  # version, field type id, field name
        raise ShardError(path, f"not an FFCV .beton file (bad header or field table: {exc!r})") from exc
    except (ValueError, IndexError, TypeError, OSError) as exc:
        raise ShardError(path, f"unreadable .beton: {exc}") from exc


@functools.cache
def _mapped_reader_class(head_only: bool = False) -> type:
    """ffcv's ``Reader``, with the per-sample metadata and the allocation table memory-mapped and their
    bounds checked against the file size (a truncated file fails here, with a reason). ``head_only``: no
    allocation table (a file cut where the data starts)."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    class MappedReader(Reader):
        def read_metadata(self):
            if len(self.field_descriptors) != self.num_fields:
                raise ValueError("truncated: the field table is incomplete")
            self.metadata_start = HeaderType.itemsize + self.field_descriptors.nbytes
            self.metadata = _map_array(self._fname, self.metadata_type, self.metadata_start,
                                       int(self.num_samples), "the per-sample metadata")

        def read_allocation_table(self):
            if head_only:
                self.alloc_table = np.zeros(0, ALLOC_TABLE_TYPE)
                return
            start = int(self.header["alloc_table_ptr"])
            size = os.path.getsize(self._fname)
            if start == 0:
                raise ValueError("it was never finalized (no allocation table)")
            if start > size:
                raise ValueError(f"truncated: the allocation table starts at byte {start}, "
                                 f"the file has {size} bytes")
            if start < self.metadata_start + self.metadata.nbytes:
                raise ValueError(f"the allocation table pointer ({start}) points into the metadata")
            count, rest = divmod(size - start, ALLOC_TABLE_TYPE.itemsize)
            if rest:
                raise ValueError("truncated: the allocation table at the end of the file is incomplete")
            self.alloc_table = _map_array(self._fname, ALLOC_TABLE_TYPE, start, count, "the allocation table")

    return MappedReader


def _map_array(path: str, dtype: np.dtype, offset: int, count: int, what: str) -> np.ndarray:
    """``count`` records of ``dtype`` at ``offset`` in ``path``, memory-mapped read-only."""
    end = offset + count * dtype.itemsize
    size = os.path.getsize(path)
    if end > size:
        raise ValueError(f"truncated: {what} needs {end} bytes, the file has {size}")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _field_types(reader) -> dict[str, type]:
    """Each field's ffcv class, by the type id in the file. ffcv's Reader builds handlers with the
    parent's ``from_binary`` for subclasses, so a JSONField reads back as a BytesField and a
    TorchTensorField as an NDArrayField; the type id keeps them apart."""
    from ffcv.types import TYPE_ID_HANDLER

    type_ids = reader.field_descriptors["type_id"]
    return {name: TYPE_ID_HANDLER[int(t)] for name, t in zip(reader.field_names, type_ids)}


@functools.cache
def _image_modes() -> tuple[int, int]:
    """ffcv's per-sample image storage codes: (raw, jpg)."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    return int(IMAGE_MODES["raw"]), int(IMAGE_MODES["jpg"])


def _image_storage(column: np.ndarray, raw_mode: int) -> dict:
    """How an RGBImageField metadata column was written, from each sample's mode and size."""
    num_raw = num_jpg = largest_raw = 0
    smallest_jpg = None
    for start in range(0, len(column), _SCAN_CHUNK):
        chunk = np.asarray(column[start:start + _SCAN_CHUNK])
        nbytes = chunk["height"].astype(np.int64) * chunk["width"] * 3
        raw = chunk["mode"] == raw_mode
        num_raw += int(raw.sum())
        num_jpg += int((~raw).sum())
        if raw.any():
            largest_raw = max(largest_raw, int(nbytes[raw].max()))
        if not raw.all():
            least = int(nbytes[~raw].min())
            smallest_jpg = least if smallest_jpg is None else min(smallest_jpg, least)
    info = {"write_mode": "raw", "max_resolution": None, "jpeg_quality": None, "smart_threshold": None,
            "compress_probability": None, "num_raw": num_raw, "num_jpg": num_jpg}
    if num_jpg and not num_raw:
        info["write_mode"] = "jpg"
    elif num_jpg and largest_raw < smallest_jpg:
        info.update(write_mode="smart", smart_threshold=largest_raw)
    elif num_jpg:
        info.update(write_mode="proportion", compress_probability=num_jpg / (num_raw + num_jpg))
    return info


def _ascending(values: np.ndarray) -> bool:
    """Whether ``values`` never decrease, checked a chunk at a time so memory stays bounded."""
    for start in range(0, len(values), _SCAN_CHUNK):
        chunk = np.asarray(values[start:start + _SCAN_CHUNK + 1])
        if np.any(chunk[1:] < chunk[:-1]):
            return False
    return True


def _decode_jpeg(encoded: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """Decode with ffcv's own turbojpeg binding, as its loaders do; None if decoding fails."""
    from ffcv.libffcv import imdecode

    image = np.zeros((height, width, 3), np.uint8)
    status = imdecode(encoded, image, height, width, height, width, 0, 0, 1, 1, False, False)
    return image if status == 0 else None


def _for_encoder(field, value):
    """``value`` in the array type ``field.encode`` takes: a torch tensor for a TorchTensorField, a numpy
    array for other array and bytes fields. Either is accepted (BetonReader yields numpy arrays; a
    torch DataLoader on the way converts them to tensors)."""
    import torch
    from ffcv.fields import BytesField, NDArrayField, TorchTensorField

    if isinstance(field, TorchTensorField):
        return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if isinstance(field, (NDArrayField, BytesField)) and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _trial_encode(field, value) -> int:
    """Run ``field.encode`` on a scratch record; returns the bytes it allocates, raises what it raises."""
    allocated = []

    def malloc(size):
        allocated.append(int(size))
        return 0, np.empty(int(size), np.uint8)

    field.encode(np.zeros(1, field.metadata_type), value, malloc)
    return sum(allocated)


def _output_fields(like: BetonReader, jpeg_quality: int) -> dict:
    """ffcv fields for the output: ``like``'s names, types and order.

    Image fields are re-created with the storage inferred from the input (the file keeps no
    RGBImageField arguments), array fields by :func:`_array_field`; the other types take no arguments.
    """
    from ffcv.fields import NDArrayField, RGBImageField

    fields = {}
    for name, field_type in like._field_types.items():
        if field_type is RGBImageField:
            fields[name] = _image_field(like._storage_info(name), jpeg_quality)
        elif issubclass(field_type, NDArrayField):
            fields[name] = _array_field(field_type, like._reader.handlers[name])
        else:
            fields[name] = field_type()
    return fields


def _array_field(field_type: type, handler):
    """A ``field_type`` (NDArrayField or TorchTensorField) with ``handler``'s dtype and shape.

    ffcv's Reader returns both as an NDArrayField whose shape holds numpy uint64s; its allocator then
    mixes those sizes with int64 ones into float offsets and fails, so the shape becomes Python ints.
    """
    from ffcv.fields import TorchTensorField

    shape = tuple(int(n) for n in handler.shape)
    if field_type is TorchTensorField:
        import torch

        return TorchTensorField(torch.from_numpy(np.zeros(0, handler.dtype)).dtype, shape)
    return field_type(handler.dtype, shape)


def _image_field(storage: dict, jpeg_quality: int):
    """An RGBImageField writing the way ``storage`` (from ``_image_storage``) says the input was written."""
    from ffcv.fields import RGBImageField

    options = {k: storage[k] for k in ("smart_threshold", "compress_probability") if storage[k] is not None}
    return RGBImageField(write_mode=storage["write_mode"], jpeg_quality=jpeg_quality, **options)


# ---------------------------------------------------------------------------------------------------------
# The pipeline's view: a registered ShardFormat
# ---------------------------------------------------------------------------------------------------------

from . import (  # noqa: E402
    LABEL_KEYS,
    Image,
    Labelled,
    ReadPolicy,
    Record,
    ShardFormat,
    ShardWriter,
    WritePolicy,
    class_label,
    register,
)


class BetonShardWriter(ShardWriter):
    """An output ``.beton``: samples spooled in order, built by the run's :class:`BetonBuilder` at finish.

    The BetonWriter is created at the first sample (it needs the input's field layout, and the input may turn
    out unreadable): a shard none of whose samples survive writes no file (ffcv cannot write an empty one).
    """

    def __init__(self, fmt: BetonFormat, tmp: str, source: str, policy: WritePolicy):
        self._fmt, self._tmp, self._source, self._policy = fmt, tmp, source, policy
        self._writer: BetonWriter | None = None

    def write_sample(self, key: str, fields: dict) -> None:
        if self._writer is None:
            with _head(self._source) as local:  # a remote input: only the bytes before its data, not again whole
                self._writer = BetonWriter(self._tmp, like=BetonReader(local, head_only=local != self._source),
                                           jpeg_quality=self._policy.jpeg_quality,
                                           spool_dir=os.path.dirname(self._tmp), seed=self._policy.seed)
        self._writer.write(fields)

    def finish(self, stop=None) -> str | None:
        if self._writer is None:
            return None
        builder = self._fmt.builder
        if builder is None:  # outside a pipeline run: ffcv's writer in this process
            self._writer.close()
            from ..fsutil import file_sha256
            return file_sha256(self._tmp)
        return self._writer.close_in(builder, stop)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


class BetonFormat(ShardFormat):
    suffix = ".beton"

    def __init__(self):
        self.builder: BetonBuilder | None = None

    def check_usable(self, path: str) -> None:
        require_ffcv(path)

    def records(self, path: str, policy: ReadPolicy) -> Iterator[Record]:
        with _local(path) as local:
            yield from self._records(local, policy)

    def _records(self, path: str, policy: ReadPolicy) -> Iterator[Record]:
        reader = BetonReader(path, max_pixels=policy.max_pixels)
        names = reader.fields_to_purify(policy.image_key)
        it = iter(reader)
        index = 0
        while True:
            try:
                sample = next(it)
            except StopIteration:
                return
            except SampleError as e:  # one undecodable image: the reader goes on with the next
                yield Record(index, e.key, index, error=e.reason)
                index += 1
                continue
            images = [Image(name, np.ascontiguousarray(sample.pop(name))) for name in names]
            yield Record(index, sample["__key__"], index, sample, images)
            index += 1

    def images(self, path: str, image_key: str | None = None, skip_missing: bool = False) -> Iterator[tuple]:
        require_ffcv(redact(path))
        with _local(path) as local:
            reader = BetonReader(local, image_field=image_key)
            for sample in reader:
                yield sample["__key__"], sample[reader.image_field]

    def labelled(self, path: str, label_key: str | None, image_key: str | None,
                 max_pixels: int | None) -> Iterator[Labelled]:
        """Fields are per file: a missing label field raises InputError; without ``label_key`` the first
        IntField stands in for :data:`LABEL_KEYS`. An IntField or FloatField label is read from the metadata
        column, no image decoded. A label that is not a class label, or (other label types, read sample by
        sample) an image that cannot be decoded, raises SampleError: it ends the scan whatever ``--on-error``.

        A remote .beton is staged locally while it is read; the images of the samples yielded are then kept as
        their stored bytes (as a tar's are), not read back from the file later."""
        require_ffcv(redact(path))
        if not is_remote(path):
            yield from self._labelled(path, label_key, image_key, max_pixels, copy=False)
            return
        with _local(path) as local:
            yield from self._labelled(local, label_key, image_key, max_pixels, copy=True)

    def _labelled(self, path: str, label_key: str | None, image_key: str | None, max_pixels: int | None,
                  copy: bool) -> Iterator[Labelled]:
        reader = BetonReader(path, image_field=image_key, max_pixels=max_pixels)
        names = reader.field_names
        if label_key is not None:
            if label_key not in names:
                raise InputError(f"{path}: no label field {label_key!r} (--label-key); fields: {names}")
            label_field = label_key
        else:
            found = [k for k in LABEL_KEYS if k in names]
            ints = [n for n in names if reader._field_types[n].__name__ == "IntField"]
            if not found and not ints:
                raise InputError(f"{path}: no label field (looked for {', '.join(LABEL_KEYS)} or an IntField; "
                                 f"name one with --label-key); fields: {names}")
            label_field = found[0] if found else ints[0]
        kind = reader._field_types[label_field].__name__
        data = np.memmap(reader.path, dtype=np.uint8, mode="r")

        image_position = names.index(reader.image_field)

        def load(index: int) -> np.ndarray:
            return reader._sample(data, index)[reader.image_field]  # SampleError for a bad image

        def stored(index: int):
            """load(index), with the image's bytes copied now (the file goes away after this shard)."""
            key = f"{index:09d}"
            try:
                found = reader._image_bytes(reader._reader.metadata[index][image_position], data, key)
            except SampleError as e:
                return functools.partial(_raise, e)
            return functools.partial(reader._decode, *found, key)

        if kind in ("IntField", "FloatField"):
            metadata = reader._reader.metadata
            column = np.asarray(metadata[metadata.dtype.names[names.index(label_field)]])
            values = ((f"{i:09d}", v) for i, v in enumerate(column.tolist()))
        else:
            values = ((s["__key__"], s[label_field]) for s in reader)
        for index, (key, value) in enumerate(values):
            yield Labelled(key, class_label(value, (str(path), key), label_field),
                           stored(index) if copy else functools.partial(load, index))

    def encode(self, image: Image, rgb: np.ndarray, policy: WritePolicy) -> np.ndarray:
        return rgb  # stored as pixels; the writer compresses as the input's storage mode says

    def open_writer(self, tmp: str, source: str, policy: WritePolicy) -> BetonShardWriter:
        return BetonShardWriter(self, tmp, source, policy)

    def temporary_names(self) -> str:
        return r"\.spool-.+"  # BetonWriter's spool folder, next to the partial output

    @contextlib.contextmanager
    def session(self):
        """For one pipeline run: the builder process (see :class:`BetonBuilder`). It is forked at the first run
        of this process, from the main thread before the run's threads and reader workers start, and kept for
        later runs (ffcv's compiled encoders stay warm); a run that fails kills it. ffcv is imported first
        (the writers need it here too), so that the builder starts with it."""
        with contextlib.suppress(ImportError, OSError):  # without ffcv the readers say so, shard by shard
            import ffcv.fields  # noqa: F401
            import ffcv.writer  # noqa: F401
        global _BUILDER
        if _BUILDER is None or not _BUILDER.alive():
            _BUILDER = BetonBuilder()
            atexit.register(_BUILDER.close)
        self.builder = _BUILDER
        try:
            yield self
        except BaseException:
            _BUILDER.kill()
            _BUILDER = None
            raise
        finally:
            self.builder = None


_BUILDER: BetonBuilder | None = None


def _raise(error: BaseException):
    raise error


@contextlib.contextmanager
def _local(path: str):
    """A local path holding the .beton at ``path``: itself, or for a remote one a staged copy (removed when
    the block ends: one shard at a time per reader); errors name ``path`` (redacted), not the copy."""
    if not is_remote(path):
        yield path
        return
    shown = redact(path)
    local = None
    try:
        with staged(path, ".beton") as local:
            yield local
    except RemoteError as e:
        raise ShardError(shown, f"cannot read: {e}") from None
    except SampleError as e:
        raise SampleError(shown, e.key, e.reason) from None
    except ShardError as e:
        raise ShardError(shown, e.reason.replace(local or shown, shown)) from None
    except InputError as e:
        raise InputError(str(e).replace(local or shown, shown)) from None


@contextlib.contextmanager
def _head(path: str):
    """A local path from which the field layout of the .beton at ``path`` can be read (``BetonReader(...,
    head_only=True)``): the file itself if local; for a remote one, a temporary file holding only its head
    (header, field table, per-sample metadata: a few bytes per sample), fetched in three small reads instead of
    the whole shard, which the reader worker has fetched already. Removed when the block ends."""
    if not is_remote(path):
        yield path
        return
    from ffcv.types import FieldDescType, HeaderType, get_handlers, get_metadata_type

    shown = redact(path)
    sweep_stale_temporaries()
    fd, tmp = tempfile.mkstemp(prefix=f"eclipse-stream-stage-{os.getpid()}-", suffix=".beton-head")
    try:
        with os.fdopen(fd, "wb") as out, open_input(path, read_ahead=False) as src:
            header = src.read(HeaderType.itemsize)
            out.write(header)
            if len(header) == HeaderType.itemsize:
                h = np.frombuffer(header, HeaderType, count=1)[0]
                table = src.read(int(h["num_fields"]) * FieldDescType.itemsize)
                out.write(table)
                try:
                    metadata_type = get_metadata_type(get_handlers(np.frombuffer(table, FieldDescType)))
                except (KeyError, ValueError, TypeError, AttributeError) as e:
                    raise ShardError(shown, f"not an FFCV .beton file (bad field table: {e!r})") from None
                out.write(src.read(int(h["num_samples"]) * metadata_type.itemsize))
        yield tmp
    except RemoteError as e:
        raise ShardError(shown, f"cannot read: {e}") from None
    except ShardError as e:
        raise ShardError(shown, e.reason.replace(tmp, shown)) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


register(BetonFormat())
