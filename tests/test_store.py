"""The activation store: exact contents, reuse, resume after SIGKILL, corruption, bounded memory."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, synthetic_documents
from saesweep.activations import harvest
from saesweep.data import ContextSource
from saesweep.errors import ConfigError
from saesweep.store import (
    MANIFEST,
    STORE_DTYPES,
    ActivationStore,
    HarvestedRows,
    StoreCorruptError,
    StoreSpec,
    StoreStream,
    TokenFilter,
    model_fingerprint,
    write_store,
)
from saesweep.store.files import read_shard_pieces
from saesweep.training_data import kept_rows

HOOK = "blocks.1.hook_resid_post"
CTX = 16


NO_FILTER = TokenFilter()


def spec_for(model, n_tokens=3000, dtype="float32", token_filter=NO_FILTER):
    return StoreSpec(
        model="tiny", model_fingerprint=model_fingerprint(model), hook_point=HOOK, dataset={"docs": "synthetic"},
        split="train", ctx_len=CTX, n_tokens=n_tokens, dtype=dtype, token_filter=token_filter,
    )


def train_batches(model, n_docs=200):
    source = ContextSource(synthetic_documents(n_docs), model.tokenizer, CTX, True, seed=0)
    return source.train_batches(batch_contexts=32)


def test_store_holds_exactly_the_harvested_activations(tmp_path, tiny_model):
    store = ActivationStore(tmp_path, spec_for(tiny_model), shard_tokens=500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), batch_contexts=8)
    assert manifest["complete"] and manifest["n_rows"] == 3000 and manifest["d_in"] == 32
    assert len(manifest["shards"]) == 7  # 496 rows (31 contexts) per shard
    stored = torch.cat([store.read_shard(s) for s in manifest["shards"]])
    contexts = torch.cat(list(train_batches(tiny_model)))[: -(-3000 // CTX)]
    expected = harvest(tiny_model, contexts, HOOK, 8).reshape(-1, 32)[:3000]
    torch.testing.assert_close(stored, expected)


def test_second_ensure_reuses_without_touching_the_model(tmp_path, tiny_model, caplog):
    spec = spec_for(tiny_model)
    ActivationStore(tmp_path, spec, 500).ensure(tiny_model, train_batches(tiny_model), 8)

    def exploding():
        raise AssertionError("a reused store must not read contexts")
        yield

    with caplog.at_level(logging.INFO, logger="saesweep.store"):
        ActivationStore(tmp_path, spec, 500).ensure(None, exploding(), 8)
    assert "activation store reused" in caplog.text


def test_key_changes_with_weights_dtype_and_filters(tiny_model):
    base = spec_for(tiny_model)
    assert spec_for(tiny_model).digest() == base.digest()
    assert spec_for(tiny_model, dtype="bfloat16").digest() != base.digest()
    assert spec_for(tiny_model, token_filter=TokenFilter(drop_special_tokens=True)).digest() != base.digest()
    param = next(tiny_model.parameters())
    original = param.detach().clone()
    with torch.no_grad():
        param[0] += 1.0
        try:
            assert spec_for(tiny_model).digest() != base.digest()
        finally:
            param.copy_(original)  # exactly: x + 1 - 1 is not always x in floating point
    assert spec_for(tiny_model).digest() == base.digest()


def test_bfloat16_store_and_special_token_filter(tmp_path, tiny_model):
    spec = spec_for(tiny_model, dtype="bfloat16", token_filter=TokenFilter(drop_special_tokens=True))
    store = ActivationStore(tmp_path, spec, 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    shard = store.read_shard(manifest["shards"][0])
    assert shard.dtype == torch.bfloat16 and manifest["n_rows"] == 3000
    # BOS is the only special token in these contexts: one of every 16 positions is dropped
    contexts = torch.cat(list(train_batches(tiny_model)))[:40]
    acts = harvest(tiny_model, contexts, HOOK, 8)[:, 1:].reshape(-1, 32)
    torch.testing.assert_close(shard[:300].float(), acts[:300].to(torch.bfloat16).float())


def test_norm_outlier_filter_drops_rows_above_ratio_of_median():
    acts = torch.ones(1, 10, 4)
    acts[0, 3] *= 50
    keep = TokenFilter(max_norm_ratio=10).keep_mask(torch.zeros(1, 10, dtype=torch.long), acts, [])
    assert keep.tolist() == [[True, True, True, False, True, True, True, True, True, True]]


_SLOW_HARVEST = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, "tests")
    import saesweep.store.activation_store as store_mod
    from saesweep.lm import load_model
    from test_store import spec_for, train_batches
    real_harvest = store_mod.harvest
    def slow_harvest(*args, **kwargs):
        time.sleep(0.4)
        return real_harvest(*args, **kwargs)
    store_mod.harvest = slow_harvest
    model = load_model(None, sys.argv[1], torch.device("cpu"))
    store_mod.ActivationStore(sys.argv[2], spec_for(model), 200).ensure(model, train_batches(model), 8)
""")


def test_sigkilled_harvest_resumes_without_redoing_finished_shards(tmp_path, tiny_model_dir, tiny_model):
    script = tmp_path / "slow_harvest.py"
    script.write_text(_SLOW_HARVEST)
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(root)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    store = ActivationStore(root, spec_for(tiny_model), 200)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        manifest = store.manifest() if store.path.exists() else None
        if manifest and len(manifest["shards"]) >= 3:
            break
        assert proc.poll() is None, f"harvest process ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = store.manifest()
    assert not killed["complete"] and 3 <= len(killed["shards"]) < 16
    finished = {s["file"]: os.stat(store.path / s["file"]).st_mtime_ns for s in killed["shards"]}

    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    assert manifest["complete"] and manifest["n_rows"] == 3000
    for name, mtime in finished.items():
        assert os.stat(store.path / name).st_mtime_ns == mtime, f"{name} was harvested again"
    fresh = ActivationStore(tmp_path / "fresh", spec_for(tiny_model), 200)
    fresh_manifest = fresh.ensure(tiny_model, train_batches(tiny_model), 8)
    assert [s["crc32"] for s in manifest["shards"]] == [s["crc32"] for s in fresh_manifest["shards"]]


@pytest.mark.parametrize(("damage", "index", "device_buffer"), [
    ("flip", 2, False), ("truncate", 2, False), ("truncate", 0, False), ("flip", 2, True), ("truncate", 0, True),
])
def test_corrupt_shard_is_named_and_reharvested_alone(tmp_path, tiny_model, damage, index, device_buffer):
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    others = {s["file"]: (store.path / s["file"]).stat().st_ino for i, s in enumerate(manifest["shards"]) if i != index}
    bad = store.path / manifest["shards"][index]["file"]
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    bad.write_bytes(bytes(data))

    with pytest.raises(StoreCorruptError, match=bad.name):
        list(StoreStream(store, batch_size=100, buffer_tokens=10_000, seed=0, device_buffer=device_buffer))
    assert not store.is_complete()
    repaired = store.ensure(tiny_model, train_batches(tiny_model), 8)
    assert repaired["complete"] and repaired["shards"] == manifest["shards"]
    assert {f: (store.path / f).stat().st_ino for f in others} == others, "the intact shards were not rewritten"
    rows = torch.cat(list(StoreStream(store, batch_size=100, buffer_tokens=10_000, seed=0)))
    assert rows.shape == (3000, 32)


def test_a_store_checksummed_with_blake2b_still_reads_and_its_damage_is_still_found(tmp_path, tiny_model):
    """Stores written before the crc32 check recorded blake2b: they stream unchanged, and are checked."""
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    stored = torch.cat([store.read_shard(s) for s in manifest["shards"]])
    for entry in manifest["shards"]:
        del entry["crc32"]
        entry["blake2b"] = hashlib.blake2b((store.path / entry["file"]).read_bytes()).hexdigest()
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    rows = torch.cat(list(StoreStream(store, batch_size=100, buffer_tokens=10_000, seed=0)))
    assert torch.allclose(rows.sum(0), stored.sum(0), atol=1e-3)
    resident = torch.cat(list(StoreStream(store, batch_size=100, buffer_tokens=10_000, seed=0, device_buffer=True)))
    assert torch.equal(resident, rows)
    bad = store.path / manifest["shards"][1]["file"]
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=f"{bad.name} is corrupt"):
        store.read_shard(manifest["shards"][1])


def test_stream_yields_every_row_once_in_a_new_order_each_epoch(tmp_path, tiny_model):
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    stored = torch.cat([store.read_shard(s) for s in manifest["shards"]])
    stream = StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0)
    epochs = [torch.cat(list(stream)) for _ in range(2)]
    assert len(stream) == 24
    for rows in epochs:
        assert rows.shape == stored.shape
        assert torch.equal(rows.sum(0), rows.sum(0)) and torch.allclose(rows.sum(0), stored.sum(0), atol=1e-2)
        assert not torch.equal(rows, stored)
    assert not torch.equal(epochs[0], epochs[1])




def test_data_parallel_ranks_stream_disjoint_shards_in_equal_numbers_of_half_batches(tmp_path, tiny_model):
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    ranks = [StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    batches = [list(stream) for stream in ranks]
    assert all(len(b) == len(ranks[0]) and all(len(x) <= 64 for x in b) for b in batches)
    parts = [torch.cat([store.read_shard(s) for s in manifest["shards"][rank::2]]) for rank in (0, 1)]
    for rows, own in zip((torch.cat(b) for b in batches), parts):  # each rank reads its own shards only
        assert {tuple(r) for r in rows.tolist()} <= {tuple(r) for r in own.tolist()}
    # the rank with fewer rows streams all of them; the other stops after as many batches
    smaller = min((0, 1), key=lambda r: len(parts[r]))
    torch.testing.assert_close(torch.cat(batches[smaller]).sum(0), parts[smaller].sum(0), rtol=1e-4, atol=1e-2)
    with pytest.raises(ConfigError, match="train.batch_size=127 does not split evenly over 2 processes"):
        StoreStream(store, batch_size=127, buffer_tokens=1000, seed=0, rank=0, world_size=2)


def test_streaming_memory_is_bounded_by_the_buffer_not_the_store(tmp_path):
    """A 256 MiB store streamed through an 8 MiB buffer: peak RSS grows by a few buffers, measured."""
    d_in, n_rows, shard_rows, buffer_rows = 512, 131072, 4096, 4096
    spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, n_rows, "float32", TokenFilter())
    store = write_store(tmp_path, spec, torch.randn(n_rows, d_in), shard_tokens=shard_rows)

    # glibc otherwise keeps freed multi-MB blocks in its heap, which would measure the allocator's
    # caching policy rather than what the stream holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream_memory.py"), str(store.path), str(buffer_rows)],
                         capture_output=True, text=True, check=True, cwd=REPO, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_increase"] = result["rss_peak"] - result["rss_before"]
    store_bytes = n_rows * d_in * 4
    buffer_bytes = buffer_rows * d_in * 4
    assert result["rows"] == n_rows
    # buffer + two shards (the one shuffled in, the next one read: as file pages and tensor): about 5 buffers' worth
    assert result["peak_increase"] > buffer_bytes / 2, result  # the measurement sees the buffer itself
    assert result["peak_increase"] < 8 * buffer_bytes, result
    assert result["peak_increase"] < store_bytes / 4, result


def test_store_cli_lists_verifies_and_removes(tmp_path, tiny_model, capsys):
    from saesweep.store_cli import main

    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    manifest = store.ensure(tiny_model, train_batches(tiny_model), 8)
    assert main(["--dir", str(tmp_path), "ls"]) == 0
    listing = capsys.readouterr().out
    assert store.path.name in listing and "3,000 tokens" in listing and "complete" in listing
    assert main(["--dir", str(tmp_path), "verify"]) == 0
    (store.path / manifest["shards"][1]["file"]).write_bytes(b"broken")
    assert main(["--dir", str(tmp_path), "verify"]) == 1
    assert manifest["shards"][1]["file"] in capsys.readouterr().out
    assert main(["--dir", str(tmp_path), "rm", store.path.name]) == 0
    assert not store.path.exists()
    assert main(["--dir", str(tmp_path), "rm", "nonexistent"]) == 2


def test_held_out_set_is_built_once_and_checked(tmp_path, tiny_model):
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    store.ensure(tiny_model, train_batches(tiny_model), 8)
    made = {"tokens": torch.arange(12).reshape(3, 4), "ce": torch.rand(3, 3)}
    assert store.held_out(3, lambda: made) is made
    again = store.held_out(3, lambda: pytest.fail("a stored held-out set must not be rebuilt"))
    assert torch.equal(again["tokens"], made["tokens"]) and torch.equal(again["ce"], made["ce"])
    # another eval.n_tokens is another held-out set beside it; the first stays
    bigger = store.held_out(5, lambda: {"tokens": torch.arange(20).reshape(5, 4)})
    assert bigger["tokens"].shape == (5, 4) and store.held_out(3, lambda: pytest.fail("kept"))["tokens"].shape == (3, 4)
    path = store.path / store.manifest()["held_out"]["3"]["file"]
    path.write_bytes(path.read_bytes()[:-8])  # truncated: detected, rebuilt
    rebuilt = store.held_out(3, lambda: {k: v + 1 for k, v in made.items()})
    assert torch.equal(rebuilt["tokens"], made["tokens"] + 1)

@pytest.mark.parametrize("device_buffer", [False, True])
def test_stream_position_restored_in_a_new_stream_continues_with_the_next_batch(tmp_path, tiny_model, device_buffer):
    store = ActivationStore(tmp_path, spec_for(tiny_model), 500)
    store.ensure(tiny_model, train_batches(tiny_model), 8)
    uninterrupted = StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0, device_buffer=device_buffer)
    epoch_0, epoch_1 = torch.cat(list(uninterrupted)), torch.cat(list(uninterrupted))
    stream = StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0, device_buffer=device_buffer)
    list(stream)
    partial = iter(stream)  # epoch 1, interrupted after 5 batches
    consumed = [next(partial) for _ in range(5)]
    assert stream.state_dict() == {"epoch": 1, "batches": 5}

    resumed = StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0, device_buffer=device_buffer)
    resumed.load_state_dict(stream.state_dict())
    rest = list(resumed)
    assert len(rest) == 24 - 5 and torch.equal(torch.cat(consumed + rest), epoch_1)
    # a position at the end of an epoch resumes with the next epoch from its start
    after_epoch = StoreStream(store, batch_size=128, buffer_tokens=1000, seed=0, device_buffer=device_buffer)
    after_epoch.load_state_dict({"epoch": 0, "batches": 24})
    second = torch.cat(list(after_epoch))
    assert torch.equal(second, epoch_1) and not torch.equal(second, epoch_0)


@pytest.mark.parametrize(("dtype", "buffer_tokens", "world_size"), [("float32", 1000, 1), ("bfloat16", 10_000, 2)])
def test_resident_rows_give_the_streamed_batches(tmp_path, dtype, buffer_tokens, world_size):
    """The resident path draws the streamed path's batches, bit for bit, epoch after epoch and on every
    rank: the shuffle is the same, run on row numbers instead of rows."""
    spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, 3000, dtype, TokenFilter())
    store = write_store(tmp_path, spec, torch.randn(3000, 24), shard_tokens=400)
    for rank in range(world_size):
        streamed, resident = (
            StoreStream(store, 128, buffer_tokens, seed=5, rank=rank, world_size=world_size, device_buffer=buffer)
            for buffer in (False, True)
        )
        assert (streamed.resident, resident.resident) == (False, True)
        for _ in range(2):
            a, b = list(streamed), list(resident)
            assert len(a) == len(b) == len(streamed) and all(x.dtype == torch.float32 for x in b)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    # divided by the training's scale: each batch is its raw self / scale, bit for bit, on either path, and the
    # store's files stay raw
    for buffer in (False, True):
        raw = StoreStream(store, 128, buffer_tokens, seed=5, device_buffer=False)
        scaled = StoreStream(store, 128, buffer_tokens, seed=5, device_buffer=buffer, scale=2.5)
        for _ in range(2):  # a resident buffer is divided once, not at every epoch
            assert torch.equal(torch.cat(list(scaled)), torch.cat(list(raw)) / 2.5)
    unscaled = StoreStream(store, 128, buffer_tokens, seed=5, device_buffer=True)
    assert torch.equal(torch.cat(list(unscaled)), torch.cat(list(StoreStream(store, 128, buffer_tokens, seed=5))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_kept_by_the_harvest_give_the_read_back_batches_without_reading_a_shard(tmp_path, tiny_model, monkeypatch, dtype):
    """A fit right after its harvest draws from the rows the harvest kept (HarvestedRows): the batches of a
    stream that reads the store back, bit for bit, with no shard read. After a resumed harvest only the
    shards written before are read; a stream of part of the store (one rank of two) reads its shards."""
    spec, cpu = spec_for(tiny_model, dtype=dtype), torch.device("cpu")
    store = ActivationStore(tmp_path, spec, 500)

    def harvest_keeping_rows() -> HarvestedRows:
        kept = HarvestedRows.for_fit("auto", spec.n_tokens, 32, STORE_DTYPES[dtype], cpu)
        store.ensure(tiny_model, train_batches(tiny_model), 8, on_shard=kept)
        return kept

    kept = harvest_keeping_rows()
    read = []
    read_shard = ActivationStore.read_shard
    monkeypatch.setattr(ActivationStore, "read_shard", lambda self, entry, *a: read.append(entry["file"]) or read_shard(self, entry, *a))
    # the kept rows are already in memory: counted as free, so auto keeps them where it would not read them in
    monkeypatch.setattr("saesweep.store.resident.free_memory", lambda device: 3000 * 32 * STORE_DTYPES[dtype].itemsize)
    from_harvest = StoreStream(store, 128, 1000, seed=0, device_buffer="auto", scale=2.5, harvested=kept)
    assert from_harvest.resident and kept.rows is None  # handed over once
    epochs = [list(from_harvest), list(from_harvest)]
    assert read == []
    monkeypatch.undo()
    read_back = StoreStream(store, 128, 1000, seed=0, device_buffer=True, scale=2.5)
    for batches in epochs:
        expected = list(read_back)
        assert len(batches) == len(expected) == 24 and all(torch.equal(a, b) for a, b in zip(batches, expected))

    manifest = store.manifest()
    for entry in (manifest["shards"][2], manifest["shards"][4]):  # found corrupt: the next harvest writes them again
        store.invalidate(entry)
    kept = harvest_keeping_rows()
    assert sorted(kept.placed) == ["shard_00002.safetensors", "shard_00004.safetensors"]
    monkeypatch.setattr(ActivationStore, "read_shard", lambda self, entry, *a: read.append(entry["file"]) or read_shard(self, entry, *a))
    resumed = StoreStream(store, 128, 1000, seed=0, device_buffer=True, scale=2.5, harvested=kept)
    assert torch.equal(torch.cat(list(resumed)), torch.cat(epochs[0]))
    assert sorted(read) == [s["file"] for i, s in enumerate(store.manifest()["shards"]) if i not in (2, 4)]

    read.clear()
    kept = harvest_keeping_rows()  # the store is complete: nothing written, nothing kept
    assert kept.rows is None
    store.invalidate(manifest["shards"][0])
    kept = harvest_keeping_rows()
    rank_0 = torch.cat(list(StoreStream(store, 128, 1000, seed=0, rank=0, world_size=2, device_buffer=True, harvested=kept)))
    assert sorted(read) == [s["file"] for s in manifest["shards"][0::2]]
    assert torch.equal(rank_0, torch.cat(list(StoreStream(store, 128, 1000, seed=0, rank=0, world_size=2, device_buffer=True))))


def test_a_harvest_keeps_its_rows_only_where_the_setting_free_memory_and_one_process_allow(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("saesweep.store.resident.free_memory", lambda device: 80_000)
    assert HarvestedRows.for_fit("auto", 1000, 10, torch.float32, cpu) is not None  # 40,000 bytes: at most half
    assert HarvestedRows.for_fit(True, 1000, 10, torch.float32, cpu) is not None
    assert HarvestedRows.for_fit(False, 1000, 10, torch.float32, cpu) is None
    assert HarvestedRows.for_fit("auto", 1001, 10, torch.float32, cpu) is None
    # a job keeps them when it runs in one process; under DDP each rank reads its own shards
    cfg = OmegaConf.create({"n_tokens": 1000, "store": {"device_buffer": "auto", "dtype": "float32"}, "trainer": {"devices": 1}})
    assert kept_rows(cfg, 10, cpu) is not None
    for trainer in ({"devices": 2}, {"devices": 1, "num_nodes": 2}, {"devices": "auto"}):
        assert kept_rows(OmegaConf.merge(cfg, {"trainer": trainer}), 10, cpu) is None


def _huge_page_kib(tensor: torch.Tensor) -> int:
    """KiB of this process's memory on 2 MiB pages in the mappings that hold `tensor` (madvise splits one)."""
    first, kib, inside = tensor.data_ptr(), 0, False
    last = first + tensor.numel() * tensor.element_size()
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and not line.split()[0].endswith(":"):
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            inside = start < last and first < end
        elif inside and line.startswith("AnonHugePages:"):
            kib += int(line.split()[1])
    return kib


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="Linux with transparent huge pages")
def test_resident_rows_on_the_cpu_lie_on_huge_pages(tmp_path):
    """The resident buffer is asked to lie on 2 MiB pages (a random-row gather missed the TLB on every row of
    4 KiB pages); an ordinary tensor of the same size, filled the same way, is not (under THP=madvise)."""
    # 64 MiB: over glibc's largest mmap threshold (32 MiB), so a fresh mapping, never reused heap pages
    # already on 4 KiB pages, as a real resident buffer is
    rows = torch.randn(32768, 512)
    spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, len(rows), "float32", TokenFilter())
    store = write_store(tmp_path, spec, rows, shard_tokens=8192)
    resident = StoreStream(store, 512, 2048, seed=0, device_buffer=True)._resident_rows()
    assert torch.equal(resident, rows)
    assert _huge_page_kib(resident) >= 8 * 1024
    if "[madvise]" in THP.read_text():
        ordinary = torch.empty_like(rows).copy_(rows)
        assert _huge_page_kib(ordinary) == 0


def test_device_buffer_decides_by_free_memory_and_true_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, 1000, "float32", TokenFilter())
    store = write_store(tmp_path, spec, torch.randn(1000, 8), shard_tokens=250)  # 32,000 bytes of rows
    monkeypatch.setattr("saesweep.store.resident.free_memory", lambda device: 50_000)
    assert not StoreStream(store, 100, 500, seed=0, device_buffer="auto").resident  # more than half of it
    assert StoreStream(store, 100, 500, seed=0, device_buffer=True).resident
    monkeypatch.setattr("saesweep.store.resident.free_memory", lambda device: 70_000)
    assert StoreStream(store, 100, 500, seed=0, device_buffer="auto").resident
    monkeypatch.setattr("saesweep.store.resident.free_memory", lambda device: 20_000)
    with pytest.raises(ConfigError, match=r"store.device_buffer=true: the training activations take 0.03 MiB, more "
                                          r"than the 0.02 MiB free on cpu"):
        StoreStream(store, 100, 500, seed=0, device_buffer=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_shard_read_in_pieces_through_two_buffers_is_the_shard_and_its_damage_is_found(tmp_path, dtype):
    """The GPU's read (files.read_shard_pieces): whole rows in each buffer in turn, the shard in order, and a
    flipped byte found after the last piece, which forgets the shard as a whole read does."""
    rows = torch.randn(1000, 24).to(STORE_DTYPES[dtype])
    spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, len(rows), dtype, TokenFilter())
    store = write_store(tmp_path, spec, rows, shard_tokens=500)
    entry = store.manifest()["shards"][1]
    row_bytes = 24 * rows.element_size()
    buffers = [torch.empty(7 * row_bytes + 5, dtype=torch.uint8) for _ in range(2)]  # 7 rows and a part of one
    handed_out = []

    def in_turn():
        while True:
            for buffer in buffers:
                handed_out.append(buffer)
                yield buffer

    pieces = [piece.clone() for piece in store.read_shard_pieces(entry, in_turn())]
    assert [len(p) for p in pieces] == [7] * 71 + [3] and len(handed_out) == 72
    assert torch.equal(torch.cat(pieces), rows[500:]) and torch.equal(torch.cat(pieces), store.read_shard(entry))
    with pytest.raises(ValueError, match="staging buffer of 40 bytes, smaller than one row"):
        next(store.read_shard_pieces(entry, iter([torch.empty(40, dtype=torch.uint8)])))

    path = store.path / entry["file"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    read = []
    with pytest.raises(StoreCorruptError, match=f"{entry['file']} is corrupt"):
        read.extend(store.read_shard_pieces(entry, in_turn()))
    assert len(read) == 72, "the checksum's verdict comes after the last piece"
    assert entry["file"] not in [s["file"] for s in store.manifest()["shards"]] and not store.is_complete()
    path.write_bytes(bytes(data[:-100]))  # cut short: refused before a piece is read
    with pytest.raises(StoreCorruptError, match="corrupt or truncated"):
        next(read_shard_pieces(store.path, entry, in_turn()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resident_rows_reach_the_gpu_through_small_page_locked_buffers(tmp_path, monkeypatch):
    """On a GPU each reader thread stages its shards through two small page-locked buffers (not one the size of
    a shard): the rows on the GPU are the store's, bit for bit, float32 and bfloat16 alike."""
    monkeypatch.setattr("saesweep.store.resident.STAGING_BYTES", 3 * 1024 + 100)  # many pieces a shard
    for dtype in ("float32", "bfloat16"):
        rows = torch.randn(5000, 64).to(STORE_DTYPES[dtype])
        spec = StoreSpec("synthetic", "0", "hook", {}, "train", 16, len(rows), dtype, TokenFilter())
        store = write_store(tmp_path / dtype, spec, rows, shard_tokens=700)
        resident = StoreStream(store, 512, 2048, seed=0, device_buffer=True, device="cuda")._resident_rows()
        assert resident.is_cuda and torch.equal(resident.cpu(), rows)
