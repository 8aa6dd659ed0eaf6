"""The activation store: activations harvested once per (model, hook, data, ...) key, shared by every
job of a sweep and by later sweeps, streamed from disk with bounded memory.

Layout of one store, `<store.dir>/<key digest>/`:
  manifest.json            the key, dtype, d_in, shard list (rows, bytes, crc32 checksum), `complete`
  shard_00000.safetensors  one tensor "activations" [rows, d_in] per shard
  held_out_<n>.safetensors the first n held-out contexts: tokens, activations, clean and zero-ablation losses
  .lock                    held (flock) while a process harvests; others wait on it

A shard is written atomically and then recorded in the manifest (also atomic), so a harvest killed at
any point leaves only complete, recorded shards; the rerun keeps them and harvests the rest. Shard `i`
always holds the activations of the same training contexts, so resuming needs no other state.

Modules: `key` (what decides a store and names it), `files` (the checked, atomic files),
`activation_store` (harvest under a lock, held-out sets), `stream` (training batches), `resident` (the
training rows held on the training device: their read, and the rows a harvest keeps there for them).
"""

from saesweep.store.activation_store import ActivationStore, ShardSink, write_store
from saesweep.store.files import (
    MANIFEST,
    StoreCorruptError,
    list_stores,
    read_shard,
    remove_store,
    verify_store,
)
from saesweep.store.key import STORE_DTYPES, StoreSpec, TokenFilter, default_store_dir, model_fingerprint
from saesweep.store.resident import HarvestedRows, free_memory, resident_rows
from saesweep.store.stream import ResumableLoader, StoreStream

__all__ = [
    "MANIFEST", "STORE_DTYPES", "ActivationStore", "HarvestedRows", "ResumableLoader", "ShardSink", "StoreCorruptError",
    "StoreSpec", "StoreStream", "TokenFilter", "default_store_dir", "free_memory", "list_stores", "model_fingerprint",
    "read_shard", "remove_store", "resident_rows", "verify_store", "write_store",
]
