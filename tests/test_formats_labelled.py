"""ShardFormat.labelled, scan's one view of a shard: scan knows no format, so a new one is scanned as registered."""

import ast
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tar
from PIL import Image

import eclipse_stream.scan as scan_module
from eclipse_stream.errors import SampleError
from eclipse_stream.formats import FORMATS, Labelled, ShardFormat, class_label, format_for, suffixes
from eclipse_stream.scan import ScanConfig, sample_shards


class ToyFormat(ShardFormat):
    """A JSON list of {"label", "value"} rows; each image is 8 x 8 of one grey value."""

    suffix = ".toy"

    def labelled(self, path, label_key, image_key, max_pixels):
        for i, row in enumerate(json.loads(Path(path).read_text())):
            key = f"row{i}"
            if "label" not in row:
                yield Labelled(key, error="no label")
                continue
            yield Labelled(key, class_label(row["label"], (path, key), "label"),
                           functools.partial(np.full, (8, 8, 3), row["value"], np.uint8))


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setitem(FORMATS, ".toy", ToyFormat())
    yield


def test_a_format_registered_under_a_new_suffix_is_scanned(toy_format, tmp_path):
    rows = [{"label": f"c{i % 2}", "value": i} for i in range(10)] + [{"value": 99}]
    path = tmp_path / "part.toy"
    path.write_text(json.dumps(rows))
    with pytest.raises(SampleError, match=r"part\.toy: sample 'row10': no label"):
        sample_shards(path, ScanConfig(per_class=5))
    sampled = sample_shards(tmp_path, ScanConfig(per_class=5, probe_size=8, on_error="skip")).whole
    assert sampled.classes == ["c0", "c1"] and sampled.seen == {"c0": 5, "c1": 5}
    assert [int(im[0, 0, 0]) for im in sampled.images] == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert sampled.skipped == [{"shard": str(path), "key": "row10", "reason": "no label"}]


def test_scan_names_no_format():
    """No suffix or format module in the scan package's code: it reaches formats through format_for only."""
    files = sorted(Path(scan_module.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        tree = ast.parse(path.read_text())
        constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & set(suffixes()), path
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in modules if m and m.startswith("formats.")}, path


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_labelled_reads_labels_and_decodes_on_load(tmp_path):
    path = write_tar(tmp_path / "a.tar", [
        {"__key__": "a", "png": _png(7), "cls": b"3"},
        {"__key__": "b", "png": _png(8)},
        {"__key__": "c", "png": b"junk", "label": b"dog"},
    ])
    items = list(format_for(path).labelled(str(path), None, None, 1000))
    assert [(i.key, i.label, i.error) for i in items] == [
        ("a", 3, None), ("b", None, "no label field (looked for cls, class, label, target; name one with "
                                    "--label-key); its fields are: png"), ("c", "dog", None)]
    assert items[0].load().shape == (4, 4, 3) and int(items[0].load()[0, 0, 0]) == 7
    with pytest.raises(SampleError, match=r"a\.tar: sample 'c': "):
        items[2].load()


def test_a_format_with_some_roles_says_which_it_lacks_and_writers_must_be_complete():
    with pytest.raises(NotImplementedError, match=r"\.toy shards cannot be read for purify"):
        ToyFormat().records("x.toy", None)
    with pytest.raises(NotImplementedError, match=r"\.toy shards cannot be written"):
        ToyFormat().open_writer("tmp", "x.toy", None)

    from eclipse_stream.formats import ShardWriter

    class NoAbort(ShardWriter):
        def write_sample(self, key, fields):
            pass

        def finish(self, stop=None):
            return None

    with pytest.raises(TypeError, match="abort"):
        NoAbort()
