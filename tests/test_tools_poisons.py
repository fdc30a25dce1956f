"""tools.poisons: budgets respected on the stored images, keys/labels/layout preserved, EM/TAP run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tools.common import ToolError, default_data_dir, read_json, read_split
from tools.poisons import POISONS
from tools.poisons.base import LSP_L2, Budget, measure, quantize, within
from tools.poisons.driver import NORMS, poison_split
from tools.prepare import prepare

DATA = default_data_dir()
PER_CLASS = 20


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("poison") / "clean"
    prepare(None, out, limit_per_class=PER_CLASS, shard_size=64, beton=False)
    return out / "train"


def _check_poisoned(clean_dir, out_dir, kind):
    keys, images, labels = read_split(clean_dir)
    p_keys, p_images, p_labels = read_split(out_dir)
    assert p_keys == keys and np.array_equal(p_labels, labels)
    assert sorted(p.name for p in out_dir.glob("*.tar")) == sorted(p.name for p in clean_dir.glob("*.tar"))
    norms = read_json(out_dir / NORMS)
    assert norms == {**norms, **measure(images, p_images)}, "norms.json must describe the stored images"
    assert within(norms, POISONS[kind].BUDGET)
    assert not np.array_equal(p_images, images)
    return norms, images, p_images, labels


@pytest.mark.parametrize("kind", ["urp", "lsp", "ar", "ops"])
def test_cheap_poisons_budget_keys_labels(clean, tmp_path, kind):
    out = tmp_path / kind
    poison_split(kind, clean, out, seed=0, log=lambda m: None)
    norms, images, poisoned, labels = _check_poisoned(clean, out, kind)
    diff = poisoned.astype(int) - images.astype(int)
    if kind == "urp":
        assert norms["linf_max_255"] == 8
        # class-wise: wherever no clipping happened, images of a class share one pattern
        a, b = np.flatnonzero(labels == 3)[:2]
        free = (images[a] >= 8) & (images[a] <= 247) & (images[b] >= 8) & (images[b] <= 247)
        assert np.array_equal(diff[a][free], diff[b][free])
    elif kind == "lsp":
        assert norms["l2_max"] <= LSP_L2 + 1e-9 and norms["l2_mean"] > 0.8 * LSP_L2
    elif kind == "ar":
        assert norms["l2_max"] <= 1.0 + 1e-9 and norms["l2_mean"] > 0.7
    elif kind == "ops":
        assert norms["l0_pixels_max"] == 1
        changed = np.abs(diff).max(-1).reshape(len(diff), -1).argmax(1)
        for c in range(10):  # one position per class
            members = np.flatnonzero(labels == c)
            moved = members[np.abs(diff[members]).reshape(len(members), -1).max(1) > 0]
            assert len(set(changed[moved].tolist())) <= 1


def test_lsp_patches_and_linear_separability():
    """Yu et al.'s construction: 8x8-constant patches, L2 = sqrt(3072)*6/255, linearly separable by class."""
    from sklearn.svm import LinearSVC

    from tools.poisons import lsp

    labels = np.repeat(np.arange(10), 30)
    delta = lsp.generate(np.zeros((300, 32, 32, 3), np.uint8), labels, seed=0)
    assert math.isclose(LSP_L2, math.sqrt(3072) * 6 / 255)
    np.testing.assert_allclose(np.linalg.norm(delta.reshape(300, -1), axis=1), LSP_L2, rtol=1e-5)
    blocks = delta.reshape(300, 4, 8, 4, 8, 3)
    assert np.allclose(blocks, blocks[:, :, :1, :, :1, :])
    assert LinearSVC(max_iter=5000).fit(delta.reshape(300, -1), labels).score(delta.reshape(300, -1), labels) == 1.0


def test_ar_own_filter_annihilates_own_signal():
    """An AR signal gives (near) zero response to its own process's filter and a large one to others'."""
    import torch.nn.functional as F

    from tools.poisons import ar

    coeffs = ar.find_processes(10, seed=0)
    start = torch.randn((1, 3, ar.CANVAS, ar.CANVAS), generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    signal = ar.ar_signals(torch.tensor(coeffs[:1]), start)[:, :, ar.CROP:, ar.CROP:]
    signal = signal / signal.norm()
    own = F.conv2d(signal, ar._filter(coeffs[0])).abs().max().item()
    other = min(F.relu(F.conv2d(signal, ar._filter(c))).sum().item() for c in coeffs[1:])
    assert own < 1e-9 and other > 1.0


def test_rerun_skips_finished_split(clean, tmp_path):
    first = poison_split("urp", clean, tmp_path / "urp", log=lambda m: None)
    stamp = (tmp_path / "urp" / NORMS).stat().st_mtime_ns
    assert poison_split("urp", clean, tmp_path / "urp", log=lambda m: None) == first
    assert (tmp_path / "urp" / NORMS).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("budget", [Budget("linf", 8 / 255), Budget("l2", 1.0), Budget("l2", LSP_L2)])
def test_quantize_keeps_budget_after_rounding(budget):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    delta = rng.normal(size=images.shape).astype(np.float32)
    if budget.norm == "linf":
        delta = np.clip(delta, -budget.eps, budget.eps)
    else:
        delta *= budget.eps / np.linalg.norm(delta.reshape(64, -1), axis=1)[:, None, None, None]
    norms = measure(images, quantize(images, delta, budget))
    assert within(norms, budget)
    if budget.norm == "l2":
        assert norms["l2_max"] <= budget.eps and norms["l2_mean"] > 0.9 * budget.eps


def test_em_tiny_run_respects_linf(clean, tmp_path):
    opts = {"settings": {"pgd_steps": 2, "train_steps": 1, "max_rounds": 2, "batch_size": 100, "width": 0.125}}
    out = tmp_path / "em"
    poison_split("em", clean, out, seed=0, device="cpu", options=opts, log=lambda m: None)
    norms, *_ = _check_poisoned(clean, out, "em")
    assert 0 < norms["linf_max_255"] <= 8
    assert (tmp_path / "em.em-state.pt").is_file()  # resumable progress


def test_tap_tiny_run_respects_linf(clean, tmp_path):
    opts = {"settings": {"steps": 2, "batch_size": 100}, "surrogate_width": 0.125, "surrogate_epochs": 1}
    out = tmp_path / "tap"
    poison_split("tap", clean, out, seed=0, device="cpu", options=opts, log=lambda m: None)
    norms, *_ = _check_poisoned(clean, out, "tap")
    assert 0 < norms["linf_max_255"] <= 8
    assert (tmp_path / "tap.surrogate.pt").is_file()


def test_tap_targets_are_a_derangement():
    from tools.poisons.tap import derangement

    perm = derangement(10, 0)
    assert sorted(perm.tolist()) == list(range(10)) and not (perm == np.arange(10)).any()


def test_em_resumes_from_state(clean, tmp_path):
    """A run stopped by its time budget continues from the saved round instead of starting over."""
    from tools.poisons import em
    from tools.poisons.pgd import PoisonIncomplete

    _, images, labels = read_split(clean)
    images, labels = images[:40], labels[:40]
    settings = em.EMSettings(pgd_steps=1, train_steps=1, max_rounds=3, batch_size=40, width=0.125,
                             stop_accuracy=2.0)
    state = tmp_path / "em-state.pt"
    with pytest.raises(PoisonIncomplete):
        em.generate(images, labels, device="cpu", settings=settings, state_path=state, max_seconds=0.0,
                    log=lambda m: None)
    assert torch.load(state, weights_only=False)["round"] == 1
    logs = []
    delta = em.generate(images, labels, device="cpu", settings=settings, state_path=state, log=logs.append)
    assert logs[0].startswith("EM: resumed after round 1") and len(logs) == 3
    assert np.abs(delta).max() <= 8 / 255 + 1e-6


def test_default_auto_device_runs_and_is_recorded(clean, tmp_path):
    # "auto" is the CLI default of `evaluate poison` and `grid`; it once crashed after the shards were written
    record = poison_split("urp", clean, tmp_path / "urp", device="auto", log=lambda m: None)
    expected = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu ("
    assert record["device"].startswith(expected)
    assert (tmp_path / "urp" / NORMS).is_file()


def test_reusing_a_split_poisoned_with_another_seed_is_refused(clean, tmp_path):
    poison_split("urp", clean, tmp_path / "urp", seed=0, log=lambda m: None)
    with pytest.raises(ToolError, match="poisoned with seed=0"):
        poison_split("urp", clean, tmp_path / "urp", seed=1, log=lambda m: None)


def test_em_trains_on_shuffled_passes_of_a_class_sorted_set():
    """EM's model must see mixed classes: sets stored class by class gave one-class batches, a model that
    only learnt the current class's bias and an EM stuck at chance accuracy."""
    from tools.poisons import em

    n, batch = 100, 20
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    y = torch.arange(n) // 10  # sorted by class, as prepare writes them
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    model.register_forward_hook(lambda m, i, o: seen.append((i[0][:, 0, 0, 0] * n).round().long()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    s = em.EMSettings(train_steps=n // batch, batch_size=batch)
    cursor = em._train_steps(model, opt, x, y, torch.zeros_like(x), 0, s, amp=False, seed=0)
    assert cursor == n
    first_pass = torch.cat(seen)
    assert sorted(first_pass.tolist()) == list(range(n))  # each sample once per pass
    assert all(len(set((b // 10).tolist())) >= 5 for b in seen)  # every batch mixes classes
    seen.clear()
    em._train_steps(model, opt, x, y, torch.zeros_like(x), cursor, s, amp=False, seed=0)
    assert not torch.equal(torch.cat(seen), first_pass)  # a new order each pass
    assert torch.equal(em._epoch_order(n, 0, 1, "cpu"), em._epoch_order(n, 0, 1, "cpu"))  # resumable
