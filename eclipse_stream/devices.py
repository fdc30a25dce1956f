"""Where computation runs: one rule for every entry point, and one check of a device the user names.

``resolve_device(None)`` (or ``""`` / ``"auto"``) is cuda when present, else cpu. A named device is checked here,
for every command alike (purify, scan, preview, train): a name PyTorch does not know (``tpu``, ``nonsense``), a
device that holds no data (``meta``), a CUDA device on a machine without CUDA or an index past the last GPU
all raise :class:`~eclipse_stream.errors.DeviceError` (exit 2) saying which devices are available here.
"""

from __future__ import annotations

import os

import torch

from .errors import DeviceError

__all__ = ["AUTO", "available_devices", "resolve_device"]

AUTO = (None, "", "auto")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def available_devices() -> list[str]:
    """The devices this process can compute on: cpu, each CUDA GPU, and mps where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | int | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device` this process can use; ``None``, ``""`` or ``"auto"`` mean cuda when
    present, else cpu. Under torchrun the automatic choice, and plain ``"cuda"``, is this process's GPU
    (``cuda:$LOCAL_RANK``). Anything else that cannot compute here raises DeviceError."""
    if device in AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank())
        return torch.device("cpu")
    here = f"devices available here: {', '.join(available_devices())}"
    shown = repr(str(device))
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {shown} is not a device PyTorch knows; {here}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {shown}: CUDA is not available here (PyTorch {torch.__version__} sees no "
                              f"CUDA GPU); {here}")
        index = _local_rank() if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {shown}: there is no cuda:{index}, this machine has {count} CUDA "
                              f"device(s); {here}")
        return torch.device("cuda", index)
    if dev.type == "mps" and "mps" in available_devices():
        return dev
    why = "holds no data, only shapes" if dev.type == "meta" else "is not available or not supported here"
    raise DeviceError(f"device {shown} {why}; {here}")
