"""saesweep: config-driven sweeps of sparse autoencoders on transformer activations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saesweep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

import saesweep.datasets  # noqa: E402, F401  (registers the ${saesweep_dataset:...} config resolver)
from saesweep.errors import CheckpointError, ConfigError, DataError, ModelLoadError, SaesweepError  # noqa: E402
from saesweep.rundir import load_run_config, load_sae  # noqa: E402
from saesweep.sae import ARCHITECTURES, ReluSae, Sae, SaeOutput  # noqa: E402
from saesweep.steering import steer  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "ARCHITECTURES",
    "ReluSae",
    "Sae",
    "SaeOutput",
    "SaesweepError",
    "__version__",
    "load_run_config",
    "load_sae",
    "steer",
]
