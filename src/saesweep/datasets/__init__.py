"""Text corpora shipped with saesweep (README.md here): `${saesweep_dataset:<file>}` in a config is the
installed path of one of them, e.g. conf/eval_sets/other_sources.yaml."""

from pathlib import Path

from omegaconf import OmegaConf

from saesweep.errors import ConfigError

DATASETS_DIR = Path(__file__).parent


def shipped_dataset(file_name: str) -> str:
    """The path of a corpus shipped in this folder."""
    path = DATASETS_DIR / file_name
    if not path.is_file():
        shipped = sorted(p.name for p in DATASETS_DIR.glob("*.jsonl.gz"))
        raise ConfigError(f"${{saesweep_dataset:{file_name}}}: no such shipped corpus; allowed: {', '.join(shipped)}")
    return str(path)


OmegaConf.register_new_resolver("saesweep_dataset", shipped_dataset, replace=True)
