"""Errors that users see. Each says what is wrong, where (file, sample) and what to do."""


class EclipseError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""

    exit_code = 1


class InputError(EclipseError):
    """Bad input data: a missing folder, a corrupt shard, an undecodable sample."""

    exit_code = 2


class CheckpointError(EclipseError):
    """A denoiser or training-state file that is missing, truncated, foreign or inconsistent."""

    exit_code = 3


class SampleError(InputError):
    """One sample could not be used; ``--on-error skip`` records these and goes on."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(f"{shard}: sample {key!r}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


class ShardError(InputError):
    """A whole shard cannot be read (truncated or corrupt container)."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"{shard}: {reason}")
        self.shard, self.reason = shard, reason
