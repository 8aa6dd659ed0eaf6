"""What sets the GPU's floor, measured where there is no GPU: the host's cost per training step, the
batch draw from the resident buffer, and the operators and host syncs a step dispatches.

Prints its figures and ends with one `RESULT key=value ...` line; asserts nothing.

    python benchmarks/host_step.py [--steps 200] [--repeats 3]

- host_step_ms: saesweep's Lightning fit per steady-state step on a tiny dictionary (d_in 64, d_sae 64,
  batch 4096, so compute is negligible), activations resident; bare_step_ms: a plain PyTorch loop over
  the same tensor; saelens_step_ms: SAELens's trainer (when the `bench` extra is installed).
- resident_draw_act_per_s: batches drawn from the resident buffer at d_in 512, batch 4096 (and the
  streamed path's rate beside it); beside it the ceiling this machine's memory sets, in the same process:
  `gather_act_per_s`, a bare index_select of the same shuffled rows, and `copy_act_per_s`, a copy of
  batch-sized contiguous blocks (the same bytes read and written, no gather).
- resident_read_back_s / resident_kept_s: seconds a fit takes to have its resident buffer (those rows, at
  d_in 512) after the harvest wrote the store: read back from it, or kept on the device as it was written
  (store.HarvestedRows: the copies during the write plus the hand-over).
- ops_per_step / host_syncs_per_step: aten operators dispatched in one steady-state step (no logging
  that step) of an 8-member ensemble of one shape (ReLU, l1_coef differing, d_in 64, d_sae 256, batch
  4096), counted with a TorchDispatchMode, with the batched step and with the per-member loop
  (`ops_batched_vs_looped`); a host sync is an operator that makes the host wait for the device's
  result (`_local_scalar_dense` behind `.item()`/`bool()`, `nonzero`, `equal`, ...). The same fits
  give the ensemble's time per step, batched and looped (`ensemble_step_ms_*`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import saelens_contender  # benchmarks/saelens_contender.py
import torch
from bench_train import bare_loop, normalised_stream  # benchmarks/bench_train.py
from machine import describe_machine  # benchmarks/machine.py

from saesweep.dispatch import OpCounter
from saesweep.recipe import Recipe
from saesweep.sae import ReluSae
from saesweep.store import (
    ActivationStore,
    HarvestedRows,
    ResumableLoader,
    StoreSpec,
    StoreStream,
    TokenFilter,
    write_store,
)
from saesweep.train import ThrottledProgressBar
from saesweep.training import SaeTrainingModule

LOG_EVERY = 50  # Lightning's default log_every_n_steps: the counted step is not a logging step


class StepProbe(L.Callback):
    """Times the steady-state steps (from `warmup` on) and counts the operators of step `counted`."""

    def __init__(self, warmup: int, counted: int):
        self.warmup, self.counted = warmup, counted
        self.start = self.end = 0.0
        self.steps = 0
        self.counter = OpCounter()  # the operators of step `counted`

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()
        if batch_idx == self.counted:
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.counted:
            self.counter.__exit__(None, None, None)
        if batch_idx >= self.warmup:
            self.steps += 1
            self.end = time.perf_counter()

    @property
    def ops(self) -> int:
        return sum(self.counter.counts.values())


def saesweep_fit(store, n_saes: int, d_in: int, d_sae: int, batch: int, counted: int, batched: bool = True) -> StepProbe:
    """A Lightning fit of `n_saes` ReLU dictionaries (l1_coef 2, 2.25, 2.5, ...) through saesweep's
    training module, batches drawn from the resident buffer and divided by the activation scale there (as
    train.py has them), with the progress bar (train.py's) and logging a user gets; `batched`: members of one
    shape in one batched step, or one by one."""
    stream, scale = normalised_stream(store, batch, device_buffer=True, device="cpu")
    module = SaeTrainingModule(
        [ReluSae(d_in, d_sae, l1_coef=2.0 + 0.25 * i) for i in range(n_saes)], metric_prefixes=[f"d{i}/" for i in range(n_saes)] if n_saes > 1 else [""],
        act_scale=scale, batch_scale=1.0, recipes=[Recipe(1e-3, 1, 0.0, None)] * n_saes, adam_betas=(0.9, 0.999),
        total_steps=len(stream), max_bad_steps=10, model=None, hook_point="", resume_key={}, batched=batched,
    )
    probe = StepProbe(warmup=5, counted=counted)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tempfile.mkdtemp()),
        enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
        limit_val_batches=0, callbacks=[probe, ThrottledProgressBar()], log_every_n_steps=LOG_EVERY,
    )
    trainer.fit(module, train_dataloaders=ResumableLoader(stream))
    return probe


def draw_rate(store, batch: int, device_buffer: bool) -> float:
    """Activations/s of one epoch of batches drawn from the store (resident: after the one read)."""
    stream = StoreStream(store, batch, buffer_tokens=16 * batch, seed=0, device_buffer=device_buffer)
    if device_buffer:
        stream._resident_rows()
    start, rows = time.perf_counter(), 0
    for b in stream:
        rows += len(b)
    if b.is_cuda:
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - start)


def resident_fill(
    root: Path, spec: StoreSpec, rows: torch.Tensor, shard_tokens: int, device: torch.device
) -> tuple[ActivationStore, float, float]:
    """The store of `rows`, written as a harvest writes it while keeping its rows on `device`
    (HarvestedRows), and the seconds a fit then takes to have its resident buffer: read back from the
    store, and kept (the copies made while the store was written, plus the hand-over)."""
    kept, copying = HarvestedRows(len(rows), rows.shape[1], rows.dtype, device), 0.0

    def keep(*shard) -> None:
        nonlocal copying
        start = time.perf_counter()
        kept(*shard)
        synchronize(device)
        copying += time.perf_counter() - start

    store = write_store(root, spec, rows, shard_tokens, on_shard=keep)
    seconds = []
    for harvested in (None, kept):
        start = time.perf_counter()
        StoreStream(store, 4096, 16 * 4096, seed=0, device_buffer=True, device=device, harvested=harvested)._resident_rows()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return store, seconds[0], copying + seconds[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling_rates(rows: torch.Tensor, batch: int) -> tuple[float, float]:
    """Activations/s of a bare index_select of shuffled rows into batches, and of copying the same
    number of contiguous batch-sized blocks: what memory bandwidth allows a draw, with and without a gather."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).split(batch)
    start = time.perf_counter()
    for numbers in order:
        rows.index_select(0, numbers)
    gather = len(rows) / (time.perf_counter() - start)
    start = time.perf_counter()
    for block in rows.split(batch):
        block.clone()
    return gather, len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--draw-rows", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=3, help="timings of the lone fit, bare loop and SAELens")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(describe_machine())
    d, batch = 64, 4096
    x = torch.randn(args.steps * batch, d)
    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("bench-host", "0", "hook", {}, "train", 16, len(x), "float32", TokenFilter())
        store = write_store(Path(tmp) / "host", spec, x, shard_tokens=16 * batch)
        # This machine's speed drifts by up to 2× over minutes (other tenants): the three timings are taken in
        # turn, `repeats` times, and each reported as its fastest.
        host_times, bare_times, saelens_times = [], [], []
        bare_loop(x, d, 20, batch)  # the process's first loop pays for allocations and thread start-up
        for _ in range(args.repeats):
            lone = saesweep_fit(store, 1, d, d, batch, counted=LOG_EVERY + 10)
            host_times.append(1000 * (lone.end - lone.start) / lone.steps)
            bare_times.append(1000 * batch / bare_loop(x, d, args.steps - 5, batch))
            if saelens_contender.available():
                saelens_times.append(1000 * saelens_contender.train_saelens(x, d, batch, args.steps) / args.steps)
        host_ms, bare_ms = min(host_times), min(bare_times)
        ensemble = saesweep_fit(store, 8, d, 4 * d, batch, counted=LOG_EVERY + 10)
        looped = saesweep_fit(store, 8, d, 4 * d, batch, counted=LOG_EVERY + 10, batched=False)
        wide = torch.randn(args.draw_rows, 512)
        spec = StoreSpec("bench-draw", "0", "hook", {}, "train", 16, len(wide), "float32", TokenFilter())
        fills = [resident_fill(Path(tmp) / f"draw-{i}", spec, wide, 32768, torch.device("cpu")) for i in range(args.repeats)]
        draw_store = fills[0][0]
        read_back_s, kept_s = (min(seconds) for seconds in list(zip(*fills))[1:])
        # the draw and its ceilings in turn, `repeats` times, each its fastest (as the step timings)
        draws = [(draw_rate(draw_store, batch, True), *ceiling_rates(wide, batch)) for _ in range(args.repeats)]
        resident, gather, copy = (max(rates) for rates in zip(*draws))
        streamed = draw_rate(draw_store, batch, False)
    print(f"host cost per step (d_in {d}, d_sae {d}, batch {batch}), fastest of {args.repeats}: saesweep {host_ms:.3f} ms "
          f"({', '.join(f'{t:.2f}' for t in host_times)}), bare loop {bare_ms:.3f} ms "
          f"({', '.join(f'{t:.2f}' for t in bare_times)}): {host_ms / bare_ms:.2f}×")
    for name, probe in (("lone", lone), ("8-member ensemble, batched", ensemble), ("8-member ensemble, looped", looped)):
        print(f"{name}: {probe.ops} aten operators in one steady-state step, host syncs: {probe.counter.syncs or 0}")
    ops_ratio = ensemble.ops / looped.ops
    batched_ms, looped_ms = (1000 * (p.end - p.start) / p.steps for p in (ensemble, looped))
    print(f"8-member ensemble (d_in {d}, d_sae {4 * d}, batch {batch}) per step: batched {batched_ms:.2f} ms, "
          f"looped {looped_ms:.2f} ms ({batched_ms / looped_ms:.2f}×); operators {ops_ratio:.3f}× the loop's")
    print(f"batch draw at d_in 512, batch {batch}: resident {resident / 1e6:.2f}M activations/s, "
          f"streamed {streamed / 1e6:.2f}M/s; this machine's ceiling: a bare gather {gather / 1e6:.2f}M/s, "
          f"a contiguous copy {copy / 1e6:.2f}M/s")
    print(f"resident buffer of {len(wide)} rows at d_in 512 after the store is written: read back {read_back_s:.3f} s, "
          f"kept as the harvest writes it {kept_s:.3f} s")
    result = (
        f"RESULT host_step_ms={host_ms:.3f} bare_step_ms={bare_ms:.3f} host_vs_bare={host_ms / bare_ms:.3f} "
        f"resident_draw_act_per_s={resident:.0f} streamed_draw_act_per_s={streamed:.0f} gather_act_per_s={gather:.0f} "
        f"copy_act_per_s={copy:.0f} resident_draw_vs_gather={resident / gather:.3f} "
        f"resident_read_back_s={read_back_s:.3f} resident_kept_s={kept_s:.3f} "
        f"ops_per_step_lone={lone.ops} ops_per_step_8_members={ensemble.ops} "
        f"ops_per_step_8_members_looped={looped.ops} ops_batched_vs_looped={ops_ratio:.3f} "
        f"host_syncs_per_step={sum(ensemble.counter.syncs.values())} "
        f"ensemble_step_ms_batched={batched_ms:.3f} ensemble_step_ms_looped={looped_ms:.3f} "
        f"ensemble_batched_vs_looped_time={batched_ms / looped_ms:.3f}"
    )
    if saelens_times:
        saelens_ms = min(saelens_times)
        print(f"SAELens (SAETrainer, whole fit per step): {saelens_ms:.3f} ms ({', '.join(f'{t:.2f}' for t in saelens_times)})")
        result += f" saelens_step_ms={saelens_ms:.3f} host_vs_saelens={host_ms / saelens_ms:.3f}"
    else:
        print(saelens_contender.NOT_INSTALLED)
    print(result)


if __name__ == "__main__":
    main()
