"""SAE training throughput of one dictionary: saesweep's Lightning path vs SAELens's trainer (when the
`bench` extra is installed) and a bare PyTorch loop, and FLOP utilisation against this machine's float32
matmul peak, measured in the same run.

Prints its figures and ends with one `RESULT key=value ...` line; asserts nothing.

    python benchmarks/bench_train.py [--d-in 512] [--d-sae 2048] [--batch 4096] [--steps 30]

ReLU/L1 SAE, same shapes, batch, steps and threads for every contender. One step costs about 12·B·d_in·d_sae FLOPs
(encoder and decoder matmuls: 4·B·d·m forward, twice that backward). The saesweep figure includes
its data path: batches streamed from an on-disk activation store through the shuffle buffer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import saelens_contender  # benchmarks/saelens_contender.py
import torch
from machine import describe_machine  # benchmarks/machine.py

from saesweep.recipe import Recipe
from saesweep.sae import ReluSae, Sae, TopKSae
from saesweep.store import ActivationStore, StoreSpec, StoreStream, TokenFilter, write_store
from saesweep.training import SaeTrainingModule, activation_scale

# where Lightning's accelerator="auto" trains: the peak and the bare loop are measured there too
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PEAK_N = 4096 if DEVICE.type == "cuda" else 2048  # big enough to reach the peak, small enough for 2 CPU cores


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step_matmul_flops(d_in: int, d_sae: int, dense_decoder: bool = True) -> int:
    """The matmul FLOPs of a training step per activation row, which the utilisations divide by the peak:
    the encoder's forward and weight gradient (b_dec's gradient through it is a vector product, see
    `encoder_affine`), and a dense decoder's forward, weight and input gradients; a TopK decoder gathers k rows."""
    return (10 if dense_decoder else 4) * d_in * d_sae


def matmul_peak_flops(repeats: int = 10, dtype: torch.dtype = torch.float32, n: int = PEAK_N) -> float:
    """Matmul FLOP/s on DEVICE in `dtype` (float32 at default precision: on a GPU, no TF32, as saesweep trains)."""
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def bare_loop(x: torch.Tensor, d_sae: int, steps: int, batch: int, l1_coef: float = 2.0) -> float:
    """Activations/s of the plain step on DEVICE, data already there: forward, backward, Adam, decoder
    renorm; no framework, no data path."""
    x = x.to(DEVICE)
    sae = ReluSae(x.shape[1], d_sae).to(DEVICE)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)

    def step(i: int) -> None:
        xb = x[(i * batch) % (len(x) - batch) :][:batch]
        x_hat, f = sae(xb)
        loss = (x_hat - xb).pow(2).sum(-1).mean() + l1_coef * f.sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ReluSae.before_optimizer_step([sae])
        optimizer.step()
        ReluSae.after_optimizer_step([sae])

    for i in range(3):
        step(i)
    _sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync()
    return steps * batch / (time.perf_counter() - start)


class _StepTimer(L.Callback):
    """Times training steps after a warm-up, so start-up and the first batches do not count."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.rows = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.rows += len(batch)
            if batch_idx == trainer.num_training_batches - 1:  # the host runs ahead of a GPU: wait once, at the end
                _sync()
            self.end = time.perf_counter()


def normalised_stream(store: ActivationStore, batch: int, device_buffer: bool, device) -> tuple[StoreStream, float]:
    """The training stream as train.py makes it, batches divided by the activation scale (here the store's
    first shard's), and that scale: a module given it as act_scale takes the batches with batch_scale=1."""
    scale = activation_scale(store.read_shard(store.manifest()["shards"][0]))
    stream = StoreStream(store, batch, buffer_tokens=4 * batch, seed=0, device_buffer=device_buffer, device=device, scale=scale)
    return stream, scale


def saesweep_lightning(
    store: ActivationStore, d_in: int, d_sae: int, batch: int, precision: str, compile: bool = False,
    saes: list[Sae] | None = None, device_buffer: bool = False,
) -> tuple[float, float]:
    """Activations/s of saesweep's training module under Lightning, fed from the store (streamed from
    disk, or `device_buffer`: resident on the device): in the steady state (after 3 warm-up steps), and
    over the whole `fit` (start-up included). Default SAE: ReLU/L1; `saes`: an ensemble of them."""
    stream, scale = normalised_stream(store, batch, device_buffer, DEVICE)
    saes = saes or [ReluSae(d_in, d_sae, l1_coef=2.0)]
    module = SaeTrainingModule(
        saes, metric_prefixes=[""] if len(saes) == 1 else [f"d{i}/" for i in range(len(saes))], act_scale=scale,
        batch_scale=1.0, recipes=[Recipe(1e-3, 1, 0.0, None)] * len(saes), adam_betas=(0.9, 0.999), total_steps=len(stream),
        max_bad_steps=10, model=None, hook_point="", resume_key={}, compile=compile,
    )
    timer = _StepTimer(warmup=3)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer], log_every_n_steps=10,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    whole = len(stream) * batch / (time.perf_counter() - start)
    return timer.rows / (timer.end - timer.start), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--topk-d-sae", type=int, default=16384, help="the TopK rows: d_sae (0 skips them)")
    parser.add_argument("--topk-steps", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--only-topk", action="store_true", help="only the TopK rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(describe_machine())
    if args.only_topk:
        print("RESULT" + topk_rows(args, matmul_peak_flops()))
        return
    flops_per_row = step_matmul_flops(args.d_in, args.d_sae)
    peak = matmul_peak_flops()
    print(f"float32 matmul peak on {DEVICE.type} ({PEAK_N}², measured): {peak / 1e9:.1f} GFLOP/s")

    n_rows = (args.steps + 3) * args.batch
    x = torch.randn(n_rows, args.d_in)
    bare = bare_loop(x, args.d_sae, args.steps, args.batch)
    print(f"bare PyTorch loop:        {bare:9.0f} activations/s, {bare * flops_per_row / peak:6.1%} of peak")

    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("bench", "0", "hook", {}, "train", 16, n_rows, "float32", TokenFilter())
        store = write_store(Path(tmp), spec, x, shard_tokens=args.batch * 4)
        fp32, fp32_whole = saesweep_lightning(store, args.d_in, args.d_sae, args.batch, "32-true")
        print(f"saesweep (Lightning, fp32, store stream): {fp32:9.0f} activations/s, "
              f"{fp32 * flops_per_row / peak:6.1%} of peak, {fp32 / bare:.2f}× the bare loop; "
              f"whole fit {fp32_whole:.0f}/s")
        bf16, _ = saesweep_lightning(store, args.d_in, args.d_sae, args.batch, "bf16-mixed")
        print(f"saesweep (Lightning, bf16-mixed):         {bf16:9.0f} activations/s, {bf16 / fp32:.2f}× fp32")
        # the first compiled fit compiles (both graphs: with and without train/l0); time the second
        saesweep_lightning(store, args.d_in, args.d_sae, args.batch, "32-true", compile=True)
        compiled, _ = saesweep_lightning(store, args.d_in, args.d_sae, args.batch, "32-true", compile=True)
        print(f"saesweep (Lightning, fp32, compiled):     {compiled:9.0f} activations/s, "
              f"{compiled * flops_per_row / peak:6.1%} of peak, {compiled / fp32:.2f}× eager")
    result = (
        f"RESULT peak_gflops={peak / 1e9:.1f} bare_act_per_s={bare:.0f} saesweep_fp32_act_per_s={fp32:.0f} "
        f"saesweep_bf16_act_per_s={bf16:.0f} saesweep_compiled_act_per_s={compiled:.0f} "
        f"saesweep_vs_bare={fp32 / bare:.3f} saesweep_fp32_util={fp32 * flops_per_row / peak:.3f} "
        f"saesweep_compiled_util={compiled * flops_per_row / peak:.3f} "
        f"bare_util={bare * flops_per_row / peak:.3f}"
    )
    if args.topk_d_sae:
        result += topk_rows(args, peak)
    if saelens_contender.available():
        seconds = saelens_contender.train_saelens(x, args.d_sae, args.batch, args.steps + 3)
        saelens = (args.steps + 3) * args.batch / seconds
        print(f"SAELens (SAETrainer, fp32, whole fit):     {saelens:9.0f} activations/s, "
              f"{saelens * flops_per_row / peak:6.1%} of peak")
        print(f"saesweep / SAELens, whole fit of the same steps: {fp32_whole / saelens:.2f}")
        result += f" saelens_act_per_s={saelens:.0f} saesweep_vs_saelens={fp32_whole / saelens:.3f}"
    else:
        print(saelens_contender.NOT_INSTALLED)
    print(result)


def topk_rows(args, peak: float) -> str:
    """TopK (k active latents, decoded by a gather of k rows) against the dense ReLU step of the same
    shapes, and SAELens's TopK on the same activations: the RESULT fields they add."""
    d_in, d_sae, batch, steps = args.d_in, args.topk_d_sae, args.batch, args.topk_steps
    print(f"TopK rows: d_in {d_in}, d_sae {d_sae}, batch {batch}, k {args.k}, {steps} timed steps")
    n_rows = (steps + 3) * batch
    x = torch.randn(n_rows, d_in)
    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("bench-topk", "0", "hook", {}, "train", 16, n_rows, "float32", TokenFilter())
        store = write_store(Path(tmp), spec, x, shard_tokens=batch * 4)
        relu, relu_whole = saesweep_lightning(store, d_in, d_sae, batch, "32-true")
        topk, topk_whole = saesweep_lightning(store, d_in, d_sae, batch, "32-true", saes=[TopKSae(d_in, d_sae, k=args.k)])
    print(f"saesweep dense ReLU:  {relu:9.0f} activations/s (whole fit {relu_whole:.0f}/s)")
    print(f"saesweep TopK:        {topk:9.0f} activations/s (whole fit {topk_whole:.0f}/s), {topk / relu:.2f}× dense ReLU")
    fields = f" topk_act_per_s={topk:.0f} dense_relu_act_per_s={relu:.0f} topk_vs_dense_relu={topk / relu:.3f}"
    if saelens_contender.available():
        seconds = saelens_contender.train_saelens(x, d_sae, batch, steps + 3, k=args.k)
        saelens = (steps + 3) * batch / seconds
        print(f"SAELens TopK (whole fit): {saelens:9.0f} activations/s; saesweep TopK whole fit / SAELens: "
              f"{topk_whole / saelens:.2f}")
        fields += f" saelens_topk_act_per_s={saelens:.0f} topk_vs_saelens_topk={topk_whole / saelens:.3f}"
    return fields


if __name__ == "__main__":
    main()
