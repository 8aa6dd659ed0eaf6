"""The report in W&B: a Table with one row per feature (an HTML snippet of its top example) and the
histogram of log10 firing frequency over all features."""

from __future__ import annotations

import numpy as np

from .html import activation_spans, index_rows


def log_report(run, data: dict, prefix: str = "feature_report") -> None:
    import wandb

    table = wandb.Table(columns=[
        "feature", "frequency", "max_activation", "mean_activation", "mcs_max", "context_dependence", "logit_lens_top",
        "top_example",
    ])
    for feature, row in zip(data["features"], index_rows(data)):
        top = feature["top_examples"][0] if feature["top_examples"] else None
        snippet = activation_spans(top, feature["max_activation"]) if top else ""
        table.add_data(
            feature["id"], feature["frequency"], feature["max_activation"], feature["mean_activation"],
            feature["mcs_max"], feature.get("context_dependence"), " ".join(row["lens"]),
            wandb.Html(f'<div style="font-family:monospace;white-space:pre-wrap">{snippet}</div>', inject=False),
        )
    density = data["density"]
    logged = {f"{prefix}/features": table}
    if density["counts"]:
        logged[f"{prefix}/log10_frequency"] = wandb.Histogram(
            np_histogram=(np.asarray(density["counts"]), np.asarray(density["log10_edges"]))
        )
    run.log(logged)
    run.summary.update({f"{prefix}/n_features": len(data["features"]), f"{prefix}/dead_features": density["dead"]})
