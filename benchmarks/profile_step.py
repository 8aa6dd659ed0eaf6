"""Where a training step's host time goes, on whatever device Lightning picks (a GPU when there is one):
one ReLU dictionary trained from the device-resident buffer, its steady-state steps under cProfile (the
Python functions, Lightning's included, by own and by cumulative time), beside the bare PyTorch loop's
rate (the floor), the same fit with `train.compile=true`, and the timeline of a whole fit (start-up,
the store's read, the first steps). Prints the tables and one `RESULT` line;
asserts nothing.

    python benchmarks/profile_step.py [--d-sae 2048] [--steps 300]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from bench_train import (  # benchmarks/bench_train.py
    DEVICE,
    _sync,
    bare_loop,
    normalised_stream,
    saesweep_lightning,
)
from machine import describe_machine  # benchmarks/machine.py

from saesweep.recipe import Recipe
from saesweep.sae import ReluSae
from saesweep.store import StoreSpec, TokenFilter, write_store
from saesweep.store.resident import read_resident
from saesweep.training import SaeTrainingModule

WARMUP = 20


class ProfiledSteps(L.Callback):
    """cProfile over the steps from WARMUP on, and their wall time; on a GPU also the operations that
    made the host wait for it (torch.cuda.set_sync_debug_mode), by the line that called them."""

    def __init__(self):
        self.profile = cProfile.Profile()
        self.start = self.end = 0.0
        self.steps = 0
        self.syncs: collections.Counter[str] = collections.Counter()
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            _sync()
            self.start = time.perf_counter()
            if DEVICE.type == "cuda":
                self._caught = warnings.catch_warnings(record=True)
                self.syncs_seen = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.profile.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= WARMUP:
            self.steps += 1
        if batch_idx == trainer.num_training_batches - 1:
            if self._caught is not None:
                torch.cuda.set_sync_debug_mode(0)
                self._caught.__exit__(None, None, None)
                self.syncs.update(f"{Path(w.filename).name}:{w.lineno}" for w in self.syncs_seen
                                  if "synchronizing" in str(w.message))
            _sync()
            self.profile.disable()
            self.end = time.perf_counter()


class Timeline(L.Callback):
    """When each phase of a fit began, in seconds after `trainer.fit` was called (GPU work waited for
    at each mark, so a phase holds its own kernels)."""

    MARKS = ("fit_start", "train_start", "first_batch", "step_3", "last_step_done", "train_end")

    def __init__(self):
        self.called = 0.0
        self.at: dict[str, float] = {}

    def _mark(self, name: str) -> None:
        _sync()
        self.at[name] = time.perf_counter() - self.called

    def on_fit_start(self, trainer, pl_module):
        self._mark("fit_start")

    def on_train_start(self, trainer, pl_module):
        self._mark("train_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in (0, 3):
            self._mark("first_batch" if batch_idx == 0 else "step_3")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            self._mark("last_step_done")

    def on_train_end(self, trainer, pl_module):
        self._mark("train_end")


def fit(store, d_in: int, d_sae: int, batch: int, probe: L.Callback) -> float:
    """One ReLU dictionary's fit from the resident buffer with `probe` as its callback; its seconds."""
    stream, scale = normalised_stream(store, batch, device_buffer=True, device=DEVICE)
    module = SaeTrainingModule(
        [ReluSae(d_in, d_sae, l1_coef=2.0)], metric_prefixes=[""], act_scale=scale, batch_scale=1.0,
        recipes=[Recipe(1e-3, 1, 0.0, None)], adam_betas=(0.9, 0.999), total_steps=len(stream), max_bad_steps=10, model=None,
        hook_point="", resume_key={},
    )
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[probe],
        log_every_n_steps=10,
    )
    start = probe.called = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(stream, batch_size=None))
    return time.perf_counter() - start


def read_seconds(store) -> float:
    """The seconds of reading the whole store onto the device (the page cache holds it)."""
    _sync()
    start = time.perf_counter()
    manifest = store.manifest()
    read_resident(store, manifest["shards"], manifest["d_in"], torch.float32, DEVICE)
    _sync()
    return time.perf_counter() - start


def table(profile: cProfile.Profile, sort: str, rows: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats(sort).print_stats(rows)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(describe_machine())
    torch.manual_seed(0)
    d_in, d_sae, batch = args.d_in, args.d_sae, args.batch
    x = torch.randn(args.steps * batch, d_in)
    bare = bare_loop(x, d_sae, 100, batch)
    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("profile", "0", "hook", {}, "train", 16, len(x), "float32", TokenFilter())
        store = write_store(Path(tmp), spec, x, shard_tokens=32 * batch)
        probe = ProfiledSteps()
        fit(store, d_in, d_sae, batch, probe)
        compiled, _ = saesweep_lightning(store, d_in, d_sae, batch, "32-true", compile=True, device_buffer=True)
        eager, _ = saesweep_lightning(store, d_in, d_sae, batch, "32-true", device_buffer=True)
        timeline = Timeline()
        whole = fit(store, d_in, d_sae, batch, timeline)
        read = read_seconds(store)
    step_ms = 1e3 * (probe.end - probe.start) / probe.steps
    print(table(probe.profile, "tottime", 45))
    print(table(probe.profile, "cumulative", 60))
    syncs = sum(probe.syncs.values()) / probe.steps
    print(f"host syncs per steady step: {syncs:.2f}", dict(probe.syncs.most_common(10)))
    marks = " ".join(f"{name} {timeline.at[name]:.3f}" for name in Timeline.MARKS)
    print(f"fit timeline (s after trainer.fit was called): {marks}; returned {whole:.3f}; the store read alone {read:.3f}")
    print(f"per step: profiled {step_ms:.2f} ms; eager {1e3 * batch / eager:.2f} ms, compiled "
          f"{1e3 * batch / compiled:.2f} ms, bare loop {1e3 * batch / bare:.2f} ms")
    print(f"RESULT profiled_step_ms={step_ms:.3f} syncs_per_step={syncs:.2f} eager_step_ms={1e3 * batch / eager:.3f} "
          f"compiled_step_ms={1e3 * batch / compiled:.3f} bare_step_ms={1e3 * batch / bare:.3f} "
          f"first_batch_s={timeline.at['first_batch']:.3f} fit_s={whole:.3f} read_s={read:.3f}")


if __name__ == "__main__":
    main()
