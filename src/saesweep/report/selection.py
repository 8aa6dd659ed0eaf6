"""Which features get a report, and how each compares with the other runs of its sweep (MCS)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saesweep.errors import ConfigError
from saesweep.evaluate import mcs
from saesweep.evaluate.cosines import matching
from saesweep.evaluate.layers import residual_order
from saesweep.rundir import load_run_config, load_sae
from saesweep.sae import Sae

from .settings import ReportSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerMatches:
    """A run of the sweep at another residual hook point of the same model: each feature's one-to-one
    (Hungarian) match among its features by decoder cosine (saesweep.evaluate.layers)."""

    run: str  # named by its path inside the sweep
    relative_dir: str  # that run's directory, relative to this run's
    hook_point: str
    index: np.ndarray  # [d_sae]: the matched feature there (-1: unmatched)
    cosine: np.ndarray  # [d_sae]: the cosine of the match (NaN: unmatched)


@dataclass(frozen=True)
class SweepComparison:
    run_names: list[str]  # the other runs, named by their path inside the sweep
    mcs: torch.Tensor  # [n_runs, d_sae]: each feature's max cosine similarity with the decoder of each run
    skipped: list[str]  # runs that cannot be compared, with the reason
    layers: tuple[LayerMatches, ...] = ()  # the runs at other residual hook points of the same model

    @property
    def best(self) -> torch.Tensor:
        """[d_sae]: the highest MCS of each feature against any other run."""
        return self.mcs.max(dim=0).values


_COMPARABLE_KEYS = ("hook_point", "d_in", "model_name", "model_path")


def compare_with_sweep(run_dir: Path, sae: Sae, sweep_run_dirs: list[Path]) -> SweepComparison | None:
    """MCS of every feature of `sae` against each other run of the sweep that reads the same model
    and hook point, and its match in each run at another residual hook point of that model; None when
    the sweep has no other run."""
    run_dir = Path(run_dir).resolve()
    others = [Path(d).resolve() for d in sweep_run_dirs if Path(d).resolve() != run_dir]
    if not others:
        return None
    root = Path(os.path.commonpath([run_dir, *others]))
    own_cfg = load_run_config(run_dir)
    names, rows, skipped, layers = [], [], [], []
    for other in others:
        name = str(other.relative_to(root)) if other != root else other.name
        cfg = load_run_config(other)
        differing = [k for k in _COMPARABLE_KEYS if cfg.get(k) != own_cfg.get(k)]
        if differing == ["hook_point"] and None not in (residual_order(cfg["hook_point"]), residual_order(own_cfg["hook_point"])):
            index, cosine = matching(sae.W_dec.detach(), load_sae(other).W_dec.detach()).per_row(sae.d_sae)
            layers.append(LayerMatches(name, Path(os.path.relpath(other, run_dir)).as_posix(), cfg["hook_point"], index, cosine))
            continue
        if differing:
            skipped.append(f"{name}: different {', '.join(differing)}")
            continue
        decoder = load_sae(other, device=sae.W_dec.device).W_dec.detach()
        rows.append(mcs(sae.W_dec.detach(), decoder).cpu())
        names.append(f"{name} (d_sae={cfg['d_sae']})")
    for reason in skipped:
        log.info("not compared with run %s", reason)
    mcs_rows = torch.stack(rows) if rows else torch.empty(0, sae.d_sae)
    return SweepComparison(names, mcs_rows, skipped, tuple(layers))


def check_feature_ids(settings: ReportSettings, d_sae: int) -> None:
    """Explicit feature ids must exist in the dictionary (checked before any expensive work)."""
    bad = [f for f in settings.features or () if not 0 <= f < d_sae]
    if bad:
        raise ConfigError(
            f"feature id {bad[0]} is out of range: this dictionary has features 0..{d_sae - 1}"
            + (f" (other bad ids: {bad[1:]})" if len(bad) > 1 else "")
        )


def select_features(
    settings: ReportSettings,
    d_sae: int,
    frequency: torch.Tensor,
    sweep: SweepComparison | None,
) -> tuple[str, list[int]]:
    """The selection in force and the feature ids in the order their pages are listed (see
    ReportSettings.selection)."""
    selection = settings.resolved_selection(in_sweep=sweep is not None and bool(sweep.run_names))
    features = _select(selection, settings, d_sae, frequency, sweep)
    if not features and settings.selection is None and selection == "found_again":
        # the default for a run of a sweep; a run with nothing found again still gets a report
        log.info("no feature is found again in the sweep at MCS ≥ %g: a random sample of alive features instead",
                 settings.found_threshold)
        selection = "random"
        features = _select(selection, settings, d_sae, frequency, sweep)
    return selection, features


def _select(
    selection: str, settings: ReportSettings, d_sae: int, frequency: torch.Tensor, sweep: SweepComparison | None
) -> list[int]:
    if selection == "explicit":
        check_feature_ids(settings, d_sae)
        return list(dict.fromkeys(settings.features))  # drop repeats, keep the order given
    if selection == "frequent":
        # stable sort: among equally frequent features the lower id comes first
        order = torch.sort(frequency, descending=True, stable=True).indices
        return order[: settings.top_n].tolist()
    if selection == "random":
        # dead features have nothing to show, and the densest are rarely readable: the sample is drawn from
        # the alive ones (frequency within [alive_min_frequency, alive_max_frequency], never 0)
        alive = ((frequency > 0) & (frequency >= settings.alive_min_frequency)
                 & (frequency <= settings.alive_max_frequency)).nonzero().squeeze(1)
        if len(alive) == 0:
            alive = (frequency > 0).nonzero().squeeze(1)
            log.warning(
                "no feature fires on between %g and %g of the held-out tokens (report.alive_min_frequency, "
                "alive_max_frequency); sampling from all %d that fire", settings.alive_min_frequency,
                settings.alive_max_frequency, len(alive),
            )
        generator = torch.Generator().manual_seed(settings.seed)
        return sorted(alive[torch.randperm(len(alive), generator=generator)[: settings.top_n]].tolist())
    # found_again
    if sweep is None or not sweep.run_names:
        raise ConfigError(
            "report.selection=found_again needs other runs of the sweep to compare with: "
            "set report.sweep_dir (a sweep with other runs of the same model and hook point)"
        )
    best = sweep.best
    found = (best >= settings.found_threshold).nonzero().squeeze(1)
    order = torch.sort(best[found], descending=True, stable=True).indices
    return found[order][: settings.top_n].tolist()
