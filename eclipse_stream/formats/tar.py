"""WebDataset ``.tar`` shards: read with ``tarfile`` by WebDataset's grouping rules, written as webdataset's
``TarWriter`` writes them.

Reading (:func:`read_tar`) streams one tar, groups members into samples (key = the name up to the first dot
of its last path part), keeps every member that belongs to no sample, and turns every way a tar can be broken
or incomplete into a :class:`~eclipse_stream.errors.ShardError` naming the file. :class:`TarFormat` turns the
samples into records: each image field decoded by :func:`~eclipse_stream.imageio.decode_image`.

Writing (:class:`TarShardWriter`) puts samples byte for byte as ``TarWriter(encoder=False, mtime=0)`` does
(fields in sorted order, mode 0444, owner bigdata, mtime 0) but keeps every field (TarWriter drops names
starting with "_") and copies the other members unchanged; the output is hashed as it is written.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ..errors import SampleError, ShardError
from ..fsutil import HashingFile
from ..imageio import ImageDecodeError, decode_image, encode_image, find_image_key, image_fields
from ..storage import RemoteError, open_input, redact
from . import Image, Labelled, ReadPolicy, Record, ShardFormat, ShardWriter, WritePolicy, register, sample_label

__all__ = ["TarFormat", "TarItem", "TarShardWriter", "iter_tar_samples", "read_tar"]


class TarItem(NamedTuple):
    """One step of a WebDataset tar, in file order: a sample, or members that belong to no sample.

    A sample (``key`` set) maps each field name (the member name after the key's first dot, case kept) to its
    bytes. ``members`` (``key`` None) holds ``(TarInfo, bytes | None)`` pairs that WebDataset's reader skips:
    links, directories and other non-regular members, regular members without a field name (no extension,
    a name starting with a dot) and top-level ``__name__`` metadata members. They are copied unchanged.
    """

    key: str | None
    fields: dict[str, bytes] | None = None
    members: list | None = None


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's top-level metadata members (e.g. __index__)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then all extensions
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def _field_of(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, field) of a member WebDataset reads as a sample field, else None (a member copied as is)."""
    name = info.name
    if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def read_tar(path: str | os.PathLike, fileobj=None) -> Iterator[TarItem]:
    """The samples (grouped by key as WebDataset groups them) and other members of one tar, in file order.

    The shard must be complete: after its last member come the two zero blocks that end a tar archive, and
    nothing but zeros follows them (tar's record padding). A tar cut anywhere, even exactly at a member
    boundary, or with data after its end, raises :class:`ShardError` naming the file, the byte offset and the
    last sample known to be complete (one followed by a member of another sample). gzip/bz2/xz-compressed
    tars are read too. A sample field name repeated within one sample is a ShardError, as in WebDataset.

    ``path`` may be any location :func:`~eclipse_stream.storage.open_input` opens (a URL, ``pipe:CMD``): it
    is read front to back as a stream, never copied locally. ``fileobj``, if given, is read instead of
    opening ``path`` (which then only names it in errors); it need not be seekable.
    """
    path = str(path)
    shown = redact(path)
    complete = complete_fields = None  # the last sample followed by a member of another sample, its fields
    pending: dict | None = None  # the sample being read: {"key", "fields"}
    loose: list = []
    info = reading = None  # the last member header read; the member whose data is being read

    def where() -> str:
        """The last complete sample. At an abrupt end (no member being read), the sample read last counts as
        complete when it has the same fields as the one before it: tar has no sample boundaries to tell."""
        last = complete
        if (pending is not None and reading is None and complete_fields is not None
                and set(pending["fields"]) == complete_fields):
            last = pending["key"]
        return f"after sample {last!r}" if last is not None else "before its first complete sample"

    try:
        with contextlib.nullcontext(fileobj) if fileobj is not None else open_input(path) as source:
            seekable = _seekable(source)
            raw = source if seekable else _Lookback(source)
            magic = raw.read(6)
            raw.seek(0)
            kind = next((k for m, k in _COMPRESSED if magic.startswith(m)), None)
            stream = raw if kind is None else importlib.import_module(kind).open(raw, "rb")
            if kind is not None and not seekable:  # a decompressor seeks back by rewinding its input: not here
                stream = _Lookback(stream)
            tf = tarfile.open(fileobj=stream, mode="r:")
            headers = _Headers(tf, stream)
            while (info := headers.next()) is not None:
                tf.members = []  # no index of every member: memory stays flat over big shards
                kf = _field_of(info)
                if kf is None:
                    reading = info = headers.full(info)
                    data = headers.data(info) if info.isreg() else None
                    reading = None
                    loose.append((info, data))
                    continue
                key, field = kf
                if pending is not None and key != pending["key"]:
                    yield TarItem(pending["key"], pending["fields"])
                    complete, complete_fields, pending = pending["key"], set(pending["fields"]), None
                if pending is None:
                    # other members met since the last sample started go right after it (before the first)
                    if loose:
                        yield TarItem(None, members=loose)
                        loose = []
                    pending = {"key": key, "fields": {}}
                if field in pending["fields"]:
                    raise ShardError(shown, f"corrupt tar ({where()}): member {info.name!r} appears twice in "
                                           f"sample {key!r}")
                reading = info
                pending["fields"][field] = headers.data(info)
                reading = None
            _check_end(stream, headers.offset)
            if pending is not None:
                yield TarItem(pending["key"], pending["fields"])
            if loose:
                yield TarItem(None, members=loose)
    except ShardError:
        raise
    except RemoteError as e:
        raise ShardError(shown, f"cannot read: {e}") from None
    except _Incomplete as e:
        raise ShardError(shown, f"incomplete tar ({where()}): {e}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        reason = str(e) or type(e).__name__
        if reading is not None:
            reason += f" in member {reading.name!r} (header at byte {reading.offset})"
        elif info is not None:
            reason += f" after member {info.name!r} (header at byte {info.offset})"
        raise ShardError(shown, f"corrupt or truncated tar ({where()}): {reason}") from e


class _Incomplete(Exception):
    pass


def _seekable(f) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class _Lookback:
    """A stream read front to back that can still seek back a little: the tar reader re-reads a header it
    looked at (at most a few blocks back). The last ``keep`` bytes read stay in memory; a seek back beyond
    them raises OSError naming the distance (a corrupt tar could ask for that; a good one never does).

    The bytes at hand are an ``io.BytesIO`` window, so the tar reader's many small reads and seeks are C calls,
    as on a file; the window is rebuilt (the last ``keep`` bytes and at least 1 MiB more) when a read needs
    more."""

    def __init__(self, raw, keep: int = 1 << 20):
        self.raw, self.keep = raw, keep
        self.window = io.BytesIO()
        self.start = 0  # absolute offset of the window's first byte
        self.eof = False

    def _fill(self, upto: int) -> None:
        """Read on until the window reaches absolute offset ``upto`` (or the stream ends), dropping what lies
        more than ``keep`` bytes before the read position."""
        pos = self.start + self.window.tell()
        data = self.window.getvalue()
        cut = min(len(data), max(0, pos - self.keep - self.start))
        parts, have = [data[cut:]] if cut < len(data) else [], self.start + len(data)
        read1 = getattr(self.raw, "read1", None)  # a whole block of a read-ahead stream comes without a copy
        got = 0
        while (have < upto or got < 1 << 20) and not self.eof:  # at least 1 MiB more: few rebuilds
            chunk = read1() if read1 is not None else self.raw.read(max(1 << 20, upto - have))
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
            got += len(chunk)
        self.start += cut
        self.window = io.BytesIO(parts[0] if len(parts) == 1 else b"".join(parts))  # one part: shared, no copy
        self.window.seek(pos - self.start)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            self._fill(1 << 62)
            return self.window.read()
        data = self.window.read(n)
        if len(data) < n and not self.eof:
            self._fill(self.tell() + n - len(data))
            data += self.window.read(n - len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self.tell()
        target = offset if whence == 0 else pos + offset if whence == 1 else None
        if target is None:
            raise OSError("cannot seek from the end of a stream")
        if target < self.start:
            raise OSError(f"cannot seek back {pos - target} bytes in a stream")
        self.window.seek(target - self.start)
        return target

    def tell(self) -> int:
        return self.start + self.window.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


_NUMERIC = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))


class _Headers:
    """The member headers of a tar in order, as ``tarfile.TarFile.next`` gives them, but faster.

    tarfile's header parsing costs more than reading a CIFAR-sized sample, so the common members are parsed
    here: a regular file (type '0' or NUL) with a valid unsigned checksum and octal numbers, optionally after a
    pax header that only sets times, ids or owner names (webdataset's ``TarWriter`` and ours write one per
    member, for the float mtime), with no global pax header in force. Anything else (the end-of-archive
    blocks, other pax keys, GNU long names, links, directories, sparse files, a bad checksum, a short read)
    is handed to tarfile at the same offset, after the truncation check tarfile makes before it reads a
    header, so every error is tarfile's own. ``data(info)`` reads a member's bytes; ``full(info)`` is the
    member's complete TarInfo, as tarfile parses it (for members copied as they are).
    """

    def __init__(self, tf: tarfile.TarFile, stream):
        self.tf, self.stream = tf, stream
        self.offset: int | None = None  # of the next header; after the end, of the end-of-archive blocks
        self._fast: set[int] = set()  # header offsets of the members parsed here

    def next(self) -> tarfile.TarInfo | None:
        tf = self.tf
        if self.offset is None:  # tarfile.open read the first header already
            info = tf.next()
            self.offset = tf.offset
            return info
        if not tf.pax_headers:
            info = self._fast_member(self.offset)
            if info is not None:
                return info
        if self.offset > 0:  # as TarFile.next: data or padding cut short before this header
            self.stream.seek(self.offset - 1)
            if not self.stream.read(1):
                raise tarfile.ReadError("unexpected end of data")
        tf.offset = self.offset
        info = tf.next()
        if info is not None:
            self.offset = tf.offset
        return info

    def _fast_member(self, offset: int) -> tarfile.TarInfo | None:
        self.stream.seek(offset)
        header = _plain_header(self.stream.read(tarfile.BLOCKSIZE), b"0\0x")
        if header is None:
            return None
        kind, size, buf = header
        data_at = offset + tarfile.BLOCKSIZE
        if kind == b"x":  # a pax header for the next member: only keys that change neither name nor size
            pax = self.stream.read(_block(size))
            if len(pax) < _block(size) or not _harmless_pax(pax[:size]):
                return None
            header = _plain_header(self.stream.read(tarfile.BLOCKSIZE), b"0\0")
            if header is None:
                return None
            _, size, buf = header
            data_at += _block(len(pax)) + tarfile.BLOCKSIZE
        enc, err = self.tf.encoding, self.tf.errors
        name = buf[:100].split(b"\0", 1)[0].decode(enc, err)
        prefix = buf[345:500].split(b"\0", 1)[0].decode(enc, err)
        if name.endswith("/"):  # a directory, in the old V7 way
            return None
        info = tarfile.TarInfo(prefix + "/" + name if prefix else name)
        info.size, info.offset, info.offset_data = size, offset, data_at  # offset: of the pax header, as tarfile
        self.offset = data_at + _block(size)
        self._fast.add(offset)
        return info

    def full(self, info: tarfile.TarInfo) -> tarfile.TarInfo:
        if info.offset not in self._fast:
            return info
        self.stream.seek(info.offset)
        self.tf.offset = info.offset
        return self.tf.next()

    def data(self, info: tarfile.TarInfo) -> bytes:
        if info.offset not in self._fast:
            return self.tf.extractfile(info).read()
        self.stream.seek(info.offset_data)
        data = self.stream.read(info.size)
        if len(data) != info.size:
            raise tarfile.ReadError("unexpected end of data")  # as tarfile's own reader says it
        return data


_NUMERIC = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_HARMLESS_PAX = {b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"}


def _block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _plain_header(buf: bytes, kinds: bytes) -> tuple[bytes, int, bytes] | None:
    """(type, size, buf) of a well-formed header of one of ``kinds``, else None (tarfile then decides)."""
    if len(buf) != tarfile.BLOCKSIZE or buf[156] not in kinds:
        return None
    try:
        numbers = [_octal(buf[a:b]) for a, b in _NUMERIC]
    except ValueError:
        return None
    if numbers[5] != 256 + sum(buf[:148]) + sum(buf[156:]):  # tarfile also takes a signed sum: its call
        return None
    return buf[156:157].replace(b"\0", b"0"), numbers[3], buf


def _harmless_pax(records: bytes) -> bool:
    """Whether pax records parse exactly and only set keys that change neither a member's name nor its size."""
    pos = 0
    while pos < len(records):
        m = _PAX_RECORD.match(records, pos)
        if m is None:
            return False
        length = int(m.group(1))
        if length == 0 or m.group(2) not in _HARMLESS_PAX or records[m.start(1) + length - 1:][:1] != b"\n":
            return False
        pos = m.start(1) + length
    return pos == len(records)


def _octal(field: bytes) -> int:
    """A numeric header field as tarfile reads it; ValueError where tarfile reads it otherwise or not at all."""
    if field[0] in (0o200, 0o377):  # base-256: tarfile's
        raise ValueError(field)
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _check_end(stream, offset: int) -> None:
    """After the last member at ``offset``: two zero blocks, then only zeros (the record padding)."""
    stream.seek(offset)
    marker = stream.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.count(0) != len(marker):
        if marker.count(0) != len(marker):
            what = "an unreadable member header follows it (cut short or corrupt)"
        else:
            what = (f"the file ends {len(marker)} bytes later, where a tar ends with two 512-byte zero blocks"
                    if marker else "the file ends there, where a tar ends with two 512-byte zero blocks")
        raise _Incomplete(f"no end-of-archive marker after the last complete member (byte {offset}): {what}")
    pos = offset + len(marker)
    while block := stream.read(1 << 16):
        if block.count(0) != len(block):
            first = pos + next(i for i, b in enumerate(block) if b)
            raise _Incomplete(f"data after the end-of-archive marker (byte {first}); "
                              "concatenated tars are not read (split them into shards)")
        pos += len(block)


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Samples of one WebDataset tar in file order, fields as raw bytes, names as stored.

    Field names keep their case so they can be written back unchanged; members that are not sample fields
    are left out (see :func:`read_tar`, which the purify pipeline uses to copy them too). A truncated or
    corrupt tar raises :class:`ShardError` naming the file.
    """
    for item in read_tar(path):
        if item.key is not None:
            yield {**item.fields, "__key__": item.key, "__url__": redact(path)}


class TarShardWriter(ShardWriter):
    """Samples and other members, in order, into a tar at ``tmp`` (see the module docstring).

    The bytes are those of ``tarfile.open(fileobj, "w|")`` with ``addfile`` per member and ``close`` (pax
    format: a pax header with the float mtime before each sample field), but a sample field's headers come
    from :func:`_sample_header` (tarfile's header code costs more than encoding a CIFAR image), and the whole
    sample is written in one call.
    """

    def __init__(self, tmp: str):
        self._file = HashingFile(tmp)
        self._offset = 0

    def _write(self, parts: list[bytes]) -> None:
        data = b"".join(parts)
        self._file.write(data)
        self._offset += len(data)

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        parts = []
        for name in sorted(fields):
            data = fields[name]
            parts += [_sample_header(f"{key}.{name}", len(data)), data, _padding(len(data))]
        self._write(parts)

    def write_members(self, members: list) -> None:
        parts = []
        for info, data in members:
            info = copy.copy(info)
            if info.isreg():  # a sparse or contiguous-file member is written back as the plain file it reads as
                info.type = tarfile.REGTYPE
            if data is None:  # links and the like carry no data (some writers still record a size for them)
                info.size = 0
            parts.append(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
            if data is not None:
                parts += [data, _padding(len(data))]
        self._write(parts)

    def finish(self, stop=None) -> str:
        end = self._offset + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, then zeros to a whole record
        self._write([bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)])
        return self._file.finish()

    def abort(self) -> None:
        self._file.close()


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def _tarfile_sample_header(name: str, size: int) -> bytes:
    """What ``TarFile.addfile`` writes before a sample field (webdataset's TarWriter: mode 0444, owner
    bigdata, float mtime 0 -> a pax header)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0.0, 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


@functools.cache
def _header_template() -> tuple[bytes, bytearray]:
    """(the pax header, which does not depend on name or size; the ustar header of a placeholder member)."""
    whole = _tarfile_sample_header("x", 0)
    return whole[:-tarfile.BLOCKSIZE], bytearray(whole[-tarfile.BLOCKSIZE:])


def _sample_header(name: str, size: int) -> bytes:
    """The bytes of :func:`_tarfile_sample_header`, made from a template when tarfile would put nothing but
    the name and the size in other places (an ASCII name of at most 100 characters, a size under 8 GiB);
    tarfile's own otherwise. tests/test_tar_reader.py checks both agree."""
    if size >= 8 ** 11 or len(name) > 100 or not name.isascii():
        return _tarfile_sample_header(name, size)
    pax, ustar = _header_template()
    header = ustar.copy()
    header[0:100] = name.encode("ascii").ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % (256 + sum(header[:148]) + sum(header[156:]))
    return pax + bytes(header)


class TarFormat(ShardFormat):
    suffix = ".tar"

    def records(self, path: str, policy: ReadPolicy) -> Iterator[Record]:
        sample_no = 0
        for index, item in enumerate(read_tar(path)):
            if item.key is None:
                yield Record(index, None, members=item.members)
                continue
            no, sample_no = sample_no, sample_no + 1
            try:
                images = _decoded_images(item.fields, policy)
            except (ImageDecodeError, ValueError) as e:
                yield Record(index, item.key, no, error=str(e))
                continue
            names = {image.field for image in images}
            passthrough = {k: v for k, v in item.fields.items() if k not in names}
            yield Record(index, item.key, no, passthrough, images)

    def images(self, path: str, image_key: str | None = None, skip_missing: bool = False) -> Iterator[tuple]:
        for sample in iter_tar_samples(path):
            key = sample["__key__"]
            try:
                field = find_image_key(sample, image_key)
            except ValueError as e:  # no field named image_key
                raise SampleError(redact(path), key, str(e)) from None
            if field is None and not skip_missing:
                raise SampleError(redact(path), key, "no image field "
                                  f"(fields: {sorted(k for k in sample if not k.startswith('__'))})")
            if field is not None:
                yield key, sample[field]

    def labelled(self, path: str, label_key: str | None, image_key: str | None,
                 max_pixels: int | None) -> Iterator[Labelled]:
        for sample in iter_tar_samples(path):
            key = sample["__key__"]
            where = (redact(path), key)
            try:
                label, field = sample_label(sample, label_key, image_key, where)
            except SampleError as e:
                yield Labelled(key, error=e.reason)
                continue
            yield Labelled(key, label, functools.partial(_rgb, sample[field], where, max_pixels))

    def encode(self, image: Image, rgb: np.ndarray, policy: WritePolicy) -> bytes:
        return encode_image(rgb, image.source, image.field, jpeg_quality=policy.jpeg_quality)

    def open_writer(self, tmp: str, source: str, policy: WritePolicy) -> TarShardWriter:
        return TarShardWriter(tmp)


def _rgb(data: bytes, where: tuple[str, str], max_pixels: int | None) -> np.ndarray:
    """One image field's pixels (uint8 H x W x 3); SampleError at ``where`` if it cannot be decoded."""
    try:
        return decode_image(bytes(data), max_pixels=max_pixels).rgb
    except ImageDecodeError as e:
        raise SampleError(*where, str(e)) from None


def _decoded_images(fields: dict[str, bytes], policy: ReadPolicy) -> list[Image]:
    """Every image field of a sample, decoded; one bad image rejects the sample (never half purified)."""
    names = image_fields(fields, policy.image_key)
    if not names:
        raise ImageDecodeError(f"no image field (fields: {sorted(fields)})")
    images = []
    for name in names:
        try:
            decoded = decode_image(fields[name], max_pixels=policy.max_pixels)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"field {name!r}: {e}" if len(names) > 1 else str(e)) from None
        rgb, decoded.rgb = decoded.rgb, None  # the pixels travel in the batch tensor, not twice
        images.append(Image(name, rgb, decoded))
    return images


register(TarFormat())
