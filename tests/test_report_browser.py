"""Report pages in a real browser: headless Chromium over the DevTools protocol (tests/chromium.py).

Run with `make test-browser` (or `pytest -m browser`). Skipped when no Chromium is installed
(Debian: apt-get install -y chromium), unless REQUIRE_BROWSER=1. Screenshots go to $SCREENSHOT_DIR,
else to pytest's tmp dir.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from chromium import Chromium, find_chromium
from saesweep.report import build_report
from saesweep.report.html import render_index
from test_report import fast_settings, make_sae, write_run

NO_CHROMIUM = ("no Chromium found ($CHROMIUM, or chromium / chromium-browser / google-chrome on PATH); "
               "install it: apt-get install -y chromium")
# `make test-browser` sets REQUIRE_BROWSER=1: there a missing Chromium fails instead of skipping
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(find_chromium() is None and os.environ.get("REQUIRE_BROWSER") != "1", reason=NO_CHROMIUM),
]


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.fail(NO_CHROMIUM)
    with Chromium(executable, width=1280, height=900) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model, tiny_model_dir, corpus_path):
    run = write_run(tmp_path_factory.mktemp("browser_run"), make_sae(tiny_model.cfg.d_model, 24, seed=4),
                    tiny_model_dir, corpus_path, "blocks.0.hook_resid_post")
    return build_report(run, fast_settings(top_n=12), model=tiny_model)


def open_clean(browser: Chromium, path: Path) -> None:
    browser.console_errors.clear()
    browser.requested_urls.clear()
    browser.open(path.resolve().as_uri())


def assert_clean(browser: Chromium) -> None:
    assert browser.console_errors == []
    assert all(url.startswith("file:") for url in browser.requested_urls), browser.requested_urls


def type_into(browser: Chromium, element_id: str, value: str) -> None:
    """Set an input's value and fire the input event, as typing does."""
    browser.evaluate(f"(() => {{ const el = document.getElementById({json.dumps(element_id)}); "
                     f"el.value = {json.dumps(value)}; el.dispatchEvent(new Event('input')); }})()")


COLUMN = "Array.from(document.querySelectorAll('#features tbody tr')).map(r => r.cells[{}].textContent)"


def test_index_sorts_and_filters_without_console_errors(browser, report, screenshot_dir):
    open_clean(browser, report.index_html)
    assert_clean(browser)
    ids = [int(x) for x in browser.evaluate(COLUMN.format(0))]
    assert sorted(ids) == sorted(report.features)
    frequencies = [float(x) for x in browser.evaluate(COLUMN.format(1))]
    assert frequencies == sorted(frequencies, reverse=True)  # the initial order: most frequent first

    browser.evaluate("document.querySelector('th[data-key=max]').click()")
    maxima = [float(x) for x in browser.evaluate(COLUMN.format(2))]
    assert maxima == sorted(maxima, reverse=True) and maxima[0] > maxima[-1]
    assert browser.evaluate("document.querySelector('th[data-key=max]').getAttribute('aria-sort')") == "descending"
    browser.evaluate("document.querySelector('th[data-key=max]').click()")
    assert [float(x) for x in browser.evaluate(COLUMN.format(2))] == sorted(maxima)
    browser.evaluate("document.querySelector('th[data-key=id]').click()")
    assert [int(x) for x in browser.evaluate(COLUMN.format(0))] == sorted(report.features, reverse=True)

    # filter by a feature's id text, then by minimum frequency
    target = report.features[0]
    type_into(browser, "filter", str(target))
    shown = [int(x) for x in browser.evaluate(COLUMN.format(0))]
    assert target in shown and len(shown) < len(report.features)
    type_into(browser, "filter", "")
    type_into(browser, "minfreq", "0.3")
    expected = sorted(f["id"] for f in report.data["features"] if f["frequency"] >= 0.3)
    assert sorted(int(x) for x in browser.evaluate(COLUMN.format(0))) == expected
    type_into(browser, "minfreq", "")

    # the context-dependence column: sorted by a click, filtered by a minimum
    browser.evaluate("document.querySelector('th[data-key=ctx]').click()")
    scores = [float(x) for x in browser.evaluate(COLUMN.format(4))]
    assert len(scores) == len(report.features) and scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    middle = sorted(f["context_dependence"] for f in report.data["features"])[len(report.features) // 2]
    type_into(browser, "minctx", str(middle))
    expected = sorted(f["id"] for f in report.data["features"] if f["context_dependence"] >= middle)
    assert sorted(int(x) for x in browser.evaluate(COLUMN.format(0))) == expected
    type_into(browser, "minctx", "")
    assert browser.evaluate("document.body.textContent.includes('Context dependence of the')")
    assert_clean(browser)
    browser.screenshot(screenshot_dir / "report_index.png")


def test_feature_page_shows_coloured_tokens(browser, report, screenshot_dir):
    feature = report.data["features"][0]
    browser.open(report.index_html.resolve().as_uri())
    browser.evaluate(f"document.querySelector('#features a[href=\"features/{feature['id']}.html\"]').click()")
    browser.wait_for_event("Page.loadEventFired")
    assert browser.evaluate("location.pathname").endswith(f"/features/{feature['id']}.html")
    assert_clean(browser)
    headings = browser.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert headings == ["Logit lens", "Top examples", "Uniform examples", "Ablated text", "Context dependence",
                        "Direction ablation"]
    bars = browser.evaluate("Array.from(document.querySelectorAll('svg rect title')).map(t => t.textContent)")
    assert any(t.startswith("offset -1: mean drop") for t in bars)  # the per-offset bars
    coloured = browser.evaluate("""
        Array.from(document.querySelectorAll('.t')).filter(s => getComputedStyle(s).backgroundColor !== 'rgba(0, 0, 0, 0)')
             .map(s => [s.title, getComputedStyle(s).backgroundColor])""")
    activation_colours = [c for title, c in coloured if "activation" in title and c.startswith("rgba(255, 128, 0")]
    ablation_colours = [c for title, c in coloured if "changes the activation" in title or "Δ log p" in title]
    assert len(activation_colours) >= len(feature["top_examples"])  # every top example has its peak coloured
    assert ablation_colours  # red / blue deltas are shown
    # the token strings on the page are the report's tokens
    first = browser.evaluate("Array.from(document.querySelector('.ex .tokens').children).map(s => s.textContent)")
    assert len(first) == len(feature["top_examples"][0]["tokens"])
    browser.screenshot(screenshot_dir / "report_feature.png", full_page=True)


def synthetic_report(n_features: int) -> dict:
    """A features.json-shaped dict with many features: the index page alone is rendered from it."""
    rng = random.Random(0)
    words = ["the", " cat", " sat", "<b>", " on", " mat", "\n", " def", " return", "&amp;"]
    features = []
    for i in range(n_features):
        tokens = [rng.choice(words) for _ in range(25)]
        features.append({
            "id": i, "frequency": rng.random() ** 4, "max_activation": rng.uniform(0, 50),
            "mcs_max": rng.random(),
            "logit_lens": {"top": [{"token": rng.choice(words)} for _ in range(10)]},
            "top_examples": [{"tokens": tokens, "position": rng.randrange(25)}],
        })
    return {
        "run": {"run_dir": "/runs/synthetic", "architecture": "relu_l1", "d_sae": n_features, "d_in": 512,
                "hook_point": "blocks.2.hook_resid_post", "model": "synthetic"},
        "held_out": {"description": "synthetic"},
        "selection": {"method": "frequent"},
        "sweep": None,
        "density": {"log10_edges": [-4 + k / 10 for k in range(41)], "counts": [rng.randrange(500) for _ in range(40)],
                    "dead": 3},
        "logit_lens": {"use_ln_final": True, "excluded_rule": "synthetic", "excluded_tokens": [], "median_norm": 1.0},
        "features": features,
    }


def test_index_with_10k_features_is_fast(browser, tmp_path, screenshot_dir):
    index = tmp_path / "index.html"
    index.write_text(render_index(synthetic_report(10_000)))
    open_clean(browser, index)
    assert_clean(browser)
    assert browser.evaluate("document.querySelectorAll('#features tbody tr').length") == 500  # the first page
    timings = browser.evaluate("""(() => {
        const out = {};
        for (const key of ['max', 'mcs', 'snip', 'lens', 'id']) {
          const t = performance.now();
          document.querySelector('th[data-key=' + key + ']').click();
          out[key] = performance.now() - t;
        }
        const f = document.getElementById('filter'), t = performance.now();
        f.value = 'cat'; f.dispatchEvent(new Event('input'));
        out.filter = performance.now() - t;
        return out;
    })()""")
    assert max(timings.values()) < 500, timings  # milliseconds, including the DOM update
    type_into(browser, "filter", "")
    browser.evaluate("document.getElementById('more').click()")
    assert browser.evaluate("document.querySelectorAll('#features tbody tr').length") == 1000
    assert "of 10000 matching" in browser.evaluate("document.getElementById('count').textContent")
    assert_clean(browser)
    browser.screenshot(screenshot_dir / "report_index_10k.png")
