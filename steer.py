"""Steer a run's model with one of its features: `python steer.py run_dir=RUN feature=N strength=S
prompts='["..."]'` (see conf/steer.yaml and src/saesweep/steering.py)."""

import hydra
from omegaconf import DictConfig

from saesweep.cli import errors_without_traceback
from saesweep.console import quiet_third_party
from saesweep.steering import steer_from_config

quiet_third_party()  # known third-party console noise off (SAESWEEP_VERBOSE=1 shows it)


@hydra.main(version_base="1.3", config_path="conf", config_name="steer")
@errors_without_traceback
def main(cfg: DictConfig) -> None:
    steer_from_config(cfg)


if __name__ == "__main__":
    main()
