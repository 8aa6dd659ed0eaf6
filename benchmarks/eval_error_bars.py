"""How large a held-out set the headline metrics need: standard errors against eval.n_tokens.

Trains one dictionary with the default recipe on the reference model (or reuses `--run`), then
evaluates it on the first N held-out tokens for several N, printing each headline metric with its
standard error and the time of one evaluation (what every periodic eval/* and metrics.json costs).
Ends with a `RESULT` line; asserts nothing.

    python benchmarks/eval_error_bars.py [--run RUN_DIR] [--n-tokens 2000000] [--sizes 10000,25000,50000,100000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from machine import describe_machine  # benchmarks/machine.py

from saesweep import load_sae
from saesweep.data import context_source
from saesweep.lm import load_model
from saesweep.metrics import HeldOutSet, evaluate
from saesweep.train import train

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
HEADLINE = ("fvu", "l0", "ce_delta", "ce_recovered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a finished run directory of the reference model (default: train one)")
    parser.add_argument("--n-tokens", type=int, default=2_000_000, help="training tokens of the dictionary")
    parser.add_argument("--dict-ratio", type=float, default=4)
    parser.add_argument("--sizes", default="10000,25000,50000,100000")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_eval_error_bars"))
    args = parser.parse_args()
    print(describe_machine())

    run_dir = Path(args.run) if args.run else Path(args.out) / f"ratio{args.dict_ratio:g}_{args.n_tokens}"
    if not (run_dir / "metrics.json").is_file():
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[
                f"model.path={REFERENCE / 'model'}", "data=jsonl", f"data.path={REFERENCE / 'corpus' / 'train.jsonl.gz'}",
                f"n_tokens={args.n_tokens}", f"dict_ratio={args.dict_ratio}", "logger=none",
                "trainer.enable_progress_bar=false",
            ])
        started = time.monotonic()
        train(cfg, run_dir)
        print(f"trained {run_dir} in {time.monotonic() - started:.0f} s")
    sae = load_sae(run_dir)
    run_cfg = sae.run_cfg
    model = load_model(None, run_cfg["model_path"], torch.device("cpu"))
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx_len = run_cfg["ctx_len"]
    held_out = context_source(run_cfg["dataset"], model.tokenizer, ctx_len).held_out_contexts(
        -(-max(sizes) // ctx_len)
    )
    print(f"dictionary: {run_dir} (d_sae {run_cfg['d_sae']}, {run_cfg['tokens_trained']} tokens trained)")
    print(f"held-out order: {len(held_out.tokens)} contexts from {held_out.n_documents} documents")
    header = f"{'eval tokens':>11} {'docs':>5} " + " ".join(f"{k:>22}" for k in HEADLINE) + f" {'eval s':>7}"
    print(header)
    result = {}
    for size in sizes:
        n_contexts = -(-size // ctx_len)
        contexts = held_out.tokens[:n_contexts]
        held = HeldOutSet.build(model, contexts, run_cfg["hook_point"], 128)
        started = time.monotonic()
        m = evaluate(sae, model, run_cfg["hook_point"], held, 128).metrics
        seconds = time.monotonic() - started
        docs = min(n_contexts, held_out.n_documents)
        cells = " ".join(f"{m[k]:>12.4f} ± {m[k + '_se']:<7.4f}" for k in HEADLINE)
        print(f"{size:>11} {docs:>5} {cells} {seconds:>7.1f}")
        result[size] = (m["ce_recovered_se"], m["fvu_se"], seconds)
    print("RESULT " + " ".join(
        f"ce_recovered_se_{size}={se:.4f} fvu_se_{size}={fvu_se:.4f} eval_s_{size}={s:.1f}"
        for size, (se, fvu_se, s) in result.items()
    ))


if __name__ == "__main__":
    main()
