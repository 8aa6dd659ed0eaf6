"""Self-contained HTML for a feature report: index.html (a sortable, filterable table over an inline
JSON blob, vanilla JS) and one static page per feature. No external resource is ever referenced.

All text from the corpus or the tokenizer is escaped (saesweep.pages.esc): tokens are untrusted input. The
page frame and the steering section, which the steering page shows too, are saesweep.pages's.
"""

from __future__ import annotations

import json
import math

from saesweep.pages import asset, chip_token, display_token, esc, page, steering_section

_INDEX_CSS = asset("index.css")

# Colour scales. Activation: orange by activation / the feature's maximum. Ablation deltas: red where the
# removal lowers the value, blue where it raises it.
_ORANGE, _RED, _BLUE = (255, 128, 0), (215, 38, 38), (40, 96, 215)
_SNIPPET_BEFORE, _SNIPPET_AFTER = 10, 3  # tokens of the top example around its maximum, in the index table
_SHOWN_TOKENS_IN_TABLE = 5


def feature_page_name(feature: int) -> str:
    return f"{feature}.html"


def _layer_matches_table(matches: list[dict], sweep: dict | None) -> str:
    """The feature's one-to-one decoder matches in the sweep's runs at other residual hook points, linked."""
    if not matches:
        return ""
    rows = "".join(
        f'<tr><td>{esc(m["hook_point"])}</td><td>{esc(m["run"])}</td><td><a href="{esc(m["href"])}">feature '
        f'{m["feature"]}</a></td><td class="num">{"<b>" if m["found"] else ""}{m["cosine"]:.3f}'
        f'{"</b>" if m["found"] else ""}</td></tr>'
        for m in matches
    )
    return (f'<h3>Matches at other layers</h3><table><tr><th>hook point</th><th>run</th><th>feature</th>'
            f'<th class="num">cosine</th></tr>{rows}</table><p class="note">One-to-one decoder matching; bold: found '
            f'there (cosine ≥ {sweep["found_threshold"]:g}). A link opens that run\'s page of the feature when its '
            "report includes it.</p>")


def _rgba(rgb: tuple[int, int, int], strength: float) -> str:
    strength = max(0.0, min(1.0, strength))
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.06 + 0.84 * strength:.3f})" if strength > 0 else "transparent"


def _signed_colour(delta: float | None, scale: float) -> str:
    if delta is None or delta == 0 or scale <= 0:
        return "transparent"
    return _rgba(_RED if delta < 0 else _BLUE, abs(delta) / scale)


def token_spans(tokens: list[str], colours: list[str], titles: list[str], hit: int | None = None) -> str:
    """Tokens as coloured spans with a tooltip each; the `hit` token is outlined."""
    spans = []
    for k, (token, colour, title) in enumerate(zip(tokens, colours, titles)):
        cls = "t hit" if k == hit else "t"
        style = f' style="background:{colour}"' if colour != "transparent" else ""
        if token == "":  # holds only continuation bytes of a character shown on the token before
            cls, title = cls + " cont", f"{title} (continues the character before)"
        spans.append(f'<span class="{cls}"{style} title="{esc(title)}">{esc(display_token(token) or "·")}</span>')
    return "".join(spans)


def activation_spans(example: dict, max_activation: float) -> str:
    """An example's tokens coloured by the feature's activation on each."""
    colours = [_rgba(_ORANGE, (a or 0) / max_activation) if max_activation > 0 else "transparent"
               for a in example["activations"]]
    titles = [f"{display_token(t)!r}  activation {a:.4g}" for t, a in zip(example["tokens"], example["activations"])]
    return token_spans(example["tokens"], colours, titles, hit=example["position"])


def _svg_histogram(edges: list[float], counts: list[int], x_label: str, width: int = 460, height: int = 150,
                   log_x: bool = False, dead: int = 0) -> str:
    """A bar chart as inline SVG over equal-width bins. With log_x the edges are log10 values, labelled at
    whole decades; `dead` adds a separate grey bar for features that never fired."""
    if not counts:
        return '<p class="note">(no data)</p>'
    left, bottom, top_pad = 44, 30, 8
    slots = len(counts) + (3 if dead else 0)  # the dead bar sits after a gap of two bar widths
    bar_w = (width - left - 8) / slots
    plot_h = height - bottom - top_pad
    axis_y = top_pad + plot_h
    peak = max(max(counts), dead, 1)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']

    def bar(slot: int, count: int, fill: str, tooltip: str) -> None:
        h = plot_h * count / peak
        parts.append(f'<rect x="{left + slot * bar_w:.1f}" y="{axis_y - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="{fill}"><title>{esc(tooltip)}: {count}</title></rect>')

    def label(x: float, text: str, anchor: str = "middle") -> None:
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 13}" text-anchor="{anchor}">{esc(text)}</text>')

    for k, count in enumerate(counts):
        if log_x:
            tooltip = f"frequency {10 ** edges[k]:.2g} – {10 ** edges[k + 1]:.2g}"
        else:
            tooltip = f"({edges[k]:.3g}, {edges[k + 1]:.3g}]"
        bar(k, count, "#4a7fb5", tooltip)
    end_x = left + len(counts) * bar_w
    if log_x:
        label(left, f"{10 ** edges[0]:.2g}", "start")
        label(end_x, f"{10 ** edges[-1]:.2g}", "end")
        span = edges[-1] - edges[0]
        for decade in range(math.ceil(edges[0]), math.floor(edges[-1]) + 1):
            where = (decade - edges[0]) / span
            if 0.15 < where < 0.85:  # whole decades in between, clear of the end labels
                label(left + where * (end_x - left), f"1e{decade}" if decade else "1")
    else:
        label(left, f"{edges[0]:.3g}", "start")
        label(end_x, f"{edges[-1]:.3g}", "end")
    if dead:
        bar(len(counts) + 2, dead, "#9aa5b1", "never fired")
        label(left + (len(counts) + 2.5) * bar_w, "dead")
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{end_x}" y2="{axis_y}" stroke="#9aa5b1"/>')
    parts.append(f'<text x="{left - 4}" y="{top_pad + 9}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{axis_y}" text-anchor="end">0</text>')
    parts.append(f'<text x="{(left + end_x) / 2:.1f}" y="{height - 3}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _json_for_script(obj: object) -> str:
    """JSON that is safe inside <script type="application/json">: no '<', '>' or '&' left raw."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026"
    )


def _hyperparameters_text(run: dict) -> str:
    """`; k=32, aux_coef=0.03125`: the architecture's own keys as trained (reports from before: none)."""
    keys = run.get("hyperparameters") or {}
    return "; " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in keys.items()) if keys else ""


def _run_header(data: dict) -> str:
    run, held_out = data["run"], data["held_out"]
    parts = [
        f'<p class="meta">{esc(run["run_dir"])}</p>',
        (f'<p class="meta">{esc(run["architecture"])} SAE, d_sae {run["d_sae"]} on {esc(run["hook_point"])} '
        f'of {esc(run["model"])} (d_in {run["d_in"]}){esc(_hyperparameters_text(run))}</p>'),
        f'<p class="meta">Held-out tokens: {esc(held_out["description"])}.</p>',
    ]
    return "".join(parts)


def _snippet(feature: dict) -> dict:
    """The top example around its maximum, as plain text pieces for the index table."""
    if not feature["top_examples"]:
        return {"pre": "", "hit": "", "post": ""}
    example = feature["top_examples"][0]
    tokens, p = [display_token(t) for t in example["tokens"]], example["position"]
    return {
        "pre": "".join(tokens[max(0, p - _SNIPPET_BEFORE) : p]),
        "hit": tokens[p],
        "post": "".join(tokens[p + 1 : p + 1 + _SNIPPET_AFTER]),
    }


def index_rows(data: dict) -> list[dict]:
    """One compact row per feature for the index table (also the W&B table)."""
    return [
        {
            "id": f["id"],
            "freq": f["frequency"],
            "max": f["max_activation"],
            "mcs": f["mcs_max"],
            "ctx": f.get("context_dependence"),
            "lens": [chip_token(t["token"]) for t in f["logit_lens"]["top"][:_SHOWN_TOKENS_IN_TABLE]],
            "snip": _snippet(f),
        }
        for f in data["features"]
    ]


_INDEX_JS = asset("index.js")


def render_index(data: dict) -> str:
    run = data["run"]
    density = data["density"]
    lens = data["logit_lens"]
    n = len(data["features"])
    excluded = "".join(f'<span class="chip" title="id {t["id"]}, norm {t["norm"]}">{esc(chip_token(t["token"]))}'
                       f"</span>" for t in lens["excluded_tokens"])
    sweep = data["sweep"]
    sweep_html = ""
    if sweep:
        sweep_html = (f'<p class="meta">MCS against {len(sweep["runs"])} other run(s) of the sweep: '
                      f'{esc(", ".join(sweep["runs"]) or "none comparable")}; found again at MCS ≥ '
                      f'{sweep["found_threshold"]:g}.</p>')
        if sweep["skipped"]:
            sweep_html += f'<p class="note">Not compared: {esc("; ".join(sweep["skipped"]))}</p>'
    n_features = density.get("dead", 0) + sum(density["counts"])
    body = f"""
<h1>Feature report: {esc("/".join(run["run_dir"].rstrip("/").split("/")[-2:]))}</h1>
{_run_header(data)}
<p class="meta">{n} feature(s) selected by <b>{esc(data["selection"]["method"])}</b>.</p>
{sweep_html}
<div class="grid"><div>
<h3>Firing frequency of all {n_features} features</h3>
{_svg_histogram(density["log10_edges"], density["counts"], "firing frequency on the held-out tokens (log scale)",
                log_x=True, dead=density["dead"])}
</div><div>
{_context_histogram(data["features"])}
</div><div>
<h3>Logit lens</h3>
<p class="note">Directions through {"the final LayerNorm scale and " if lens["use_ln_final"] else ""}W_U.
{len(lens["excluded_tokens"])} token(s) excluded ({esc(lens["excluded_rule"])}; median norm {lens["median_norm"]}).</p>
<details><summary>excluded tokens</summary><div>{excluded or "none"}</div></details>
</div></div>
<div class="controls">
<label>Filter <input id="filter" type="search" placeholder="id, token or text"></label>
<label>frequency ≥ <input id="minfreq" type="number" step="any" min="0"></label>
<label>MCS ≥ <input id="minmcs" type="number" step="any"></label>
<label>context ≥ <input id="minctx" type="number" step="any" min="0" max="1"></label>
<span id="count" class="note"></span>
</div>
<table id="features"><thead><tr>
<th class="num" data-key="id" data-type="num">Feature</th>
<th class="num" data-key="freq" data-type="num">Frequency</th>
<th class="num" data-key="max" data-type="num">Max act.</th>
<th class="num" data-key="mcs" data-type="num">MCS</th>
<th class="num" data-key="ctx" data-type="num" title="context dependence: 0 = read off the token, 1 = computed from context">Context</th>
<th data-key="lens" data-type="text">Logit lens: top tokens</th>
<th data-key="snip" data-type="text">Top example</th>
</tr></thead><tbody></tbody></table>
<button id="more" type="button">Show more</button>
<script type="application/json" id="rows">{_json_for_script(index_rows(data))}</script>
"""
    return page(f"Feature report: {run['run_dir']}", body, _INDEX_CSS, _INDEX_JS)


_CONTEXT_BINS = 10


def _context_histogram(features: list[dict]) -> str:
    scores = [f["context_dependence"] for f in features if f.get("context_dependence") is not None]
    if not scores:
        return ""
    counts = [0] * _CONTEXT_BINS
    for score in scores:
        counts[min(int(score * _CONTEXT_BINS), _CONTEXT_BINS - 1)] += 1
    edges = [k / _CONTEXT_BINS for k in range(_CONTEXT_BINS + 1)]
    return (f"<h3>Context dependence of the {len(scores)} reported features</h3>"
            + _svg_histogram(edges, counts, "0 = read off the token … 1 = computed from context"))


def _svg_offset_bars(entries: list[dict], width: int = 460, height: int = 150) -> str:
    """The mean activation drop per deleted offset (−1 nearest, at the right), as signed bars about 0."""
    shown = [e for e in entries if e["mean_drop"] is not None]
    if not shown:
        return '<p class="note">(no token before the examples was deleted)</p>'
    left, bottom, top_pad = 44, 30, 8
    shown.sort(key=lambda e: e["offset"])
    slot = (width - left - 8) / len(shown)
    peak = max(abs(e["mean_drop"]) for e in shown) or 1.0
    low = min(0.0, min(e["mean_drop"] for e in shown))
    span_h = height - bottom - top_pad
    zero_y = top_pad + span_h * peak / (peak - low) if low < 0 else top_pad + span_h
    scale = span_h / (peak - low) if low < 0 else span_h / peak
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for k, e in enumerate(shown):
        offset = e["offset"]
        h = abs(e["mean_drop"]) * scale
        y = zero_y - h if e["mean_drop"] >= 0 else zero_y
        fill = "#d72626" if e["mean_drop"] >= 0 else "#2860d7"
        parts.append(f'<rect x="{left + k * slot:.1f}" y="{y:.1f}" width="{max(slot - 1, 0.5):.1f}" height="{h:.1f}" '
                     f'fill="{fill}"><title>offset {offset}: mean drop {e["mean_drop"]:.4g} over {e["n"]} '
                     f"example(s)</title></rect>")
        if len(shown) <= 12 or offset % 5 == 0 or offset == -1:
            parts.append(f'<text x="{left + (k + 0.5) * slot:.1f}" y="{height - bottom + 13}" text-anchor="middle">'
                         f"{offset}</text>")
    parts.append(f'<line x1="{left}" y1="{zero_y:.1f}" x2="{width - 8}" y2="{zero_y:.1f}" stroke="#9aa5b1"/>')
    parts.append(f'<text x="{left - 4}" y="{top_pad + 9}" text-anchor="end">{peak:.3g}</text>')
    parts.append(f'<text x="{(left + width) / 2:.1f}" y="{height - 3}" text-anchor="middle">'
                 "offset of the deleted token (−1: the previous one)</text></svg>")
    return "".join(parts)


def _context_section(feature: dict) -> str:
    score = feature.get("context_dependence")
    intro = ("Score: 1 − Σ min(token alone, in context) / Σ in context over the top and uniform examples, where "
             "<i>token alone</i> is the activation on BOS + the example's token. 0: read off the token; "
             "1: computed from the context.")
    head = "<h2>Context dependence</h2>" + (
        f'<p><b>{score:.2f}</b> <span class="note">{intro}</span></p>' if score is not None
        else '<p class="note">Not computed (report.context_dependence=false, or the feature never fired).</p>')
    return (head + "<h3>Mean activation drop when the token at each offset is deleted (ablated-text examples)</h3>"
            + _svg_offset_bars(feature.get("deletion_by_offset") or []))


def render_feature_page(data: dict, feature: dict, previous: int | None, following: int | None) -> str:
    fid = feature["id"]
    top = feature["max_activation"]
    nav = ['<nav><a href="../index.html">↑ all features</a>']
    if previous is not None:
        nav.append(f'<a href="{feature_page_name(previous)}">← feature {previous}</a>')
    if following is not None:
        nav.append(f'<a href="{feature_page_name(following)}">feature {following} →</a>')
    nav.append("</nav>")
    freq = feature["frequency"]
    stats = [
        ("frequency", _frequency_text(freq)),
        ("max activation", f"{top:.4g}"),
        ("mean activation when firing", f"{feature['mean_activation']:.4g}"),
    ]
    if feature.get("context_dependence") is not None:
        stats.append(("context dependence (0 token … 1 context)", f"{feature['context_dependence']:.2f}"))
    if feature["mcs_max"] is not None:
        stats.append(("MCS, best other run", f"{feature['mcs_max']:.3f}" + (" (found again)" if feature["found_again"]
                                                                          else "")))
    stats_html = "".join(f'<div class="stat"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in stats)
    mcs_rows = "".join(f'<tr><td>{esc(name)}</td><td class="num">{v:.3f}</td></tr>' for name, v in feature["mcs"].items())
    mcs_html = f"<table><tr><th>other run</th><th class=\"num\">MCS</th></tr>{mcs_rows}</table>" if mcs_rows else ""
    layers_html = _layer_matches_table(feature.get("layers", []), data["sweep"])
    hist = feature["histogram"]
    body = "".join([
        "".join(nav),
        f"<h1>Feature {fid}</h1>",
        _run_header(data),
        f"<div>{stats_html}</div>",
        '<div class="grid"><div><h3>Activation histogram (tokens where it fires)</h3>',
        _svg_histogram(hist["edges"], hist["counts"], "activation"),
        f"</div><div>{'<h3>MCS against the sweep</h3>' + mcs_html if mcs_html else ''}{layers_html}</div></div>",
        _logit_lens_section(feature, data["logit_lens"]),
        _top_examples_section(feature),
        _uniform_section(feature, data["settings"]["n_bins"]),
        _ablated_text_section(feature),
        _context_section(feature),
        _direction_section(feature),
        steering_section(feature["steering"]) if feature.get("steering") else "",
    ])
    return page(f"Feature {fid}", body)


def _frequency_text(frequency: float) -> str:
    if frequency == 0:
        return "never fired"
    if frequency >= 0.01:
        return f"{100 * frequency:.3g} % of tokens"
    return f"{100 * frequency:.2g} % (1 in {1 / frequency:,.0f} tokens)"


def _logit_lens_section(feature: dict, lens_info: dict) -> str:
    def table(entries: list[dict], caption: str) -> str:
        rows = "".join(f'<tr><td><span class="chip">{esc(chip_token(e["token"]))}</span></td>'
                       f'<td class="num">{e["logit"]:+.3f}</td><td class="num note">{e["id"]}</td></tr>'
                       for e in entries)
        return f'<div><h3>{caption}</h3><table><tr><th>token</th><th class="num">logit</th>' \
               f'<th class="num">id</th></tr>{rows}</table></div>'

    lens = feature["logit_lens"]
    return (
        "<h2>Logit lens</h2>"
        f'<p class="note">W_dec[{feature["id"]}] through {"the final LayerNorm scale and " if lens_info["use_ln_final"] else ""}'
        f"the unembedding; {len(lens_info['excluded_tokens'])} outlier token(s) excluded (listed on the index page).</p>"
        f'<div class="grid">{table(lens["top"], "Promoted (top)")}{table(lens["bottom"], "Suppressed (bottom)")}</div>'
    )


def _activation_label(example: dict) -> str:
    alone = example.get("alone_activation")
    return f"{example['activation']:.4g}" + ("" if alone is None else f" · alone {alone:.3g}")


def _example_row(label: str, spans: str) -> str:
    return f'<div class="ex"><span class="val">{esc(label)}</span><span class="tokens">{spans}</span></div>'


def _top_examples_section(feature: dict) -> str:
    top = feature["max_activation"]
    rows = "".join(_example_row(_activation_label(e), activation_spans(e, top)) for e in feature["top_examples"])
    legend = f'<span class="legend" style="background:linear-gradient(90deg,{_rgba(_ORANGE, 0.01)},{_rgba(_ORANGE, 1)})">' \
             f"</span> 0 … {top:.4g}"
    return (
        "<h2>Top examples</h2>"
        f'<p class="note">The held-out contexts with the highest activation, one per context; the outlined token '
        f"is the maximum. Colour: activation {legend}.</p>" + (rows or '<p class="note">The feature never fired.</p>')
    )


def _uniform_section(feature: dict, n_bins: int) -> str:
    top = feature["max_activation"]
    width = top / n_bins if top else 0
    by_bin: dict[int, list[dict]] = {}
    for e in feature["uniform_examples"]:
        by_bin.setdefault(e["bin"], []).append(e)
    parts = ["<h2>Uniform examples</h2>",
             (f'<p class="note">(0, {top:.4g}] split into {n_bins} equal-width bins, random tokens from each, '
             "each context ending at the sampled token (outlined).</p>")]
    for b in sorted(by_bin, reverse=True):
        parts.append(f"<h3>bin {b + 1}: ({b * width:.3g}, {(b + 1) * width:.3g}]</h3>")
        parts.extend(_example_row(_activation_label(e), activation_spans(e, top)) for e in by_bin[b])
    if not by_bin:
        parts.append('<p class="note">The feature never fired.</p>')
    return "".join(parts)


def _ablated_text_section(feature: dict) -> str:
    parts = ["<h2>Ablated text</h2>",
             ('<p class="note">Each earlier token deleted in turn; colour: change of the activation at the final token '
             "(outlined) relative to its value there — red: deleting the token lowers it, blue: raises it. "
             "Uncoloured tokens were not deleted (BOS) or did not change it.</p>")]
    for e in feature["ablated_text"]:
        act = e["activation"]
        colours = [_signed_colour(d, act) for d in e["deltas"]] + ["transparent"]
        titles = [f"{display_token(t)!r}  " + ("not deleted" if d is None else f"deleting it changes the activation by {d:+.4g}")
                  for t, d in zip(e["tokens"], e["deltas"])]
        titles.append(f"{display_token(e['tokens'][-1])!r}  activation {act:.4g}")
        parts.append(_example_row(f"{e['kind']} · {act:.3g}", token_spans(e["tokens"], colours, titles,
                                                                         hit=e["position"])))
    if not feature["ablated_text"]:
        parts.append('<p class="note">The feature never fired.</p>')
    return "".join(parts)


def _direction_section(feature: dict) -> str:
    direction = feature["direction_ablation"]
    dataset = direction["dataset"]
    scale = max([abs(d) for e in direction["examples"] for d in e["delta_logprob"] if d is not None] + [0.1])

    def effects(entries: list[dict], caption: str) -> str:
        rows = "".join(f'<tr><td><span class="chip">{esc(chip_token(e["token"]))}</span></td>'
                       f'<td class="num">{e["mean_delta"]:+.3f}</td><td class="num">{e["count"]}</td></tr>'
                       for e in entries)
        return (f'<div><h3>{caption}</h3><table><tr><th>next token</th><th class="num">mean Δ log p</th>'
                f'<th class="num">count</th></tr>{rows or "<tr><td colspan=3 class=note>none</td></tr>"}</table></div>')

    parts = [
        "<h2>Direction ablation</h2>",
        (f'<p class="note">f<sub>{feature["id"]}</sub>(x)·W_dec[{feature["id"]}] removed from the residual stream at the '
        f"hook; change of log p(actual next token). Over {dataset['n_contexts']} random contexts where the feature "
        f"fires ({dataset['n_positions']} predictions from its first firing token on):</p>"),
        f'<div class="grid">{effects(dataset["falls"], "Falls most")}{effects(dataset["rises"], "Rises most")}</div>',
        "<h3>Per example</h3>",
        (f'<p class="note">Each token coloured by the change of its log-probability as the next token '
         f"(red: falls, blue: rises; full colour at {scale:.3g} nats). The outlined token is the example's; "
         "the number after the kind of example is its largest fall.</p>"),
    ]
    for e in direction["examples"]:
        deltas = e["delta_logprob"]
        colours = [_signed_colour(d, scale) for d in deltas]
        titles = [f"{display_token(t)!r}  " + ("first token" if d is None else f"Δ log p = {d:+.4g}")
                  for t, d in zip(e["tokens"], deltas)]
        worst = min(((d, k) for k, d in enumerate(deltas) if d is not None), default=None)
        label = e["kind"] if worst is None else f"{e['kind']} · {worst[0]:+.2f}"
        parts.append(_example_row(label, token_spans(e["tokens"], colours, titles, hit=e["position"])))
    return "".join(parts)
