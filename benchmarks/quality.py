"""Quality of each SAE architecture on the reference model: L0, FVU, ce_recovered (± standard errors)
and dead fraction on the held-out tokens, all architectures trained in one pass over the same
activations (an ensemble: the same batches feed every dictionary).

When SAELens is installed (`pip install -e '.[bench]'`), each setting is trained again with SAELens's
trainer and SAELens's SAE of the same architecture, on the same (normalised) activations with the same
sparsity knob, learning rate, batch, schedule and tokens, and judged by the same evaluation on the same
held-out tokens. Its ce_recovered is compared with saesweep's at matched L0: saesweep's curve over the
grid's sparsities, interpolated in log L0 (more than 5 % outside the curve's L0 range there is no match).

Prints a table and ends with a `RESULT` line; asserts nothing. The issue's full grid (three sparsities
per architecture, dict_ratio 4 and 8) is `--grid full`; on 2 CPU cores it takes hours, so the default
grid is one setting per architecture at dict_ratio 4.

    python benchmarks/quality.py [--n-tokens 2000000] [--ratios 4] [--grid default|full]
                                 [--architectures relu_l1,topk] [--saelens-ratios 4,8 | none]
                                 [--dead-tokens 250000] [--eval-sets other_sources] [--plain-baseline]

`--eval-sets other_sources` measures every row on that held-out set too (conf/eval_sets/); `--plain-baseline`
adds the plain TopK recipe of Gao et al. (benchmarks/plain_topk.py, not saesweep's trainer) at each ratio.
`--dead-tokens N` also counts each dictionary's dead fraction on a larger sample of N tokens from the same
held-out documents: a latent that fires once in 100k tokens is silent on the run's 25k, and the larger
sample tells rare latents from dead ones.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import saelens_contender  # benchmarks/saelens_contender.py
import torch
from hydra import compose, initialize_config_dir
from machine import describe_machine  # benchmarks/machine.py
from plain_topk import train_plain_topk  # benchmarks/plain_topk.py

from saesweep import load_sae
from saesweep.data import context_source
from saesweep.metrics import HEADLINE_SET, EvalResult, evaluate, set_metric
from saesweep.recipe import Recipe
from saesweep.run_description import sae_hyperparameters
from saesweep.store import StoreStream
from saesweep.train import total_steps, train_ensemble
from saesweep.training_data import TrainingData, held_out_set, training_data

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# (label, overrides): one setting per architecture near L0 30, and the full grid of three sparsities
DEFAULT_GRID = [
    ("relu_l1", ["sae=relu_l1"]),
    ("topk k=32", ["sae=topk", "sae.k=32"]),
    ("batchtopk k=32", ["sae=batchtopk", "sae.k=32"]),
    ("matryoshka k=32", ["sae=matryoshka_batchtopk", "sae.k=32"]),
    ("jumprelu", ["sae=jumprelu"]),
    ("gated", ["sae=gated"]),
]
FULL_GRID = [
    *[(f"relu_l1 l1={v}", ["sae=relu_l1", f"l1_coef={v}"]) for v in (1, 2, 4)],
    *[(f"{a} k={k}", [f"sae={a}", f"sae.k={k}"]) for a in ("topk", "batchtopk", "matryoshka_batchtopk") for k in (16, 32, 64)],
    *[(f"jumprelu l0={v}", ["sae=jumprelu", f"sae.l0_coef={v}"]) for v in (0.3, 0.7, 2.0)],  # 0.7: L0 ≈ 29 (RESULTS.md)
    *[(f"gated l1={v}", ["sae=gated", f"l1_coef={v}"]) for v in (1, 2, 4)],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-tokens", type=int, default=2_000_000)
    parser.add_argument("--ratios", default="4")
    parser.add_argument("--grid", choices=("default", "full"), default="default")
    parser.add_argument("--architectures", default=None,
                        help="comma-separated architectures of the grid to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every setting (repeatable), e.g. sae.recipe.grad_clip_norm=1")
    parser.add_argument("--saelens-ratios", default=None,
                        help="dict_ratios SAELens trains too (default: all of --ratios; 'none': no SAELens)")
    parser.add_argument("--dead-tokens", type=int, default=None,
                        help="also count the dead fraction on this many held-out tokens (e.g. 250000)")
    parser.add_argument("--eval-sets", default=None,
                        help="extra held-out sets (conf/eval_sets/), e.g. other_sources: every row on each set too")
    parser.add_argument("--plain-baseline", action="store_true",
                        help="also train the plain TopK recipe of Gao et al. (benchmarks/plain_topk.py) at each ratio, "
                             "k 32, on the same activations")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_quality"))
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    grid = DEFAULT_GRID if args.grid == "default" else FULL_GRID
    if args.architectures:
        wanted = args.architectures.split(",")
        grid = [(label, overrides) for label, overrides in grid if overrides[0].removeprefix("sae=") in wanted]
        if not grid:
            parser.error(f"--architectures={args.architectures!r} selects nothing; allowed: relu_l1, topk, "
                         "batchtopk, matryoshka_batchtopk, jumprelu, gated")
    base = [
        f"model.path={REFERENCE / 'model'}", "data=jsonl", f"data.path={REFERENCE / 'corpus' / 'train.jsonl.gz'}",
        f"n_tokens={args.n_tokens}", "logger=none", "trainer.enable_progress_bar=false", "eval.every_n_steps=100000", *args.set,
        *([f"eval_sets={args.eval_sets}"] if args.eval_sets else []),
    ]
    labels, cfgs, run_dirs = [], [], []
    out = Path(args.out) / f"{args.n_tokens}"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for ratio in args.ratios.split(","):
            for label, overrides in grid:
                labels.append(f"{label} ×{ratio}")
                cfgs.append(compose("config", overrides=[*base, f"dict_ratio={ratio}", *overrides]))
                run_dirs.append(out / f"{len(run_dirs)}")
    data = training_data(cfgs)  # the LM, store and held-out set, shared with SAELens's rows
    started = time.monotonic()
    results = train_ensemble(cfgs, run_dirs, out, data=data)
    print(f"{len(cfgs)} dictionaries on {args.n_tokens} tokens in one pass: {time.monotonic() - started:.0f} s")
    metrics = {label: result.metrics for label, result in zip(labels, results) if not isinstance(result, Exception)}
    for label, result in zip(labels, results):
        if isinstance(result, Exception):
            print(f"{label:<30} failed: {result}")
    saes = {label: load_sae(run_dir) for label, run_dir in zip(labels, run_dirs) if label in metrics}
    if args.plain_baseline:
        for ratio in sorted({c.dict_ratio for c in cfgs}):
            label = f"plain topk k=32 ×{ratio:g}"
            started = time.monotonic()
            saes[label] = plain_baseline(cfgs[0], data, int(ratio * data.d_in))
            metrics[label] = EvalResult.of_sets({
                name: evaluate(saes[label], data.model, data.hook_point, held_out, cfgs[0].eval.batch_contexts)
                for name, held_out in data.eval_sets.items()
            }).metrics
            print(f"{label}: trained and evaluated in {time.monotonic() - started:.0f} s", flush=True)
    fields = []
    for set_name in data.eval_sets:
        print(f"held-out set: {set_name}")
        print(f"{'setting':<30} {'L0':>14} {'FVU':>17} {'ce_recovered':>17} {'dead':>6}")
        prefix = "" if set_name == HEADLINE_SET else f"{set_name}_"
        for label, m in metrics.items():
            on_set = {k: m[set_metric(set_name, k)] for k in _COLUMNS}
            print(f"{label:<30} {_cells(on_set)}")
            fields.append(_fields(label, on_set, prefix))
        print(flush=True)
    if args.dead_tokens:
        fields += wide_dead_fields(cfgs[0], data, args.dead_tokens, saes)

    saelens_ratios = args.ratios if args.saelens_ratios is None else args.saelens_ratios
    if not saelens_contender.available():
        print(saelens_contender.NOT_INSTALLED)
    elif saelens_ratios != "none":
        chosen = [i for i, c in enumerate(cfgs) if f"{c.dict_ratio:g}" in saelens_ratios.split(",")]
        fields += saelens_rows([cfgs[i] for i in chosen], [labels[i] for i in chosen], metrics, data, out / "saelens")
    print("RESULT " + " ".join(fields))


_COLUMNS = ("l0", "l0_se", "fvu", "fvu_se", "ce_recovered", "ce_recovered_se", "dead_fraction")


def plain_baseline(cfg, data: TrainingData, d_sae: int):
    """The plain TopK recipe (benchmarks/plain_topk.py) on the stream saesweep trained on (same store, seed,
    batch and normalisation), as saesweep's TopKSae on raw activations."""
    stream = StoreStream(data.store, cfg.train.batch_size, cfg.store.buffer_tokens, cfg.seed)
    batches = (b.to(data.device, torch.float32) / data.scale for b in stream)
    sae = train_plain_topk(batches, data.d_in, d_sae, 32, data.sample / data.scale, seed=cfg.seed)
    return sae.as_saesweep(data.scale)


def _cells(m: dict) -> str:
    return (f"{m['l0']:>7.1f} ± {m['l0_se']:<4.1f} {m['fvu']:>8.4f} ± {m['fvu_se']:.4f} "
            f"{m['ce_recovered']:>8.4f} ± {m['ce_recovered_se']:.4f} {m['dead_fraction']:>6.3f}")


def _key(label: str) -> str:
    """'topk k=32 ×4' → 'topk_k_32_x4': the setting's name in RESULT fields and output directories."""
    return label.replace(" ", "_").replace("=", "_").replace("×", "x")


def _fields(label: str, m: dict, prefix: str = "") -> str:
    key = prefix + _key(label)
    return (f"{key}_l0={m['l0']:.1f} {key}_fvu={m['fvu']:.4f} {key}_ce_recovered={m['ce_recovered']:.4f} "
            f"{key}_dead={m['dead_fraction']:.4f}")


def _setting(label: str) -> tuple[str, str]:
    """('topk', '×4') from 'topk k=32 ×4': the architecture's curve a setting belongs to."""
    words = label.split()
    return words[0], words[-1]


def matched_ce_recovered(l0: float, curve: list[tuple[float, float]]) -> float | None:
    """saesweep's ce_recovered at `l0` on its (L0, ce_recovered) curve, interpolated in log L0. Up to 5 %
    beyond the curve's ends counts as the end point (BatchTopK's L0 wanders a little around k); further
    out there is no match."""
    points = sorted(curve)
    if not points:
        return None
    (low_l0, low_ce), (high_l0, high_ce) = points[0], points[-1]
    if low_l0 / 1.05 <= l0 <= low_l0:
        return low_ce
    if high_l0 <= l0 <= high_l0 * 1.05:
        return high_ce
    for (l0_a, ce_a), (l0_b, ce_b) in zip(points, points[1:]):
        if l0_a <= l0 <= l0_b:
            t = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a)) if l0_b > l0_a else 0.0
            return ce_a + t * (ce_b - ce_a)
    return None


def wide_dead_fields(cfg, data: TrainingData, n_tokens: int, saes: dict) -> list[str]:
    """Each trained dictionary's dead fraction on `n_tokens` held-out tokens of the training corpus (through
    the LM already loaded); prints a row each and returns the RESULT fields (`<setting>_dead_<n>k`)."""
    wide = held_out_set(cfg, data.model, data.hook_point, data.store,
                        lambda: context_source(cfg.data, data.model.tokenizer, cfg.ctx_len), n_tokens)
    print(f"{'setting':<30} {'dead on ' + str(n_tokens) + ' held-out tokens':>34}")
    fields = []
    for label, sae in saes.items():
        m = evaluate(sae, data.model, data.hook_point, wide, cfg.eval.batch_contexts).metrics
        print(f"{label:<30} {m['dead_fraction']:>34.4f}", flush=True)
        fields.append(f"{_key(label)}_dead_{n_tokens // 1000}k={m['dead_fraction']:.4f}")
    print(flush=True)
    return fields


def saelens_rows(cfgs: list, labels: list[str], ours: dict[str, dict], data: TrainingData, out: Path) -> list[str]:
    """Each setting trained by SAELens on the activations saesweep trained on (the same store, stream
    seed and normalisation), evaluated like saesweep's; prints a row per setting as it finishes and
    returns the RESULT fields."""
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label, m in ours.items():
        curves.setdefault(_setting(label), []).append((m["l0"], m["ce_recovered"]))

    print("SAELens's trainer and SAE of each architecture on the same activations; Δ = saesweep's ce_recovered "
          "at SAELens's L0 minus SAELens's (≥ -0.005 is the target)")
    print(f"{'SAELens setting':<30} {'L0':>14} {'FVU':>17} {'ce_recovered':>17} {'dead':>6} {'Δ':>8} {'fit s':>6}",
          flush=True)
    fields, deltas = [], []
    for c, label in zip(cfgs, labels):
        stream = StoreStream(data.store, c.train.batch_size, c.store.buffer_tokens, c.seed)
        steps = total_steps(c.trainer, len(stream))
        # the stream repeated: SAELens's loop may ask past the steps it was given
        batches = (b.to(data.device, torch.float32) / data.scale for _ in itertools.count() for b in stream)
        directory = out / _key(label)
        recipe = Recipe.from_config(c.sae.recipe)  # SAELens's trainer on the same schedule
        seconds = saelens_contender.train_saelens_architecture(
            c.sae.architecture, sae_hyperparameters(c), data.d_in, int(c.dict_ratio * data.d_in), batches, steps,
            c.train.batch_size, recipe.lr, recipe.warmup_steps(steps, c.train.lr_warmup_max_fraction),
            int(steps * recipe.lr_decay_fraction), directory,
        )
        sae = load_sae(directory).rescaled(data.scale)  # trained on x / scale, judged on raw activations
        m = evaluate(sae, data.model, data.hook_point, data.held_out, c.eval.batch_contexts).metrics
        match = matched_ce_recovered(m["l0"], curves.get(_setting(label), []))
        delta = "—" if match is None else f"{match - m['ce_recovered']:+.4f}"
        if match is not None:
            deltas.append(match - m["ce_recovered"])
        print(f"{label:<30} {_cells(m)} {delta:>8} {seconds:>6.0f}", flush=True)
        fields.append(_fields(label, m, prefix="saelens_"))
    if deltas:
        fields.append(f"worst_delta_vs_saelens={min(deltas):.4f} matched_settings={len(deltas)}")
    return fields


if __name__ == "__main__":
    main()
