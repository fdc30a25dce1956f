"""eclipse-stream purify over FFCV .beton files: fields, order, values, ffcv's Loader reads the output."""

import numpy as np
import torch
from ffcv.fields import FloatField, IntField, NDArrayField, RGBImageField
from ffcv.writer import DatasetWriter
from helpers import cifar_samples, rgb_array

from eclipse_stream.formats.beton import BetonReader
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import PurifierConfig


def make_beton(path, images, mode="raw"):
    class Rows:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i % 10, i / 7.0, np.full(4, i, dtype=np.int32)

    fields = {"image": RGBImageField(write_mode=mode), "label": IntField(), "weight": FloatField(),
              "extra": NDArrayField(np.dtype("int32"), (4,))}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Rows())
    return path


CFG = PurifyConfig(purifier=PurifierConfig(steps=2), batch_size=4, workers=1)


def test_beton_round_trip_keeps_fields_order_and_values(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    images = [rgb_array(s["png"]) for s in cifar_samples(cifar64[:13])]
    make_beton(tmp_path / "in" / "train.beton", images)
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, CFG, progress=False)
    assert res.processed[0]["written"] == 13 and res.manifest
    src, dst = BetonReader(tmp_path / "in" / "train.beton"), BetonReader(tmp_path / "out" / "train.beton")
    assert dst.field_names == src.field_names == ["image", "label", "weight", "extra"]
    a, b = list(src), list(dst)
    assert [s["label"] for s in a] == [s["label"] for s in b]
    assert [s["weight"] for s in a] == [s["weight"] for s in b]
    assert all(np.array_equal(x["extra"], y["extra"]) for x, y in zip(a, b))
    diffs = [np.abs(x["image"].astype(int) - y["image"].astype(int)).mean() for x, y in zip(a, b)]
    assert all(0 < d < 20 for d in diffs)

    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor

    loader = Loader(str(tmp_path / "out" / "train.beton"), batch_size=13, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                               "label": [IntDecoder(), ToTensor(), Squeeze()], "weight": None, "extra": None})
    (imgs, labels), = list(loader)
    assert labels.tolist() == [i % 10 for i in range(13)]
    assert torch.equal(torch.as_tensor(imgs[0]), torch.from_numpy(b[0]["image"]))


def test_beton_output_is_deterministic(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    make_beton(tmp_path / "in" / "x.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:6])])
    purify_shards(tmp_path / "in", tmp_path / "a", tiny_ckpt, CFG, progress=False)
    purify_shards(tmp_path / "in", tmp_path / "b", tiny_ckpt, PurifyConfig(purifier=CFG.purifier, batch_size=4,
                                                                            workers=0), progress=False)
    ia = [s["image"] for s in BetonReader(tmp_path / "a" / "x.beton")]
    ib = [s["image"] for s in BetonReader(tmp_path / "b" / "x.beton")]
    assert all(np.array_equal(x, y) for x, y in zip(ia, ib))


def test_beton_with_every_sample_rejected_is_recorded_and_not_redone(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    make_beton(tmp_path / "in" / "all-bad.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:3])])
    cfg = PurifyConfig(purifier=CFG.purifier, batch_size=4, workers=0, on_error="skip", max_pixels=100)
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg, progress=False)
    stats = res.processed[0]
    assert stats["written"] == 0 and stats["rejected"] == 3 and stats["output"] is None
    assert all("over the limit" in r["reason"] for r in stats["rejects"])
    assert not (tmp_path / "out" / "all-bad.beton").exists() and res.manifest
    again = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg, progress=False)
    assert again.skipped == ["all-bad.beton"] and not again.processed


def test_unreadable_beton_is_skipped_and_the_run_goes_on(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    good = make_beton(tmp_path / "in" / "b-good.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:3])])
    (tmp_path / "in" / "a-bad.beton").write_bytes(good.read_bytes()[:200])
    cfg = PurifyConfig(purifier=CFG.purifier, batch_size=4, workers=0, on_error="skip")
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, cfg, progress=False)
    assert [f["shard"] for f in res.failed] == ["a-bad.beton"]
    assert [p["shard"] for p in res.processed] == ["b-good.beton"] and res.processed[0]["written"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b-good.beton", "b-good.beton.stats.json"]


def test_rerun_removes_the_spool_of_a_killed_run(cifar64, tiny_ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    make_beton(tmp_path / "in" / "x.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:2])])
    spool = tmp_path / "out" / ".x.beton.partial-4242.spool-abc123"  # as a SIGKILLed writer leaves it
    spool.mkdir(parents=True)
    (spool / "records").write_bytes(b"\0" * 1000)
    res = purify_shards(tmp_path / "in", tmp_path / "out", tiny_ckpt, CFG, progress=False)
    assert res.processed[0]["written"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "x.beton", "x.beton.stats.json"]


def test_beton_class_kernels_deblur_only_their_class(cifar64, tiny_ckpt, tmp_path):
    """purify --class-kernels on a .beton: labels come from its 'label' IntField; only class 3 is deconvolved
    (every labelled image also gets its 1-pixel ring refilled from the inside after purifying)."""
    from eclipse_stream.deblur import ClassKernels

    (tmp_path / "in").mkdir()
    make_beton(tmp_path / "in" / "x.beton", [rgb_array(s["png"]) for s in cifar_samples(cifar64[:12])])
    kfile = ClassKernels(kernels={"3": [[0.5, 0.25, 0.0], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]}).save(tmp_path / "k.json")
    cfg = PurifyConfig(purifier=CFG.purifier, batch_size=4, workers=0)
    purify_shards(tmp_path / "in", tmp_path / "plain", tiny_ckpt, cfg, progress=False)
    purify_shards(tmp_path / "in", tmp_path / "deblur", tiny_ckpt,
                  PurifyConfig(purifier=CFG.purifier, batch_size=4, workers=0, class_kernels=str(kfile)),
                  progress=False)
    a, b = list(BetonReader(tmp_path / "plain" / "x.beton")), list(BetonReader(tmp_path / "deblur" / "x.beton"))
    assert [s["label"] for s in a] == [s["label"] for s in b] == [i % 10 for i in range(12)]
    for x, y in zip(a, b):
        framed = np.pad(x["image"][1:-1, 1:-1], ((1, 1), (1, 1), (0, 0)), mode="edge")
        assert np.array_equal(framed, y["image"]) == (int(x["label"]) != 3)


def test_beton_deblur_auto_reads_labels_from_the_label_field(tiny_ckpt, tmp_path):
    """--deblur auto on a .beton: the fit samples its 'label' IntField, CUDA-blurred classes are deconvolved (every
    image differs from --deblur off) and the kernels are recorded."""
    import json

    from helpers import read_cifar

    from eclipse_stream.checkpoint import record_class_spectra
    from eclipse_stream.deblur import ClassSpectra
    from tools.poisons.cuda import class_kernels, convolve

    # 50 images a class in the set and in the record: with 25 the sampling noise left a CUDA class under the 65% gate
    images = np.stack([rgb_array(jpg) for _, _, jpg in read_cifar(1000)])
    n = len(images) // 2
    labels = np.arange(len(images)) % 10  # make_beton's labels
    clean, train = images[:n], images[n:]
    ckpt = tmp_path / "rec.safetensors"
    record_class_spectra(tiny_ckpt, ckpt, ClassSpectra.from_images(
        torch.from_numpy(clean).permute(0, 3, 1, 2), labels[:n].tolist()))
    (tmp_path / "in").mkdir()
    make_beton(tmp_path / "in" / "x.beton", list(convolve(train, class_kernels(10, seed=0), labels[:n])))
    outs = {}
    for mode in ("auto", "off"):
        cfg = PurifyConfig(purifier=CFG.purifier, batch_size=50, workers=0, deblur=mode)
        purify_shards(tmp_path / "in", tmp_path / mode, ckpt, cfg, progress=False)
        outs[mode] = list(BetonReader(tmp_path / mode / "x.beton"))
    assert len(outs["auto"]) == len(outs["off"]) == n
    assert all(not np.array_equal(a["image"], b["image"]) for a, b in zip(outs["auto"], outs["off"]))
    stats = json.loads(next((tmp_path / "auto").glob("*.stats.json")).read_text())
    assert len(stats["config"]["class_kernels_fitted"]["kernels"]) == 10
    assert "class_kernels_fitted" not in json.loads(next((tmp_path / "off").glob("*.stats.json")).read_text())["config"]
