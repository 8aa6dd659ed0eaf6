"""The training rows resident on the training device (store.device_buffer): whether they fit (`resident_rows`),
their buffer (on the CPU on 2 MiB pages), its read from the store (onto a GPU through small page-locked
buffers), and the rows a harvest keeps in it as it writes the store (`HarvestedRows`)."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from saesweep.errors import ConfigError
from saesweep.store.activation_store import ActivationStore
from saesweep.store.files import bytes_text

_READERS = min(4, os.cpu_count() or 1)  # threads that read the shards of a resident buffer

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
