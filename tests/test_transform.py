"""EclipseTransform in WebDataset pipelines, and the README snippets run as written."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, cifar_samples, rgb_array, write_tar
from eclipse_stream import EclipseTransform


def snippet(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


@pytest.fixture()
def workdir(tmp_path, monkeypatch, cifar64, tiny_ckpt):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "train-000000.tar", cifar_samples(cifar64[:10]))
    write_tar(tmp_path / "shards" / "train-000001.tar", cifar_samples(cifar64[10:16]))
    (tmp_path / "denoiser.safetensors").write_bytes(tiny_ckpt.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_webdataset_snippet(workdir, cifar64):
    ns: dict = {}
    exec(snippet("webdataset"), ns)
    out = list(ns["fluent"])
    expected = cifar_samples(cifar64[:16])
    assert [s["__key__"] for s in out] == [s["__key__"] for s in expected]
    for got, want in zip(out, expected):
        assert got["cls"] == int(want["cls"]) and got["json"]["name"] == want["__key__"]
        diff = np.abs(np.asarray(got["png"]).astype(int) - rgb_array(want["png"]).astype(int))
        assert 0 < diff.mean() < 20
    pairs = list(ns["dataset"])
    assert [label for _, label in pairs] == [int(s["cls"]) for s in expected]


def test_readme_batches_snippet_with_ffcv(workdir, cifar64):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = [rgb_array(s["png"]) for s in cifar_samples(cifar64[:16])]

    class Pairs:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return images[i], i % 10

    DatasetWriter("train.beton", {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Pairs())
    ns: dict = {}
    exec(snippet("batches"), ns)
    assert ns["clean"].dtype == torch.uint8 and ns["clean"].shape == (8, 3, 32, 32)
    batch_images, batch_labels = ns["images"], ns["labels"]
    assert batch_images.dtype == torch.uint8 and batch_images.shape[1:] == (3, 32, 32)
    assert batch_labels.tolist() == [i % 10 for i in range(16)]


def test_transform_keeps_types_order_and_passes_samples_without_images(tiny_ckpt):
    t = EclipseTransform(tiny_ckpt, steps=2, batch_size=3, device="cpu", seed=0)
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": "a", "jpg": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "cls": 1},
        {"__key__": "b", "jpg": rng.random((40, 24, 3)).astype(np.float32), "cls": 2},
        {"__key__": "c", "txt": "no image here"},
        {"__key__": "d", "png": torch.rand(3, 32, 32), "cls": 4},
        {"__key__": "e", "png": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "cls": 5},
    ]
    out = list(t(iter(samples)))
    assert [s["__key__"] for s in out] == ["a", "b", "c", "d", "e"]
    assert out[2] == samples[2]
    assert out[0]["jpg"].dtype == np.uint8 and out[0]["jpg"].shape == (32, 32, 3)
    assert out[1]["jpg"].dtype == np.float32 and out[1]["jpg"].shape == (40, 24, 3)
    assert out[3]["png"].dtype == torch.float32 and out[4]["png"].dtype == torch.uint8
    assert not np.array_equal(out[0]["jpg"], samples[0]["jpg"])
    again = list(EclipseTransform(tiny_ckpt, steps=2, batch_size=3, device="cpu", seed=0)(iter(samples)))
    assert np.array_equal(again[0]["jpg"], out[0]["jpg"])
    with pytest.raises(TypeError, match="decode images first"):
        list(t(iter([{"__key__": "x", "jpg": b"raw bytes"}])))


def test_pil_modes_come_back_with_gray_and_alpha_kept(tiny_ckpt):
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    samples = [{"__key__": k, "png": im} for k, im in
               [("rgb", rgb), ("rgba", rgba), ("l", rgb.convert("L")), ("la", la)]]
    out = {s["__key__"]: s["png"] for s in EclipseTransform(tiny_ckpt, steps=2, batch_size=4, device="cpu")(samples)}
    assert {k: im.mode for k, im in out.items()} == {"rgb": "RGB", "rgba": "RGBA", "l": "L", "la": "LA"}
    for k in ("rgba", "la"):
        assert np.array_equal(np.asarray(out[k].getchannel("A")), np.asarray(alpha))
    assert not np.array_equal(np.asarray(out["rgba"])[..., :3], np.asarray(rgb))  # the colours were purified


def test_gif_and_tiff_images_are_purified_as_purify_does(tiny_ckpt):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    stage = EclipseTransform(str(tiny_ckpt), steps=2, device="cpu", batch_size=2)
    out = list(stage([{"__key__": "a", "gif": image}, {"__key__": "b", "tiff": image}]))
    for sample, field in zip(out, ["gif", "tiff"]):
        assert np.abs(np.asarray(sample[field], dtype=int) - np.asarray(image, dtype=int)).mean() > 0, field
