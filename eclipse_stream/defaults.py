"""Defaults with no heavy imports (the CLI reads them when it starts): the shipped denoiser,
the named purification recipes and the prefilters."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError

DEFAULT_DENOISER = "default-denoiser.safetensors"

PREFILTERS = ("none", "impulse")  # prefilter.py

# Named purification recipes: the settings a name stands for (each can still be set on its own).
# paper:  ECLIPSE as published: the full t*-step reverse chain, no prefilter.
# robust: the impulse prefilter (removes sparse large-magnitude poisons such as the one-pixel
#         shortcut), then the x0 estimate at t* (one UNet call); see docs/evaluation.md.
RECIPES = {
    "paper": {"steps": None, "prefilter": "none"},
    "robust": {"steps": 1, "prefilter": "impulse"},
}
DEFAULT_RECIPE = "robust"  # measured best on every poison of the CPU grid (docs/results/cpu-grid.md)


def default_denoiser_path() -> Path:
    """Path of the shipped default denoiser; CheckpointError if this install has none."""
    path = Path(str(resources.files("eclipse_stream") / "assets" / DEFAULT_DENOISER))
    if not path.is_file():
        raise CheckpointError(f"{path}: no default denoiser is installed; pass --denoiser "
                              f"(train one with 'eclipse-stream train')")
    return path
