"""Stream every batch of an activation store and print its row count and resident memory (JSON).

    python benchmarks/stream_memory.py STORE_DIR BUFFER_TOKENS

Memory is sampled from /proc/self/statm after each batch: the current RSS, not ru_maxrss, whose
lifetime peak is set by the imports. Used by benchmarks/harvest.py and tests/test_store.py.
"""

import json
import os
import sys

from saesweep.store import ActivationStore, StoreStream


def main() -> None:
    store = ActivationStore.open(sys.argv[1])
    stream = StoreStream(store, batch_size=1024, buffer_tokens=int(sys.argv[2]), seed=0)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = peak = rss()
    rows = 0
    for batch in stream:
        rows += len(batch)
        peak = max(peak, rss())
    print(json.dumps({"rows": rows, "rss_before": before, "rss_peak": peak}))


if __name__ == "__main__":
    main()
