"""eclipse-stream: ECLIPSE purification of poisoned image data as a WebDataset/FFCV pipeline stage.

The public API::

    from eclipse_stream import (
        load_denoiser, save_denoiser, Denoiser,          # checkpoints (safetensors + JSON metadata)
        GaussianDiffusion, DiffusionConfig,              # the improved-DDPM schedule and chain
        UNet, UNetConfig, preset_config,                 # the denoiser network and its presets
        Purifier, PurifierConfig,                        # nn.Module: purify image batches
        RandomCorruption, corrupt, corrupt_samples,      # corruption compensation
        EclipseTransform,                                # WebDataset pipeline stage
        PurifyConfig, purify_shards,                     # shards in -> shards out
        TrainConfig, train,                              # fit the denoiser on a sparse clean set
        ScanConfig, ScanResult, scan_shards, scan_samples, scan_arrays,  # does a dataset look poisoned?
    )
"""

__version__ = "0.1.0"

from .checkpoint import Denoiser, load_denoiser, save_denoiser  # noqa: E402
from .corruption import RandomCorruption, corrupt, corrupt_samples  # noqa: E402
from .diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from .pipeline import PurifyConfig, purify_shards  # noqa: E402
from .purifier import Purifier, PurifierConfig  # noqa: E402
from .scan import ScanConfig, ScanResult, scan_arrays, scan_samples, scan_shards  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .transform import EclipseTransform  # noqa: E402
from .unet import UNet, UNetConfig, preset_config  # noqa: E402

__all__ = [
    "Denoiser", "load_denoiser", "save_denoiser", "RandomCorruption", "corrupt", "corrupt_samples",
    "DiffusionConfig", "GaussianDiffusion", "PurifyConfig", "purify_shards", "Purifier", "PurifierConfig",
    "TrainConfig", "train", "EclipseTransform", "ScanConfig", "ScanResult", "scan_shards", "scan_samples",
    "scan_arrays", "UNet", "UNetConfig", "preset_config", "__version__",
]
