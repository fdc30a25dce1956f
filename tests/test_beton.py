"""FFCV .beton reading and writing (eclipse_stream.formats.beton) on small fixtures of real CIFAR-10 images.

Fixtures are written with ffcv's own DatasetWriter; outputs are checked with BetonReader and with
ffcv's own Reader and Loader.
"""

import errno
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields import (  # noqa: E402
    BytesField,
    FloatField,
    IntField,
    JSONField,
    NDArrayField,
    RGBImageField,
    TorchTensorField,
)
from ffcv.reader import Reader  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402
from PIL import Image

from eclipse_stream.errors import EclipseError, InputError, SampleError, ShardError
from eclipse_stream.formats.beton import BetonReader, BetonWriter, require_ffcv  # noqa: E402

CIFAR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 2


@pytest.fixture(scope="module")
def cifar() -> tuple[list[np.ndarray], list[int]]:
    """PER_CLASS images of each class from the CIFAR-10 train tar, streamed (not extracted)."""
    archive = CIFAR / "train.tar.gz"
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 data not found at {archive} (see shared/data/cifar10/README.md)")
    images, labels = [], []
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            label = CLASSES.index(Path(member.name).parent.name) if member.isfile() else -1
            if label >= 0 and labels.count(label) < PER_CLASS:
                images.append(np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                labels.append(label)
    assert len(labels) == PER_CLASS * len(CLASSES)
    return images, labels


class _Rows:
    """An indexable dataset of ready-made rows, for ffcv's DatasetWriter."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def write_fixture(path: Path, fields: dict, rows: list[tuple]) -> Path:
    """A .beton written by ffcv itself."""
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(_Rows(rows))
    return path


def labelled(path: Path, cifar, write_mode: str = "raw", **options) -> Path:
    images, labels = cifar
    fields = {"image": RGBImageField(write_mode=write_mode, **options), "label": IntField()}
    return write_fixture(path, fields, list(zip(images, labels)))


def copy_through(reader: BetonReader, path: Path, edit=lambda image: image, **options) -> BetonReader:
    """Write every sample of ``reader`` to ``path`` (image passed through ``edit``) and reopen it."""
    writer = BetonWriter(path, like=reader, **options)
    for sample in reader:
        sample[reader.image_field] = edit(sample[reader.image_field])
        writer.write(sample)
    assert writer.close() == len(reader)
    return BetonReader(path)


def no_spool_left(folder: Path) -> bool:
    return not list(folder.glob(".*.spool-*"))


def test_raw_round_trip_is_exact(cifar, tmp_path):
    images, labels = cifar
    reader = BetonReader(labelled(tmp_path / "in.beton", cifar))
    assert (reader.field_names, reader.image_field, len(reader)) == (["image", "label"], "image", 20)
    assert reader.image_info()["write_mode"] == "raw"
    samples = list(reader)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(20)]
    assert [s["__index__"] for s in samples] == list(range(20))
    assert [s["label"] for s in samples] == labels and all(type(s["label"]) is int for s in samples)
    assert all(np.array_equal(s["image"], im) for s, im in zip(samples, images))

    out = copy_through(reader, tmp_path / "out.beton", edit=lambda image: 255 - image)
    assert out.field_names == reader.field_names and out.image_info()["write_mode"] == "raw"
    written = list(out)
    assert [s["label"] for s in written] == labels
    assert all(np.array_equal(s["image"], 255 - im) for s, im in zip(written, images))
    assert no_spool_left(tmp_path)


def test_jpg_round_trip_keeps_labels_and_jpg_storage(cifar, tmp_path):
    images, labels = cifar
    reader = BetonReader(labelled(tmp_path / "in.beton", cifar, "jpg", jpeg_quality=90))
    assert reader.image_info()["write_mode"] == "jpg"
    decoded = [s["image"] for s in reader]
    assert all(d.shape == (32, 32, 3) and d.dtype == np.uint8 for d in decoded)
    assert np.mean([np.abs(d.astype(int) - im).mean() for d, im in zip(decoded, images)]) < 4

    out = copy_through(reader, tmp_path / "out.beton", jpeg_quality=95)
    info = out.image_info()
    assert (info["write_mode"], info["num_jpg"]) == ("jpg", 20)
    written = list(out)
    assert [s["label"] for s in written] == labels
    assert np.mean([np.abs(s["image"].astype(int) - d).mean() for s, d in zip(written, decoded)]) < 4


def test_other_fields_pass_through_unchanged(cifar, tmp_path):
    import torch

    images, labels = cifar
    fields = {"image": RGBImageField(), "label": IntField(), "score": FloatField(),
              "embedding": NDArrayField(np.dtype("float32"), (3, 4)), "meta": JSONField(),
              "blob": BytesField(), "tensor": TorchTensorField(torch.int16, (2,))}
    rows = [(im, lab, lab / 7, np.full((3, 4), lab, np.float32) + np.arange(12, dtype=np.float32).reshape(3, 4),
             {"class": CLASSES[lab], "i": i, "tags": [i, None, 0.5]}, np.arange(i % 4, dtype=np.uint8),
             torch.tensor([i, -i], dtype=torch.int16))
            for i, (im, lab) in enumerate(zip(images, labels))]
    reader = BetonReader(write_fixture(tmp_path / "in.beton", fields, rows))
    original = list(reader)
    first = original[1]
    assert first["score"] == pytest.approx(labels[1] / 7) and type(first["score"]) is float
    assert first["embedding"].dtype == np.float32 and first["embedding"].shape == (3, 4)
    assert first["meta"] == {"class": CLASSES[labels[1]], "i": 1, "tags": [1, None, 0.5]}
    assert first["blob"].tolist() == [0] and original[0]["blob"].size == 0
    assert first["tensor"].tolist() == [1, -1]

    out = copy_through(reader, tmp_path / "out.beton")
    assert out.field_names == list(fields)
    for before, after in zip(original, out):
        assert before.keys() == after.keys()
        for name in fields:
            if isinstance(before[name], np.ndarray):
                assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name])
            else:
                assert type(before[name]) is type(after[name]) and before[name] == after[name]
    type_ids = [Reader(str(p)).field_descriptors["type_id"].tolist() for p in (reader.path, out.path)]
    assert type_ids[0] == type_ids[1]


def test_mixed_image_sizes_round_trip(cifar, tmp_path):
    images, labels = cifar
    sizes = [(32, 32), (48, 20), (17, 33), (64, 64), (5, 90)]
    resized = [np.array(Image.fromarray(im).resize(sizes[i % len(sizes)])) for i, im in enumerate(images)]
    fields = {"image": RGBImageField(), "label": IntField()}
    reader = BetonReader(write_fixture(tmp_path / "in.beton", fields, list(zip(resized, labels))))
    assert all(np.array_equal(s["image"], im) for s, im in zip(reader, resized))

    out = copy_through(reader, tmp_path / "out.beton", edit=lambda image: np.ascontiguousarray(image[1:, ::-1]))
    written = list(out)
    assert [s["label"] for s in written] == labels
    assert all(np.array_equal(s["image"], im[1:, ::-1]) for s, im in zip(written, resized))


def test_smart_storage_is_inferred_and_kept(cifar, tmp_path):
    images, labels = cifar
    big = [np.array(Image.fromarray(im).resize((64, 64))) if i % 2 else im for i, im in enumerate(images)]
    fields = {"image": RGBImageField(write_mode="smart", smart_threshold=5000), "label": IntField()}
    reader = BetonReader(write_fixture(tmp_path / "in.beton", fields, list(zip(big, labels))))
    info = reader.image_info()
    assert (info["write_mode"], info["smart_threshold"], info["num_raw"], info["num_jpg"]) == ("smart", 3072, 10, 10)

    out = copy_through(reader, tmp_path / "out.beton")
    assert out.image_info() == info
    written = list(out)
    assert [s["label"] for s in written] == labels
    assert all(np.array_equal(s["image"], im) for s, im in zip(written[::2], images[::2]))  # raw ones exact


def test_proportion_storage_is_inferred_and_kept(cifar, tmp_path):
    np.random.seed(0)  # ffcv draws raw/jpg per image with np.random in its (forked) worker
    reader = BetonReader(labelled(tmp_path / "in.beton", cifar, "proportion", compress_probability=0.5))
    info = reader.image_info()
    assert info["write_mode"] == "proportion" and 0 < info["compress_probability"] < 1
    out = copy_through(reader, tmp_path / "out.beton")
    assert out.image_info()["write_mode"] == "proportion"
    assert [s["label"] for s in out] == cifar[1]


def test_ffcv_loader_reads_our_output(cifar, tmp_path):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    images, labels = cifar

    def load(path):
        loader = Loader(str(path), batch_size=6, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                                   "label": [IntDecoder(), ToTensor()]})
        batches = list(loader)
        return (np.concatenate([b[0].numpy() for b in batches]),
                np.concatenate([b[1].numpy().reshape(-1) for b in batches]).tolist())

    raw = copy_through(BetonReader(labelled(tmp_path / "raw.beton", cifar)), tmp_path / "raw-out.beton",
                       edit=lambda image: 255 - image)
    loaded, loaded_labels = load(raw.path)
    assert loaded_labels == labels
    assert np.array_equal(loaded, 255 - np.stack(images))

    jpg = copy_through(BetonReader(labelled(tmp_path / "jpg.beton", cifar, "jpg")), tmp_path / "jpg-out.beton")
    loaded, loaded_labels = load(jpg.path)
    assert loaded_labels == labels
    assert np.array_equal(loaded, np.stack([s["image"] for s in jpg]))  # same decoder, same pixels


def test_proportion_output_does_not_depend_on_the_global_random_state(cifar, tmp_path):
    np.random.seed(0)
    reader = BetonReader(labelled(tmp_path / "in.beton", cifar, "proportion", compress_probability=0.5))
    outputs = []
    for state in (1, 2):
        np.random.seed(state)  # what a caller did before is not the writer's business
        copy_through(reader, tmp_path / f"out{state}.beton", seed=7)
        outputs.append((tmp_path / f"out{state}.beton").read_bytes())
    assert outputs[0] == outputs[1]
    modes = BetonReader(tmp_path / "out1.beton").image_info()
    assert modes["num_raw"] and modes["num_jpg"]  # both storage modes drawn: the seed decided which


def test_pixel_limit_is_checked_before_decoding(cifar, tmp_path):
    path = labelled(tmp_path / "in.beton", cifar, "jpg")
    samples = iter(BetonReader(path, max_pixels=32 * 32 - 1))
    with pytest.raises(SampleError, match=r"32 x 32 = 1024 pixels, over the limit of 1023") as caught:
        next(samples)
    assert caught.value.key == "000000000"
    assert len(list(BetonReader(path, max_pixels=32 * 32))) == 20


@pytest.fixture
def small_beton(cifar, tmp_path) -> Path:
    return labelled(tmp_path / "small.beton", cifar)


@pytest.mark.parametrize("keep", ["header+5", "half", "all-10"])
def test_truncated_file_is_a_shard_error(small_beton, tmp_path, keep):
    data = small_beton.read_bytes()
    cut = {"header+5": 29, "half": len(data) // 2, "all-10": len(data) - 10}[keep]
    path = tmp_path / "truncated.beton"
    path.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="truncated") as caught:
        BetonReader(path)
    assert caught.value.shard == str(path)


def test_unfinalized_file_is_a_shard_error(small_beton, tmp_path):
    data = bytearray(small_beton.read_bytes())
    data[16:24] = bytes(8)  # alloc_table_ptr, which DatasetWriter fills in last
    path = tmp_path / "unfinished.beton"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="never finalized"):
        BetonReader(path)


@pytest.mark.parametrize("content", [b"", b"not a beton\n" * 100, np.random.default_rng(1).bytes(50_000)],
                         ids=["zero-byte", "text", "random"])
def test_non_beton_file_is_a_shard_error(tmp_path, content):
    path = tmp_path / "bad.beton"
    path.write_bytes(content)
    with pytest.raises(ShardError) as caught:
        BetonReader(path)
    assert caught.value.shard == str(path) and str(path) in str(caught.value)


def test_missing_file_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match="cannot open"):
        BetonReader(tmp_path / "missing.beton")


def test_undecodable_jpeg_is_a_sample_error_and_reading_goes_on(cifar, tmp_path):
    source = Reader(str(labelled(tmp_path / "in.beton", cifar, "jpg")))
    ptr = int(source.metadata[3]["f0"]["data_ptr"])
    size = int(source.alloc_table["size"][source.alloc_table["ptr"] == ptr][0])
    data = bytearray(Path(source.file_name).read_bytes())
    data[ptr:ptr + size] = bytes(size)
    path = tmp_path / "corrupt.beton"
    path.write_bytes(bytes(data))

    samples = iter(BetonReader(path))
    assert [next(samples)["label"] for _ in range(3)] == cifar[1][:3]
    with pytest.raises(SampleError) as caught:
        next(samples)
    assert (caught.value.shard, caught.value.key) == (str(path), "000000003")
    assert [s["label"] for s in samples] == cifar[1][4:]


def test_image_field_choice(cifar, tmp_path):
    images, labels = cifar
    fields = {"label": IntField(), "thumb": RGBImageField(), "image": RGBImageField()}
    path = write_fixture(tmp_path / "two.beton", fields, [(lab, im[:8, :8], im) for im, lab in zip(images, labels)])
    assert BetonReader(path).image_field == "thumb"
    assert BetonReader(path, image_field="image").image_field == "image"
    with pytest.raises(InputError, match="has type IntField, not RGBImageField"):
        BetonReader(path, image_field="label")
    with pytest.raises(InputError, match="no field named 'nope'"):
        BetonReader(path, image_field="nope")
    no_image = write_fixture(tmp_path / "labels.beton", {"label": IntField()}, [(lab,) for lab in labels])
    with pytest.raises(InputError, match="no RGBImageField"):
        BetonReader(no_image)


def test_writer_checks_samples_as_they_come(tmp_path):
    import torch

    fields = {"image": RGBImageField(), "vector": NDArrayField(np.dtype("float32"), (4,))}
    image = np.zeros((8, 8, 3), np.uint8)
    like = BetonReader(write_fixture(tmp_path / "vec.beton", fields, [(image, np.zeros(4, np.float32))]))
    writer = BetonWriter(tmp_path / "out.beton", like=like)
    bad = [{"image": image.astype(np.float32), "vector": np.zeros(4, np.float32)},
           {"image": image[:, :, :2], "vector": np.zeros(4, np.float32)},
           {"image": image, "vector": np.zeros(5, np.float32)},
           {"image": image}]
    for sample in bad:
        with pytest.raises(SampleError):
            writer.write({"__key__": "k", **sample})
    writer.write({"image": image, "vector": np.ones(4, np.float32)})
    writer.write({"image": image, "vector": torch.full((4,), 2.0)})  # as a torch DataLoader hands it on
    assert writer.close() == 2
    assert [s["vector"].tolist() for s in BetonReader(tmp_path / "out.beton")] == [[1.0] * 4, [2.0] * 4]


def test_abort_and_empty_close_leave_nothing(small_beton, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    reader = BetonReader(small_beton)
    writer = BetonWriter(out / "a.beton", like=reader, spool_dir=str(out))
    writer.write(next(iter(reader)))
    writer.abort()
    with pytest.raises(ValueError):
        writer.write(next(iter(reader)))
    empty = BetonWriter(out / "b.beton", like=reader, spool_dir=str(out))
    with pytest.raises(InputError, match="no samples"):
        empty.close()
    assert list(out.iterdir()) == []


def test_require_ffcv_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` fail
    path = tmp_path / "x.beton"
    for call in (require_ffcv, BetonReader):
        with pytest.raises(InputError) as caught:
            call(path)
        message = str(caught.value)
        assert str(path) in message
        apt = message.index("apt-get install pkg-config libopencv-dev libturbojpeg0-dev")
        assert message.index("pip install 'eclipse-stream[ffcv]'") > apt


def test_module_imports_without_ffcv():
    code = "import sys; sys.modules['ffcv'] = None; import eclipse_stream.formats.beton"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_disk_full_while_spooling_names_the_output(small_beton, tmp_path):
    reader = BetonReader(small_beton)
    writer = BetonWriter(tmp_path / "o.beton", like=reader)

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    writer._spool._records = FullDisk()
    with pytest.raises(EclipseError, match=r"o\.beton: cannot spool a sample to .*: No space left on device"):
        writer.write(next(iter(reader)))
    writer.abort()
    assert list(tmp_path.iterdir()) == [small_beton]
