"""Speed of the training data path: StoreStream's batches per second from an on-disk store, and what
one batch's worth of each stage costs (shard read with its checksum check, shuffle buffer).

    python benchmarks/stream.py [--rows 786432] [--d-in 512] [--batch 4096]

A synthetic store (d_in 512 as Pythia-70M's residual, 32768-row shards, the default 262144-row shuffle
buffer) is written once to a temporary directory and read twice, the first pass to warm the page
cache, so the figures are the CPU's cost, not the disk's. On a GPU the SAE step at these shapes takes
about 1 ms (benchmarks/RESULTS.md, H200), so `stream_act_per_s` is the ceiling of any training
throughput there. Prints the figures and a `RESULT` line; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saesweep.store import StoreSpec, StoreStream, TokenFilter, read_shard, write_store

SHARD_ROWS = 32768
BUFFER_ROWS = 262144


def synthetic_store(root: Path, rows: int, d_in: int):
    spec = StoreSpec("bench-stream", "0", "hook", {}, "train", 16, rows, "float32", TokenFilter())
    activations = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(0))
    return write_store(root, spec, activations, SHARD_ROWS)


def stream_seconds(store, batch: int) -> tuple[float, int]:
    stream = StoreStream(store, batch_size=batch, buffer_tokens=BUFFER_ROWS, seed=0)
    start = time.perf_counter()
    rows = sum(len(b) for b in stream)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=786432)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp), args.rows, args.d_in)
        shards = store.manifest()["shards"]
        stream_seconds(store, args.batch)  # warm the page cache
        seconds, rows = stream_seconds(store, args.batch)
        start = time.perf_counter()
        for entry in shards:
            read_shard(store.path, entry)
        read_s = time.perf_counter() - start
    batches = rows / args.batch
    per_batch_ms = 1000 * seconds / batches
    read_ms = 1000 * read_s / (sum(s["rows"] for s in shards) / args.batch)
    print(f"{rows} rows of d_in {args.d_in} in batches of {args.batch}: {seconds:.2f} s, "
          f"{per_batch_ms:.2f} ms per batch ({rows / seconds:,.0f} activations/s)")
    print(f"shard read with its checksum check, alone: {read_ms:.2f} ms per batch's worth of rows")
    print(f"RESULT stream_act_per_s={rows / seconds:.0f} stream_ms_per_batch={per_batch_ms:.2f} "
          f"shard_read_ms_per_batch={read_ms:.2f}")


if __name__ == "__main__":
    main()
