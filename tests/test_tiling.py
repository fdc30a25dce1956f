"""Large images in tiles (issue 22): the plan, the blend, the Purifier's tiled path, purify and EclipseTransform
on large images, and a SIGTERM during one large image (issue 24)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli_env, tar_members, write_tar
from PIL import Image

from eclipse_stream import EclipseTransform
from eclipse_stream.bucketing import Bucketer
from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.pipeline import PurifyConfig, purify_shards
from eclipse_stream.purifier import Purifier, PurifierConfig
from eclipse_stream.tiling import axis_plan, blended_output, plan_tiles
from eclipse_stream.unet import windowed_attention


@pytest.fixture(scope="module")
def den(tiny_ckpt):
    return load_denoiser(tiny_ckpt)  # the tiny preset at 32 px: tiles of 32..64 px, 4-px overlaps


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB image (upsampled noise plus a little grain), uint8 HWC."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)


def batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- the plan and the blend -------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [65, 68, 100, 128, 224, 333, 512, 1024])
def test_axis_plan_covers_with_overlap_and_the_fewest_pixels(length):
    tile, starts = axis_plan(length, 32, 64, 4, 4)
    assert 32 <= tile <= 64 and tile % 4 == 0
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(a + tile - b >= 4 for a, b in zip(starts, starts[1:]))  # neighbours overlap by >= 4 px
    best = min(-(-(length - 4) // (t - 4)) * t for t in range(32, 65, 4))
    assert len(starts) * tile == best


def test_an_axis_that_fits_in_one_tile_is_one_tile():
    assert axis_plan(64, 32, 64, 4, 4) == (64, [0])
    assert axis_plan(20, 32, 64, 4, 4) == (20, [0])


@pytest.mark.parametrize("size", [(100, 100), (64, 200), (224, 160), (300, 68)])
def test_the_blend_weights_sum_to_one_and_ramp_across_overlaps(size):
    plan = plan_tiles(*size, 32, 64, 4, 4)
    wy, wx = plan.weights("cpu")
    total = torch.zeros(size)
    for i, j in plan.tiles:
        y, x = plan.rows[i], plan.cols[j]
        total[y:y + plan.tile_h, x:x + plan.tile_w] += wy[i][:, None] * wx[j]
    assert torch.allclose(total, torch.ones(size), atol=1e-6)
    for w in wy[1:-1] + wx[1:-1]:  # inner tiles: rising, flat at 1, falling
        assert w[0] < w[len(w) // 2] == 1 and w[-1] < 1 and torch.all(w > 0)
    assert wy[0][0] == 1 and wx[-1][-1] == 1  # the image's own edges are not ramped


def test_blended_output_yields_every_row_once_and_bounds_each_call():
    x = torch.randn(1, 3, 200, 150)
    plan = plan_tiles(200, 150, 32, 64, 4, 4)
    calls = []

    def net(tiles, t):  # a local map, so the blend of its tiles is the map of the whole image
        calls.append(tiles.shape)
        return torch.cat([2 * tiles, tiles ** 2], dim=1)

    rows, out = [], torch.zeros(1, 6, 200, 150)
    for r0, r1, band in blended_output(net, x, torch.zeros(1), plan, batch_pixels=3 * 48 * 48):
        rows.append((r0, r1))
        out[..., r0:r1, :] = band
    assert rows[0][0] == 0 and rows[-1][1] == 200 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert len(rows) > 1  # bands go out before the whole image is done
    assert torch.allclose(out, torch.cat([2 * x, x ** 2], dim=1), atol=1e-5)
    assert all(n * h * w <= 3 * 48 * 48 for n, _, h, w in calls) and sum(n for n, *_ in calls) == len(plan.tiles)


def test_one_tile_is_the_net_on_the_whole_image(den):
    x = torch.randn(1, 3, 48, 40)
    plan = plan_tiles(48, 40, 32, 64, 4, 4)
    t = torch.full((1,), 25.0)
    (_, _, band), = blended_output(den.model, x, t, plan, batch_pixels=10**6)
    assert torch.equal(band, den.model(x.contiguous(memory_format=torch.channels_last), t))  # tiles go channels-last


def test_windowed_attention_is_attention_within_each_window():
    torch.manual_seed(0)
    for h, w in [(16, 16), (14, 14), (8, 20), (6, 11)]:
        qkv = torch.randn(2, 3 * 8, h, w)
        got = windowed_attention(qkv, 2, 8)
        for y0 in range(0, h, 8):  # the windows that own a position: [k*8, k*8+8) except the last, moved back
            for x0 in range(0, w, 8):
                ys, xs = min(y0, max(0, h - 8)), min(x0, max(0, w - 8))
                blk = qkv[..., ys:ys + min(8, h), xs:xs + min(8, w)]
                bh, bw = blk.shape[-2:]
                q, k, v = blk.reshape(2, 3, 2, 4, bh * bw).transpose(-1, -2).unbind(1)
                want = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 8, bh, bw)
                oy, ox = y0 - ys, x0 - xs  # where the owned part starts inside the window
                assert torch.allclose(got[..., y0:min(y0 + 8, h), x0:min(x0 + 8, w)],
                                      want[..., oy:oy + min(8, h - y0), ox:ox + min(8, w - x0)], atol=1e-6)


# --- the Purifier's tiled path ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(32, 32), (64, 64), (48, 24)])
def test_up_to_one_tile_tiled_is_native_bit_for_bit(den, size):
    x = batch(*(photo(*size, seed=s) for s in range(3)))
    tiled, native = Purifier(den, steps=2), Purifier(den, steps=2, large_images="native")
    assert not tiled.tiles(*size)
    assert torch.equal(tiled(x, torch.Generator().manual_seed(0)), native(x, torch.Generator().manual_seed(0)))


def test_a_tiled_image_does_not_depend_on_its_batch_and_reruns_give_the_same_bytes(den):
    p = Purifier(den)
    a, b, c = photo(100, 140, 1), photo(100, 140, 2), photo(100, 140, 3)
    assert p.tiles(100, 140)
    ab = p(batch(a, b), gens(7, 8))
    assert torch.equal(ab, p(batch(a, b), gens(7, 8)))
    ca = p(batch(c, a), gens(9, 7))
    alone = p(batch(a), gens(7))
    assert torch.equal(ab[0], ca[1]) and torch.equal(ab[0], alone[0])
    assert not torch.equal(ab[0], p(batch(a), gens(6))[0])  # the image's own seed matters


def test_tiled_purification_calls_the_unet_on_bounded_tiles_only(den):
    p = Purifier(den, tile_batch_pixels=5 * 56 * 56)
    shapes = []
    hook = p.model.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    out = p(batch(photo(200, 260)), gens(0))
    hook.remove()
    assert out.shape == (1, 3, 200, 260) and out.dtype == torch.uint8
    plan = p.plan(200, 260)
    assert sum(n for n, *_ in shapes) == len(plan.tiles) > 1
    assert all(n * h * w <= 5 * 56 * 56 and (h, w) == (plan.tile_h, plan.tile_w) for n, _, h, w in shapes)


def test_tiled_purification_denoises_like_native_and_has_no_visible_seams(den):
    """The tiny test denoiser is untrained, so this checks agreement, not quality: the tiled output stays close to
    the native one, and its difference from the native one is no larger along tile edges than inside tiles."""
    x = batch(photo(192, 192, 5))
    tiled = Purifier(den).purify(x.float() / 127.5 - 1, gens(0)[0])
    native = Purifier(den, large_images="native").purify(x.float() / 127.5 - 1, gens(0)[0])
    diff = (tiled - native).abs().mean(dim=(0, 1))
    assert diff.mean() < 0.05
    plan = Purifier(den).plan(192, 192)
    edge = torch.zeros(192, dtype=torch.bool)
    for r in plan.rows[1:]:
        edge[r:r + 2] = True
    assert diff[edge].mean() < 2 * diff[~edge].mean()


def test_the_paper_chain_runs_tiled_with_per_step_noise(den):
    p = Purifier(den, PurifierConfig.from_recipe("paper", steps=3))
    x = batch(photo(96, 130))
    a, b = p(x, gens(1)), p(x, gens(1))
    assert torch.equal(a, b) and not torch.equal(a, p(x, gens(2)))


def test_a_list_of_generators_must_match_the_batch(den):
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        Purifier(den)(batch(photo(100, 100)), gens(1, 2))


def test_tile_settings_are_checked(den):
    with pytest.raises(ValueError, match="multiple of the UNet's downsampling factor"):
        Purifier(den, tile_size=66)
    with pytest.raises(ValueError, match="overlap"):
        Purifier(den, tile_overlap=32)
    with pytest.raises(ValueError, match="large images must be one of"):
        PurifierConfig(large_images="huge")


# --- purify and EclipseTransform on large images ------------------------------------------------------------

def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _large_shard(path, sizes):
    samples = [{"__key__": f"k{i:03d}", "png": _png(photo(h, w, i)), "cls": b"1"} for i, (h, w) in enumerate(sizes)]
    return write_tar(path, samples)


SIZES = [(100, 140), (32, 32), (100, 140), (150, 90), (100, 140), (30, 40)]


def test_purify_large_images_the_same_bytes_whatever_the_batching(den, tiny_ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _large_shard(src / "a.tar", SIZES)
    outs = {}
    for name, kw in {"b1": {"batch_size": 1}, "b4": {"batch_size": 4}, "px": {"max_batch_pixels": 20000},
                     "workers": {"batch_size": 3, "workers": 1}}.items():
        cfg = PurifyConfig(purifier=PurifierConfig(steps=2), **{"workers": 0, **kw})
        purify_shards(src, tmp_path / name, tiny_ckpt, cfg, progress=False)
        outs[name] = dict(tar_members(tmp_path / name / "a.tar"))
    large = [f"k{i:03d}.png" for i, (h, w) in enumerate(SIZES) if max(h, w) > 64]
    for name in ("b4", "px", "workers"):
        assert all(outs[name][k] == outs["b1"][k] for k in large), name
    native = PurifyConfig(purifier=PurifierConfig(steps=2, large_images="native"), workers=0, batch_size=4)
    result = purify_shards(src, tmp_path / "native", tiny_ckpt, native, progress=False)
    assert result.processed[0]["config"]["purifier"]["large_images"] == "native"
    got = dict(tar_members(tmp_path / "native" / "a.tar"))
    assert all(got[k] != outs["b4"][k] for k in large)  # recorded because it changes the bytes


def test_batches_of_tiled_images_are_bounded_by_pixels_not_images():
    class It:
        def __init__(self, i):
            self.index = i

    b = Bucketer(batch_size=64, multiple=32, max_batch_pixels=64 * 256 * 256, max_pending=256,
                 tiled=(64, 64 * 32 * 32))
    out = []
    for i in range(6):
        out += list(b.add(It(i), np.zeros((100, 140, 3), np.uint8)))  # 128 x 160 padded: tiled
        out += list(b.add(It(10 + i), np.zeros((30, 30, 3), np.uint8)))  # 32 x 32: not tiled
    out += list(b.flush())
    tiled = [px for _, px in out if px.shape[-1] == 160]
    assert [len(px) for px in tiled] == [3, 3]  # 3 x 128 x 160 <= 65,536 < 4 x ...
    assert [len(px) for _, px in out if px.shape[-1] == 32] == [6]  # small images: by count, as before
    big = Bucketer(batch_size=64, multiple=32, max_batch_pixels=10**9, max_pending=256, tiled=(64, 65536))
    (items, px), = big.add(It(0), np.zeros((300, 300, 3), np.uint8))  # larger than the bound: alone
    assert len(items) == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("ffcv") is None, reason="ffcv is not installed")
def test_purify_large_images_in_a_beton(den, tiny_ckpt, tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = [photo(h, w, i) for i, (h, w) in enumerate(SIZES)]

    class Rows:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i

    src = tmp_path / "in"
    src.mkdir()
    DatasetWriter(str(src / "c.beton"), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Rows())
    for bs in (1, 4):
        cfg = PurifyConfig(purifier=PurifierConfig(steps=2), batch_size=bs, workers=0)
        purify_shards(src, tmp_path / f"out{bs}", tiny_ckpt, cfg, progress=False)
    from eclipse_stream.formats import ReadPolicy, format_for

    def pixels(name):
        path = tmp_path / name / "c.beton"
        return [rec.images[0].rgb for rec in format_for(path).records(str(path), ReadPolicy())]

    one, four = pixels("out1"), pixels("out4")
    for a, b, img in zip(one, four, images):
        assert a.shape == img.shape and 0 < np.abs(a.astype(int) - img).mean() < 20
        if max(img.shape[:2]) > 64:  # tiled: its own noise, whatever its batch (small ones share their batch's)
            assert np.array_equal(a, b)


def test_eclipse_transform_large_images_do_not_depend_on_batch_size(tiny_ckpt):
    samples = [{"__key__": f"s{i}", "png": Image.fromarray(photo(h, w, i)), "cls": i} for i, (h, w) in enumerate(SIZES)]
    runs = [list(EclipseTransform(tiny_ckpt, steps=2, batch_size=bs, device="cpu", seed=3)(iter(samples)))
            for bs in (1, 2, 6)]
    for i, (h, w) in enumerate(SIZES):
        got = [np.asarray(r[i]["png"]) for r in runs]
        assert got[0].shape == (h, w, 3)
        if max(h, w) > 64:
            assert all(np.array_equal(got[0], g) for g in got[1:]), i
    again = list(EclipseTransform(tiny_ckpt, steps=2, batch_size=2, device="cpu", seed=3)(iter(samples)))
    assert all(np.array_equal(np.asarray(a["png"]), np.asarray(b["png"])) for a, b in zip(runs[1], again))


# --- issue 24: SIGTERM during one large image ---------------------------------------------------------------

def test_sigterm_during_a_large_image_stops_within_seconds_and_leaves_nothing(tiny_ckpt, tmp_path):
    """One 2000 x 2000 image takes minutes on one CPU thread; in tiles the UNet is called on small pieces, so a
    SIGTERM is honoured between two calls (the bound below is a hang guard, not a timing)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    buf = io.BytesIO()
    Image.fromarray(photo(2000, 2000)).save(buf, format="JPEG", quality=90)
    write_tar(src / "big.tar", [{"__key__": "big", "jpg": buf.getvalue(), "cls": b"0"}])
    proc = subprocess.Popen([sys.executable, "-m", "eclipse_stream.cli", "purify", str(src), str(out),
                             "-d", str(tiny_ckpt), "--workers", "1", "-q"], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".*.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(4)  # decoded and into the purifier by now
    assert proc.poll() is None, "purify finished before the signal: make the image larger"
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert time.time() - start < 60
    assert not out.exists()  # no partial file, no shard, no stats, no lock: the OUT it made is removed again
