"""Feature report of one run: `python report.py run_dir=RUN report.features=[12,345]` (see conf/report.yaml)."""

import hydra
from omegaconf import DictConfig

from saesweep.cli import errors_without_traceback
from saesweep.console import quiet_third_party
from saesweep.report.app import report_from_config

quiet_third_party()  # known third-party console noise off (SAESWEEP_VERBOSE=1 shows it)


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
@errors_without_traceback
def main(cfg: DictConfig) -> None:
    report_from_config(cfg)


if __name__ == "__main__":
    main()
