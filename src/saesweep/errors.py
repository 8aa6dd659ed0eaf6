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
