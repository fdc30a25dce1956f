"""eclipse-stream scan: a toy poisoned set is flagged, a toy clean set is not, bad inputs fail as in purify."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from helpers import read_cifar, rgb_array, write_tar
from eclipse_stream.cli import main
from eclipse_stream.errors import InputError, SampleError, ShardError
from eclipse_stream.scan import (
    EXIT_CODES,
    LIKELY_POISONED,
    NO_SIGN,
    ScanConfig,
    scan_arrays,
    scan_samples,
    scan_shards,
)

PER_CLASS = 30  # 300 real CIFAR-10 test images: enough for the default bounds (median class >= 20)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The same 300 real images twice: clean, and with one uniform pattern per class (URP, L-inf 8/255)."""
    items = read_cifar(10 * PER_CLASS, split="test")
    images = np.stack([rgb_array(jpg) for _, _, jpg in items])
    labels = np.array([label for _, label, _ in items])
    patterns = np.random.default_rng(0).integers(-8, 9, size=(10, 32, 32, 3))
    poisoned = np.clip(images.astype(np.int64) + patterns[labels], 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("scan")
    for name, arr in (("clean", images), ("poisoned", poisoned)):
        (root / name).mkdir()
        for part in range(2):  # two shards, classes interleaved
            idx = np.arange(part, len(arr), 2)
            write_tar(root / name / f"train-{part:06d}.tar",
                      [{"__key__": f"{items[i][0]}", "png": _png(arr[i]), "cls": str(labels[i]).encode()}
                       for i in idx])
    return {"root": root, "images": images, "poisoned": poisoned, "labels": labels}


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_poisoned_toy_set_is_flagged_and_clean_one_is_not(toy, tmp_path):
    poisoned = scan_shards(toy["root"] / "poisoned", ScanConfig(per_class=PER_CLASS))
    assert poisoned.verdict == LIKELY_POISONED and poisoned.exit_code == 10
    assert poisoned.score >= poisoned.threshold and poisoned.probes["pixels"]["score"] > 0.9
    clean = scan_shards(toy["root"] / "clean", ScanConfig(per_class=PER_CLASS))
    assert clean.verdict == NO_SIGN and clean.exit_code == 0 and clean.score < clean.clean_below
    assert clean.per_class_sampled == dict.fromkeys([str(c) for c in range(10)], PER_CLASS)
    assert all(abs(p["score"]) < 0.25 for p in clean.null.values())  # shuffled labels: nothing to learn


def test_cli_exit_status_report_and_plot(toy, tmp_path):
    for name, code in (("poisoned", 10), ("clean", 0)):
        report, plot = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
        r = CliRunner().invoke(main, ["scan", str(toy["root"] / name), "--per-class", str(PER_CLASS),
                                      "--report", str(report), "--plot", str(plot)])
        assert r.exit_code == code, r.output
        data = json.loads(report.read_text())
        assert data["exit_code"] == code and data["verdict"] == {10: LIKELY_POISONED, 0: NO_SIGN}[code]
        assert data["config"]["per_class"] == PER_CLASS and len(data["probes"]["pixels"]["class_recall"]) == 10
        assert Image.open(plot).size == (1100, 470)
        assert data["verdict"] in r.output
    assert EXIT_CODES == {NO_SIGN: 0, LIKELY_POISONED: 10, "inconclusive": 11}
    assert NO_SIGN == "no sign of the poison types tested"  # says what was tested, not "clean"


def test_scan_samples_on_a_webdataset_pipeline_matches_scan_shards(toy):
    shards = sorted(str(p) for p in (toy["root"] / "poisoned").glob("*.tar"))
    cfg = ScanConfig(per_class=PER_CLASS, null=False)
    piped = scan_samples(wds.WebDataset(shards, shardshuffle=False).decode("pil"), cfg)
    direct = scan_shards(shards, cfg)
    assert piped.verdict == direct.verdict == LIKELY_POISONED
    assert piped.score == pytest.approx(direct.score)


def test_reference_mode_and_too_few_images(toy):
    ref = (toy["images"], toy["labels"])
    cfg = ScanConfig(per_class=PER_CLASS, null=False)
    assert scan_arrays(toy["poisoned"], toy["labels"], cfg, reference=ref).verdict == LIKELY_POISONED
    same = scan_arrays(toy["images"], toy["labels"], cfg, reference=ref)
    assert same.verdict == NO_SIGN and same.mode == "relative" and same.score == pytest.approx(0.0)
    few = scan_arrays(toy["poisoned"], toy["labels"], ScanConfig(per_class=8, null=False))
    assert few.verdict == "inconclusive" and "too few images" in few.reason


def _bad_shard(toy, path, bad: dict):
    """Eight good images of classes 0 and 1, then one bad sample."""
    good = [{"__key__": f"g{i}", "png": _png(toy["images"][i]), "cls": str(i % 2).encode()} for i in range(16)]
    return write_tar(path, [*good, {"__key__": "bad", "cls": b"1", **bad}])


@pytest.mark.parametrize("bad, reason", [
    ({"png": b""}, "empty image field (0 bytes)"),
    ({"png": b"this is not an image"}, "undecodable image"),
    ({"png": None}, "truncated image data"),
    ({"png": "float"}, "32-bit float image (mode F) is not supported"),
    ({"png": "huge"}, "over the limit of 10000"),
    ({"txt": b"hello"}, "no image field"),
])
def test_bad_samples_fail_naming_shard_and_key_as_purify(toy, tmp_path, bad, reason):
    value = bad.get("png", 0)
    if value is None:
        bad = {"png": _png(toy["images"][0])[:300]}
    elif value == "float":  # (16-bit PNGs are read as 8-bit since issue 24; 32-bit stays refused)
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(buf, format="TIFF")
        bad = {"png": buf.getvalue()}
    elif value == "huge":
        bad = {"png": _png(np.zeros((200, 200, 3), np.uint8))}
    shard = _bad_shard(toy, tmp_path / "bad.tar", bad)
    cfg = ScanConfig(per_class=PER_CLASS, max_pixels=10_000, null=False)
    with pytest.raises(SampleError) as caught:
        scan_shards(shard, cfg)
    assert str(caught.value).startswith(f"{shard}: sample 'bad': ") and reason in str(caught.value)
    skipped = scan_shards(shard, ScanConfig(per_class=PER_CLASS, max_pixels=10_000, on_error="skip", null=False))
    assert [s["key"] for s in skipped.skipped] == ["bad"] and reason in skipped.skipped[0]["reason"]


def test_bad_shards_labels_and_paths_are_clear_errors(toy, tmp_path):
    data = (toy["root"] / "clean" / "train-000000.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"trunc\.tar: corrupt or truncated tar \(after sample '[^']+'\)"):
        scan_shards(tmp_path / "trunc.tar")
    with pytest.raises(InputError, match="no such shard"):
        scan_shards(tmp_path / "missing.tar")
    nolabel = write_tar(tmp_path / "nolabel.tar", [{"__key__": "a", "png": _png(toy["images"][0])}])
    with pytest.raises(SampleError, match=r"sample 'a': no label field \(looked for cls, class, label, target"):
        scan_shards(nolabel)
    with pytest.raises(SampleError, match=r"no label field 'y' \(--label-key\); its fields are: cls, png"):
        scan_shards(toy["root"] / "clean", ScanConfig(label_key="y"))
    one_class = write_tar(tmp_path / "one.tar", [{"__key__": f"k{i}", "png": _png(toy["images"][i]), "cls": b"3"}
                                                 for i in range(6)])
    with pytest.raises(InputError, match="at least 2 classes"):
        scan_shards(one_class)
    r = CliRunner().invoke(main, ["scan", str(tmp_path / "trunc.tar")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["scan", str(toy["root"] / "clean"), "--per-class", "2"])
    assert r.exit_code == 2
    with pytest.raises(ValueError, match="probes must be some of"):
        ScanConfig(probes=("cnn",))


def test_beton_input(toy, tmp_path):
    ffcv_fields = pytest.importorskip("ffcv.fields")
    from ffcv.writer import DatasetWriter

    images, labels = toy["poisoned"], toy["labels"]

    class Rows:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    path = tmp_path / "train.beton"
    DatasetWriter(str(path), {"image": ffcv_fields.RGBImageField(write_mode="raw"), "label": ffcv_fields.IntField()},
                  num_workers=1).from_indexed_dataset(Rows())
    result = scan_shards(path, ScanConfig(per_class=PER_CLASS, null=False))
    assert result.verdict == LIKELY_POISONED and result.per_class_sampled["0"] == PER_CLASS
    with pytest.raises(InputError, match=r"no label field 'cls' \(--label-key\)"):
        scan_shards(path, ScanConfig(label_key="cls"))


def test_cli_reference_mode(toy):
    r = CliRunner().invoke(main, ["scan", str(toy["root"] / "poisoned"), "--per-class", str(PER_CLASS),
                                  "--reference", str(toy["root"] / "clean"), "--no-null"])
    assert r.exit_code == 10 and "excess over the clean reference" in r.output, r.output
    r = CliRunner().invoke(main, ["scan", str(toy["root"] / "clean"), "--per-class", str(PER_CLASS),
                                  "--reference", str(toy["root"] / "clean"), "--no-null"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["scan", str(toy["root"] / "clean"), "--threshold", "0.2", "--clean-below", "0.5"])
    assert r.exit_code == 2 and "must not exceed" in r.output
