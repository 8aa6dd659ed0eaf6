"""Feature reports: each view checked on constructed cases (SAEs, and one model, whose directions are
built by hand so the right answer is known), an end-to-end report of a tiny run, and bad input."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import synthetic_documents
from saesweep.activations import harvest
from saesweep.data import ContextSource, make_contexts
from saesweep.errors import CheckpointError, ConfigError
from saesweep.io import atomic_write_json, atomic_write_safetensors
from saesweep.lm import load_model
from saesweep.report import ReportSettings, build_report, views
from saesweep.rundir import run_dirs_in
from saesweep.sae import ReluSae

CTX_LEN = 16
EVAL_TOKENS = 800  # 50 contexts: the run's evaluation set
TRAIN_TOKENS = 1600  # 100 contexts
REPORT_TOKENS = 1200  # 75 contexts of the held-out order: the 50 evaluation ones first
LAST_HOOK = "blocks.1.hook_resid_post"  # the last block: the residual goes straight to ln_final and W_U


def fast_settings(**overrides) -> ReportSettings:
    base = {"n_tokens": REPORT_TOKENS, "n_top_examples": 4, "n_bins": 4, "per_bin": 1, "direction_contexts": 16,
            "direction_min_count": 1, "batch_contexts": 64, "device": "cpu"}
    return ReportSettings(**(base | overrides))


def write_run(run_dir: Path, sae: ReluSae, model_dir: Path, corpus: Path, hook_point: str) -> Path:
    """A run directory as training leaves it (sae_weights.safetensors and cfg.json), for a hand-built SAE."""
    atomic_write_safetensors(run_dir / "sae_weights.safetensors", {k: v.float() for k, v in sae.tensors().items()})
    atomic_write_json(run_dir / "cfg.json", {
        "architecture": "relu_l1", "d_in": sae.d_in, "d_sae": sae.d_sae, "dict_ratio": sae.d_sae / sae.d_in,
        "l1_coef": 1.0, "hook_point": hook_point, "model_name": None, "model_path": str(model_dir),
        "dataset": {"name": None, "path": str(corpus), "split": "train", "text_field": "text",
                    "prepend_bos": True, "seed": 0, "heldout_fraction": 0.1, "contexts_per_document": None,
                    "mix_pool_contexts": 1024},
        "ctx_len": CTX_LEN, "eval_n_tokens": EVAL_TOKENS, "n_tokens": TRAIN_TOKENS, "seed": 0,
    })
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    """A fresh copy of a run directory's sae_weights.safetensors and cfg.json (a report of its own to write)."""
    to.mkdir(parents=True)
    for name in ("sae_weights.safetensors", "cfg.json"):
        shutil.copy(run_dir / name, to / name)
    return to


def make_sae(d_in: int, d_sae: int, seed: int = 0) -> ReluSae:
    torch.manual_seed(seed)
    return ReluSae(d_in, d_sae)


def single_token(model, text: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the tiny tokenizer"
    return ids[0]


# --- held-out tokens ------------------------------------------------------------------------------


def test_held_out_contexts_begin_with_the_eval_set_and_are_never_trained_on(tiny_model):
    texts = synthetic_documents(300)
    args = {"ctx_len": CTX_LEN, "prepend_bos": True, "seed": 0, "mix_pool_contexts": 256}
    source = ContextSource(texts, tiny_model.tokenizer, **args)
    every_training_context = torch.cat(list(source.train_batches(batch_contexts=500)))
    splits = make_contexts(texts, tiny_model.tokenizer, n_train_contexts=100, n_eval_contexts=50, **args)
    held = source.held_out_contexts(120)
    assert held.tokens.shape == (120, CTX_LEN)
    assert held.n_documents == 30  # 10 % of 300 documents, every one of them used
    assert torch.equal(held.tokens[:50], splits.eval)  # a report's held-out tokens begin with the run's eval set
    trained = {tuple(row) for row in every_training_context.tolist()}
    assert not trained & {tuple(row) for row in held.tokens.tolist()}


def test_held_out_contexts_too_many_is_a_data_error(tiny_model):
    from saesweep.errors import DataError

    source = ContextSource(synthetic_documents(20), tiny_model.tokenizer, CTX_LEN, prepend_bos=True, seed=0)
    with pytest.raises(DataError, match=r"the 2 held-out documents give only \d+ report tokens .* raise data.heldout_fraction"):
        source.held_out_contexts(10_000, "report")


# --- examples and histograms ----------------------------------------------------------------------


def test_top_and_uniform_examples_and_histogram_on_known_activations():
    acts = torch.zeros(6, 5, 2)
    acts[2, 3, 0], acts[2, 1, 0], acts[4, 0, 0], acts[5, 4, 0] = 10.0, 9.0, 2.5, 7.5
    top = views.top_examples(acts, n=3)
    assert [(e.context, e.position, e.activation) for e in top[0]] == [(2, 3, 10.0), (5, 4, 7.5), (4, 0, 2.5)]
    assert top[1] == []  # never fires

    uniform = views.uniform_examples(acts, n_bins=4, per_bin=5, generator=torch.Generator().manual_seed(0))
    # bins of (0, 10]: (0, 2.5] (2.5, 5] (5, 7.5] (7.5, 10]
    assert sorted((e.bin, e.context, e.position) for e in uniform[0]) == [(0, 4, 0), (2, 5, 4), (3, 2, 1), (3, 2, 3)]
    edges, counts = views.activation_histograms(acts, n_bins=4)[0]
    assert edges == pytest.approx([0, 2.5, 5, 7.5, 10]) and counts == [1, 0, 1, 2]


# --- logit lens ------------------------------------------------------------------------------------


def test_outlier_unembedding_norms_are_detected_and_excluded():
    torch.manual_seed(0)
    w_u = torch.randn(16, 50)
    w_u[:, 7] *= 20  # an untrained-looking token with a huge norm
    ids, _ = views.outlier_tokens(w_u, n_mads=5.0)
    assert ids.tolist() == [7]
    direction = w_u[:, 7:8].T
    top_ids, _, _, _ = views.logit_lens(direction, w_u, torch.tensor([], dtype=torch.long), k=3)
    assert top_ids[0, 0] == 7  # unexcluded, the outlier dominates its own direction
    top_ids, _, bottom_ids, _ = views.logit_lens(direction, w_u, ids, k=3)
    assert 7 not in top_ids[0].tolist() + bottom_ids[0].tolist()


@pytest.fixture(scope="module")
def lens_and_direction_run(tmp_path_factory, tiny_model, tiny_model_dir, corpus_path):
    """An SAE at the last block whose feature 0 writes the unembedding column of " dog" and fires on
    every token (W_enc = 0, b_enc = 4), feature 1 writes minus that column, features 2.. random."""
    t = single_token(tiny_model, " dog")
    sae = make_sae(tiny_model.cfg.d_model, 8)
    with torch.no_grad():
        column = tiny_model.W_U[:, t].detach().float()
        sae.W_dec[0] = column / column.norm()
        sae.W_dec[1] = -column / column.norm()
        sae.W_enc[:, 0] = 0.0
        sae.b_enc[0] = 4.0
    run = write_run(tmp_path_factory.mktemp("lens_run"), sae, tiny_model_dir, corpus_path, LAST_HOOK)
    return run, t


@pytest.fixture(scope="module")
def lens_report(lens_and_direction_run, tiny_model):
    run, _ = lens_and_direction_run
    # every held-out context in the dataset-wide effect, so " dog" is a next token there (9 times)
    settings = fast_settings(features=(0, 1, 2), use_ln_final=False, direction_contexts=REPORT_TOKENS // CTX_LEN)
    return build_report(run, settings, model=tiny_model)


def test_logit_lens_of_an_unembedding_column_puts_its_token_first(lens_report, lens_and_direction_run):
    _, t = lens_and_direction_run
    lens = {f["id"]: f["logit_lens"] for f in lens_report.data["features"]}
    assert lens[0]["top"][0]["id"] == t and lens[0]["top"][0]["token"] == " dog"
    assert lens[1]["bottom"][0]["id"] == t
    # the logit is the dot product of the unit direction with the column: its norm
    assert lens[0]["top"][0]["logit"] > lens[0]["top"][1]["logit"] > 0


def test_logit_lens_with_ln_final_scale_and_excluded_tokens(lens_and_direction_run, tiny_model):
    run, t = lens_and_direction_run
    built = build_report(run, fast_settings(features=(0,), exclude_tokens=(t, 3)), model=tiny_model)
    lens = built.data["logit_lens"]
    assert lens["use_ln_final"] is True and [e["id"] for e in lens["excluded_tokens"]] == [3, t]
    top = built.data["features"][0]["logit_lens"]["top"]
    assert t not in [e["id"] for e in top] and len(top) == fast_settings().logit_lens_k


# --- direction ablation ---------------------------------------------------------------------------


def test_direction_ablation_lowers_the_log_prob_of_the_promoted_token(lens_report, lens_and_direction_run):
    _, t = lens_and_direction_run
    feature = next(f for f in lens_report.data["features"] if f["id"] == 0)
    assert feature["frequency"] == 1.0 and feature["max_activation"] == pytest.approx(4.0)
    dataset = feature["direction_ablation"]["dataset"]
    assert dataset["n_contexts"] == 75 and dataset["n_positions"] == 75 * (CTX_LEN - 1)
    falls = dataset["falls"]
    assert falls[0]["id"] == t and falls[0]["mean_delta"] < min(-0.3, 1.5 * falls[1]["mean_delta"])
    assert t not in [e["id"] for e in dataset["rises"]]
    # per example: the log-prob of each actual " dog" falls, by more than that of any other token
    for example in feature["direction_ablation"]["examples"]:
        deltas = example["delta_logprob"]
        assert deltas[0] is None and len(deltas) == CTX_LEN
        at_t = [d for d, i in zip(deltas[1:], example["token_ids"][1:]) if i == t]
        others = [d for d, i in zip(deltas[1:], example["token_ids"][1:]) if i != t]
        if at_t:
            assert max(at_t) < min(others)


def test_direction_ablation_changes_nothing_where_the_feature_is_silent(tiny_model):
    sae = make_sae(tiny_model.cfg.d_model, 4)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # never fires
    contexts = torch.randint(1, 200, (3, CTX_LEN))
    deltas = views.direction_ablation(tiny_model, sae, LAST_HOOK, contexts, [(0, 0), (2, 1), (3, 2)], 2)
    assert deltas.shape == (3, CTX_LEN - 1) and deltas.abs().max() < 1e-5


def test_logprob_changes_by_token_aggregates_means_and_counts():
    deltas = torch.tensor([[-1.0, -3.0, 0.5], [-2.0, 0.2, 9.0]])
    next_tokens = torch.tensor([[5, 6, 7], [5, 7, 8]])
    scored = torch.tensor([[True, True, True], [True, True, False]])
    falls, rises = views.logprob_changes_by_token(deltas, next_tokens, scored, min_count=1, k=5)
    assert [(e.token, e.mean_delta, e.count) for e in falls] == [(6, -3.0, 1), (5, -1.5, 2)]
    assert [(e.token, round(e.mean_delta, 6), e.count) for e in rises] == [(7, 0.35, 2)]  # 8 is not scored
    falls, _ = views.logprob_changes_by_token(deltas, next_tokens, scored, min_count=2, k=5)
    assert [e.token for e in falls] == [5]


# --- ablated text (token deletion) ----------------------------------------------------------------

MARK, SPARE = 31, 30  # residual channels of the constructed model: 31 carries "token T was seen"


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory, tiny_model_dir):
    """The tiny model with block 0 rebuilt by hand: token T's embedding alone has a component on channel
    MARK (every embedding is centred, so LayerNorm keeps MARK at exactly 0 for the others); head 0
    attends (almost) only to T tokens, with a constant query and a key reading MARK, and copies MARK
    into the final position; the other heads and the MLP write nothing. At blocks.0.hook_resid_post
    the MARK channel of a position is then large when T occurs at or before it, else 0."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = tokenizer(" house", add_special_tokens=False)["input_ids"]
    assert len(t) == 1
    t = t[0]
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir)
    d = hf.config.hidden_size
    head = d // hf.config.num_attention_heads
    with torch.no_grad():
        embed = hf.gpt_neox.embed_in.weight
        embed[:, MARK] = 0
        embed[:, SPARE] = 0
        rest = [c for c in range(d) if c not in (MARK, SPARE)]
        embed[:, rest] -= embed[:, rest].mean(dim=1, keepdim=True)  # centred rows, MARK still exactly 0
        embed[t, MARK] += 0.5
        embed[t, SPARE] -= 0.5  # keeps the row centred
        layer = hf.gpt_neox.layers[0]
        qkv = layer.attention.query_key_value
        qkv.weight.zero_()
        qkv.bias.zero_()
        dim = 2  # the first dimension of head 0 without rotary embedding (rotary_pct 0.25 of 8 → 2 dims)
        qkv.bias[0 * head + dim] = 10.0  # query (head 0: rows [q | k | v] of `head` each)
        qkv.weight[1 * head + dim, MARK] = 10.0  # key reads MARK
        qkv.weight[2 * head + dim, MARK] = 1.0  # value reads MARK
        layer.attention.dense.weight.zero_()
        layer.attention.dense.bias.zero_()
        layer.attention.dense.weight[MARK, dim] = 1.0  # head 0's value dimension back onto MARK
        layer.mlp.dense_4h_to_h.weight.zero_()
        layer.mlp.dense_4h_to_h.bias.zero_()
    out = tmp_path_factory.mktemp("marker_model")
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return load_model(None, str(out), torch.device("cpu")), out, t


def _encoder_on_embedding(model, t: int, d_sae: int, feature: int) -> ReluSae:
    """An SAE whose `feature` has the encoder row of T's (unit) embedding and no biases."""
    sae = make_sae(model.cfg.d_model, d_sae)
    with torch.no_grad():
        embedding_of_t = model.W_E[t].detach().float()
        sae.W_enc[:, feature] = embedding_of_t / embedding_of_t.norm()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


MARK_HOOK = "blocks.0.hook_resid_post"


def test_ablated_text_changes_only_where_the_read_token_is_deleted(marker_model):
    model, _, t = marker_model
    sae = _encoder_on_embedding(model, t, d_sae=3, feature=1)
    filler = [i for i in range(5, 200) if i != t]
    contexts = torch.tensor([[model.tokenizer.bos_token_id, *filler[: CTX_LEN - 1]],
                             [model.tokenizer.bos_token_id, *filler[20 : 20 + CTX_LEN - 1]]])
    contexts[0, 4] = t  # T at position 4 of context 0, at 9 of context 1
    contexts[1, 9] = t
    acts = sae.encode(harvest(model, contexts, MARK_HOOK, 8))[..., 1]
    assert acts[0, :4].max() < 0.2 and acts[0, 5:].min() > 1.0, acts  # the feature reads "T was seen"
    examples = [views.Example(0, 12, float(acts[0, 12])), views.Example(1, 15, float(acts[1, 15])),
                views.Example(0, 7, float(acts[0, 7]))]
    effects = views.deletion_effects(model, sae, MARK_HOOK, contexts, [(1, e) for e in examples],
                                     first_deletable=1, batch_contexts=4)
    for example, effect, t_position in zip(examples, effects, (4, 9, 4)):
        assert effect.shape == (example.position,) and effect[0].isnan()  # the BOS is never deleted
        # each entry is the activation at the shifted final token of that deletion, run alone
        context = contexts[example.context]
        for s in (1, t_position, example.position - 1):
            deleted = torch.cat([context[:s], context[s + 1 : example.position + 1]])[None]
            alone = sae.encode(harvest(model, deleted, MARK_HOOK, 1))[0, -1, 1]
            assert effect[s] == pytest.approx(float(alone) - example.activation, abs=1e-4)
        # deleting T removes (nearly) all of the activation; deleting any other token changes nothing
        assert effect[t_position] < -0.9 * example.activation
        others = torch.cat([effect[1:t_position], effect[t_position + 1 :]])
        assert others.abs().max() < 1e-3


def test_ablated_text_in_a_report_of_the_marker_model(marker_model, tmp_path, corpus_path):
    model, model_dir, t = marker_model
    sae = _encoder_on_embedding(model, t, d_sae=2, feature=0)
    run = write_run(tmp_path / "run", sae, model_dir, corpus_path, MARK_HOOK)
    built = build_report(run, fast_settings(features=(0,), causal_top=2, causal_uniform=4), model=model)
    entries = built.data["features"][0]["ablated_text"]
    assert len(entries) >= 4
    cases = 0
    for entry in entries:
        ids, deltas = entry["token_ids"], entry["deltas"]
        assert deltas[0] is None and len(deltas) == len(ids) - 1 == entry["position"]
        t_positions = [p for p, i in enumerate(ids[:-1]) if i == t]
        # only deleting a T can change the activation, and only when it was the one T seen
        assert all(abs(d) < 1e-3 for p, d in enumerate(deltas[1:], 1) if p not in t_positions)
        if ids[-1] != t and len(t_positions) == 1:
            assert deltas[t_positions[0]] < -0.9 * entry["activation"]
            cases += 1
    assert cases >= 1


# --- a whole report of a tiny run ------------------------------------------------------------------

HOSTILE = '<script>alert("x")</script> </script><img src=x onerror=alert(1)> & "quotes" \'single\''


@pytest.fixture(scope="module")
def hostile_corpus(tmp_path_factory) -> Path:
    """The synthetic corpus with markup in every document: the report must show it as text."""
    path = tmp_path_factory.mktemp("hostile") / "docs.jsonl"
    docs = [f"{text[:80]} {HOSTILE} {text[80:]}" for text in synthetic_documents(300, seed=3)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_model_dir, hostile_corpus) -> Path:
    sae = make_sae(tiny_model.cfg.d_model, 16, seed=1)
    return write_run(tmp_path_factory.mktemp("tiny_run") / "run", sae, tiny_model_dir, hostile_corpus,
                     "blocks.0.hook_resid_post")


@pytest.fixture(scope="module")
def tiny_report(tiny_run, tiny_model):
    return build_report(tiny_run, fast_settings(selection="frequent", top_n=5), model=tiny_model)


def test_report_files_and_contents(tiny_report, tiny_run):
    report = tiny_run / "report"
    assert tiny_report.report_dir == report and tiny_report.index_html.is_file()
    data = json.loads((report / "features.json").read_text())
    assert data["selection"] == {"method": "frequent", "n_features": 5}
    assert data["held_out"]["n_tokens"] == REPORT_TOKENS and data["held_out"]["n_eval_tokens"] == EVAL_TOKENS
    assert "from 30 held-out documents (never trained on)" in data["held_out"]["description"]
    frequencies = [f["frequency"] for f in data["features"]]
    assert frequencies == sorted(frequencies, reverse=True) and frequencies[0] > 0
    assert sum(data["density"]["counts"]) + data["density"]["dead"] == 16
    assert sorted(p.name for p in (report / "features").iterdir()) == sorted(f"{i}.html" for i in tiny_report.features)
    for feature in data["features"]:
        assert feature["max_activation"] == pytest.approx(max(e["activation"] for e in feature["top_examples"]),
                                                          rel=1e-3)
        assert sum(feature["histogram"]["counts"]) == round(feature["frequency"] * REPORT_TOKENS)
        for example in feature["uniform_examples"]:  # each ends at the sampled token
            assert len(example["tokens"]) == example["position"] + 1
            assert example["activations"][-1] == pytest.approx(example["activation"], rel=1e-3)
        assert len(feature["logit_lens"]["top"]) == 10 and feature["mcs"] == {} and feature["mcs_max"] is None
    assert set(tiny_report.timings) >= {"held_out", "examples", "logit_lens", "ablated_text", "direction_ablation"}


class _TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def test_report_html_escapes_corpus_text(tiny_report):
    pages = [tiny_report.index_html, *(tiny_report.report_dir / "features").glob("*.html")]
    for page in pages:
        parsed = _TagCollector()
        parsed.feed(page.read_text())
        # the corpus's <script> and <img onerror=...> are text, never elements or attributes
        assert "img" not in parsed.tags and not any(a.startswith("on") for a in parsed.attributes)
        assert ("script" in parsed.tags) == (page.name == "index.html")  # the index's own script only
        assert "http://" not in page.read_text() and "https://" not in page.read_text()  # nothing loads from anywhere
    assert "&lt;" in "".join(p.read_text() for p in pages[1:])  # the markup is there, as text


def test_report_pages_of_features_no_longer_selected_are_removed(tiny_run, tiny_model, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    build_report(run, fast_settings(features=(3, 4)), model=tiny_model)
    built = build_report(run, fast_settings(features=(4,)), model=tiny_model)
    assert [p.name for p in (built.report_dir / "features").iterdir()] == ["4.html"]


def test_a_feature_that_never_fires_gets_a_page_that_says_so(tiny_run, tiny_model, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    sae = make_sae(tiny_model.cfg.d_model, 16, seed=1)
    with torch.no_grad():
        sae.b_enc[6] = -1e6
    atomic_write_safetensors(run / "sae_weights.safetensors", {k: v.float() for k, v in sae.tensors().items()})
    built = build_report(run, fast_settings(features=(6, 1)), model=tiny_model)
    dead = built.data["features"][0]
    assert dead["frequency"] == 0 and dead["max_activation"] == 0 and dead["histogram"]["counts"] == [0] * 20
    assert dead["top_examples"] == dead["uniform_examples"] == dead["ablated_text"] == []
    assert dead["direction_ablation"] == {"examples": [], "dataset": {"n_contexts": 0, "n_positions": 0,
                                                                      "falls": [], "rises": []}}
    assert len(dead["logit_lens"]["top"]) == 10  # the direction still has a logit lens
    assert built.data["density"]["dead"] >= 1
    assert "never fired" in (built.report_dir / "features" / "6.html").read_text()


# --- selection and the sweep ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_run, tiny_model, tiny_model_dir, hostile_corpus) -> Path:
    """Run 0 (a copy of tiny_run) with runs 1 and 10: run 10 contains copies of run 0's features 2 and 5;
    run 1 reads the next layer's residual stream: its features are matched one-to-one, not by MCS."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    copy_run(tiny_run, sweep_dir / "0")
    own = make_sae(tiny_model.cfg.d_model, 16, seed=1)
    other = make_sae(tiny_model.cfg.d_model, 32, seed=2)
    with torch.no_grad():
        other.W_dec[7] = own.W_dec[2]
        other.W_dec[30] = own.W_dec[5]
    write_run(sweep_dir / "10", other, tiny_model_dir, hostile_corpus, "blocks.0.hook_resid_post")
    write_run(sweep_dir / "1", make_sae(tiny_model.cfg.d_model, 16, seed=3), tiny_model_dir, hostile_corpus,
              "blocks.1.hook_resid_post")
    return sweep_dir


def test_run_dirs_in_a_sweep_are_in_natural_order(sweep):
    assert [p.name for p in run_dirs_in(sweep)] == ["0", "1", "10"]


def test_found_again_features_and_mcs_against_the_sweep(sweep, tiny_model, tmp_path):
    run = sweep / "0"
    built = build_report(run, fast_settings(selection="found_again", found_threshold=0.99),
                         sweep_run_dirs=run_dirs_in(sweep), model=tiny_model)
    assert sorted(built.features) == [2, 5]
    info = built.data["sweep"]
    assert info["runs"] == ["10 (d_sae=32)"] and info["skipped"] == []
    for feature in built.data["features"]:
        assert feature["mcs"] == {"10 (d_sae=32)": pytest.approx(1.0, abs=1e-3)} and feature["found_again"] is True
        (match,) = feature["layers"]  # its one-to-one match at the other layer, linked to that run's page
        assert match["run"] == "1" and match["hook_point"] == "blocks.1.hook_resid_post" and not match["found"]
        assert match["href"] == f"../../../1/report/features/{match['feature']}.html"
        page = (built.report_dir / "features" / f"{feature['id']}.html").read_text()
        assert "Matches at other layers" in page and f'href="{match["href"]}"' in page
    assert "10 (d_sae=32)" in built.index_html.read_text()


def test_default_selection_is_alive_features_alone_and_found_again_in_a_sweep():
    from saesweep.report.selection import SweepComparison, select_features

    frequency = torch.tensor([0.0, 5e-5, 1e-4, 2e-3, 0.05, 0.1, 0.3, 0.9])
    settings = ReportSettings(top_n=10)
    assert select_features(settings, 8, frequency, None) == ("random", [2, 3, 4, 5])  # 1e-4 ≤ f ≤ 0.1
    # a run compared with a sweep: the features found again, best first
    sweep = SweepComparison(["1 (d_sae=8)"], torch.tensor([[0.2, 0.95, 0.5, 0.99, 0.1, 0.3, 0.92, 0.0]]), [])
    assert select_features(settings, 8, frequency, sweep) == ("found_again", [3, 1, 6])
    nothing_found = SweepComparison(["1 (d_sae=8)"], torch.zeros(1, 8), [])
    assert select_features(settings, 8, frequency, nothing_found) == ("random", [2, 3, 4, 5])  # the default falls back
    # asked for by name, found_again stays empty (build_report then says no feature was selected)
    assert select_features(ReportSettings(selection="found_again"), 8, frequency, nothing_found) == ("found_again", [])
    assert select_features(ReportSettings(features=(7, 0)), 8, frequency, sweep) == ("explicit", [7, 0])
    assert select_features(ReportSettings(selection="frequent", top_n=2), 8, frequency, sweep) == ("frequent", [7, 6])
    with pytest.raises(ConfigError, match="alive_min_frequency=0.2 and alive_max_frequency=0.1"):
        ReportSettings(alive_min_frequency=0.2)


def test_report_of_a_sweeps_job_defaults_to_the_features_found_again(sweep, tiny_model, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from saesweep.report import app

    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra leaves in a sweep directory
    run = sweep / "0"
    monkeypatch.setattr(app, "build_report", lambda *a, **k: build_report(*a, **k, model=tiny_model))
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("report", overrides=[
            f"run_dir={run}", f"report.n_tokens={REPORT_TOKENS}", "report.device=cpu", "report.found_threshold=0.99",
            "report.n_bins=3", "report.direction_contexts=4", "report.wandb.enabled=false",
        ])
    built = app.report_from_config(cfg)
    assert built.data["selection"] == {"method": "found_again", "n_features": 2} and sorted(built.features) == [2, 5]
    (sweep / "multirun.yaml").unlink()


def test_random_selection_is_a_seeded_sample_of_live_features(tiny_run, tiny_model, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    first = build_report(run, fast_settings(selection="random", top_n=4, seed=7), model=tiny_model)
    again = build_report(run, fast_settings(selection="random", top_n=4, seed=7), model=tiny_model)
    assert first.features == again.features and len(set(first.features)) == 4
    assert all(f["frequency"] > 0 for f in first.data["features"])


# --- bad input ------------------------------------------------------------------------------------


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not a saesweep run directory"):
        build_report(tmp_path, fast_settings(), model=tiny_model)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_dirs_in(tmp_path / "no-such-sweep")


def test_feature_ids_out_of_range_name_the_id_and_the_range(tiny_run, tiny_model):
    with pytest.raises(ConfigError, match=r"feature id 16 is out of range: this dictionary has features 0\.\.15"):
        build_report(tiny_run, fast_settings(features=(3, 16, -1)), model=tiny_model)


def test_bad_report_settings_are_config_errors(tiny_run, tiny_model):
    with pytest.raises(ConfigError, match="needs feature ids"):
        ReportSettings(selection="explicit")
    with pytest.raises(ConfigError, match="report.selection='best' is unknown"):
        ReportSettings(selection="best")
    with pytest.raises(ConfigError, match="integer ids"):
        ReportSettings(features=("12",))
    with pytest.raises(ConfigError, match="report.n_bins=0"):
        ReportSettings(n_bins=0)
    with pytest.raises(ConfigError, match=r"unknown report settings \['top_nn'\]"):
        ReportSettings.from_config({"top_nn": 3})
    with pytest.raises(ConfigError, match="needs other runs of the sweep"):
        build_report(tiny_run, fast_settings(selection="found_again"), model=tiny_model)
    with pytest.raises(ConfigError, match="token id 100000 is out of range"):
        build_report(tiny_run, fast_settings(features=(1,), exclude_tokens=(100000,)), model=tiny_model)


# --- the command-line app, with W&B ---------------------------------------------------------------


def test_report_app_writes_the_report_and_a_wandb_table(tmp_path, tiny_model, tiny_model_dir, corpus_path):
    from hydra import compose, initialize_config_dir

    from saesweep.report.app import report_from_config

    run = write_run(tmp_path / "run", make_sae(tiny_model.cfg.d_model, 8), tiny_model_dir, corpus_path,
                    "blocks.0.hook_resid_post")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("report", overrides=[
            f"run_dir={run}", "report.features=[4,1]", f"report.n_tokens={REPORT_TOKENS}", "report.device=cpu",
            "report.n_bins=3", "report.direction_contexts=4",
        ])
    built = report_from_config(cfg)
    assert built.features == [4, 1] and (run / "report" / "features" / "4.html").is_file()
    tables = list(run.glob("wandb/offline-run-*/files/media/table/feature_report/features_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["feature", "frequency"] and [row[0] for row in table["data"]] == [4, 1]


def test_report_app_requires_a_run_dir():
    from hydra import compose, initialize_config_dir

    from saesweep.report.app import report_from_config

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("report")
    with pytest.raises(ConfigError, match="run_dir is required"):
        report_from_config(cfg)


def test_build_report_logs_into_a_given_wandb_run(tiny_run, tiny_model, tmp_path):
    """The sweep evaluator's way: its own W&B run, one prefix per reported run."""
    import wandb

    run = wandb.init(project="saesweep-test", mode="offline", dir=str(tmp_path), job_type="evaluate")
    try:
        build_report(copy_run(tiny_run, tmp_path / "run"), fast_settings(features=(2, 0)), model=tiny_model,
                     wandb_run=run, wandb_prefix="feature_report/0")
    finally:
        run.finish()
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/feature_report/0/features_*.table.json")
    assert [row[0] for row in json.loads(table.read_text())["data"]] == [2, 0]


def test_report_of_a_released_dictionary_given_its_model_and_text(tmp_path, tiny_model, tiny_model_dir, corpus_path):
    """A dictionary in sparsify's layout (no saesweep cfg.json): the command line gives the model, the
    text and the hook point."""
    from hydra import compose, initialize_config_dir

    from saesweep.io import atomic_write_safetensors
    from saesweep.report.app import report_from_config

    d_in, d_sae = tiny_model.cfg.d_model, 16
    sae = make_sae(d_in, d_sae)
    released = tmp_path / "layers.1"
    released.mkdir()
    (released / "cfg.json").write_text(json.dumps({"k": 3, "num_latents": d_sae, "d_in": d_in, "activation": "topk"}))
    atomic_write_safetensors(released / "sae.safetensors", {
        "encoder.weight": sae.W_enc.detach().T.contiguous(), "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()})
    overrides = [f"run_dir={released}", "report.features=[0,5]", f"report.n_tokens={REPORT_TOKENS}",
                 "report.device=cpu", "report.n_bins=3", "report.direction_contexts=4", "report.wandb.enabled=false",
                 f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", f"ctx_len={CTX_LEN}"]
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        without_hook = compose("report", overrides=overrides)
        cfg = compose("report", overrides=[*overrides, f"hook_point={LAST_HOOK}"])
    with pytest.raises(ConfigError, match="does not say its hook point: give hook_point="):
        report_from_config(without_hook)
    built = report_from_config(cfg)
    assert built.features == [0, 5] and (released / "report" / "index.html").is_file()
    assert built.data["run"]["architecture"] == "topk" and built.data["run"]["hook_point"] == LAST_HOOK
    assert built.data["held_out"]["n_tokens"] == REPORT_TOKENS


# --- context dependence ----------------------------------------------------------------------------


def test_a_token_identity_feature_scores_zero(tiny_model, tiny_model_dir, corpus_path, tmp_path):
    """At blocks.0.hook_resid_pre the residual is the token's embedding alone, so a feature there is read
    off the token: its activation on BOS + token equals its activation in any context."""
    t = single_token(tiny_model, " dog")
    sae = _encoder_on_embedding(tiny_model, t, d_sae=2, feature=0)
    run = write_run(tmp_path / "run", sae, tiny_model_dir, corpus_path, "blocks.0.hook_resid_pre")
    feature = build_report(run, fast_settings(features=(0,)), model=tiny_model).data["features"][0]
    examples = feature["top_examples"] + feature["uniform_examples"]
    assert len(examples) >= 4
    assert all(e["alone_activation"] == pytest.approx(e["activation"], rel=1e-3, abs=1e-4) for e in examples)
    assert feature["context_dependence"] == pytest.approx(0.0, abs=1e-3)
    # nothing before the token matters to it: deleting any earlier token changes nothing
    assert all(abs(o["mean_drop"]) < 1e-4 for o in feature["deletion_by_offset"] if o["mean_drop"] is not None)


def test_a_feature_reading_the_previous_token_scores_high_with_its_spike_at_minus_one(marker_model):
    """The marker model's feature fires once T has been seen; in contexts where T is exactly the previous
    token it reads that token: alone (BOS + the current token) it is silent, and deleting offset −1 alone
    removes its activation."""
    model, _, t = marker_model
    sae = _encoder_on_embedding(model, t, d_sae=2, feature=0)
    filler = [i for i in range(5, 200) if i != t]
    bos = model.tokenizer.bos_token_id
    contexts = torch.tensor([[bos, *filler[k * 20 : k * 20 + CTX_LEN - 1]] for k in range(3)])
    positions = (6, 10, 14)
    for row, p in enumerate(positions):
        contexts[row, p - 1] = t
    acts = sae.encode(harvest(model, contexts, MARK_HOOK, 8))[..., 0]
    examples = [views.Example(row, p, float(acts[row, p])) for row, p in enumerate(positions)]
    assert min(e.activation for e in examples) > 1.0
    tokens = torch.tensor([int(contexts[e.context, e.position]) for e in examples])
    alone = views.token_alone_activations(model, sae, MARK_HOOK, tokens, torch.zeros(3, dtype=torch.long), bos, 8)
    assert alone.abs().max() < 0.2
    score = views.context_dependence(torch.tensor([e.activation for e in examples]), alone)
    assert score > 0.9
    deltas = views.deletion_effects(model, sae, MARK_HOOK, contexts, [(0, e) for e in examples], 1, 8)
    by_offset = {offset: (drop, n) for offset, drop, n in views.deletion_by_offset(deltas, CTX_LEN - 1)}
    drop, n = by_offset[-1]
    assert n == 3 and drop == pytest.approx(sum(e.activation for e in examples) / 3, rel=0.1)
    assert max(abs(d) for offset, (d, _) in by_offset.items() if offset != -1 and d is not None) < 1e-3
    assert by_offset[-CTX_LEN + 1] == (None, 0)  # no example has a token that far back


def test_context_dependence_score_is_weighted_and_bounded():
    fired = torch.tensor([4.0, 1.0])
    assert views.context_dependence(fired, torch.tensor([4.0, 0.0])) == pytest.approx(0.2)  # 1 − 4/5
    assert views.context_dependence(fired, torch.tensor([9.0, 3.0])) == 0.0  # stronger alone: still read off the token
    assert views.context_dependence(fired, torch.tensor([-1.0, -1.0])) == 1.0
    assert views.context_dependence(torch.zeros(2), torch.zeros(2)) is None


def test_a_model_handed_in_decides_the_device(tiny_run, tiny_model, tmp_path):
    """settings.device names where a model the report loads goes; a model handed in is where it is, and
    the SAE joins it (a CPU model with device=cuda on a GPU machine failed at the first forward pass).
    `meta` stands in for any device the model is not on."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("report")))
    build_report(run, fast_settings(selection="frequent", top_n=2, device="meta"), model=tiny_model)
    features = json.loads((run / "report" / "features.json").read_text())["features"]
    assert len(features) == 2 and features[0]["frequency"] > 0
