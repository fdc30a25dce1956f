"""formats/tar.py parses common member headers itself (faster than tarfile); it must read every tar exactly as
tarfile does: same samples, members and bytes, and the same error for every cut or corrupted byte."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from eclipse_stream.errors import ShardError
from eclipse_stream.formats import tar as tarformat


def _tar(fmt: int, members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = kind, extra.get("mtime", 0), 0o644
            info.uname = extra.get("uname", "")
            info.linkname = extra.get("linkname", "")
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _webdataset_like() -> bytes:
    """Members as webdataset's TarWriter (and our writer) writes them: a pax header per member (float mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tf:
        for i in range(4):
            for ext, data in (("cls", str(i).encode()), ("jpg", bytes(range(256)) * (i + 1))):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size, info.mtime, info.mode, info.uname = len(data), 0.0, 0o444, "bigdata"
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


REG, DIR, SYM = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE
MIXED = [("README", b"loose", REG, {}), ("a/x.cls", b"1", REG, {}), ("a/x.png", b"p" * 700, REG, {}),
         ("d" * 120 + "/long.name.txt", b"long name", REG, {}), ("dir", None, DIR, {}),
         ("link", None, SYM, {"linkname": "a/x.png"}), ("b.jpg", b"j" * 512, REG, {"mtime": 1.5}),
         ("\u00e9t\u00e9.cls", b"2", REG, {"uname": "\u00e9"}), ("__index__", b"idx", REG, {}),
         ("c.cls", b"", REG, {})]
CASES = {"webdataset": _webdataset_like(), "gnu": _tar(tarfile.GNU_FORMAT, MIXED),
         "pax": _tar(tarfile.PAX_FORMAT, MIXED), "ustar": _tar(tarfile.USTAR_FORMAT, MIXED[:3] + MIXED[4:7])}


def _read(path, fast: bool):
    if not fast:
        real = tarformat._Headers._fast_member
        tarformat._Headers._fast_member = lambda self, offset: None
    try:
        items = []
        for item in tarformat.read_tar(path):
            members = [(i.get_info(), d) for i, d in item.members] if item.members else None
            items.append((item.key, item.fields, members))
        return items, None
    except ShardError as e:
        return None, str(e)
    finally:
        if not fast:
            tarformat._Headers._fast_member = real


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_headers_read_what_tarfile_reads(case, tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(CASES[case])
    fast, slow = _read(path, True), _read(path, False)
    assert fast == slow and fast[1] is None and fast[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_headers_fail_as_tarfile_fails_on_cut_and_corrupt_tars(case, tmp_path):
    data = CASES[case]
    rng = random.Random(case)
    path = tmp_path / "t.tar"
    variants = [data[:n] for n in sorted(rng.sample(range(1, len(data)), 40)) + list(range(512, len(data), 512))]
    for _ in range(60):
        pos = rng.randrange(len(data))
        variants.append(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:])
    for variant in variants:
        path.write_bytes(variant)
        assert _read(path, True) == _read(path, False), len(variant)


@pytest.mark.parametrize("name", ["a.cls", "k" * 96 + ".jpg", "k" * 97 + ".jpeg", "dir/sub/x.png", "\u00e9.png",
                                  "x" * 150 + ".png", "sp ace.txt", "a/b.left.PNG"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 123456, 8 ** 11 - 1])
def test_sample_headers_are_tarfiles_own(name, size):
    assert tarformat._sample_header(name, size) == tarformat._tarfile_sample_header(name, size)


def test_the_writer_writes_what_tarfile_writes(tmp_path):
    samples = [("a", {"cls": b"1", "png": b"p" * 700, "_private": b""}), ("b/c", {"left.jpg": b"j" * 1024})]
    members = [(tarfile.TarInfo("README"), b"loose"), (tarfile.TarInfo("dir"), None)]
    members[0][0].size = 5
    members[1][0].type = tarfile.DIRTYPE
    w = tarformat.TarShardWriter(str(tmp_path / "ours.tar"))
    w.write_members(members)
    for key, fields in samples:
        w.write_sample(key, fields)
    sha = w.finish()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
        for key, fields in samples:
            for name in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(fields[name]), 0.0, 0o444, \
                    "bigdata", "bigdata"
                tf.addfile(info, io.BytesIO(fields[name]))
    assert (tmp_path / "ours.tar").read_bytes() == ref.getvalue()
    assert sha == __import__("hashlib").sha256(ref.getvalue()).hexdigest()


class _OneWay(io.RawIOBase):
    """Read front to back only (a pipe, an HTTP body, an object read in ranges), in odd-sized pieces."""

    def __init__(self, data: bytes, piece: int = 7919):
        self._data, self._pos, self._piece = data, 0, piece

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        n = min(len(b), len(self._data) - self._pos, self._piece)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _read_stream(path, data: bytes, piece: int = 7919):
    try:
        items = []
        for item in tarformat.read_tar(path, fileobj=_OneWay(data, piece)):
            members = [(i.get_info(), d) for i, d in item.members] if item.members else None
            items.append((item.key, item.fields, members))
        return items, None
    except ShardError as e:
        return None, str(e)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_stream_reads_what_the_file_reads_also_cut_or_corrupt(case, tmp_path):
    """The stream entry (no seeking, a look-back window) gives the file's samples, or the file's error."""
    data = CASES[case]
    rng = random.Random(case + "stream")
    path = tmp_path / "t.tar"
    variants = [data] + [data[:n] for n in sorted(rng.sample(range(1, len(data)), 30))]
    for _ in range(30):
        pos = rng.randrange(len(data))
        variants.append(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:])
    for variant in variants:
        path.write_bytes(variant)
        assert _read_stream(path, variant) == _read(path, True), len(variant)


def test_a_big_stream_with_members_larger_than_the_look_back(tmp_path):
    """Members bigger than the 1 MiB look-back and many small ones between, read in odd pieces: the window is
    rebuilt many times and every byte still arrives in order."""
    rng = random.Random(5)
    members = []
    for i in range(40):
        size = (3 << 20) // 2 + rng.randrange(1000) if i % 13 == 5 else rng.randrange(1, 3000)
        members.append((f"s{i:03d}.bin", rng.randbytes(size), REG, {}))
        members.append((f"s{i:03d}.cls", str(i).encode(), REG, {}))
    data = _tar(tarfile.PAX_FORMAT, members)
    path = tmp_path / "big.tar"
    path.write_bytes(data)
    expected = _read(path, True)
    assert expected[1] is None and len(expected[0]) == 40
    for piece in (1 << 16, 1000003, 7919):
        assert _read_stream(path, data, piece) == expected
    cut = data[:len(data.rstrip(b"\0")) - 100]  # inside the last member's data
    path.write_bytes(cut)
    assert _read_stream(path, cut) == _read(path, True) and "incomplete tar" in _read(path, True)[1]
