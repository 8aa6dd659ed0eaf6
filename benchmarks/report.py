"""Benchmark: feature reports for 100 features over 100k held-out tokens of the reference model.

    python benchmarks/report.py                      # trains a small SAE first (not timed as report)
    python benchmarks/report.py --run-dir RUN        # or reports on an existing run of the reference model

Prints the time of each stage of build_report and ends with one `RESULT key=value ...` line. The report
is built twice in one run, without and with the context-dependence view, to measure what that view adds
(target: ≤ 25 %). Measures,
never asserts. The machine may be shared: the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def train_reference_run(run_dir: Path, n_tokens: int) -> None:
    from hydra import compose, initialize_config_dir

    from saesweep.train import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model.path={REFERENCE / 'model'}", "data=jsonl", f"data.path={REFERENCE / 'corpus' / 'train.jsonl.gz'}",
            "dict_ratio=2", f"n_tokens={n_tokens}", "logger=none", "trainer.enable_progress_bar=false",
        ])
    train(cfg, run_dir)


def deletion_batching(model, run_dir: Path, data: dict, n_features: int) -> tuple[int, float, float, float]:
    """The token-deletion view of the first features' examples, batched (as the report runs it) and
    with one forward pass per deletion: (sequences, batched s, one-by-one s, largest difference)."""
    from saesweep.report.views import Example, deletion_effects
    from saesweep.rundir import load_run_config, load_sae

    sae = load_sae(run_dir)
    first = 1 if load_run_config(run_dir)["dataset"]["prepend_bos"] else 0  # the BOS is never deleted
    entries = [(f["id"], e) for f in data["features"][:n_features] for e in f["ablated_text"]]
    ctx_len = data["held_out"]["ctx_len"]
    # the entries hold their context up to the example's token, all the deletion view reads
    contexts = torch.tensor([e["token_ids"] + [0] * (ctx_len - len(e["token_ids"])) for _, e in entries])
    requests = [(fid, Example(row, e["position"], e["activation"])) for row, (fid, e) in enumerate(entries)]
    timings, results = [], []
    for batch in (128, 1):
        start = time.perf_counter()
        results.append(deletion_effects(model, sae, data["run"]["hook_point"], contexts, requests, first, batch))
        timings.append(time.perf_counter() - start)
    n_sequences = sum(max(e.position - first, 0) for _, e in requests)
    difference = max((a - b).nan_to_num().abs().max().item() for a, b in zip(*results) if len(a))
    return n_sequences, timings[0], timings[1], difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a run directory of the reference model (default: train one)")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--train-tokens", type=int, default=100_000, help="when training the run first")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from saesweep.lm import load_model
    from saesweep.report import ReportSettings, build_report
    from saesweep.rundir import load_run_config

    print(describe_machine())
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f}")

    run_dir = args.run_dir
    train_s = 0.0
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="report-bench-")) / "run"
        start = time.perf_counter()
        train_reference_run(run_dir, args.train_tokens)
        train_s = time.perf_counter() - start
        print(f"trained an SAE on {args.train_tokens} tokens in {train_s:.1f} s: {run_dir}")
    run_cfg = load_run_config(run_dir)
    start = time.perf_counter()
    model = load_model(run_cfg.get("model_name"), run_cfg.get("model_path"), torch.device("cpu"))
    load_model_s = time.perf_counter() - start

    settings = ReportSettings(top_n=args.features, n_tokens=args.tokens, selection="frequent", context_dependence=False)
    start = time.perf_counter()
    build_report(run_dir, settings, model=model)
    without_context_s = time.perf_counter() - start
    settings = ReportSettings(top_n=args.features, n_tokens=args.tokens, selection="frequent")
    start = time.perf_counter()
    built = build_report(run_dir, settings, model=model)
    total_s = time.perf_counter() - start
    context_overhead = (total_s - without_context_s) / without_context_s
    print(f"report without context dependence {without_context_s:.1f} s, with it {total_s:.1f} s: "
          f"+{100 * context_overhead:.1f} % (its own stage {built.timings.get('context_dependence', 0):.2f} s)")

    print(f"\nreport of {len(built.features)} features of d_sae {built.data['run']['d_sae']} over "
          f"{built.data['held_out']['n_tokens']} tokens: {total_s:.1f} s (model loaded beforehand in {load_model_s:.1f} s)")
    for stage, seconds in built.timings.items():
        print(f"  {stage:<20} {seconds:7.1f} s  {100 * seconds / total_s:5.1f} %")
    pages = list((built.report_dir / "features").glob("*.html"))
    size_mb = sum(p.stat().st_size for p in [built.index_html, built.features_json, *pages]) / 1e6
    print(f"output: {built.report_dir} ({len(pages)} pages, {size_mb:.1f} MB with features.json)")
    # readable tokens: no U+FFFD (a byte piece of a character decoded alone) on any page
    replacement_chars = sum(p.read_text(encoding="utf-8").count("\ufffd") for p in [built.index_html, *pages])
    escaped_bytes = sum(p.read_text(encoding="utf-8").count("⟨0x") for p in [built.index_html, *pages])
    print(f"U+FFFD on the pages: {replacement_chars}; ⟨0x..⟩ byte escapes: {escaped_bytes}")
    n_sequences, batched_s, single_s, difference = deletion_batching(model, run_dir, built.data, n_features=10)
    print(f"token deletion for the examples of 10 features ({n_sequences} deleted sequences): batched {batched_s:.2f} s, "
          f"one forward pass per deletion {single_s:.2f} s ({single_s / batched_s:.1f}× slower; results agree "
          f"to {difference:.1e})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    figures = {
        "features": len(built.features),
        "tokens": built.data["held_out"]["n_tokens"],
        "total_s": round(total_s, 1),
        "without_context_dependence_s": round(without_context_s, 1),
        "context_dependence_overhead_pct": round(100 * context_overhead, 1),
        **{f"{stage}_s": round(seconds, 1) for stage, seconds in built.timings.items()},
        "output_mb": round(size_mb, 1),
        "replacement_chars": replacement_chars,
        "deletion_batched_speedup": round(single_s / batched_s, 1),
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
