"""Training batches from a complete store, streamed from disk or drawn from rows resident on the
training device; the same batches either way, resumable mid-epoch."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import math
import mmap
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, IterableDataset

from saesweep.errors import CheckpointError, ConfigError
from saesweep.store.activation_store import ActivationStore
from saesweep.store.files import bytes_text
from saesweep.store.key import STORE_DTYPES

log = logging.getLogger(__name__)

_PREFETCH = 2  # batches read ahead while the training step runs
_READERS = min(4, os.cpu_count() or 1)  # threads that read the shards of a resident buffer


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


DEVICE_BUFFER_SHARE = 0.5  # store.device_buffer=auto: the rows may take up to this share of the free memory


def read_resident(
    store: ActivationStore, shards: list[dict], d_in: int, dtype: torch.dtype, device: torch.device,
    harvested: HarvestedRows | None = None,
) -> torch.Tensor:
    """The rows of `shards` in one tensor on `device`, in shard order: `harvested`'s tensor when given (see
    HarvestedRows.take), with the shards it lacks read into it. They are read by _READERS threads a shard at a
    time: on the CPU straight into their rows; on a GPU in pieces through the thread's own `PinnedStaging`,
    copied on its own CUDA stream while the next piece is read."""
    starts = list(itertools.accumulate((s["rows"] for s in shards), initial=0))
    if harvested is None:
        rows, have = empty_rows(starts[-1], d_in, dtype, device), set()
    else:
        rows, have = harvested.rows, set(harvested.placed)
    to_read = [j for j, s in enumerate(shards) if s["file"] not in have]

    def read_every_nth(first: int) -> None:
        mine = to_read[first::_READERS]
        if device.type != "cuda":
            for j in mine:
                store.read_shard(shards[j], rows[starts[j] : starts[j + 1]].view(-1).view(torch.uint8))
            return
        copies = torch.cuda.Stream(device)
        copies.wait_stream(torch.cuda.current_stream(device))  # `rows` was made on the current stream
        staging = PinnedStaging(max(STAGING_BYTES, d_in * 4))  # a row of the widest stored dtype at least
        with torch.cuda.stream(copies):
            for j in mine:
                at = starts[j]
                for piece in store.read_shard_pieces(shards[j], staging):
                    staging.copy(piece, rows[at : at + len(piece)])
                    at += len(piece)
        copies.synchronize()

    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="saesweep-resident") as pool:
        list(pool.map(read_every_nth, range(min(_READERS, len(to_read)))))
    return rows


# The bytes of one page-locked staging buffer; a GPU reader thread has two. Page-locking cost 0.7 ms a MB on the
# H200 (44 ms for 64 MB), paid at a process's first read: buffers of a whole shard each (four threads × 256 MiB
# for 64 Ki rows at d_in 1024) would cost more than the read they serve.
STAGING_BYTES = 4 << 20


class PinnedStaging:
    """Two page-locked buffers handed out in turn (an iterator, for ActivationStore.read_shard_pieces), each
    only once the copy out of its last piece has left it; `copy` sends a piece to the device on the current
    CUDA stream."""

    def __init__(self, n_bytes: int):
        self.buffers = [torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # after the last copy out of each buffer
        self.turn = 0

    def __iter__(self) -> PinnedStaging:
        return self

    def __next__(self) -> torch.Tensor:
        self.turn = 1 - self.turn
        if (copied := self.copied[self.turn]) is not None:
            copied.synchronize()
        return self.buffers[self.turn]

    def copy(self, piece: torch.Tensor, into: torch.Tensor) -> None:
        """`into` (on the device) gets `piece`, the last buffer's, without the host waiting for it."""
        into.copy_(piece, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()


def empty_rows(n_rows: int, d_in: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A resident buffer, not yet written: on the CPU asked to lie on huge pages (advise_huge_pages)."""
    rows = torch.empty(n_rows, d_in, dtype=dtype, device=device)
    advise_huge_pages(rows)
    return rows


class HarvestedRows:
    """A store's rows kept on `device` as a harvest (or a synthetic source) writes them: an
    ActivationStore.ensure `on_shard` that copies each shard into its place in one tensor, in the store's
    shard order, so that the fit right after the harvest draws from them instead of reading the store back
    (0.42 s for 1.68 GB on an H200, and every row's checksum again). Shards written before (a resumed
    harvest) are not here: the stream reads them into their places."""

    def __init__(self, n_rows: int, d_in: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (n_rows, d_in), dtype, device
        self.rows: torch.Tensor | None = None  # made at the first shard: a store found complete costs nothing
        self.placed: dict[str, int] = {}  # shard file → its first row

    @classmethod
    def for_fit(
        cls, setting: bool | str, n_rows: int, d_in: int, dtype: torch.dtype, device: torch.device
    ) -> HarvestedRows | None:
        """Where a harvest keeps its rows for the fit that follows: unless store.device_buffer=false, when
        the whole store fits by auto's rule (resident_rows; None: it is read back)."""
        fits = setting is not False and resident_rows("auto", n_rows * d_in * dtype.itemsize, device)
        return cls(n_rows, d_in, dtype, device) if fits else None

    def __call__(self, file: str, first_row: int, shard: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = empty_rows(*self.shape, self.dtype, self.device)
        self.rows[first_row : first_row + len(shard)].copy_(shard)
        self.placed[file] = first_row

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def take(self, shards: list[dict], dtype: torch.dtype, device: torch.device) -> HarvestedRows | None:
        """These rows, handed over once (the stream divides them in place), when they are `shards` (every
        shard of the store: one process) in their places, in `dtype` on `device`; None otherwise."""
        starts = itertools.accumulate((s["rows"] for s in shards), initial=0)
        device = torch.empty(0, device=device).device  # with its index: "cuda" is "cuda:0" here
        fits = (
            self.rows is not None and (self.rows.dtype, self.rows.device) == (dtype, device)
            and len(self.rows) == sum(s["rows"] for s in shards)
            and all(self.placed.get(s["file"], start) == start for s, start in zip(shards, starts))
        )
        taken = HarvestedRows(*self.shape, self.dtype, self.device)
        taken.rows, taken.placed = self.rows, self.placed
        self.rows, self.placed = None, {}
        return taken if fits else None


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a CPU tensor's memory (not yet written) with 2 MiB pages. A batch draw reads rows
    at random, each on its own 4 KiB page: every row missed the TLB, and the gather ran at a fifth of a plain
    copy's speed; on 2 MiB pages it is 1.5× faster (benchmarks/RESULTS.md, host_step.py). Pages already
    touched stay small: it is for a fresh mapping, as a tensor over glibc's mmap threshold (≤ 32 MiB) is.
    Best effort: False where the system does not take the advice (another OS, or transparent huge pages off)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    with contextlib.suppress(OSError, AttributeError):
        start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        aligned = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # madvise wants a page-aligned start
        if start + size > aligned:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            return madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + size - aligned), mmap.MADV_HUGEPAGE) == 0
    return False


def resident_rows(setting: bool | str, n_bytes: int, device: torch.device, held: int = 0) -> bool:
    """Whether a fit's training rows (`n_bytes`) are read once onto `device` (store.device_buffer):
    true, false, or auto (when they take at most half of the device's free memory, counting as free the
    `held` bytes of harvested rows the buffer would be)."""
    if setting is False:
        return False
    free = free_memory(device) + held
    fits = n_bytes <= DEVICE_BUFFER_SHARE * free
    if setting is True and n_bytes > free:
        raise ConfigError(
            f"store.device_buffer=true: the training activations take {bytes_text(n_bytes)}, more than the "
            f"{bytes_text(free)} free on {device}; use store.device_buffer=auto (streams what does not fit), "
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
