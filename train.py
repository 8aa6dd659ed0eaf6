"""Train one SAE per Hydra job: `python train.py`, or a sweep: `python train.py dict_ratio=1,2,4,8 -m`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep.train import train

_MULTIRUN_FLAGS = ("-m", "--multirun")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    result = train(cfg, Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.sweep.dir) if multirun else None)
    return result.metrics["fvu"]


if __name__ == "__main__":
    # Hydra's argparse takes overrides only before `-m`; let users write it anywhere on the line.
    flags = [a for a in sys.argv[1:] if a in _MULTIRUN_FLAGS]
    sys.argv = sys.argv[:1] + flags + [a for a in sys.argv[1:] if a not in _MULTIRUN_FLAGS]
    main()
