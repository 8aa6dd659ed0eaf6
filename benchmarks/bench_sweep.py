"""Wall time of a 4-ratio sweep (dict_ratio 1, 2, 4, 8), harvest and training of all four on the same
tokens of the offline reference model: saesweep's ensemble (train.ensemble=true, one process, one pass)
vs saesweep's four sequential jobs (-m, one harvest reused) vs four sequential SAELens jobs (each its
own process, harvest and SAETrainer; needs the `bench` extra).

Every contender starts from a cold activation store and is run as a command, as a researcher runs it.
saesweep's runs include their final evaluation on 25k held-out tokens (metrics.json), but not the periodic
one (eval.every_n_steps is set past the end); SAELens's runs have no evaluation (it runs one only when
logging to W&B), which favours SAELens. Prints its figures and a `RESULT` line.

    python benchmarks/bench_sweep.py [--n-tokens 200000] [--batch 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import saelens_contender  # benchmarks/saelens_contender.py
from machine import describe_machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
RATIOS = (1, 2, 4, 8)
HOOK = "blocks.2.hook_resid_post"


def timed(command: list[str]) -> float:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    print(describe_machine())
    print(f"reference model {REFERENCE / 'model'}, {HOOK}, {args.n_tokens} tokens, batch {args.batch}, "
          f"dict_ratio {','.join(map(str, RATIOS))}")
    with tempfile.TemporaryDirectory() as tmp:
        def saesweep(name: str, *extra: str) -> list[str]:
            return [
                sys.executable, "train.py", f"model.path={REFERENCE / 'model'}", "data=jsonl",
                f"data.path={REFERENCE / 'corpus' / 'train.jsonl.gz'}", f"n_tokens={args.n_tokens}",
                f"train.batch_size={args.batch}", f"dict_ratio={','.join(map(str, RATIOS))}",
                f"store.dir={tmp}/{name}-store", f"hydra.sweep.dir={tmp}/{name}", "trainer.enable_progress_bar=false",
                f"eval.every_n_steps={args.n_tokens}",
                *extra,
            ]

        ensemble = timed(saesweep("ensemble", "train.ensemble=true"))
        print(f"saesweep ensemble (one process):        {ensemble:7.1f} s")
        sequential = timed(saesweep("sequential", "-m"))
        print(f"saesweep, four sequential jobs (-m):    {sequential:7.1f} s, ensemble {ensemble / sequential:.2f}×")
        result = (f"RESULT ensemble_s={ensemble:.1f} saesweep_sequential_s={sequential:.1f} "
                  f"ensemble_vs_sequential={ensemble / sequential:.3f}")
        if saelens_contender.available():
            saelens = sum(
                timed([sys.executable, str(Path(saelens_contender.__file__)), str(REFERENCE / "model"),
                       str(REFERENCE / "corpus" / "train.jsonl.gz"), HOOK, "25", str(args.n_tokens), str(ratio),
                       str(args.batch)])
                for ratio in RATIOS
            )
            print(f"SAELens, four sequential jobs:          {saelens:7.1f} s, ensemble {ensemble / saelens:.2f}×")
            result += f" saelens_sequential_s={saelens:.1f} ensemble_vs_saelens={ensemble / saelens:.3f}"
        else:
            print(saelens_contender.NOT_INSTALLED)
    print(result)


if __name__ == "__main__":
    main()
