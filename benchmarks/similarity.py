"""Cost of activation similarity (saesweep.similarity) between two dictionaries: time and peak memory.

Prints its figures and ends with one `RESULT key=value ...` line; asserts nothing.

    python benchmarks/similarity.py [--d-sae 2048] [--tokens 100000] [--d-in 512]

Two ReLU dictionaries with random encoders (every feature fires on some tokens), held-out activations
streamed in batches of 4096 random rows (made as they are read, as a store streams them). Peak memory:
the process's maximum resident set, above what it held before the comparison started.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from machine import describe_machine  # benchmarks/machine.py

from saesweep.sae import ReluSae
from saesweep.similarity import activation_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args()
    print(describe_machine())
    generator = torch.Generator().manual_seed(0)
    saes = []
    for _ in range(2):
        sae = ReluSae(args.d_in, args.d_sae, generator=generator)
        with torch.no_grad():
            sae.W_enc.normal_(generator=generator)
        saes.append(sae)

    def batches():
        for start in range(0, args.tokens, 4096):
            x = torch.randn(min(4096, args.tokens - start), args.d_in, generator=generator)
            yield x, x

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = activation_similarity(saes[0], saes[1], batches())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"two {args.d_sae}-feature dictionaries on {result.n_tokens} tokens: {seconds:.1f} s, peak memory "
          f"+{peak / 2**20:.0f} MiB; mean matched correlation {result.matched.mean():.3f} "
          f"(shuffled tokens {result.matched_chance.mean():.3f})")
    print(f"RESULT similarity_seconds={seconds:.1f} similarity_peak_mib={peak / 2**20:.0f} "
          f"d_sae={args.d_sae} tokens={result.n_tokens}")


if __name__ == "__main__":
    main()
