"""How a scan samples, probes and judges: ``ScanConfig`` (its field defaults are the CLI's), the verdicts and
their exit statuses. No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import is_int, is_real
from ..defaults import DEFAULT_MAX_PIXELS

__all__ = ["LIKELY_POISONED", "NO_SIGN", "INCONCLUSIVE", "EXIT_CODES", "GROUP_MODES", "ScanConfig"]

LIKELY_POISONED = "likely poisoned"
NO_SIGN = "no sign of the poison types tested"
INCONCLUSIVE = "inconclusive"
#: Exit status of ``eclipse-stream scan`` per verdict; errors keep 1 (other), 2 (bad input/usage), 3 (checkpoint).
EXIT_CODES = {NO_SIGN: 0, LIKELY_POISONED: 10, INCONCLUSIVE: 11}
MIN_PER_CLASS = 4  # a class with fewer readable sampled images is left out (one per fold at most 4 folds)
#: How the input is split for the per-group scores: one group per shard, per INPUTS argument, or none.
GROUP_MODES = ("shard", "input", "none")
#: The largest probe window: features grow with its square (about 50 KB per sampled image at 32, 800 KB at 128),
#: and images smaller than the window are resized up to it.
MAX_PROBE_SIZE = 128
MAX_PER_CLASS = 100_000  # sampled images are held in memory (about 50 KB each at probe size 32)


@dataclass
class ScanConfig:
    """How a scan samples and probes. The defaults are the setting measured in docs/scan.md.

    ``probes``: None runs the default probes (``probes.DEFAULT``; ``thorough`` adds the opt-in ones).
    ``threshold`` / ``clean_below``: None uses each probe's calibrated bounds at the sample's size
    (``calibration.json``, derived from clean CIFAR-10 scores only); a number applies to every probe's score.
    ``relative_*``: the same for the excess of a probe's score over a clean reference's (calibrated: the clean
    bounds' z values times sqrt(2) times the probe's clean sd, the spread of a difference of two clean samples).
    Memory: about 50 KB per sampled image at ``probe_size`` 32 (float64 features), so lower ``per_class``
    for datasets with thousands of classes.
    """

    per_class: int = 100            # images sampled per class (fewer if a class has fewer)
    probes: tuple | None = None     # which probes run (None: the default set); the verdict uses every one
    thorough: bool = False          # also run the slower opt-in probes (a small CNN's learning dynamics)
    probe_size: int = 32            # the probes see a probe_size x probe_size view of each image
    view: str = "crop"              # crop: central window at native resolution; resize: whole image
    folds: int = 4                  # cross-validation folds (every sampled image is held out once)
    seed: int = 0                   # sampling, folds and the shuffled-label control
    device: str | None = None       # None / "auto": cuda when present, else cpu
    label_key: str | None = None    # None: first of LABEL_KEYS present
    image_key: str | None = None    # None: first image field, as purify
    max_pixels: int = DEFAULT_MAX_PIXELS
    on_error: str = "fail"          # fail | skip (a bad sampled image is recorded and left out)
    null: bool = True               # also fit each probe on shuffled labels (the no-signal curve)
    by: str = "shard"               # per-group scores: one group per shard | per input argument | none
    group_per_class: int = 50       # images per class sampled from each group (its own sample)
    max_groups: int = 32            # more shards than this: consecutive shards are grouped into this many
    threshold: float | None = None      # None: calibrated per probe and sample size; else score >= this: poisoned
    clean_below: float | None = None    # None: calibrated; else every score < this: no sign
    relative_threshold: float | None = None    # with a reference: None: calibrated; else excess >= this: poisoned
    relative_clean_below: float | None = None  # with a reference: None: calibrated; else every excess < this: no sign

    def __post_init__(self) -> None:
        from .probes import PROBES  # the registry (torch); config stays importable without it otherwise

        if not is_int(self.per_class, MIN_PER_CLASS, MAX_PER_CLASS):
            raise ValueError(f"per_class must be an integer in {MIN_PER_CLASS}..{MAX_PER_CLASS}, not {self.per_class!r}")
        if self.probes is not None:
            self.probes = tuple(self.probes)
            unknown = [p for p in self.probes if p not in PROBES]
            if unknown or not self.probes:
                raise ValueError(f"probes must be some of {', '.join(PROBES)}, not {list(self.probes)}")
        if not is_int(self.folds, 2, MIN_PER_CLASS):
            raise ValueError(f"folds must be between 2 and {MIN_PER_CLASS}, not {self.folds!r}")
        if self.view not in ("crop", "resize"):
            raise ValueError(f"view must be 'crop' or 'resize', not {self.view!r}")
        if not is_int(self.probe_size, 8, MAX_PROBE_SIZE):
            raise ValueError(f"probe_size must be in 8..{MAX_PROBE_SIZE} (its square sizes the features), "
                             f"not {self.probe_size!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if not is_int(self.max_pixels, 1):
            raise ValueError(f"max_pixels must be positive, not {self.max_pixels!r}")
        if self.by not in GROUP_MODES:
            raise ValueError(f"by must be one of {', '.join(GROUP_MODES)}, not {self.by!r}")
        if not is_int(self.group_per_class, MIN_PER_CLASS, MAX_PER_CLASS):
            raise ValueError(f"group_per_class must be an integer in {MIN_PER_CLASS}..{MAX_PER_CLASS}, "
                             f"not {self.group_per_class!r}")
        if not is_int(self.max_groups, 1, 10_000):
            raise ValueError(f"max_groups must be an integer in 1..10000, not {self.max_groups!r}")
        for name in ("threshold", "clean_below", "relative_threshold", "relative_clean_below"):
            value = getattr(self, name)
            if value is not None and not is_real(value, 0.0, 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], not {value!r}")
        if self.threshold is not None and self.clean_below is not None and self.clean_below > self.threshold:
            raise ValueError("the 'clean below' bounds must not exceed the thresholds")
        if (self.relative_threshold is not None and self.relative_clean_below is not None
                and self.relative_clean_below > self.relative_threshold):
            raise ValueError("the 'clean below' bounds must not exceed the thresholds")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        from ..devices import AUTO, resolve_device

        if self.device not in AUTO:
            resolve_device(self.device)  # an unknown or absent device is refused before any shard is read

    def probe_names(self) -> tuple[str, ...]:
        """The probes this scan runs."""
        from .probes import DEFAULT, THOROUGH

        if self.probes is not None:
            return self.probes
        return DEFAULT + (THOROUGH if self.thorough else ())
