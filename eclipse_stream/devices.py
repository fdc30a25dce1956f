"""Where computation runs when the user does not say: one rule for every entry point."""

from __future__ import annotations

import os

import torch

AUTO = (None, "", "auto")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None``, ``""`` or ``"auto"`` mean cuda when present, else cpu.

    Under torchrun the automatic choice is this process's GPU (``cuda:$LOCAL_RANK``).
    """
    if device not in AUTO:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
