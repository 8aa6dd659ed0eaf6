"""Harvest throughput of the activation store vs a naive full forward pass, and streaming memory.

Prints measured figures and ends with one `RESULT key=value ...` line; asserts nothing.

    python benchmarks/harvest.py [--model DIR] [--corpus FILE] [--n-tokens N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_machine  # benchmarks/machine.py

from saesweep.data import ContextSource, load_texts
from saesweep.lm import load_model
from saesweep.store import ActivationStore, StoreSpec, TokenFilter, model_fingerprint

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
HOOK = "blocks.2.hook_resid_post"

STREAM_MEMORY = Path(__file__).with_name("stream_memory.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REFERENCE / "model"))
    parser.add_argument("--corpus", default=str(REFERENCE / "corpus" / "train.jsonl.gz"))
    parser.add_argument("--n-tokens", type=int, default=100_000)
    parser.add_argument("--batch-contexts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(describe_machine())

    model = load_model(None, args.model, torch.device("cpu"))
    texts = load_texts(args.corpus, None, "train", "text")
    source = ContextSource(texts, model.tokenizer, 25, True, seed=0)
    n_contexts = -(-args.n_tokens // 25)
    contexts = torch.cat(list(_take(source.train_batches(args.batch_contexts), n_contexts)))
    n_tokens = contexts.numel()
    print(f"model {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; hook {HOOK}; {n_tokens} tokens")

    def naive() -> None:
        # a full forward pass with run_with_cache and no stop_at_layer
        with torch.no_grad():
            for i in range(0, len(contexts), args.batch_contexts):
                model.run_with_cache(contexts[i : i + args.batch_contexts], names_filter=[HOOK])

    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("bench", model_fingerprint(model), HOOK, {"corpus": args.corpus}, "train", 25,
                         n_tokens, "float32", TokenFilter())

        def store_harvest(round_index: int) -> ActivationStore:
            store = ActivationStore(Path(tmp) / str(round_index), spec, shard_tokens=8192)
            store.ensure(model, iter(contexts.split(args.batch_contexts)), args.batch_contexts)
            return store

        # interleaved rounds, best of each: robust to load from other processes on the machine
        naive_times, store_times = [], []
        for r in range(args.rounds):
            start = time.perf_counter()
            naive()
            naive_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            store = store_harvest(r)
            store_times.append(time.perf_counter() - start)
            print(f"round {r}: naive {naive_times[-1]:.1f} s, store harvest {store_times[-1]:.1f} s")
        naive_s, store_s = min(naive_times), min(store_times)
        store_bytes = sum(f.stat().st_size for f in store.path.glob("shard_*"))
        print(f"naive full forward:        {n_tokens / naive_s:10.0f} tokens/s (best of {args.rounds})")
        print(f"store harvest (to disk):   {n_tokens / store_s:10.0f} tokens/s (best of {args.rounds}, "
              f"{store_bytes / 2**20:.0f} MiB written)")

        buffer_tokens = n_tokens // 10
        out = subprocess.run(
            [sys.executable, str(STREAM_MEMORY), str(store.path), str(buffer_tokens)],
            capture_output=True, text=True, check=True,
        )
        stream = json.loads(out.stdout.strip().splitlines()[-1])
    d_in = model.cfg.d_model
    buffer_mib = buffer_tokens * d_in * 4 / 2**20
    growth_mib = (stream["rss_peak"] - stream["rss_before"]) / 2**20
    print(f"streaming {stream['rows']} rows ({store_bytes / 2**20:.0f} MiB store) through a {buffer_mib:.0f} MiB "
          f"shuffle buffer: peak RSS {stream['rss_peak'] / 2**20:.0f} MiB, growth while streaming {growth_mib:.0f} MiB")
    print(f"RESULT harvest_tokens_per_s={n_tokens / store_s:.0f} naive_tokens_per_s={n_tokens / naive_s:.0f} "
          f"harvest_vs_naive={naive_s / store_s:.2f} store_mib={store_bytes / 2**20:.0f} buffer_mib={buffer_mib:.0f} "
          f"stream_rss_growth_mib={growth_mib:.0f} store_to_buffer={store_bytes / 2**20 / buffer_mib:.1f}")


def _take(batches, n_contexts):
    have = 0
    for batch in batches:
        yield batch[: n_contexts - have]
        have += len(batch)
        if have >= n_contexts:
            return


if __name__ == "__main__":
    main()
