"""Quality of each SAE architecture on the reference model: L0, FVU, ce_recovered (± standard errors)
and dead fraction on the held-out tokens, all architectures trained in one pass over the same
activations (an ensemble: the same batches feed every dictionary).

Prints a table and ends with a `RESULT` line; asserts nothing. The issue's full grid (three sparsities
per architecture, dict_ratio 4 and 8, SAELens's trainers beside) is `--grid full`; on 2 CPU cores it
takes hours, so the default grid is one setting per architecture at dict_ratio 4.

    python benchmarks/quality.py [--n-tokens 2000000] [--ratios 4] [--grid default|full]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from machine import describe_machine  # benchmarks/machine.py

from saesweep.train import train_ensemble

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
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_quality"))
    args = parser.parse_args()
    print(describe_machine())
    grid = DEFAULT_GRID if args.grid == "default" else FULL_GRID
    base = [
        f"model.path={REFERENCE / 'model'}", "data=jsonl", f"data.path={REFERENCE / 'corpus' / 'train.jsonl.gz'}",
        f"n_tokens={args.n_tokens}", "logger=none", "trainer.enable_progress_bar=false", "eval.every_n_steps=100000",
    ]
    labels, cfgs, run_dirs = [], [], []
    out = Path(args.out) / f"{args.n_tokens}"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for ratio in args.ratios.split(","):
            for label, overrides in grid:
                labels.append(f"{label} ×{ratio}")
                cfgs.append(compose("config", overrides=[*base, f"dict_ratio={ratio}", *overrides]))
                run_dirs.append(out / f"{len(run_dirs)}")
    started = time.monotonic()
    results = train_ensemble(cfgs, run_dirs, out)
    print(f"{len(cfgs)} dictionaries on {args.n_tokens} tokens in one pass: {time.monotonic() - started:.0f} s")
    print(f"{'setting':<24} {'L0':>14} {'FVU':>17} {'ce_recovered':>17} {'dead':>6}")
    fields = []
    for label, result in zip(labels, results):
        if isinstance(result, Exception):
            print(f"{label:<24} failed: {result}")
            continue
        m = result.metrics
        print(f"{label:<24} {m['l0']:>7.1f} ± {m['l0_se']:<4.1f} {m['fvu']:>8.4f} ± {m['fvu_se']:.4f} "
              f"{m['ce_recovered']:>8.4f} ± {m['ce_recovered_se']:.4f} {m['dead_fraction']:>6.3f}")
        key = label.replace(" ", "_").replace("=", "").replace("×", "x")
        fields.append(f"{key}_l0={m['l0']:.1f} {key}_fvu={m['fvu']:.4f} {key}_ce_recovered={m['ce_recovered']:.4f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
