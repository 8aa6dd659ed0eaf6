"""The project's own error types: every bad input ends in one of these, with a message that names
the bad value and what is allowed."""


class SaesweepError(Exception):
    """Base class of every error saesweep raises on purpose."""


class ConfigError(SaesweepError, ValueError):
    """A configuration value is invalid."""


class ModelLoadError(SaesweepError):
    """The language model could not be loaded."""


class DataError(SaesweepError):
    """The text dataset is missing, empty or malformed."""


class CheckpointError(SaesweepError):
    """A saved SAE, run directory or checkpoint is missing, corrupt or inconsistent."""


class TrainingDivergedError(SaesweepError):
    """Too many consecutive training steps had NaN/Inf activations or loss."""


class JobStopped(BaseException):
    """A scheduler's signal (SIGTERM, SIGUSR1) stopped the job after it wrote a checkpoint.

    Not an Exception, as KeyboardInterrupt is not: Hydra's launchers catch every Exception of a job
    and go on to the next, and a stopped sweep must stop. The process exits with `exit_code`, the
    shell's code for a process killed by the signal (143 for SIGTERM).
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
