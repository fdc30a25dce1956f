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


class OutputError(EclipseError):
    """The output cannot be written: an unwritable or read-only folder, a full disk, an OUT in use."""


class DeviceError(EclipseError, ValueError):
    """A ``--device`` that does not exist here (or that no command can compute on); says which devices do."""

    exit_code = 2


class NumericalError(EclipseError):
    """A computation went wrong: a training loss or weights became NaN/inf, or the purifier returned no image
    (a constant one) for a real one. Nothing computed from it is written."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) asked the run to stop; finished shards are kept, a rerun resumes.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for "killed by this signal"
