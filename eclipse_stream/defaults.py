"""The denoiser shipped inside the package (the default for purify and preview)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError

DEFAULT_DENOISER = "default-denoiser.safetensors"


def default_denoiser_path() -> Path:
    """Path of the shipped default denoiser; CheckpointError if this install has none."""
    path = Path(str(resources.files("eclipse_stream") / "assets" / DEFAULT_DENOISER))
    if not path.is_file():
        raise CheckpointError(f"{path}: no default denoiser is installed; pass --denoiser "
                              f"(train one with 'eclipse-stream train')")
    return path
