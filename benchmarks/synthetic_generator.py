"""How fast the synthetic generator (saesweep/synthetic.py) writes activations, at #27's cost shape: d_in 256,
4096 true features, about 25 active per vector, 64 hierarchies. Times `activation_chunks` (what a synthetic
store's harvest runs) after one warm-up block, and checks on the side that every feature fires at its
marginal probability (the mean squared z-score over features is about 1 for an exact sampler). Prints the
figures and one `RESULT` line; asserts nothing.

    python benchmarks/synthetic_generator.py [--blocks 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe_machine  # benchmarks/machine.py

from saesweep.synthetic import BLOCK, SyntheticSpec, activation_chunks, make_features, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--check-tokens", type=int, default=200_000)
    args = parser.parse_args()
    print(describe_machine())
    spec = SyntheticSpec(d_in=256, n_features=4096, mean_active=25, n_hierarchies=64)
    features = make_features(spec)
    list(activation_chunks(spec, features, BLOCK))  # warm-up: the cached unit tables, the allocator
    start = time.perf_counter()
    rows = sum(len(x) for x in activation_chunks(spec, features, BLOCK * args.blocks))
    rate = rows / (time.perf_counter() - start)

    _, coefficients = sample(spec, features, args.check_tokens, torch.Generator().manual_seed(1))
    fired = torch.bincount(coefficients.indices()[1], minlength=spec.n_features).double() / args.check_tokens
    marginal = features.firing_probability.double().clone()
    children = features.parent >= 0
    marginal[children] *= features.firing_probability[features.parent[children]].double()
    z = (fired - marginal) / (marginal * (1 - marginal) / args.check_tokens).sqrt().clamp_min(1e-12)
    print(f"{rows} vectors in blocks of {BLOCK}: {rate:,.0f} vectors/s; L0 {float(fired.sum()):.2f} "
          f"(expected {float(marginal.sum()):.2f}); mean z² over features {float(z.pow(2).mean()):.3f}")
    print(f"RESULT generator_vectors_per_s={rate:.0f} mean_l0={float(fired.sum()):.3f} mean_z2={float(z.pow(2).mean()):.3f}")


if __name__ == "__main__":
    main()
