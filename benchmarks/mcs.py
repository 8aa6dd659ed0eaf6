"""MCS between dictionaries: time on CPU, and the memory the chunked computation needs.

    PYTHONPATH=src python benchmarks/mcs.py

Measures (never asserts): the chunked `mcs_both_ways` against a brute-force full similarity matrix for
two 4096×512 dictionaries (an 8× SAE on Pythia-70M), then the peak RSS growth while comparing two
32768×512 dictionaries (64×), whose full similarity matrix alone would take 4 GiB. Ends with one
`RESULT key=value ...` line.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import torch
from machine import describe_machine  # benchmarks/machine.py

from saesweep.evaluate import DEFAULT_CHUNK_SIZE, mcs_both_ways

D = 512
SMALL, LARGE = 4096, 32768
REPEATS = 5
MIB = 2**20


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def brute_force_both_ways(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sims = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return sims.amax(dim=1), sims.amax(dim=0)


def median_seconds(fn, *args) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(describe_machine())
    print(f"chunk_size={DEFAULT_CHUNK_SIZE}, load average {os.getloadavg()[0]:.1f} "
          "(other processes make CPU timings noisy: compare ratios)")
    g = torch.Generator().manual_seed(0)

    # Memory first, while the process's peak RSS is still low: growth beyond the inputs during the
    # 64× comparison.
    a, b = torch.randn(LARGE, D, generator=g), torch.randn(LARGE, D, generator=g)
    inputs_mib = 2 * a.numel() * 4 / MIB
    before = peak_rss_bytes()
    start = time.perf_counter()
    mcs_both_ways(a, b)
    large_s = time.perf_counter() - start
    growth_mib = (peak_rss_bytes() - before) / MIB
    full_matrix_mib = LARGE * LARGE * 4 / MIB
    print(
        f"{LARGE}×{D} vs {LARGE}×{D}: {large_s:.1f} s (both directions), peak RSS growth {growth_mib:.0f} MiB "
        f"beyond {inputs_mib:.0f} MiB of inputs; an unchunked similarity matrix would be {full_matrix_mib:.0f} MiB"
    )
    del a, b

    a, b = torch.randn(SMALL, D, generator=g), torch.randn(SMALL, D, generator=g)
    chunked_s = median_seconds(mcs_both_ways, a, b)
    split_s = median_seconds(mcs_both_ways, a, b, SMALL // 4)  # 16 blocks: the cost of chunking itself
    brute_s = median_seconds(brute_force_both_ways, a, b)
    same = all(
        torch.equal(x, y) for x, y in zip(mcs_both_ways(a, b, SMALL // 4), brute_force_both_ways(a, b), strict=True)
    )
    print(
        f"{SMALL}×{D} vs {SMALL}×{D} on CPU, median of {REPEATS}: chunked {chunked_s:.3f} s "
        f"(chunk_size={SMALL // 4}: {split_s:.3f} s), brute force {brute_s:.3f} s "
        f"(ratio {chunked_s / brute_s:.2f}), chunked = brute force exactly: {same}"
    )

    print(
        f"RESULT mcs_{SMALL}_cpu_s={chunked_s:.4f} brute_{SMALL}_cpu_s={brute_s:.4f} "
        f"chunked_over_brute={chunked_s / brute_s:.3f} mcs_{SMALL}_chunk{SMALL // 4}_cpu_s={split_s:.4f} mcs_{LARGE}_cpu_s={large_s:.2f} "
        f"peak_rss_growth_{LARGE}_mib={growth_mib:.0f} inputs_{LARGE}_mib={inputs_mib:.0f} "
        f"full_matrix_{LARGE}_mib={full_matrix_mib:.0f} chunk_size={DEFAULT_CHUNK_SIZE} threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
