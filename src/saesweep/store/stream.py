"""Training batches from a complete store, streamed from disk or drawn from rows resident on the
training device (resident.py); the same batches either way, resumable mid-epoch."""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, IterableDataset

from saesweep.errors import CheckpointError, ConfigError
from saesweep.store.activation_store import ActivationStore
from saesweep.store.files import bytes_text
from saesweep.store.key import STORE_DTYPES
from saesweep.store.resident import HarvestedRows, read_resident, resident_rows

log = logging.getLogger(__name__)

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

    Every batch comes divided by `scale` (the training's activation scale, 1: raw activations): a resident
    float32 buffer is divided once, streamed shards in the reader thread, so no training step divides a batch.

    `harvested`: the rows a harvest in this process kept on the device as it wrote them (HarvestedRows); a
    resident stream of the whole store takes them as its buffer and reads back only the shards they lack.
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
        scale: float = 1.0,
        harvested: HarvestedRows | None = None,
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
        self.scale = float(scale)
        # the part with the fewest rows sets every rank's batch count
        self._n_batches = min(
            math.ceil(sum(s["rows"] for s in manifest["shards"][r::world_size]) / self.batch_size)
            for r in range(world_size)
        )
        self.epoch = 0  # the epoch the next iteration streams
        self._skip = 0  # batches of that epoch to skip (already consumed before a resume)
        self._position = {"epoch": 0, "batches": 0}  # of the iteration in progress
        self.device = torch.device(device)
        dtype = STORE_DTYPES[store.spec.dtype]
        self._harvested = harvested.take(self.shards, dtype, self.device) if harvested else None
        held = 0 if self._harvested is None else self._harvested.nbytes  # already on the device: not counted twice
        self.resident = resident_rows(device_buffer, self.n_rows * self.d_in * dtype.itemsize, self.device, held)
        if not self.resident:
            self._harvested = None
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
        shards = _prefetched((self._scaled(self.store.read_shard(self.shards[i]).float()) for i in order), depth=1)
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
        # the epoch's row numbers go to the device in one copy; each batch is then one gather there (on the
        # CPU not in a prefetch thread: the handoff cost more than the gather, 5.6 against 3.3 ms a step at
        # d_in 64 in benchmarks/host_step.py on 2 cores)
        scaled = rows.dtype == torch.float32  # divided once when read; other dtypes after the cast to float32
        for numbers_of_batch in torch.cat(batches).to(self.device, non_blocking=True).split(sizes):
            batch = rows.index_select(0, numbers_of_batch)
            yield batch if scaled else self._scaled(batch.float())

    def _resident_rows(self) -> torch.Tensor:
        """Every row of this rank's shards in one tensor on the device, in shard order (read once)."""
        if self._rows is None:
            dtype = STORE_DTYPES[self.store.spec.dtype]
            kept = 0 if self._harvested is None else len(self._harvested.placed)
            self._rows = read_resident(self.store, self.shards, self.d_in, dtype, self.device, self._harvested)
            self._harvested = None
            log.info(
                "training rows resident on %s: %d rows (%s), %d shards kept from the harvest, %d read from the store",
                self.device, len(self._rows), bytes_text(self._rows.numel() * self._rows.element_size()), kept,
                len(self.shards) - kept,
            )
            if dtype == torch.float32:
                self._scaled(self._rows)
        return self._rows

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (float32, this stream's own) divided by the scale, in place."""
        return rows if self.scale == 1.0 else rows.div_(self.scale)

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
