"""The scan's parts: each probe finds the shortcut it is for (and not a processing applied to every class), the
verdict follows its calibrated bounds, and a poisoned group of shards is found and named beside clean ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import write_tar
from PIL import Image

from eclipse_stream.cli import main
from eclipse_stream.scan import INCONCLUSIVE, LIKELY_POISONED, NO_SIGN, ScanConfig, scan_arrays, scan_shards
from eclipse_stream.scan import probes as probe_module
from eclipse_stream.scan import verdict as verdict_module
from eclipse_stream.scan.probes import DEFAULT, PROBES, THOROUGH, ProbeData, probe

PER_CLASS = 40


@pytest.fixture(scope="module")
def base(scan_cifar):
    """40 real images per class."""
    _, images, labels = scan_cifar
    keep = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
    return images[keep], labels[keep]


def _score(name: str, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255)
    return PROBES[name](ProbeData(x, labels, 10))["score"]


def _add(images, delta):
    return np.clip(images.astype(np.float64) + delta, 0, 255).round().astype(np.uint8)


def _filter(images, kernels):
    """Depthwise 3x3 convolution of every image by its own kernels (N, 3, 3, 3), zero padding (as CUDA)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    out = torch.stack([torch.nn.functional.conv2d(x[i:i + 1], torch.from_numpy(k)[:, None], padding=1, groups=3)[0]
                       for i, k in enumerate(kernels)])
    return out.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def _classwise_blur(labels, rng, same: bool = False):
    """CUDA-like kernels: a random 3x3 kernel per class and channel (blur parameter 0.3), or one for all."""
    kernels = rng.uniform(0, 0.3, size=(10, 3, 3, 3))
    kernels[:, :, 1, 1] = 1
    kernels /= kernels.sum(axis=(2, 3), keepdims=True)
    return kernels[np.zeros_like(labels) if same else labels]


# --------------------------------------------------------------------------------------------- probes


def test_pixels_finds_a_classwise_pixel_pattern(base):
    images, labels = base
    patterns = np.random.default_rng(0).choice([-6.0, 6.0], size=(10, 32, 32, 3))
    assert _score("pixels", _add(images, patterns[labels]), labels) > 0.8
    assert _score("pixels", images, labels) < 0.3


def test_texture_finds_a_classwise_noise_process_with_a_fresh_draw_per_image(base):
    images, labels = base
    rng = np.random.default_rng(1)
    kernels = rng.normal(size=(10, 3, 3))  # one spatial correlation per class, the same for every channel
    noise = torch.from_numpy(rng.normal(size=(len(images), 1, 34, 34)))
    coloured = torch.stack([torch.nn.functional.conv2d(noise[i:i + 1], torch.from_numpy(kernels[c])[None, None])[0, 0]
                            for i, c in enumerate(labels)]).numpy()
    delta = 8 * coloured / coloured.std(axis=(1, 2), keepdims=True)
    poisoned = _add(images, delta[..., None])
    assert _score("texture", poisoned, labels) > 0.5
    assert _score("pixels", poisoned, labels) < 0.4  # a fresh draw per image: no pixel pattern to learn
    assert _score("texture", images, labels) < 0.35


def test_blocks_finds_a_classwise_patch_colour_layout(base):
    images, labels = base
    patches = np.random.default_rng(2).choice([-10.0, 10.0], size=(10, 4, 4, 3))
    delta = np.repeat(np.repeat(patches, 8, axis=1), 8, axis=2)  # 8 x 8 patches, as LSP at 32 x 32
    assert _score("blocks", _add(images, delta[labels]), labels) > 0.8
    assert _score("blocks", images, labels) < 0.35


def test_spectrum_finds_classwise_filters_but_not_one_filter_for_every_class(base):
    images, labels = base
    rng = np.random.default_rng(3)
    clean = _score("spectrum", images, labels)
    assert _score("spectrum", _filter(images, _classwise_blur(labels, rng)), labels) > 0.6
    assert _score("spectrum", _filter(images, _classwise_blur(labels, rng, same=True)), labels) < clean + 0.1
    assert clean < 0.3


def test_colour_finds_a_classwise_colour_change_but_not_a_global_one(base):
    images, labels = base
    gains = np.random.default_rng(4).uniform(0.8, 1.0, size=(10, 3))  # a colour cast per class, up to 20%
    clean = _score("colour", images, labels)
    bound = verdict_module.bounds_for("colour", PER_CLASS).poisoned  # what the shipped verdict would flag
    assert _score("colour", _add(images * gains[labels][:, None, None, :], 0), labels) > max(bound, clean + 0.12)
    assert _score("colour", _add(images * gains[0], 0), labels) < clean + 0.1
    assert clean < 0.3


def test_learning_probe_fits_a_poisoned_set_fast_and_far(base, monkeypatch):
    # a shorter budget than a scan's (400): a faster test. Not 150: on an AMD EPYC VM the held-out score after 150
    # steps was 0.43 (0.73 after 200, 0.87 after 400; Intel VMs passed at 150): the float arithmetic differs by CPU
    monkeypatch.setattr(probe_module, "LEARNING_STEPS", 200)
    monkeypatch.setattr(probe_module, "LEARNING_CHECKPOINTS", (50, 200))
    images, labels = base
    poisoned = _filter(images, _classwise_blur(labels, np.random.default_rng(5)))
    x = torch.from_numpy(poisoned).permute(0, 3, 1, 2).double().div(255)
    r = PROBES["learning"](ProbeData(x, labels, 10))
    assert r["score"] > 0.5 and [f["step"] for f in r["fit_curve"]] == [50, 200]
    assert r["fit_curve"][-1]["train_accuracy"] > 0.6
    assert _score("learning", images, labels) < 0.35
    # deterministic: the same data gives the same score (the probe's randomness is seeded, global RNG untouched)
    state = torch.random.get_rng_state()
    assert PROBES["learning"](ProbeData(x, labels, 10))["score"] == r["score"]
    assert torch.equal(state, torch.random.get_rng_state())


def test_every_default_probe_is_calibrated_and_the_registry_takes_a_new_probe(monkeypatch):
    cal = verdict_module.calibration()
    assert set(DEFAULT) <= set(cal["probes"]) and set(DEFAULT).isdisjoint(THOROUGH)
    assert all(set(cal["probes"][p]) >= {"25", "50", "100", "200"} for p in DEFAULT)
    monkeypatch.setattr(probe_module, "PROBES", dict(PROBES))

    @probe
    def constant(data):  # noqa: ARG001
        return probe_module.outcome(0.1, [0.1] * 10, 10, [])

    assert "constant" in probe_module.PROBES
    assert ScanConfig(probes=("pixels", "constant")).probe_names() == ("pixels", "constant")


# --------------------------------------------------------------------------------------------- verdict

CAL = {"sizes": [25, 50, 100, 200], "needed_for_half_budget": 50, "policy": {"z_poisoned": 4.0, "z_clean": 3.0,
                                                                             "min_sd": 0.01},
       "probes": {"a": {"25": {"mean": 0.2, "sd": 0.04}, "50": {"mean": 0.22, "sd": 0.03},
                        "100": {"mean": 0.24, "sd": 0.02}, "200": {"mean": 0.26, "sd": 0.005}},
                  "b": {"25": {"mean": 0.0, "sd": 0.02}, "50": {"mean": 0.0, "sd": 0.02},
                        "100": {"mean": 0.0, "sd": 0.02}, "200": {"mean": 0.0, "sd": 0.02}}}}


@pytest.fixture
def cal(monkeypatch):
    monkeypatch.setattr(verdict_module, "calibration", lambda: CAL)
    return CAL


def test_bounds_interpolate_in_log_size_floor_the_sd_and_extrapolate_upwards(cal):
    b = verdict_module.bounds_for("a", 50, cal)
    assert (b.mean, b.sd, b.poisoned, b.clean, b.extrapolated) == pytest.approx((0.22, 0.03, 0.34, 0.31, False))
    mid = verdict_module.bounds_for("a", 70.71, cal)  # half way between 50 and 100 in log2
    assert mid.mean == pytest.approx(0.23, abs=1e-3) and mid.sd == pytest.approx(0.025, abs=1e-3)
    assert verdict_module.bounds_for("a", 200, cal).sd == 0.01  # floored
    beyond = verdict_module.bounds_for("a", 400, cal)
    assert beyond.extrapolated and beyond.mean == pytest.approx(0.28)  # the 100 -> 200 trend, one more doubling
    assert verdict_module.bounds_for("nope", 50, cal) is None


def test_bounds_follow_the_class_count(cal, monkeypatch):
    few = {**cal, "by_classes": {"2": {"a": {str(n): {"mean": 0.4, "sd": 0.1} for n in (25, 50, 100, 200)}}}}
    assert verdict_module.bounds_for("a", 50, few, k=2).poisoned == pytest.approx(0.8)
    mid = verdict_module.bounds_for("a", 50, few, k=round(2 ** 0.5 * 10 ** 0.5))  # ~ half way in log(k): 4
    assert 0.22 < mid.mean < 0.4 and 0.03 < mid.sd < 0.1
    many = verdict_module.bounds_for("a", 50, few, k=100)
    assert many.mean == pytest.approx(0.22) and many.extrapolated  # the 10-class table, said to be beyond it
    monkeypatch.setattr(verdict_module, "calibration", lambda: few)
    labels = np.repeat(np.arange(2), 50)
    j, _ = verdict_module.judge({"a": 0.6}, labels, 2, ScanConfig())  # clean for 2 classes, flagged for 10
    assert j.verdict == NO_SIGN
    j, _ = verdict_module.judge({"a": 0.6}, np.repeat(np.arange(10), 50), 10, ScanConfig())
    assert j.verdict == LIKELY_POISONED


def _judge(scores, n=50, seen=None, **cfg):
    labels = np.repeat(np.arange(10), n)
    return verdict_module.judge(scores, labels, 10, ScanConfig(**cfg), seen)


def test_verdicts_from_calibrated_bounds(cal):
    j, table = _judge({"a": 0.25, "b": 0.02})
    assert j.verdict == NO_SIGN and "within the range of clean photos" in j.reason
    assert table["b"]["z"] == pytest.approx(1.0)
    j, _ = _judge({"a": 0.25, "b": 0.09})  # b: 4.5 sd above its clean mean
    assert j.verdict == LIKELY_POISONED and j.probe == "b" and j.threshold == pytest.approx(0.08)
    j, _ = _judge({"a": 0.33, "b": 0.0}, seen={str(c): 1000 for c in range(10)})  # a between 0.31 and 0.34
    assert j.verdict == INCONCLUSIVE and "between the clean and poisoned bounds (a)" in j.reason
    assert "--per-class 200" in j.reason
    j, _ = _judge({"a": 0.9, "b": 0.9}, n=10)
    assert j.verdict == INCONCLUSIVE and "at least 25 needed" in j.reason and "50 for weaker" in j.reason
    j, _ = _judge({"a": 0.25, "b": 0.02, "uncalibrated": 0.99})  # a probe without bounds does not vote
    assert j.verdict == NO_SIGN
    j, _ = _judge({"a": 0.25, "b": 0.02}, threshold=0.2)  # the user's bound, for every probe
    assert j.verdict == LIKELY_POISONED and j.threshold == 0.2
    with pytest.raises(ValueError, match="none of the probes"):
        _judge({"uncalibrated": 0.5})


# --------------------------------------------------------------------------------------------- groups


def _urp(images, labels, seed=0):
    patterns = np.random.default_rng(seed).choice([-8.0, 8.0], size=(10, 32, 32, 3))
    return _add(images, patterns[labels])


@pytest.fixture(scope="module")
def mixed(scan_cifar):
    """Four sources of 30 images per class each (every class in every source); source "s2" is URP-poisoned."""
    _, images, labels = scan_cifar
    groups = np.empty(len(labels), dtype=object)
    for c in range(10):
        members = np.flatnonzero(labels == c)[:120]
        groups[members] = [f"s{i // 30}" for i in range(len(members))]
    poisoned = images.copy()
    bad = groups == "s2"
    poisoned[bad] = _urp(images[bad], labels[bad])
    return poisoned, labels, groups


def test_a_poisoned_group_is_flagged_and_named_beside_clean_groups(mixed):
    images, labels, groups = mixed
    cfg = ScanConfig(per_class=60, group_per_class=30, null=False)
    r = scan_arrays(images, labels, cfg, groups=groups)
    assert r.groups["s2"]["verdict"] == LIKELY_POISONED and r.groups["s2"]["probe"] == "pixels"
    assert [r.groups[g]["verdict"] for g in ("s0", "s1", "s3")] == [NO_SIGN] * 3
    assert r.verdict == LIKELY_POISONED and r.flagged_groups() == ["s2"]
    assert r.groups["s0"]["per_class_sampled"] == dict.fromkeys(map(str, range(10)), 30)
    assert "s2" in r.summary() and "by shard (4 groups" in r.summary()
    whole_only = scan_arrays(images, labels, ScanConfig(per_class=60, null=False, by="none"), groups=groups)
    assert whole_only.groups == {} and whole_only.whole["verdict"] == whole_only.verdict


def test_a_poisoned_verdict_says_what_to_do_and_names_deblurring_only_for_a_classwise_filter(base):
    images, labels = base
    cfg = ScanConfig(per_class=PER_CLASS, null=False, by="none")
    blurred = scan_arrays(_filter(images, _classwise_blur(labels, np.random.default_rng(3))), labels, cfg)
    assert blurred.verdict == LIKELY_POISONED
    assert any("fit-kernels" in s for s in blurred.next_steps()) and "--class-kernels" in blurred.summary()
    urp = scan_arrays(_urp(images, labels), labels, cfg)
    assert urp.verdict == LIKELY_POISONED and urp.next_steps()[0].startswith("next: `eclipse-stream purify")
    urp.probes["spectrum"]["score"] = urp.bounds["spectrum"]["poisoned"] - 0.01  # only the other probes flag it
    assert len(urp.next_steps()) == 1 and "fit-kernels" not in urp.summary()
    clean = scan_arrays(images, labels, cfg)
    assert clean.verdict != LIKELY_POISONED and clean.next_steps() == [] and "next:" not in clean.summary()


def test_a_group_without_every_class_is_reported_not_scored(mixed):
    images, labels, groups = mixed
    groups = groups.copy()
    groups[(groups == "s3") & (labels < 5)] = "s0"  # s3 keeps only classes 5-9
    r = scan_arrays(images, labels, ScanConfig(per_class=60, group_per_class=30, null=False), groups=groups)
    assert "holds 5 of the 10 classes" in r.groups["s3"]["not_scored"]
    assert r.groups["s2"]["verdict"] == LIKELY_POISONED


def _png(rgb: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_shards(mixed, tmp_path_factory):
    images, labels, groups = mixed
    root = tmp_path_factory.mktemp("mixed")
    for g in ("s0", "s1", "s2", "s3"):
        idx = np.flatnonzero(groups == g)
        folder = root / ("bad" if g == "s2" else "good")
        folder.mkdir(exist_ok=True)
        write_tar(folder / f"{g}.tar", [{"__key__": f"{g}-{i}", "png": _png(images[i]), "cls": str(labels[i]).encode()}
                                        for i in idx])
    return root


def test_shards_and_inputs_are_judged_each(mixed_shards):
    good, bad = mixed_shards / "good", mixed_shards / "bad"
    cfg = ScanConfig(per_class=60, group_per_class=30, null=False)
    r = scan_shards([good, bad], cfg)
    assert r.flagged_groups() == [str(bad / "s2.tar")] and len(r.groups) == 4
    by_input = scan_shards([good, bad], ScanConfig(per_class=60, group_per_class=30, null=False, by="input"))
    assert by_input.flagged_groups() == [str(bad)] and by_input.groups[str(good)]["verdict"] == NO_SIGN
    pooled = scan_shards([good, bad], ScanConfig(per_class=60, group_per_class=30, null=False, max_groups=2))
    assert len(pooled.groups) == 2 and len(pooled.flagged_groups()) == 1  # s0+s1 together, s2+s3 together


def test_cli_reports_groups_and_exits_10_for_a_poisoned_minority(mixed_shards, tmp_path):
    report = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["scan", str(mixed_shards / "good"), str(mixed_shards / "bad"), "--per-class", "60",
                                  "--group-per-class", "30", "--no-null", "--report", str(report)])
    assert r.exit_code == 10, r.output
    assert "s2.tar" in r.output and "likely poisoned" in r.output
    import json

    data = json.loads(report.read_text())
    assert [g for g, v in data["groups"].items() if v.get("verdict") == LIKELY_POISONED] == [
        str(mixed_shards / "bad" / "s2.tar")]
    assert set(data["bounds"]) == set(DEFAULT) and data["config"]["by"] == "shard"
    r = CliRunner().invoke(main, ["scan", str(mixed_shards / "good"), "--per-class", "60", "--group-per-class", "30",
                                  "--no-null", "--by", "input"])
    assert r.exit_code == 0, r.output
    assert NO_SIGN in r.output


def test_reference_bounds_are_the_spread_of_a_difference_of_two_clean_samples(cal):
    labels = np.repeat(np.arange(10), 50)
    cfg = ScanConfig()
    j, table = verdict_module.judge_relative({"a": 0.27, "b": 0.02}, {"a": 0.22, "b": 0.0}, labels, 10, cfg)
    assert j.verdict == NO_SIGN  # a: +0.05 < 3 * sqrt(2) * 0.03 = 0.127
    assert table["a"]["poisoned"] == pytest.approx(4 * 2 ** 0.5 * 0.03)
    j, _ = verdict_module.judge_relative({"a": 0.42, "b": 0.0}, {"a": 0.22, "b": 0.0}, labels, 10, cfg)
    assert j.verdict == LIKELY_POISONED and j.probe == "a" and j.score == pytest.approx(0.2)
    j, _ = verdict_module.judge_relative({"a": 0.37, "b": 0.0}, {"a": 0.22, "b": 0.0}, labels, 10, cfg)
    assert j.verdict == INCONCLUSIVE
    j, _ = verdict_module.judge_relative({"a": 0.37, "b": 0.0}, {"a": 0.22, "b": 0.0}, labels, 10,
                                         ScanConfig(relative_threshold=0.1))
    assert j.verdict == LIKELY_POISONED and j.threshold == 0.1
