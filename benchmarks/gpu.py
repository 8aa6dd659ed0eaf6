"""saesweep against SAELens on one GPU, ready to run in one call (`make bench-gpu`): per dictionary (ReLU/L1 at
d_sae 2048 and 16384, TopK k=32 at d_sae 16384) and a 4-ratio ensemble against four SAELens fits, with the
FLOP/s achieved against the matmul peak measured in the same run, in fp32 and bf16; and the seconds to the
resident buffer after the store is written, read back or kept on the GPU by the harvest (host_step.py's
resident_fill).

Needs the project and the `bench` extra (SAELens); no network: the activations are random, written to an
activation store in a temporary folder, and saesweep trains from its device-resident buffer (SAELens's
data provider also holds them on the GPU). Prints its figures and ends with one `RESULT key=value ...`
line; asserts nothing. About 3–5 minutes on an H200; without a GPU it refuses (use bench_train.py).

    python benchmarks/gpu.py [--steps 200] [--d-in 512] [--batch 4096]

FLOPs per activation: the matmuls saesweep's step does (bench_train's `step_matmul_flops`), 10·d_in·d_sae
for a dense SAE (the encoder's forward and weight gradient, the decoder's forward, weight and input
gradients) and 4·d_in·d_sae for TopK (the encoder alone: its decoder reads k rows). Before 2026-12-05
(stop 43) the step also took b_dec's gradient through a [batch, d_in] matmul: 12 and 6 then.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import saelens_contender  # benchmarks/saelens_contender.py
import torch
from bench_train import matmul_peak_flops, saesweep_lightning, step_matmul_flops  # benchmarks/bench_train.py
from host_step import resident_fill  # benchmarks/host_step.py
from machine import describe_machine  # benchmarks/machine.py

from saesweep.sae import ReluSae, TopKSae
from saesweep.store import StoreSpec, TokenFilter, write_store

RATIOS = (1, 2, 4, 8)


def warm_up(folder: Path, d_in: int, k: int) -> None:
    """A short untimed fit of each kind, both contenders, fp32 and bf16: the process's one-time costs
    (CUDA's lazy loading of each kernel, cuBLAS's first calls) are then paid by no measured fit, where
    they would fall on whichever came first (saesweep's, which measured 0.28M act/s where it ran 1.12M/s)."""
    x = torch.randn(20 * 512, d_in)
    spec = StoreSpec("bench-gpu-warm-up", "0", "hook", {}, "train", 16, len(x), "float32", TokenFilter())
    store = write_store(folder / "warm-up", spec, x, shard_tokens=4096)
    for precision in ("32-true", "bf16-mixed"):
        saesweep_lightning(store, d_in, 0, 512, precision, saes=[ReluSae(d_in, 2048), TopKSae(d_in, 2048, k=k)],
                           device_buffer=True)
    saelens_contender.train_saelens(x, 2048, 512, 20)
    saelens_contender.train_saelens(x, 2048, 512, 20, k=k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py measures a GPU and none is visible; on the CPU run benchmarks/bench_train.py")
    if not saelens_contender.available():
        raise SystemExit(saelens_contender.NOT_INSTALLED)
    torch.manual_seed(0)
    print(describe_machine())
    peak = {"fp32": matmul_peak_flops(dtype=torch.float32, n=8192), "bf16": matmul_peak_flops(dtype=torch.bfloat16, n=8192)}
    print(f"matmul peak (8192², measured): fp32 {peak['fp32'] / 1e12:.1f} TFLOP/s, bf16 {peak['bf16'] / 1e12:.1f} TFLOP/s")
    d_in, batch, steps = args.d_in, args.batch, args.steps
    x = torch.randn(steps * batch, d_in)
    fields: dict[str, float] = {"peak_fp32_tflops": peak["fp32"] / 1e12, "peak_bf16_tflops": peak["bf16"] / 1e12}
    with tempfile.TemporaryDirectory() as tmp:
        spec = StoreSpec("bench-gpu", "0", "hook", {}, "train", 16, len(x), "float32", TokenFilter())
        store, read_back_s, kept_s = resident_fill(Path(tmp), spec, x, 32 * batch, torch.device("cuda"))
        print(f"resident buffer of {len(x)} rows ({x.numel() * 4 / 1e9:.2f} GB) after the store is written: read back "
              f"{read_back_s:.3f} s, kept on the GPU as the harvest writes it {kept_s:.3f} s")
        fields |= {"resident_read_back_s": read_back_s, "resident_kept_s": kept_s}
        warm_up(Path(tmp), d_in, args.k)
        rows = (
            ("relu_2048", lambda: ReluSae(d_in, 2048), None, step_matmul_flops(d_in, 2048)),
            ("relu_16384", lambda: ReluSae(d_in, 16384), None, step_matmul_flops(d_in, 16384)),
            ("topk_16384", lambda: TopKSae(d_in, 16384, k=args.k), args.k, step_matmul_flops(d_in, 16384, dense_decoder=False)),
        )
        for name, make, k, flops_per_row in rows:
            d_sae = make().d_sae
            fp32, fp32_whole = saesweep_lightning(store, d_in, d_sae, batch, "32-true", saes=[make()], device_buffer=True)
            bf16, _ = saesweep_lightning(store, d_in, d_sae, batch, "bf16-mixed", saes=[make()], device_buffer=True)
            saelens = steps * batch / saelens_contender.train_saelens(x, d_sae, batch, steps, k=k)
            print(f"{name}: saesweep fp32 {fp32 / 1e6:.2f}M act/s ({fp32 * flops_per_row / peak['fp32']:.1%} of the fp32 "
                  f"peak; whole fit {fp32_whole / 1e6:.2f}M/s), bf16-mixed {bf16 / 1e6:.2f}M/s "
                  f"({bf16 * flops_per_row / peak['bf16']:.1%} of the bf16 peak); SAELens whole fit {saelens / 1e6:.2f}M/s; "
                  f"saesweep / SAELens (whole fits) {fp32_whole / saelens:.2f}×")
            fields |= {
                f"{name}_act_per_s": fp32, f"{name}_bf16_act_per_s": bf16, f"{name}_saelens_act_per_s": saelens,
                f"{name}_vs_saelens": fp32_whole / saelens, f"{name}_fp32_util": fp32 * flops_per_row / peak["fp32"],
                f"{name}_bf16_util": bf16 * flops_per_row / peak["bf16"],
            }
        sizes = [ratio * d_in for ratio in RATIOS]
        start = time.perf_counter()
        saesweep_lightning(store, d_in, 0, batch, "32-true", saes=[ReluSae(d_in, m) for m in sizes], device_buffer=True)
        ensemble_seconds = time.perf_counter() - start
        saelens_seconds = sum(saelens_contender.train_saelens(x, m, batch, steps) for m in sizes)
    print(f"ensemble of {len(sizes)} ratios {RATIOS}: saesweep {ensemble_seconds:.1f} s (one fit), SAELens "
          f"{saelens_seconds:.1f} s (four fits): {saelens_seconds / ensemble_seconds:.2f}×")
    fields |= {"ensemble_seconds": ensemble_seconds, "saelens_four_fits_seconds": saelens_seconds,
               "ensemble_vs_saelens": saelens_seconds / ensemble_seconds}
    print("RESULT " + " ".join(f"{key}={value:.4g}" for key, value in fields.items()))


if __name__ == "__main__":
    main()
