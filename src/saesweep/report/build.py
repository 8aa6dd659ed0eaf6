"""Build the feature report of one run directory: <run>/report/features.json, index.html and one page
per feature, optionally logged to W&B.

`build_report(run_dir, settings)` is what `python report.py run_dir=...` and the sweep evaluator call.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saesweep.errors import CheckpointError, ConfigError
from saesweep.io import atomic_write_bytes
from saesweep.lm import load_model, resolve_device, validate_hook_point
from saesweep.rundir import CFG_FILE, SAE_FILE, load_run_config, load_sae, run_setting, weights_file
from saesweep.sae import Sae, trained_architecture
from saesweep.tokens import ReadableTokens

from . import views
from .heldout import HeldOutTokens, rebuild_held_out
from .html import feature_page_name, render_feature_page, render_index
from .selection import SweepComparison, check_feature_ids, compare_with_sweep, select_features
from .settings import ReportSettings

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FEATURES_JSON = "features.json"
INDEX_HTML = "index.html"
PAGES_DIR = "features"


@dataclass
class BuiltReport:
    report_dir: Path
    features: list[int]
    data: dict  # the content of features.json
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def index_html(self) -> Path:
        return self.report_dir / INDEX_HTML

    @property
    def features_json(self) -> Path:
        return self.report_dir / FEATURES_JSON


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _round(x: float) -> float:
    """Four significant digits: enough to read, keeps features.json small."""
    return float(f"{x:.4g}")


def _rounded(values) -> list:
    return [None if math.isnan(v) else _round(v) for v in values]  # NaN (not measured) → null


def build_report(
    run_dir: str | Path,
    settings: ReportSettings | None = None,
    *,
    sweep_run_dirs: list[Path] | None = None,
    model=None,
    wandb_run=None,
    wandb_prefix: str = "feature_report",
    run_cfg: dict | None = None,
    trust_pickle: bool = False,
) -> BuiltReport:
    """Compute the report views for the selected features of one run and write <run_dir>/report/.

    sweep_run_dirs: the runs of the sweep (this one may be among them); each feature's MCS against
        the others that read the same model and hook point goes into the report.
    model: the run's language model, already loaded (saves loading it again for every run of a sweep).
    wandb_run: a W&B run to log the feature table and density histogram to, under `wandb_prefix`.
    run_cfg: what the run's cfg.json would say (model, hook point, dataset, ctx_len), for a dictionary
        that is not a saesweep run (a released SAELens, sparsify or dictionary_learning directory).
    trust_pickle: load a pickle weights file (dictionary_learning's ae.pt).
    """
    settings = settings or ReportSettings()
    run_dir = Path(run_dir)
    watch = _Stopwatch()
    if run_cfg is None and (not (run_dir / CFG_FILE).is_file() or not weights_file(run_dir).is_file()):
        raise CheckpointError(
            f"{run_dir} is not a saesweep run directory: it needs {CFG_FILE} and {SAE_FILE} (a finished training job); "
            "for a released dictionary give model.path (or model.name) and the data"
        )
    with watch("load"):
        run_cfg = run_cfg or load_run_config(run_dir)
        # a model handed in decides the device: the SAE must sit where the model's activations are
        device = next(model.parameters()).device if model is not None else resolve_device(settings.device)
        sae = load_sae(run_dir, device, trust_pickle=trust_pickle).eval()
        check_feature_ids(settings, sae.d_sae)
        if model is None:
            model = load_model(run_setting(run_cfg, "model_name"), run_setting(run_cfg, "model_path"), device)
        hook_point = run_setting(run_cfg, "hook_point")
        validate_hook_point(model, hook_point)
    with watch("held_out"):
        held_out = rebuild_held_out(model, run_cfg, settings.n_tokens, settings.batch_contexts)
    with watch("statistics"):
        stats = views.feature_statistics(sae, held_out.activations)
        sweep = compare_with_sweep(run_dir, sae, sweep_run_dirs) if sweep_run_dirs else None
        selection, features = select_features(settings, sae.d_sae, stats.frequency, sweep)
        if not features:
            raise ConfigError(f"report.selection={selection} selected no feature of {run_dir} (none fires on the held-out "
                              "tokens, or none is found again); choose features with report.features=[...]")
        feature_ids = torch.tensor(features, dtype=torch.long)
        acts = views.selected_activations(sae, held_out.activations, feature_ids)
    log.info("report on %d features of %s over %s", len(features), run_dir, held_out.describe())

    data = _compute_views(model, sae, run_cfg, held_out, features, acts, stats, sweep, settings, watch)
    data["run"] = _run_summary(run_dir, run_cfg, sae, hook_point)
    data["held_out"] = {
        "n_tokens": held_out.n_tokens, "n_contexts": len(held_out.contexts), "ctx_len": held_out.contexts.shape[1],
        "n_eval_tokens": held_out.n_eval_tokens, "n_documents": held_out.n_documents, "description": held_out.describe(),
    }
    data["selection"] = {"method": selection, "n_features": len(features)}
    data["settings"] = asdict(settings)

    report_dir = run_dir / REPORT_DIR
    with watch("write"):
        _write(report_dir, data)
    if wandb_run is not None:
        from .wandb_log import log_report

        with watch("wandb"):
            log_report(wandb_run, data, wandb_prefix)
    return BuiltReport(report_dir, features, data, watch.seconds)


def _run_summary(run_dir: Path, run_cfg: dict, sae: Sae, hook_point: str) -> dict:
    """The report's `run`: what was trained, on what."""
    return {
        "run_dir": str(run_dir.resolve()),
        "architecture": trained_architecture(run_cfg),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "hook_point": hook_point,
        "model": run_cfg.get("model_path") or run_cfg.get("model_name"),
        "dict_ratio": run_cfg.get("dict_ratio"),
        "l1_coef": run_cfg.get("l1_coef"),
        # the architecture's own keys as trained (l1_coef, k, l0_coef ... whichever it has)
        "hyperparameters": {k: v for k, v in (run_cfg.get("sae") or {}).items() if k != "architecture"},
    }


def _compute_views(
    model,
    sae: Sae,
    run_cfg: dict,
    held_out: HeldOutTokens,
    features: list[int],
    acts: torch.Tensor,
    stats: views.FeatureStatistics,
    sweep: SweepComparison | None,
    settings: ReportSettings,
    watch: _Stopwatch,
) -> dict:
    text = ReadableTokens(model.tokenizer)
    contexts = held_out.contexts
    hook_point = run_cfg["hook_point"]
    generator = torch.Generator().manual_seed(settings.seed)

    with watch("examples"):
        tops = views.top_examples(acts, settings.n_top_examples)
        uniforms = views.uniform_examples(acts, settings.n_bins, settings.per_bin, generator)
        histograms = views.activation_histograms(acts, settings.histogram_bins)
        causal = [_causal_examples(t, u, settings) for t, u in zip(tops, uniforms)]

    # the BOS the run's contexts begin with (the token-alone and steering inputs begin with it too)
    bos = int(contexts[0, 0]) if run_setting(run_cfg, "dataset", "prepend_bos") else None
    with watch("context_dependence"):
        alone = (_token_alone(model, sae, hook_point, contexts, features, tops, uniforms, bos, settings)
                 if settings.context_dependence else None)

    with watch("logit_lens"):
        w_u = views.effective_unembedding(model, settings.use_ln_final).to(sae.W_dec.device)
        excluded, rule = _excluded_tokens(w_u, settings)
        norms = w_u.norm(dim=0).cpu()
        lens = views.logit_lens(sae.W_dec.detach()[torch.tensor(features, dtype=torch.long)], w_u, excluded,
                                settings.logit_lens_k)

    with watch("ablated_text"):
        deletions = views.deletion_effects(
            model, sae, hook_point, contexts, [(f, e) for f, exs in zip(features, causal) for e in exs],
            first_deletable=1 if run_setting(run_cfg, "dataset", "prepend_bos") else 0,
            batch_contexts=settings.batch_contexts,
        )
        deletions_of = _split(deletions, [len(exs) for exs in causal])

    with watch("direction_ablation"):
        example_deltas, aggregates = _direction_views(model, sae, hook_point, contexts, features, acts, causal,
                                                      settings, generator)

    steering = _steering_views(model, sae, hook_point, features, stats, bos, settings, watch)
    computed = _Computed(contexts, text, acts, stats, sweep, settings, tops, uniforms, histograms, causal, alone,
                         lens, deletions_of, example_deltas, aggregates, steering)
    with watch("assemble"):
        pages = [_feature_page(computed, j, feature) for j, feature in enumerate(features)]
    return {
        "features": pages,
        "density": views.density_histogram(stats.frequency),
        "logit_lens": {
            "use_ln_final": settings.use_ln_final,
            "excluded_rule": rule,
            "excluded_tokens": [
                {"id": int(i), "token": t, "norm": _round(float(norms[i]))} for i, t in zip(excluded, text.single(excluded))
            ],
            "median_norm": _round(float(norms.median())),
        },
        "sweep": None if sweep is None else {
            "runs": sweep.run_names, "skipped": sweep.skipped, "found_threshold": settings.found_threshold,
        },
    }


@dataclass(frozen=True)
class _Computed:
    """What the report computed for its features (index j in each list), from which each page is made."""

    contexts: torch.Tensor
    text: ReadableTokens
    acts: torch.Tensor
    stats: views.FeatureStatistics
    sweep: SweepComparison | None
    settings: ReportSettings
    tops: list
    uniforms: list
    histograms: list
    causal: list
    alone: list | None
    lens: tuple
    deletions_of: list
    example_deltas: list
    aggregates: list
    steering: dict


def _steering_views(model, sae: Sae, hook_point: str, features: list[int], stats: views.FeatureStatistics,
                    bos: int | None, settings: ReportSettings, watch: _Stopwatch) -> dict:
    """Per feature, steering's continuations and logit shifts (report.steering; {} when off)."""
    if not settings.steering:
        return {}
    from saesweep.steering import SteeringResult, SteeringSettings, steer_with

    steering = {}
    with watch("steering"):
        for feature in features:
            scale = float(stats.max_activation[feature])
            steered = SteeringSettings(feature=feature, seed=settings.seed, **settings.steering)
            continuations, shifts = steer_with(model, sae, hook_point, scale, steered, bos)
            steering[feature] = SteeringResult(feature, steered.mode, float(steered.strength), _round(scale),
                                               hook_point, continuations, shifts).to_dict()
    return steering


def _feature_page(c: _Computed, j: int, feature: int) -> dict:
    """The page of feature `feature`, the j-th of the report."""
    feature_acts = c.acts[:, :, j]
    edges, counts = c.histograms[j]
    mcs_runs = {} if c.sweep is None else {
        name: _round(float(c.sweep.mcs[r, feature])) for r, name in enumerate(c.sweep.run_names)
    }
    best = max(mcs_runs.values()) if mcs_runs else None
    examples = c.tops[j] + c.uniforms[j]
    alone_j = None if c.alone is None else c.alone[j]
    return {
        "id": feature,
        "frequency": float(c.stats.frequency[feature]),
        "mean_activation": _round(float(c.stats.mean_activation[feature])),
        "max_activation": _round(float(c.stats.max_activation[feature])),
        "mcs": mcs_runs,
        "mcs_max": best,
        "layers": [] if c.sweep is None else _layer_matches(c.sweep, feature, c.settings.found_threshold),
        "found_again": None if best is None else best >= c.settings.found_threshold,
        "histogram": {"edges": _rounded(edges), "counts": counts},
        "context_dependence": None if alone_j is None else _maybe_round(views.context_dependence(
            torch.tensor([e.activation for e in examples]), torch.tensor(alone_j))),
        "deletion_by_offset": [
            {"offset": offset, "mean_drop": _maybe_round(drop), "n": n}
            for offset, drop, n in views.deletion_by_offset(c.deletions_of[j], c.contexts.shape[1] - 1)
        ],
        "logit_lens": {
            "top": _lens_entries(c.lens[0][j], c.lens[1][j], c.text),
            "bottom": _lens_entries(c.lens[2][j], c.lens[3][j], c.text),
        },
        "top_examples": [
            _example(e, c.contexts, feature_acts, c.text, whole=True, alone=_at(alone_j, k))
            for k, e in enumerate(c.tops[j])
        ],
        "uniform_examples": [
            _example(e, c.contexts, feature_acts, c.text, whole=False, alone=_at(alone_j, len(c.tops[j]) + k))
            for k, e in enumerate(c.uniforms[j])
        ],
        "ablated_text": [
            {**_example(e, c.contexts, feature_acts, c.text, whole=False), "kind": _kind(e),
             "deltas": _rounded(d.tolist())}
            for e, d in zip(c.causal[j], c.deletions_of[j])
        ],
        "steering": c.steering.get(feature),
        "direction_ablation": {
            "examples": [
                {**_example(e, c.contexts, feature_acts, c.text, whole=True), "kind": _kind(e),
                 "delta_logprob": [None] + _rounded(d.tolist())}  # the first token has no prediction
                for e, d in zip(c.causal[j], c.example_deltas[j])
            ],
            "dataset": {**c.aggregates[j],
                        "falls": [_effect(e, c.text) for e in c.aggregates[j]["falls"]],
                        "rises": [_effect(e, c.text) for e in c.aggregates[j]["rises"]]},
        },
    }


def _causal_examples(
    top: list[views.Example], uniform: list[views.Example], settings: ReportSettings
) -> list[views.Example]:
    """The examples that get the causal views: the strongest top ones and uniform ones from bins spread
    evenly over the occupied bins (the highest, the lowest and between)."""
    chosen_top = top[: settings.causal_top]
    taken = {(e.context, e.position) for e in chosen_top}
    first_of_bin: dict[int, views.Example] = {}
    for e in uniform:
        if (e.context, e.position) not in taken:  # the top example is often drawn from the highest bin too
            first_of_bin.setdefault(e.bin, e)
    bins = sorted(first_of_bin, reverse=True)
    n = min(settings.causal_uniform, len(bins))
    picks = torch.linspace(0, len(bins) - 1, n).round().long().unique().tolist() if n else []
    return chosen_top + [first_of_bin[bins[p]] for p in picks]


def _layer_matches(sweep: SweepComparison, feature: int, threshold: float) -> list[dict]:
    """The feature's one-to-one matches in the runs at other residual hook points, with links to their pages."""
    return [
        {"run": m.run, "hook_point": m.hook_point, "feature": int(m.index[feature]),
         "cosine": _round(float(m.cosine[feature])), "found": bool(m.cosine[feature] >= threshold),
         "href": f"../../{m.relative_dir}/{REPORT_DIR}/{PAGES_DIR}/{feature_page_name(int(m.index[feature]))}"}
        for m in sweep.layers if m.index[feature] >= 0
    ]


def _excluded_tokens(w_u: torch.Tensor, settings: ReportSettings) -> tuple[torch.Tensor, str]:
    """Token ids left out of the logit lens, and the rule that chose them."""
    if settings.exclude_tokens is None:
        ids, _ = views.outlier_tokens(w_u, settings.outlier_mads)
        return ids.cpu(), f"|norm − median| > {settings.outlier_mads:g} × 1.4826 × MAD of the unembedding column norms"
    bad = [t for t in settings.exclude_tokens if not 0 <= t < w_u.shape[1]]
    if bad:
        raise ConfigError(f"report.exclude_tokens: token id {bad[0]} is out of range: the vocabulary is 0..{w_u.shape[1] - 1}")
    return torch.tensor(sorted(set(settings.exclude_tokens)), dtype=torch.long), "listed in report.exclude_tokens"


def _direction_views(
    model,
    sae: Sae,
    hook_point: str,
    contexts: torch.Tensor,
    features: list[int],
    acts: torch.Tensor,
    causal: list[list[views.Example]],
    settings: ReportSettings,
    generator: torch.Generator,
) -> tuple[list[list[torch.Tensor]], list[dict]]:
    """Direction ablation: per feature, the log-prob changes [ctx_len−1] of each causal example, and the
    changes aggregated by next token over a random sample of the contexts where the feature fires.

    The samples of all features are drawn along one shared random order of the contexts: each is still a
    uniform sample of that feature's firing contexts, and features firing in the same contexts share
    their clean forward passes.
    """
    firing = (acts > 0).any(dim=1)  # [n_ctx, k]
    shared_order = torch.randperm(len(contexts), generator=generator)
    samples = [shared_order[firing[shared_order, j]][: settings.direction_contexts] for j in range(len(features))]
    requests = [(f, e.context) for f, exs in zip(features, causal) for e in exs]
    requests += [(f, c) for f, rows in zip(features, samples) for c in rows.tolist()]
    deltas = views.direction_ablation(model, sae, hook_point, contexts, requests, settings.batch_contexts)
    n_examples = sum(len(exs) for exs in causal)
    example_deltas = _split(list(deltas[:n_examples]), [len(exs) for exs in causal])
    sample_deltas = _split(list(deltas[n_examples:]), [len(rows) for rows in samples])

    positions = torch.arange(contexts.shape[1] - 1)
    aggregates = []
    for j, rows in enumerate(samples):
        block = torch.stack(sample_deltas[j]) if len(rows) else torch.empty(0, len(positions))
        # a prediction is scored from the feature's first firing token on: before it nothing was removed
        first_fire = (acts[rows, :, j] > 0).float().argmax(dim=1)
        scored = positions[None, :] >= first_fire[:, None]
        falls, rises = views.logprob_changes_by_token(
            block, contexts[rows, 1:], scored, settings.direction_min_count, settings.direction_k
        )
        aggregates.append({"n_contexts": len(rows), "n_positions": int(scored.sum()), "falls": falls, "rises": rises})
    return example_deltas, aggregates


def _split(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


def _lens_entries(ids: torch.Tensor, logits: torch.Tensor, text: ReadableTokens) -> list[dict]:
    return [{"id": int(i), "token": t, "logit": _round(float(v))} for i, t, v in zip(ids, text.single(ids), logits)]


def _kind(example: views.Example) -> str:
    return "top" if example.bin is None else f"bin {example.bin + 1}"


def _token_alone(
    model, sae: Sae, hook_point: str, contexts: torch.Tensor, features: list[int], tops: list[list[views.Example]],
    uniforms: list[list[views.Example]], bos: int | None, settings: ReportSettings,
) -> list[list[float]]:
    """Per feature, per example (top ones, then uniform ones): the feature's activation on the example's
    token alone. Each distinct (feature, token) goes through the model once; an example on the context's
    first token (BOS) has no context to lose and keeps its own activation."""
    pairs: dict[tuple[int, int], int] = {}
    for feature, examples in zip(features, (t + u for t, u in zip(tops, uniforms))):
        for e in examples:
            if e.position > 0:
                pairs.setdefault((feature, int(contexts[e.context, e.position])), len(pairs))
    values = torch.empty(0)
    if pairs:
        keys = torch.tensor(list(pairs), dtype=torch.long)
        values = views.token_alone_activations(model, sae, hook_point, keys[:, 1], keys[:, 0], bos, settings.batch_contexts)
    return [
        [e.activation if e.position == 0 else float(values[pairs[feature, int(contexts[e.context, e.position])]])
         for e in t + u]
        for feature, t, u in zip(features, tops, uniforms)
    ]


def _at(values: list[float] | None, k: int) -> float | None:
    return None if values is None else _round(values[k])


def _maybe_round(x: float | None) -> float | None:
    return None if x is None else _round(x)


def _example(
    e: views.Example, contexts: torch.Tensor, feature_acts: torch.Tensor, text: ReadableTokens, whole: bool,
    alone: float | None = None
) -> dict:
    """An example as JSON: the whole context (top examples) or the context up to the example's token;
    `alone`: the feature's activation on the example's token without its context."""
    end = contexts.shape[1] if whole else e.position + 1
    ids = contexts[e.context, :end].tolist()
    return {
        "context": e.context,
        "position": e.position,
        "activation": _round(e.activation),
        **({"bin": e.bin} if e.bin is not None else {}),
        **({"alone_activation": alone} if alone is not None else {}),
        "token_ids": ids,
        "tokens": text.sequence(ids),
        "activations": _rounded(feature_acts[e.context, :end].tolist()),
    }


def _effect(effect: views.TokenEffect, text: ReadableTokens) -> dict:
    return {"id": effect.token, "token": text.single([effect.token])[0], "mean_delta": _round(effect.mean_delta),
            "count": effect.count}


def _write(report_dir: Path, data: dict) -> None:
    """features.json, index.html and the pages; pages of features no longer in the report are removed."""
    pages_dir = report_dir / PAGES_DIR
    features = data["features"]
    for k, feature in enumerate(features):
        neighbours = (features[k - 1]["id"] if k else None, features[k + 1]["id"] if k + 1 < len(features) else None)
        html = render_feature_page(data, feature, *neighbours)
        atomic_write_bytes(pages_dir / feature_page_name(feature["id"]), html.encode())
    keep = {feature_page_name(f["id"]) for f in features}
    if pages_dir.is_dir():
        for stale in pages_dir.glob("*.html"):
            if stale.name not in keep:
                stale.unlink()
    # compact: a report of 100 features is ~2 MB this way, three times that indented
    atomic_write_bytes(report_dir / FEATURES_JSON, json.dumps(data, separators=(",", ":")).encode())
    atomic_write_bytes(report_dir / INDEX_HTML, render_index(data).encode())
