"""The recipe grid of each architecture, read from a sweep trained with saesweep's own machinery and evaluated:
per architecture and recipe, the mean over seeds (± half their spread) of L0, FVU, ce_recovered and silent
latents on every held-out set, and the share of features found again by the other seed; of the recipes
whose L0 is within ±10 % of the runs' target L0 (a matched comparison), the one with the lowest FVU averaged
over the held-out sets is marked. With several sweeps, their runs form one grid; where one of them trained the
plain recipe of Gao et al. (lr 2e-3, no warm-up, no decay, no clip, AuxK's dead window 200k tokens:
`benchmarks/plain_topk.py` as a saesweep recipe), each architecture's own recipe (conf/sae/NAME.yaml) is
compared with it on every held-out set. Prints the tables and a `RESULT` line.

The grid of benchmarks/RESULTS.md ("Recipes per architecture"), about 85 minutes on 2 CPU cores:
    python train.py -m model.path=../shared/reference/model data=jsonl \\
        data.path=../shared/reference/corpus/train.jsonl.gz \\
        sae=relu_l1,topk,batchtopk,jumprelu,matryoshka_batchtopk,gated sae.target_l0=32 \\
        sae.recipe.lr=3e-3,2e-3 sae.recipe.grad_clip_norm=1.0,null seed=0,1 train.ensemble=true \\
        eval_sets=other_sources eval.every_n_steps=100000 hydra.sweep.dir=multirun/recipes
    python evaluate.py sweep_dir=multirun/recipes
    python benchmarks/recipes.py multirun/recipes

The plain recipe on every architecture (two seeds, about 25 minutes), then both grids together:
    python train.py -m model.path=../shared/reference/model data=jsonl \\
        data.path=../shared/reference/corpus/train.jsonl.gz \\
        sae=relu_l1,topk,batchtopk,jumprelu,matryoshka_batchtopk,gated sae.target_l0=32 sae.recipe.lr=2e-3 \\
        sae.recipe.lr_warmup_steps=0 sae.recipe.lr_decay_fraction=0 sae.recipe.grad_clip_norm=null \\
        train.dead_window_tokens=200000 seed=0,1 train.ensemble=true eval_sets=other_sources \\
        eval.every_n_steps=100000 hydra.sweep.dir=multirun/plain_recipe
    python evaluate.py sweep_dir=multirun/plain_recipe
    python benchmarks/recipes.py multirun/recipes multirun/plain_recipe
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from saesweep.recipe import Recipe

METRICS = ("l0", "fvu", "ce_recovered", "dead_fraction")


CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_DEAD_WINDOW = OmegaConf.load(CONF / "config.yaml").train.dead_window_tokens
PLAIN = {"lr": 2e-3, "lr_warmup_steps": 0, "lr_decay_fraction": 0, "grad_clip_norm": None}, 200_000


def recipe_label(recipe: dict, dead_window: int = DEFAULT_DEAD_WINDOW, init: float | None = None,
                 resample: int | None = None) -> str:
    """`init`: the encoder's initial norm where it is not the architecture's default; `resample`: the
    resampling interval in tokens, if any."""
    return ", ".join(label for label, _ in _recipe_parts(recipe, dead_window, init, resample))


def recipe_key(recipe: dict, dead_window: int = DEFAULT_DEAD_WINDOW, init: float | None = None,
               resample: int | None = None) -> str:
    return "_".join(key for _, key in _recipe_parts(recipe, dead_window, init, resample))


def _recipe_parts(recipe: dict, dead_window: int, init: float | None, resample: int | None) -> list[tuple[str, str]]:
    """Each knob of a recipe as (its words in a label, its part of a key); the last three only where set."""
    clip = "none" if recipe["grad_clip_norm"] is None else f"{recipe['grad_clip_norm']:g}"
    parts = [(f"lr {recipe['lr']:g}", f"lr{recipe['lr']:g}"),
             (f"warm-up {recipe['lr_warmup_steps']}", f"w{recipe['lr_warmup_steps']}"),
             (f"decay {recipe['lr_decay_fraction']:g}", f"d{recipe['lr_decay_fraction']:g}"),
             (f"clip {clip}", f"clip{clip}")]
    if dead_window != DEFAULT_DEAD_WINDOW:
        parts.append((f"dead window {dead_window // 1000}k", f"dw{dead_window // 1000}k"))
    if init is not None:
        parts.append((f"encoder init {init:g}", f"init{init:g}"))
    if resample:
        parts.append((f"resampled every {resample // 1000}k", f"rs{resample // 1000}k"))
    return parts


@functools.cache
def architecture_defaults(architecture: str) -> dict:
    """The architecture's keys as conf/sae/NAME.yaml sets them, its recipe among them."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "sae" / f"{architecture}.yaml"))


def own_recipe_key(architecture: str) -> str:
    """The key of the recipe conf/sae/NAME.yaml gives the architecture, its dead-latent handling included."""
    defaults = architecture_defaults(architecture)
    window = Recipe.from_config(defaults["recipe"]).dead_window(DEFAULT_DEAD_WINDOW)
    return recipe_key(defaults["recipe"], window, resample=defaults.get("resample_every_tokens"))


def read_grid(sweeps: list[Path]) -> tuple[dict, list[str]]:
    """(architecture, recipe key) → {"label", "seeds": [per-seed values]}, and the held-out sets."""
    grid: dict[tuple[str, str], dict] = {}
    sets = ["corpus"]
    for sweep in sweeps:
        sets = _read_sweep(sweep, grid)
    return grid, sets


def _read_sweep(sweep: Path, grid: dict) -> list[str]:
    sets = ["corpus"]
    with (sweep / "evaluation" / "summary.csv").open() as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok":
                continue
            cfg = json.loads((sweep / row["run"] / "cfg.json").read_text())
            recipe = cfg["sae"]["recipe"]
            window = Recipe.from_config(recipe).dead_window(cfg["train"]["dead_window_tokens"])
            init = cfg["sae"].get("encoder_init_norm")
            init = None if init == architecture_defaults(row["architecture"]).get("encoder_init_norm") else init
            sets = ["corpus", *sorted({k.split("/")[0] for k in row if k.endswith("/fvu")})]
            values = {}
            for set_name in sets:
                prefix = "" if set_name == "corpus" else f"{set_name}/"
                values |= {f"{set_name}:{m}": float(row[prefix + m]) for m in METRICS}
            found = row.get("found_by_other_seed")
            values["found_by_other_seed"] = float(found) / cfg["d_sae"] if found else float("nan")
            resample = cfg["sae"].get("resample_every_tokens")
            entry = grid.setdefault((row["architecture"], recipe_key(recipe, window, init, resample)),
                                    {"label": recipe_label(recipe, window, init, resample),
                                     "target_l0": cfg["sae"].get("target_l0"),
                                     # the plain recipe, whatever the architecture's encoder start at the time
                                     "plain": recipe_key(recipe, window) == recipe_key(*PLAIN) and not resample,
                                     "seeds": []})
            entry["seeds"].append(values)
    return sets


def against_plain(grid: dict, sets: list[str], fields: list[str]) -> None:
    """Each architecture's own recipe against the plain recipe, set by set: the differences of the seed
    means, beside the larger seed spread of the two (a difference within it is not told apart)."""
    print("\neach architecture's own recipe (conf/sae/NAME.yaml) against the plain recipe (own − plain):")
    for architecture in sorted({a for a, _ in grid}):
        own = own_recipe_key(architecture)
        plain_key = min((key for (a, key), entry in grid.items() if a == architecture and entry["plain"]), default=None)
        if (architecture, own) not in grid or plain_key is None:
            continue
        cells = []
        for set_name in sets:
            for metric in ("fvu", "ce_recovered"):
                name = f"{set_name}:{metric}"
                (a, spread_a), (b, spread_b) = (mean_spread([s[name] for s in grid[architecture, key]["seeds"]])
                                                for key in (own, plain_key))
                cells.append(f"{set_name} {metric} {a - b:+.4f} (spread {max(spread_a, spread_b):.4f})")
                fields.append(f"{architecture}_own_minus_plain_{set_name}_{metric}={a - b:.4f}")
        l0s = [mean_spread([s["corpus:l0"] for s in grid[architecture, key]["seeds"]])[0] for key in (own, plain_key)]
        target = grid[architecture, own]["target_l0"]
        off = [f"{who} L0 {l0:.1f}" for who, l0 in zip(("own", "plain"), l0s) if not on_target(l0, target)]
        print(f"  {architecture:<22} {grid[architecture, own]['label']}: " + "; ".join(cells)
              + (f"  (not matched: {', '.join(off)}, target {target})" if off else ""))


def on_target(l0: float, target: float | None) -> bool:
    """Whether an L0 is within ±10 % of the runs' target L0 (a matched comparison; no target: always)."""
    return not target or abs(l0 / target - 1) <= 0.1


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="evaluated sweeps; their runs form one grid")
    args = parser.parse_args()
    grid, sets = read_grid(args.sweep_dirs)
    columns = [f"{s}:{m}" for s in sets for m in ("fvu", "ce_recovered", "dead_fraction")]
    print(f"{'architecture':<22} {'recipe':<44} {'seeds':>5} {'L0':>6} "
          + " ".join(f"{c:>24}" for c in columns) + f" {'found by other seed':>20}")
    fields, best = [], {}
    for (architecture, key), entry in sorted(grid.items()):
        seeds = entry["seeds"]
        stats = {name: mean_spread([s[name] for s in seeds]) for name in seeds[0]}
        fidelity = statistics.fmean(stats[f"{s}:fvu"][0] for s in sets)
        target = entry["target_l0"]
        matched = on_target(stats["corpus:l0"][0], target)
        if matched and (architecture not in best or fidelity < best[architecture][1]):
            best[architecture] = (key, fidelity)
        cells = " ".join(f"{stats[c][0]:>15.4f} ± {stats[c][1]:.4f}" for c in columns)
        found = stats["found_by_other_seed"]
        print(f"{architecture:<22} {entry['label']:<44} {len(seeds):>5} {stats['corpus:l0'][0]:>6.1f} {cells} "
              f"{found[0]:>12.3f} ± {found[1]:.3f}" + ("" if matched else "  (L0 off its target: not compared)"))
        for c in (*columns, "found_by_other_seed"):
            fields.append(f"{architecture}_{key}_{c.replace(':', '_')}={stats[c][0]:.4f}")
    print("\nlowest FVU averaged over the held-out sets, at L0 within ±10 % of the target:")
    for architecture, (key, fidelity) in sorted(best.items()):
        print(f"  {architecture:<22} {grid[architecture, key]['label']} (mean FVU {fidelity:.4f})")
        fields.append(f"best_{architecture}={key}")
    against_plain(grid, sets, fields)
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
