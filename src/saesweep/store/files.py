"""A store's files: shards and held-out sets checked against the manifest's sizes and checksums when
read, written atomically; the listing, checking and removal behind `saesweep-store`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from saesweep.errors import CheckpointError, ConfigError
from saesweep.io import atomic_write_bytes

MANIFEST = "manifest.json"
_READ_CHUNK = 1 << 22
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class StoreCorruptError(CheckpointError):
    """A shard on disk does not match its recorded size or checksum."""

def shard_file(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def read_shard(store_path: Path, entry: dict) -> torch.Tensor:
    """A shard's activations, after checking its size and checksum against its manifest entry."""
    return read_verified(store_path, entry, "activations")["activations"]


def read_verified(store_path: Path, entry: dict, *names: str) -> dict[str, torch.Tensor]:
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
    _check_shard(path, entry, size, intact)
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise StoreCorruptError(f"activation shard {path} cannot be read: {e}") from None


def read_shard_into(store_path: Path, entry: dict, into: torch.Tensor) -> torch.Tensor:
    """A shard's activations read straight into `into` (flat uint8, at least their bytes long: the
    rows' place in a resident buffer) and checked there, chunk by chunk while each is in the cache;
    returns them as a view of `into`. The host makes no copy of its own. A store written with blake2b
    checksums is read by `read_shard`, and copied."""
    if "crc32" not in entry:
        data = read_shard(store_path, entry)
        out = into[: data.numel() * data.element_size()].view(data.dtype).view(data.shape)
        return out.copy_(data)
    path = Path(store_path) / entry["file"]
    with _checked_shard(path, entry) as (f, header, dtype, shape, end):
        read, checksum = _read_checked(f, into, end, zlib.crc32(header))
        _check_shard(path, entry, len(header) + read, f"{checksum:08x}" == entry["crc32"])
    return into[:end].view(dtype).view(shape)


def read_shard_pieces(store_path: Path, entry: dict, buffers: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """A shard's activations read in pieces of whole rows, each into the next buffer `buffers` gives (flat
    uint8, each holding a row at least: page-locked staging on the way to a GPU), as views [rows, ...] of
    them, in row order. Size and checksum are checked as they are read, the checksum's verdict after the
    last piece (StoreCorruptError): only then do the pieces' copies hold the shard. `buffers` may hand out
    a buffer again once the caller is done with its last piece (it is asked for the next buffer only after
    the last piece was handed over). A store checksummed with blake2b gives one piece, not in a buffer."""
    if "crc32" not in entry:  # a blake2b store: one piece, the whole shard, read and checked first
        yield read_shard(store_path, entry)
        return
    path = Path(store_path) / entry["file"]
    with _checked_shard(path, entry) as (f, header, dtype, shape, end):
        row_bytes, read, checksum = dtype.itemsize * math.prod(shape[1:]), 0, zlib.crc32(header)
        while read < end:
            buffer = next(buffers)
            if len(buffer) < row_bytes:
                raise ValueError(f"a staging buffer of {len(buffer)} bytes, smaller than one row ({row_bytes} bytes)")
            n = min(len(buffer) // row_bytes * row_bytes, end - read)
            got, checksum = _read_checked(f, buffer, n, checksum)
            read += got
            if got < n:
                break
            yield buffer[:n].view(dtype).view(-1, *shape[1:])
        _check_shard(path, entry, len(header) + read, f"{checksum:08x}" == entry["crc32"])


@contextlib.contextmanager
def _checked_shard(path: Path, entry: dict) -> Iterator[tuple]:
    """A crc32 shard opened after its size is checked against `entry`, at its data: the open file, its
    safetensors header (where the checksum starts), the activations' dtype and shape, and their bytes. A
    shard missing, cut short or with a header that does not add up is a StoreCorruptError."""
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(open(path, "rb"))
            on_disk = os.fstat(f.fileno()).st_size
            _check_shard(path, entry, on_disk, True)
            head = f.read(8)
            header = head + f.read(int.from_bytes(head, "little"))
            info = json.loads(header[8:])["activations"]
            start, end = info["data_offsets"]
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            if len(header) + end != on_disk or start != 0 or math.prod(shape) * dtype.itemsize != end:
                raise ValueError(f"data of shape {shape} at {start}..{end} after a {len(header)}-byte header in {on_disk} bytes")
        except FileNotFoundError:
            raise StoreCorruptError(f"activation shard {path} is missing") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise StoreCorruptError(f"activation shard {path} cannot be read: {e}") from None
        yield f, header, dtype, shape, end  # outside the try: what the reader raises stays its own


def _read_checked(f, into: torch.Tensor, n: int, checksum: int) -> tuple[int, int]:
    """Up to `n` bytes of `f` read into the flat uint8 `into`, the crc32 `checksum` carried over them a
    cache-sized chunk at a time while each is fresh: the bytes read and the checksum."""
    data, read = memoryview(into.numpy())[:n], 0
    while read < n and (got := f.readinto(data[read : min(read + _READ_CHUNK, n)])):
        checksum = zlib.crc32(data[read : read + got], checksum)
        read += got
    return read, checksum


def _check_shard(path: Path, entry: dict, size: int, intact: bool) -> None:
    if size != entry["bytes"] or not intact:
        raise StoreCorruptError(
            f"activation shard {path} is corrupt or truncated ({size} bytes, expected {entry['bytes']}, "
            "checksum mismatch); rerun the job to re-harvest it"
        )


def bytes_text(n_bytes: int) -> str:
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


def write_file(store_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Tensors written atomically as `name` in the store; returns their manifest entry."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(Path(store_path) / name, data)
    return {"file": name, "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
