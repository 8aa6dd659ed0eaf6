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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

import saesweep
from saesweep.activations import harvest
from saesweep.errors import CheckpointError, ConfigError, DataError
from saesweep.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
_FORMAT_VERSION = 3  # 2: shards record the training contexts they read; 3: documents mixed, held-out documents
_READ_CHUNK = 1 << 22


class StoreCorruptError(CheckpointError):
    """A shard on disk does not match its recorded size or checksum."""


def default_store_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "saesweep" / "activations"


def model_fingerprint(model) -> str:
    """A digest of every weight of the model: a changed local model never reuses stale activations."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenFilter:
    """Which harvested positions to drop: special tokens (BOS/EOS) and norm outliers."""

    drop_special_tokens: bool = False
    max_norm_ratio: float | None = None  # drop rows with norm > ratio × the median norm of their shard

    @property
    def active(self) -> bool:
        return self.drop_special_tokens or self.max_norm_ratio is not None

    def keep_mask(self, tokens: torch.Tensor, acts: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
        keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if self.drop_special_tokens and special_ids:
            keep &= ~torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))
        if self.max_norm_ratio is not None:
            norms = acts.float().norm(dim=-1)
            keep &= norms <= self.max_norm_ratio * norms.median()
        return keep

    def apply(self, tokens: torch.Tensor, acts: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
        """The kept rows of `acts` [n, ctx_len, d] as [rows, d] (a view when nothing is filtered)."""
        if not self.active:
            return acts.reshape(-1, acts.shape[-1])
        return acts[self.keep_mask(tokens, acts, special_ids)]


@dataclass(frozen=True)
class StoreSpec:
    """Everything that decides the stored activations; its digest names the store."""

    model: str
    model_fingerprint: str
    hook_point: str
    dataset: dict
    split: str
    ctx_len: int
    n_tokens: int
    dtype: str
    token_filter: TokenFilter

    def key(self) -> dict:
        return {
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "hook_point": self.hook_point,
            "dataset": self.dataset,
            "split": self.split,
            "ctx_len": self.ctx_len,
            "n_tokens": self.n_tokens,
            "dtype": self.dtype,
            "token_filter": {
                "drop_special_tokens": self.token_filter.drop_special_tokens,
                "max_norm_ratio": self.token_filter.max_norm_ratio,
            },
            "format": _FORMAT_VERSION,
        }

    @classmethod
    def from_key(cls, key: dict) -> StoreSpec:
        fields = {name: key[name] for name in cls.__dataclass_fields__ if name != "token_filter"}
        return cls(**fields, token_filter=TokenFilter(**key["token_filter"]))

    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(self.key(), sort_keys=True).encode(), digest_size=10).hexdigest()


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
                f"store.dir={str(self.path.parent)!r} has {_bytes_text(free)} free, but the activation store needs up to "
                f"{_bytes_text(needed)} more (n_tokens={self.spec.n_tokens} × d_in={d_in} × {itemsize} bytes of "
                f"{self.spec.dtype}); free space, set store.dir to a disk with room, lower n_tokens, or use "
                "store.dtype=bfloat16 (half the bytes)"
            )

    def ensure(self, model, context_batches: Iterator[torch.Tensor], batch_contexts: int) -> dict:
        """Harvest the store unless it is complete; concurrent callers wait for the harvester.

        `context_batches` yields training contexts in their fixed order; it is only consumed when
        something is left to harvest. Returns the manifest.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if self.is_complete():
            self._log("reused")
            return self.manifest()
        with self._lock("harvested"):
            if self.is_complete():  # another job finished it while we waited
                self._log("reused")
                return self.manifest()
            self._harvest(model, context_batches, batch_contexts)
            self._log("harvested")
            return self.manifest()

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

    def _harvest(self, model, context_batches: Iterator[torch.Tensor], batch_contexts: int) -> None:
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
            if _shard_file(shard_index) in present:
                continue  # this shard's contexts were harvested before (an interruption, a shard found corrupt)
            if present and _shard_file(shard_index) < max(present):
                log.warning("activation store %s: re-harvesting %s", self.path, _shard_file(shard_index))
            acts = harvest(model, shard_contexts, self.spec.hook_point, batch_contexts)
            kept_rows = self.spec.token_filter.apply(shard_contexts, acts, special)
            shard = kept_rows[: target - manifest["n_rows"]].to(STORE_DTYPES[self.spec.dtype])
            self._write_shard(manifest, shard_index, shard, n_contexts=len(shard_contexts))
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

    def _write_shard(self, manifest: dict, index: int, shard: torch.Tensor, n_contexts: int) -> None:
        entry = self._write_file(_shard_file(index), {"activations": shard})
        # training contexts read for it: held-out reports skip exactly these
        manifest["shards"].append({**entry, "rows": len(shard), "contexts": n_contexts})
        manifest["shards"].sort(key=lambda s: s["file"])  # a re-harvested shard goes back to its place
        manifest["n_rows"] += len(shard)
        manifest["d_in"] = shard.shape[1]
        atomic_write_json(self.path / MANIFEST, manifest)

    def _write_file(self, name: str, tensors: dict[str, torch.Tensor]) -> dict:
        data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self.path / name, data)
        return {"file": name, "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}

    def held_out(self, n_contexts: int, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors of the first `n_contexts` held-out contexts (see ContextSource.held_out_contexts),
        made once by `build` and kept beside the shards: every job of a sweep reads them."""
        if (tensors := self._read_held_out(n_contexts)) is not None:
            return tensors
        with self._lock("given its held-out set"):
            if (tensors := self._read_held_out(n_contexts)) is not None:  # another job built it while we waited
                return tensors
            tensors = build()
            entry = {**self._write_file(f"held_out_{n_contexts}.safetensors", tensors), "tensors": sorted(tensors)}
            manifest = self.manifest()
            manifest["held_out"] = {**manifest.get("held_out", {}), str(n_contexts): entry}
            atomic_write_json(self.path / MANIFEST, manifest)
        return tensors

    def _read_held_out(self, n_contexts: int) -> dict[str, torch.Tensor] | None:
        entry = self.manifest().get("held_out", {}).get(str(n_contexts))
        if not entry:
            return None
        try:
            return _read_verified(self.path, entry, *entry["tensors"])
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
    def read_shard(self, entry: dict) -> torch.Tensor:
        """A shard's activations; a shard found corrupt is forgotten, so the next `ensure` re-harvests it."""
        try:
            return read_shard(self.path, entry)
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


def _shard_file(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def read_shard(store_path: Path, entry: dict) -> torch.Tensor:
    """A shard's activations, after checking its size and checksum against its manifest entry."""
    return _read_verified(store_path, entry, "activations")["activations"]


def _read_verified(store_path: Path, entry: dict, *names: str) -> dict[str, torch.Tensor]:
    """Tensors `names` of a store file, after checking its size and checksum against `entry`.

    The checksum is computed while reading in chunks and the tensors then come from a memory map, so
    reading costs one copy of the data, not two. Files are checked with crc32, 5× faster than the
    blake2b of stores written before it (still read): the check runs on every row training reads.
    """
    path = Path(store_path) / entry["file"]
    size, checksum = 0, 0
    digest = None if "crc32" in entry else hashlib.blake2b()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                if digest is None:
                    checksum = zlib.crc32(chunk, checksum)
                else:
                    digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise StoreCorruptError(f"activation shard {path} is missing") from None
    intact = f"{checksum:08x}" == entry["crc32"] if digest is None else digest.hexdigest() == entry["blake2b"]
    if size != entry["bytes"] or not intact:
        raise StoreCorruptError(
            f"activation shard {path} is corrupt or truncated ({size} bytes, expected {entry['bytes']}, "
            "checksum mismatch); rerun the job to re-harvest it"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise StoreCorruptError(f"activation shard {path} cannot be read: {e}") from None


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


_PREFETCH = 2  # batches read ahead while the training step runs


def _prefetched(batches: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """`batches`, each made `depth` ahead of its use in a background thread, so that reading, checking
    and shuffling shards overlaps the training step (file reads, hashing and torch ops release the GIL;
    on a GPU the step's kernels are queued and the host would otherwise wait on the data path). One
    worker calls `next` on the generator, so it never runs twice at once; its errors reach the caller."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saesweep-prefetch") as pool:
        pending = deque(pool.submit(next, batches, None) for _ in range(depth))
        while (batch := pending.popleft().result()) is not None:
            pending.append(pool.submit(next, batches, None))
            yield batch


class StoreStream(IterableDataset):
    """Training batches from a complete store: shards in a random order, rows mixed in a shuffle buffer
    of `buffer_tokens` rows.

    Two ways to get the rows, the same batches for the same seed (`device_buffer`: true, false, or
    "auto" for when they fit, see `resident_rows`). Streamed: shards are read as the epoch goes
    (memory: the buffer plus two shards, whatever n_tokens is). Resident: every row is read once into
    one tensor on `device` (the GPU; RAM on the CPU), the shuffle runs on row numbers, and a batch is
    one gather on the device: no host work, no copy per batch.

    The order of an epoch depends only on (seed, epoch), so a position is two numbers: `state_dict()`
    gives them and `load_state_dict()` makes the next iteration replay that epoch and skip the batches
    already consumed, which is how a resumed job sees exactly the batches an uninterrupted one would.

    Under data parallelism (`world_size` processes) rank r reads only the shards r, r + world_size, …
    in batches of batch_size / world_size rows, so the ranks' batches together make one batch of
    batch_size; every rank stops after the same number of batches (the smallest part's), as DDP needs.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device_buffer: bool | str = False,
        device: torch.device | str = "cpu",
    ):
        manifest = store.manifest()
        if not (manifest and manifest["complete"]):
            raise CheckpointError(f"activation store {store.path} is not complete; harvest it first")
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} does not split evenly over {world_size} processes; "
                f"allowed: a multiple of {world_size}"
            )
        if len(manifest["shards"]) < world_size:
            raise ConfigError(
                f"the activation store has {len(manifest['shards'])} shards, fewer than the {world_size} processes "
                "that each need their own; lower store.shard_tokens"
            )
        self.store = store
        self.d_in = manifest["d_in"]
        self.shards = manifest["shards"][rank::world_size]
        self.n_rows = sum(s["rows"] for s in self.shards)
        self.batch_size = batch_size // world_size
        self.buffer_tokens = max(buffer_tokens // world_size, self.batch_size)
        self.seed = seed
        # the part with the fewest rows sets every rank's batch count
        self._n_batches = min(
            math.ceil(sum(s["rows"] for s in manifest["shards"][r::world_size]) / self.batch_size)
            for r in range(world_size)
        )
        self.epoch = 0  # the epoch the next iteration streams
        self._skip = 0  # batches of that epoch to skip (already consumed before a resume)
        self._position = {"epoch": 0, "batches": 0}  # of the iteration in progress
        self.device = torch.device(device)
        itemsize = STORE_DTYPES[store.spec.dtype].itemsize
        self.resident = resident_rows(device_buffer, self.n_rows * self.d_in * itemsize, self.device)
        self._rows: torch.Tensor | None = None  # the resident rows, read on first use

    def __len__(self) -> int:
        return self._n_batches

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # the epoch was finished: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self.epoch, self._skip = epoch, batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, skip = self.epoch, self._skip
        self.epoch, self._skip = epoch + 1, 0
        self._position = {"epoch": epoch, "batches": skip}
        batches = self._resident_batches(epoch, skip) if self.resident else self._streamed_batches(epoch, skip)
        for batch in batches:
            self._position["batches"] += 1
            yield batch

    def _streamed_batches(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        # the next shard is read and checked in another thread while this one is shuffled
        shards = _prefetched((self.store.read_shard(self.shards[i]).float() for i in order), depth=1)
        batches = itertools.islice(self._shuffled(shards, generator), len(self))
        yield from itertools.islice(_prefetched(batches, _PREFETCH), skip, None)

    def _resident_batches(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        rows = self._resident_rows()
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        starts = list(itertools.accumulate((s["rows"] for s in self.shards), initial=0))
        # the streamed path's shuffle, run on row numbers: the same batches, drawn from `rows`
        numbers = (torch.arange(starts[i], starts[i + 1]) for i in order)
        batches = list(itertools.islice(self._shuffled(numbers, generator), skip, len(self)))
        if not batches:
            return
        sizes = [len(b) for b in batches]
        # the epoch's row numbers go to the device in one copy; each batch is then one gather there
        for numbers_of_batch in torch.cat(batches).to(self.device, non_blocking=True).split(sizes):
            yield rows.index_select(0, numbers_of_batch).float()

    def _resident_rows(self) -> torch.Tensor:
        """Every row of this rank's shards in one tensor on the device, in shard order (read once)."""
        if self._rows is None:
            pinned = self.device.type == "cuda"
            rows = torch.empty(self.n_rows, self.d_in, dtype=STORE_DTYPES[self.store.spec.dtype], device=self.device)
            offset = 0
            for shard in _prefetched((self.store.read_shard(s) for s in self.shards), depth=2):
                # through page-locked memory, so the copy to the GPU runs while the next shard is read
                rows[offset : offset + len(shard)].copy_(shard.pin_memory() if pinned else shard, non_blocking=pinned)
                offset += len(shard)
            self._rows = rows
        return self._rows

    def _shuffled(self, chunks: Iterator[torch.Tensor], generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The chunks' rows (activations [n, d_in], or row numbers [n]) mixed through the shuffle buffer
        and cut into batches; the order depends on the generator alone, not on what the rows hold."""
        capacity = self.buffer_tokens
        # emit a random half of a full buffer (whole batches), keep the rest to mix with later shards
        n_emit = max(capacity // 2 // self.batch_size, 1) * self.batch_size
        buffer: torch.Tensor | None = None
        # The buffer is a list of rows in logical order (kept rows first, then new ones); `slots` maps
        # it to the rows' places in `buffer`, so that keeping half a buffer moves indices, not rows.
        # (index_select and index_copy_: several times faster on the CPU than buffer[indices])
        slots = torch.arange(capacity)
        filled = 0
        for rows in chunks:
            if buffer is None:
                buffer = rows.new_empty((capacity, *rows.shape[1:]))
            taken = 0
            while taken < len(rows):
                n = min(capacity - filled, len(rows) - taken)
                buffer.index_copy_(0, slots[filled : filled + n], rows[taken : taken + n])
                filled, taken = filled + n, taken + n
                if filled == capacity:
                    mixed = torch.randperm(capacity, generator=generator)
                    yield from (buffer.index_select(0, batch) for batch in slots[mixed[:n_emit]].split(self.batch_size))
                    slots = torch.cat([slots[mixed[n_emit:]], slots[mixed[:n_emit]]])
                    filled = capacity - n_emit
            del rows
        if filled:
            mixed = torch.randperm(filled, generator=generator)
            yield from (buffer.index_select(0, batch) for batch in slots[:filled][mixed].split(self.batch_size))


DEVICE_BUFFER_SHARE = 0.5  # store.device_buffer=auto: the rows may take up to this share of the free memory


def resident_rows(setting: bool | str, n_bytes: int, device: torch.device) -> bool:
    """Whether a fit's training rows (`n_bytes`) are read once onto `device` (store.device_buffer):
    true, false, or auto (when they take at most half of the device's free memory)."""
    if setting is False:
        return False
    free = free_memory(device)
    fits = n_bytes <= DEVICE_BUFFER_SHARE * free
    if setting is True and n_bytes > free:
        raise ConfigError(
            f"store.device_buffer=true: the training activations take {_bytes_text(n_bytes)}, more than the "
            f"{_bytes_text(free)} free on {device}; use store.device_buffer=auto (streams what does not fit), "
            "store.dtype=bfloat16 (half the bytes) or fewer n_tokens"
        )
    return setting is True or fits


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the RAM available on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ResumableLoader(DataLoader):
    """A DataLoader over a StoreStream that Lightning checkpoints: Lightning saves the `state_dict` of
    any stateful train loader with the fit loop and hands it back on resume, before iterating.

    The stream's position counts the batches it has handed out. That equals the steps taken because
    Lightning prefetches nothing from a loader whose length is known (StoreStream has `__len__`).
    """

    def __init__(self, stream: StoreStream, pin_memory: bool = False):
        super().__init__(stream, batch_size=None, pin_memory=pin_memory)

    def state_dict(self) -> dict[str, int]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.load_state_dict(state)


def _bytes_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def list_stores(root: Path) -> list[dict]:
    """Every store under `root`: its directory, size on disk, token count, completeness and key."""
    out = []
    for path in sorted(Path(root).glob("*/" + MANIFEST)):
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = {}
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
        out.append({
            "path": path.parent,
            "bytes": size,
            "n_rows": manifest.get("n_rows", 0),
            "complete": manifest.get("complete", False),
            "key": manifest.get("key", {}),
            "shards": manifest.get("shards", []),
        })
    return out


def verify_store(path: Path, shards: list[dict]) -> list[str]:
    """The problems of every shard of a store (empty when all are intact)."""
    problems = []
    for entry in shards:
        try:
            read_shard(path, entry)
        except StoreCorruptError as e:
            problems.append(str(e))
    return problems


def remove_store(path: Path) -> None:
    if not (Path(path) / MANIFEST).is_file():
        raise ConfigError(f"{path} is not an activation store (no {MANIFEST})")
    shutil.rmtree(path)


def write_store(root: Path, spec: StoreSpec, activations: torch.Tensor, shard_tokens: int) -> ActivationStore:
    """A complete store of activations already in memory [n, d_in] (computed elsewhere, or synthetic
    for tests and benchmarks); shards record no training contexts."""
    store = ActivationStore(root, spec, shard_tokens)
    store.path.mkdir(parents=True, exist_ok=True)
    manifest = {"key": spec.key(), "dtype": spec.dtype, "d_in": activations.shape[1], "shards": [], "n_rows": 0,
                "complete": False, "saesweep_version": saesweep.__version__}
    for index, start in enumerate(range(0, len(activations), shard_tokens)):
        rows = activations[start : start + shard_tokens].to(STORE_DTYPES[spec.dtype])
        store._write_shard(manifest, index, rows, n_contexts=0)
    manifest["complete"] = True
    atomic_write_json(store.path / MANIFEST, manifest)
    return store
