"""Shared fixtures (the helpers they use live in helpers.py; import helpers from there)."""

from __future__ import annotations

import pytest
import torch

from helpers import cifar_samples, make_denoiser, read_cifar, write_tar

# 2-core CI machines: one intra-op thread per process avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar64():
    return read_cifar(64)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, cifar64):
    """Three small shards of real CIFAR-10 images: png+cls+json, jpg+cls+json, png+cls+json."""
    d = tmp_path_factory.mktemp("shards")
    write_tar(d / "part-000.tar", cifar_samples(cifar64[:12], "png"))
    write_tar(d / "part-001.tar", cifar_samples(cifar64[12:22], "jpg"))
    write_tar(d / "part-002.tar", cifar_samples(cifar64[22:30], "png"))
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_denoiser(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def scan_cifar():
    """1,200 real CIFAR-10 test images (120 per class) for the scan tests: (names, uint8 NHWC, labels)."""
    import numpy as np
    from helpers import rgb_array

    items = read_cifar(1200, split="test")
    return ([name for name, _, _ in items], np.stack([rgb_array(jpg) for _, _, jpg in items]),
            np.array([label for _, label, _ in items]))
