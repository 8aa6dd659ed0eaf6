"""The quick start (`make sweep`): where its model and text come from, its sweep, and its table.

    python -m saesweep.quickstart [--reference DIR] [OVERRIDE ...]

- With a reference folder (`--reference DIR`, `make sweep REFERENCE=DIR`; default ../shared/reference:
  `model/`, a local Hugging Face model directory, and `corpus/train.jsonl.gz`, the text) it runs offline
  on them.
- Without one, it runs the seed experiment's own setup: Pythia-70M-deduped and NeelNanda/pile-10k from
  the Hugging Face hub.
- With neither (no reference folder, and HF_HUB_OFFLINE=1 or the hub out of reach) it stops at once
  with one line that says both ways.

The recipe is conf/experiment/quickstart.yaml. After training, the sweep is evaluated (evaluate.py) and
one table is printed: per dictionary size its fidelity and the features found again in the next larger
dictionary, with chance beside them, then whether they rise with size. OVERRIDEs go to train.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from saesweep.errors import SaesweepError
from saesweep.hub import hub_reachable, offline_mode

DEFAULT_REFERENCE = Path("../shared/reference")
REFERENCE_MODEL = "model"  # inside the reference folder: a Hugging Face model directory
REFERENCE_CORPUS = "corpus/train.jsonl.gz"  # inside the reference folder: one JSON object per line, a "text" field
HUB_MODEL = "EleutherAI/pythia-70m-deduped"
HUB_DATA = "NeelNanda/pile-10k"
EXPERIMENT = "experiment=quickstart"
FOUND_THRESHOLD = 0.9  # evaluate.py's default found_threshold

HEADER = ("dict_ratio", "d_sae", "L0", "FVU", "ce_recovered",
          f"found again in the next larger (MCS ≥ {FOUND_THRESHOLD:g})", "chance")


class NoSourceError(SaesweepError):
    """Neither a reference folder nor the Hugging Face hub is there to run the quick start on."""


@dataclass(frozen=True)
class Source:
    """Where the quick start's model and text come from: the train.py overrides that say so, and the
    environment the run needs."""

    name: str  # "reference" or "hub"
    description: str
    overrides: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def reference_files(reference: Path) -> tuple[Path, Path] | None:
    """The model directory and corpus of a reference folder, or None when it does not hold both."""
    model, corpus = reference / REFERENCE_MODEL, reference / REFERENCE_CORPUS
    return (model, corpus) if (model / "config.json").is_file() and corpus.is_file() else None


def neither_message(reference: Path, offline: bool) -> str:
    hub = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face hub is not reachable"
    return (
        f"no reference folder at {reference} and {hub}: either pass REFERENCE=DIR, a folder with "
        f"{REFERENCE_MODEL}/ (a Hugging Face model directory) and {REFERENCE_CORPUS} (the text), or run with the "
        f"network (HF_HUB_OFFLINE unset) to use {HUB_MODEL} and {HUB_DATA} from the hub"
    )


def choose_source(
    reference: Path = DEFAULT_REFERENCE,
    explicit: bool = False,
    offline: bool | None = None,
    reachable: Callable[[], bool] = hub_reachable,
) -> Source:
    """The reference folder when it holds a model and a corpus; else the hub when it can be reached; else
    NoSourceError with one line saying both ways. `explicit`: the user named the folder, so a folder that
    is not one is an error, not a reason to download from the hub."""
    files = reference_files(reference)
    if files:
        model, corpus = files
        return Source(
            "reference",
            f"the reference folder {reference} (offline): {model}, {corpus}",
            (f"model.path={model}", "data=jsonl", f"data.path={corpus}"),
            {"HF_HUB_OFFLINE": "1"},
        )
    if explicit:
        raise NoSourceError(
            f"REFERENCE={reference} is not a reference folder: it needs {REFERENCE_MODEL}/ (a Hugging Face model "
            f"directory with its config.json) and {REFERENCE_CORPUS}"
        )
    offline = offline_mode() if offline is None else offline
    if offline or not reachable():
        raise NoSourceError(neither_message(reference, offline))
    return Source("hub", f"the Hugging Face hub: {HUB_MODEL} and {HUB_DATA} (no reference folder at {reference})")


def sweep_dir_of(overrides: Sequence[str], now: datetime | None = None) -> tuple[Path, list[str]]:
    """The sweep directory (the user's `hydra.sweep.dir=` or a new one under multirun/quickstart/) and the
    overrides that pin it."""
    for override in overrides:
        if override.startswith("hydra.sweep.dir="):
            return Path(override.split("=", 1)[1]), list(overrides)
    path = Path("multirun/quickstart") / (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    return path, [*overrides, f"hydra.sweep.dir={path}"]


def train_command(source: Source, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, "train.py", EXPERIMENT, *source.overrides, *overrides, "-m"]


# --- the table ---------------------------------------------------------------------------------------

def _with_se(value: float | None, se: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def setting(run) -> str:
    """What a run is beyond its size: architecture, its sparsity key and the RNG seed (`relu_l1 l1=2 s0`)."""
    values = run.values
    key = (f"k{values['k']}" if values.get("k") not in (None, "", "None") else
           f"l0={values['sae.l0_coef']}" if values.get("sae.l0_coef") not in (None, "", "None") else
           f"l1={values['l1_coef']}" if values.get("l1_coef") not in (None, "", "None") else "")
    return " ".join(part for part in (values.get("architecture", "?"), key, f"s{run.seed}") if part)


def lines_of_sizes(runs) -> dict[str, list]:
    """The runs by setting, each setting's dictionaries smallest first: the lines along which found again and
    fidelity should rise (one, unless the user swept seeds or architectures too)."""
    lines: dict[str, list] = {}
    for r in runs:
        lines.setdefault(setting(r), []).append(r)
    return {name: sorted(members, key=lambda r: r.dict_ratio) for name, members in lines.items()}


def _row(r) -> list[str]:
    found = r.number("found_in_next_larger")
    again = "–" if found is None else f"{int(found)} ({found / r.d_sae:.1%})"
    chance = "–" if found is None else str(int(r.number("baseline_found_in_next_larger") or 0))
    return [f"{r.dict_ratio:g}", str(r.d_sae), _with_se(r.number("l0"), r.number("l0_se"), 1),
            _with_se(r.number("fvu"), r.number("fvu_se"), 4),
            _with_se(r.number("ce_recovered"), r.number("ce_recovered_se"), 4), again, chance]


def _rises(values: list[float]) -> bool:
    return len(values) >= 2 and all(b > a for a, b in zip(values, values[1:]))


def verdict(lines: dict[str, list]) -> list[str]:
    """Two lines: do the features found again rise with size (beside chance), and does fidelity; along each
    setting's sizes when there are several."""
    arrow = " → ".join
    found_parts, fidelity_parts, found_ok, fidelity_ok = [], [], True, True
    for name, runs in lines.items():
        label = f"{name}: " if len(lines) > 1 else ""
        counted = [r for r in runs if r.number("found_in_next_larger") is not None]
        found = [r.number("found_in_next_larger") for r in counted]
        chance = [r.number("baseline_found_in_next_larger") or 0 for r in counted]
        fvu = [r.number("fvu") for r in runs]
        ce = [r.number("ce_recovered") for r in runs]
        found_ok &= _rises(found)
        fidelity_ok &= _rises([-f for f in fvu]) and _rises(ce)
        found_parts.append(f"{label}{arrow(str(int(f)) for f in found)}; chance {arrow(str(int(c)) for c in chance)}")
        fidelity_parts.append(f"{label}FVU {arrow(f'{f:.3f}' for f in fvu)}; ce_recovered {arrow(f'{c:.3f}' for c in ce)}")
    return [f"features found again rise with size: {'yes' if found_ok else 'no'} ({' | '.join(found_parts)})",
            f"fidelity rises with size: {'yes' if fidelity_ok else 'no'} ({' | '.join(fidelity_parts)})"]


def format_table(runs) -> str:
    """The quick start's table: a header, one row per dictionary (with a `setting` column first when the sweep
    has several settings of size lines), and the verdict."""
    lines = lines_of_sizes(runs)
    several = len(lines) > 1
    header = (["setting"] if several else []) + list(HEADER)
    table = [header] + [([name] if several else []) + _row(r) for name, members in lines.items() for r in members]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    rows = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join(rows + verdict(lines))


# --- the run -----------------------------------------------------------------------------------------

def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def run(source: Source, overrides: Sequence[str], python: str = sys.executable) -> int:
    from saesweep.reproduction import read_evaluation

    if not Path("train.py").is_file():
        print("error: run the quick start from the repository root (where train.py is): make sweep", file=sys.stderr)
        return 2
    started = time.monotonic()
    sweep_dir, overrides = sweep_dir_of(overrides)
    env = os.environ | source.env
    print(f"quick start on {source.description}\n  → {sweep_dir}", flush=True)
    trained = subprocess.run(train_command(source, overrides, python), env=env)
    if trained.returncode != 0:
        return trained.returncode
    print(f"evaluating {sweep_dir} (MCS between the dictionaries, plots, summary.csv) ...", flush=True)
    evaluated = subprocess.run([python, "evaluate.py", f"sweep_dir={sweep_dir}"], env=env, capture_output=True, text=True)
    if evaluated.returncode != 0:
        sys.stderr.write(evaluated.stdout[-3000:] + evaluated.stderr[-3000:])
        return evaluated.returncode
    try:
        _, runs = read_evaluation(sweep_dir)
    except SaesweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runs = sorted(runs, key=lambda r: (r.dict_ratio, r.seed, r.name))
    print(f"\n{sweep_dir}: held-out fidelity and features found again\n{format_table(runs)}")
    print(f"plots and tables: {sweep_dir}/evaluation/; W&B runs (offline): {sweep_dir}/*/wandb/ "
          f"(`wandb sync` to upload); quick start took {_minutes(time.monotonic() - started)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saesweep.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help=f"a reference folder: {REFERENCE_MODEL}/ and {REFERENCE_CORPUS} (default {DEFAULT_REFERENCE})")
    parser.add_argument("--explicit-reference", action="store_true",
                        help="the folder was named by the user: if it is not a reference folder, stop rather than use the hub")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. seed=1 n_tokens=400000")
    args = parser.parse_args(argv)
    try:
        source = choose_source(args.reference, explicit=args.explicit_reference)
    except NoSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run(source, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
