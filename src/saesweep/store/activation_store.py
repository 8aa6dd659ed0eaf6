"""One activation store on disk: harvested once, resumably, under a lock; its shards and held-out sets
read back checked."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import saesweep
from saesweep.activations import harvest
from saesweep.errors import ConfigError, DataError
from saesweep.io import atomic_write_json
from saesweep.store.files import (
    MANIFEST,
    StoreCorruptError,
    bytes_text,
    read_shard,
    read_shard_into,
    read_shard_pieces,
    read_verified,
    shard_file,
    write_file,
)
from saesweep.store.key import STORE_DTYPES, StoreSpec

log = logging.getLogger(__name__)

# Told of each shard as it is written: its file, its first row in the store's shard order, its rows (in the
# store's dtype). StoreStream's HarvestedRows keeps them for the fit that follows the harvest.
ShardSink = Callable[[str, int, torch.Tensor], None]


class ActivationStore:
    """One store on disk: harvest it (once, resumably, under a lock) and read its shards back."""

    def __init__(self, root: Path, spec: StoreSpec, shard_tokens: int):
        if spec.dtype not in STORE_DTYPES:
            raise ConfigError(f"store.dtype={spec.dtype!r} is not supported; allowed: {sorted(STORE_DTYPES)}")
        self.spec = spec
        self.path = Path(root) / spec.digest()
        self.shard_tokens = shard_tokens

    @classmethod
    def open(cls, path: Path) -> ActivationStore:
        """An existing store, from its directory alone."""
        manifest_path = Path(path) / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
            spec = StoreSpec.from_key(manifest["key"])
            shard_tokens = max(s["rows"] for s in manifest["shards"]) if manifest["shards"] else 1
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"{manifest_path} is missing or unreadable: {e}") from None
        store = cls(Path(path).parent, spec, shard_tokens)
        if store.path != Path(path):
            raise StoreCorruptError(f"{path} does not hold the store its manifest describes ({store.path.name})")
        return store

    # -- the manifest ---------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreCorruptError(f"{path} is not valid JSON ({e}); delete {self.path} to re-harvest") from None
        if manifest.get("key") != self.spec.key():
            raise StoreCorruptError(f"{path} was written for another key; delete {self.path} to re-harvest")
        return manifest

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest["complete"])

    # -- harvesting -----------------------------------------------------------------------------
    def check_room(self, d_in: int) -> None:
        """Fail before harvesting when the disk cannot hold the rest of the store."""
        manifest = self.manifest() if self.path.is_dir() else None
        if manifest and manifest["complete"]:
            return
        itemsize = STORE_DTYPES[self.spec.dtype].itemsize
        needed = self.spec.n_tokens * d_in * itemsize - sum(s["bytes"] for s in (manifest or {}).get("shards", []))
        existing = self.path
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if needed > free:
            raise ConfigError(
                f"store.dir={str(self.path.parent)!r} has {bytes_text(free)} free, but the activation store needs up to "
                f"{bytes_text(needed)} more (n_tokens={self.spec.n_tokens} × d_in={d_in} × {itemsize} bytes of "
                f"{self.spec.dtype}); free space, set store.dir to a disk with room, lower n_tokens, or use "
                "store.dtype=bfloat16 (half the bytes)"
            )

    def ensure(
        self, model, context_batches: Iterator[torch.Tensor], batch_contexts: int, on_shard: ShardSink | None = None
    ) -> dict:
        """Harvest the store unless it is complete; concurrent callers wait for the harvester.

        `context_batches` yields training contexts in their fixed order; it is only consumed when
        something is left to harvest. `on_shard` is told of each shard this call writes. Returns the manifest.
        """
        return self._ensure("harvested", lambda: self._harvest(model, context_batches, batch_contexts, on_shard))

    def ensure_rows(self, rows: Callable[[], Iterable[torch.Tensor]], on_shard: ShardSink | None = None) -> dict:
        """Write the store from rows made without a model (`rows()`: chunks [n, d_in], e.g. synthetic
        activations) unless it is complete, under the same lock as a harvest. Returns the manifest."""
        return self._ensure("generated", lambda: self._write_rows(rows(), on_shard))

    def _ensure(self, work: str, fill: Callable[[], None]) -> dict:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.is_complete():
            self._log("reused")
            return self.manifest()
        with self._lock(work):
            if self.is_complete():  # another job finished it while we waited
                self._log("reused")
                return self.manifest()
            fill()
            self._log(work)
            return self.manifest()

    def _write_rows(self, rows: Iterable[torch.Tensor], on_shard: ShardSink | None = None) -> None:
        """The whole store from row chunks, re-cut into shards; shards record no training contexts."""
        manifest = {"key": self.spec.key(), "dtype": self.spec.dtype, "d_in": None, "shards": [], "n_rows": 0,
                    "complete": False, "saesweep_version": saesweep.__version__}
        for index, shard in enumerate(_regroup(iter(rows), self.shard_tokens)):
            self._write_shard(manifest, index, shard.to(STORE_DTYPES[self.spec.dtype]), 0, on_shard)
        manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, manifest)

    def _log(self, what: str) -> None:
        manifest = self.manifest()
        log.info(
            "activation store %s: %s (%d tokens, %s, %s at %s)",
            what, self.path, manifest["n_rows"], manifest["dtype"], self.spec.model, self.spec.hook_point,
        )

    @contextmanager
    def _lock(self, work: str):
        """The store's file lock; `work` says in the log what a waiting process waits for."""
        with open(self.path / ".lock", "w") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("activation store %s is being %s by another process; waiting", self.path, work)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _harvest(
        self, model, context_batches: Iterator[torch.Tensor], batch_contexts: int, on_shard: ShardSink | None
    ) -> None:
        manifest = self.manifest() or {
            "key": self.spec.key(),
            "dtype": self.spec.dtype,
            "d_in": None,
            "shards": [],
            "n_rows": 0,
            "complete": False,
            "saesweep_version": saesweep.__version__,
        }
        kept = self._verified_shards(manifest["shards"])
        manifest["shards"] = kept
        manifest["n_rows"] = sum(s["rows"] for s in kept)
        atomic_write_json(self.path / MANIFEST, manifest)
        present = {s["file"] for s in kept}

        contexts_per_shard = max(self.shard_tokens // self.spec.ctx_len, 1)
        target = self.spec.n_tokens
        special = sorted({i for i in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id) if i is not None})
        progress = tqdm(
            total=target, initial=manifest["n_rows"], unit="tok", unit_scale=True,
            desc="harvest", disable=not sys.stderr.isatty(),
        )
        start_time, start_rows = time.monotonic(), manifest["n_rows"]
        for shard_index, shard_contexts in enumerate(_regroup(context_batches, contexts_per_shard)):
            if manifest["n_rows"] >= target:
                break
            if shard_file(shard_index) in present:
                continue  # this shard's contexts were harvested before (an interruption, a shard found corrupt)
            if present and shard_file(shard_index) < max(present):
                log.warning("activation store %s: re-harvesting %s", self.path, shard_file(shard_index))
            acts = harvest(model, shard_contexts, self.spec.hook_point, batch_contexts)
            kept_rows = self.spec.token_filter.apply(shard_contexts, acts, special)
            shard = kept_rows[: target - manifest["n_rows"]].to(STORE_DTYPES[self.spec.dtype])
            self._write_shard(manifest, shard_index, shard, len(shard_contexts), on_shard)
            progress.update(len(shard))
        progress.close()
        if manifest["n_rows"] < target:
            raise DataError(
                f"the dataset ran out after {manifest['n_rows']} of n_tokens={target} training tokens "
                f"at {self.spec.hook_point}: lower n_tokens or use a larger dataset"
            )
        manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, manifest)
        rate = (manifest["n_rows"] - start_rows) / max(time.monotonic() - start_time, 1e-9)
        log.info("harvest: %.0f tokens/s", rate)

    def _write_shard(
        self, manifest: dict, index: int, shard: torch.Tensor, n_contexts: int, on_shard: ShardSink | None
    ) -> None:
        entry = write_file(self.path, shard_file(index), {"activations": shard})
        # training contexts read for it: held-out reports skip exactly these
        manifest["shards"].append({**entry, "rows": len(shard), "contexts": n_contexts})
        manifest["shards"].sort(key=lambda s: s["file"])  # a re-harvested shard goes back to its place
        manifest["n_rows"] += len(shard)
        manifest["d_in"] = shard.shape[1]
        atomic_write_json(self.path / MANIFEST, manifest)
        if on_shard is not None:
            first_row = sum(s["rows"] for s in manifest["shards"] if s["file"] < entry["file"])
            on_shard(entry["file"], first_row, shard)

    def held_out(
        self, n_contexts: int, build: Callable[[], dict[str, torch.Tensor]], set_key: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors of the first `n_contexts` held-out contexts (see ContextSource.held_out_contexts),
        made once by `build` and kept beside the shards: every job of a sweep reads them. `set_key`: an
        extra held-out set's (eval.sets; a name and a digest of its corpus), None for the training corpus's."""
        entry_key = str(n_contexts) if set_key is None else f"{set_key}/{n_contexts}"
        if (tensors := self._read_held_out(entry_key)) is not None:
            return tensors
        with self._lock("given its held-out set"):
            if (tensors := self._read_held_out(entry_key)) is not None:  # another job built it while we waited
                return tensors
            tensors = build()
            file_name = f"held_out_{entry_key.replace('/', '_')}.safetensors"
            entry = {**write_file(self.path, file_name, tensors), "tensors": sorted(tensors)}
            manifest = self.manifest()
            manifest["held_out"] = {**manifest.get("held_out", {}), entry_key: entry}
            atomic_write_json(self.path / MANIFEST, manifest)
        return tensors

    def _read_held_out(self, entry_key: str) -> dict[str, torch.Tensor] | None:
        entry = self.manifest().get("held_out", {}).get(entry_key)
        if not entry:
            return None
        try:
            return read_verified(self.path, entry, *entry["tensors"])
        except StoreCorruptError as e:
            log.warning("%s; computing the held-out set again", e)
            return None

    def _verified_shards(self, shards: list[dict]) -> list[dict]:
        """The shards whose files are intact; harvesting fills in the others."""
        intact = []
        for entry in shards:
            try:
                read_shard(self.path, entry)
                intact.append(entry)
            except StoreCorruptError as e:
                log.warning("%s", e)
        return intact

    # -- reading --------------------------------------------------------------------------------
    def read_shard(self, entry: dict, into: torch.Tensor | None = None) -> torch.Tensor:
        """A shard's activations (read straight into `into`, files.read_shard_into, when given: a view of
        it); a shard found corrupt is forgotten, so the next `ensure` re-harvests it."""
        try:
            return read_shard(self.path, entry) if into is None else read_shard_into(self.path, entry, into)
        except StoreCorruptError:
            self.invalidate(entry)
            raise

    def read_shard_pieces(self, entry: dict, buffers: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """A shard's activations in pieces read into `buffers` in turn (files.read_shard_pieces); a shard found
        corrupt, after its last piece at the latest, is forgotten as by `read_shard`."""
        try:
            yield from read_shard_pieces(self.path, entry, buffers)
        except StoreCorruptError:
            self.invalidate(entry)
            raise

    def invalidate(self, entry: dict) -> None:
        """Forget a bad shard (only it: the others stay), so the next `ensure` re-harvests it."""
        manifest = self.manifest()
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != entry["file"]]
        manifest["n_rows"] = sum(s["rows"] for s in manifest["shards"])
        manifest["complete"] = False
        atomic_write_json(self.path / MANIFEST, manifest)


def _regroup(batches: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of row batches into groups of exactly `size` rows (the last may be shorter)."""
    pending: list[torch.Tensor] = []
    have = 0
    for batch in batches:
        pending.append(batch)
        have += len(batch)
        while have >= size:
            rows = torch.cat(pending)
            yield rows[:size]
            pending, have = [rows[size:]], have - size
    if have:
        yield torch.cat(pending)


def write_store(
    root: Path, spec: StoreSpec, activations: torch.Tensor, shard_tokens: int, on_shard: ShardSink | None = None
) -> ActivationStore:
    """A complete store of activations already in memory [n, d_in] (computed elsewhere, or made up
    for tests and benchmarks), written whatever is there; `on_shard` is told of each shard."""
    store = ActivationStore(root, spec, shard_tokens)
    store.path.mkdir(parents=True, exist_ok=True)
    store._write_rows(activations.split(shard_tokens), on_shard)
    return store
