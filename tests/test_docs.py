"""The README against the files its figures come from: the quick start's output is the table the quick start
prints and the one benchmarks/RESULTS.md records; every figure of "Current results" and of the seed experiment
is in RESULTS.md or REPRODUCTION.md; the names of "For SAELens users" are saesweep's real keys, fields and
metrics; the layout names every script and module; CI runs the README's first command."""

from __future__ import annotations

import contextlib
import csv
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from saesweep import quickstart
from saesweep.run_description import describe_run
from saesweep.train import train

README = (REPO / "README.md").read_text()
RESULTS = (REPO / "benchmarks" / "RESULTS.md").read_text()
REPRODUCTION = (REPO / "REPRODUCTION.md").read_text()


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"(?m)^(#+) {re.escape(heading)}.*$", text)
    assert match, f"no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"(?m)^#{{1,{level}}} ", rest)
    return rest[: end.start()] if end else rest


def code_blocks(text: str) -> list[str]:
    return re.findall(r"(?ms)^```[a-z]*\n(.*?)^```", text)


def readme_quickstart_block() -> str:
    (block,) = [b for b in code_blocks(section(README, "Quick start")) if "dict_ratio  d_sae" in b]
    return block


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_the_readme_quick_start_output_has_the_shape_the_quick_start_prints():
    lines = readme_quickstart_block().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dict_ratio"))
    header, rows, verdict = lines[start], lines[start + 1: start + 5], lines[start + 5: start + 7]
    assert cells(header) == list(quickstart.HEADER)
    table = [cells(row) for row in rows]
    assert [(row[0], row[1]) for row in table] == [("1", "256"), ("2", "512"), ("4", "1024"), ("8", "2048")]
    assert all(len(row) == len(quickstart.HEADER) for row in table)
    found = [int(row[5].split()[0]) for row in table[:3]]
    fvu = [float(row[3].split()[0]) for row in table]
    assert found == sorted(found) and all(row[6] == "0" for row in table[:3]) and table[3][5:] == ["–", "–"]
    assert fvu == sorted(fvu, reverse=True)
    assert verdict[0].startswith("features found again rise with size: yes")
    assert verdict[1].startswith("fidelity rises with size: yes")
    assert re.search(r"quick start took \d+ min \d\d s", lines[start + 7])


def test_the_readme_quick_start_output_is_the_one_results_md_records():
    (recorded,) = [b for b in code_blocks(section(RESULTS, "Quick start")) if "dict_ratio  d_sae" in b]
    assert readme_quickstart_block() == recorded
    took = re.search(r"quick start took (\d+) min (\d\d) s", recorded)
    assert int(took.group(1)) * 60 + int(took.group(2)) <= 180, "the quick start's promise: three minutes on 2 cores"


def test_the_readme_one_line_with_neither_is_what_the_quick_start_prints():
    (block,) = [b for b in code_blocks(section(README, "Quick start")) if b.startswith("error: no reference folder")]
    assert block.strip() == "error: " + quickstart.neither_message(Path("../shared/reference"), offline=True)


def numbers(text: str) -> list[str]:
    """The figures of a text: numbers with a decimal point or a per cent sign, and counts of three digits
    or more (1×, k 32, 2M tokens and the like are settings, not figures)."""
    text = re.sub(r"`[^`]*`|\b[0-9a-f]{7}\b|\d+(?:\.\d+)?[kM]\b|20\d\d-\d\d-\d\d|\b(?:19|20)\d\d\b", " ", text)
    return re.findall(r"[−+-]?\d[\d,]*\.\d+|[−+-]?\d+(?:\.\d+)?(?= ?%)|\b\d{3,}(?:,\d{3})*\b", text)


def source_values(text: str) -> set[float]:
    values = set()
    for token in re.findall(r"[−+-]?\d[\d,]*(?:\.\d+)?", text):
        with contextlib.suppress(ValueError):
            values.add(round(float(token.replace("−", "-").replace(",", "")), 6))
    return values


SOURCES = source_values(RESULTS + REPRODUCTION)


def recorded(figure: str) -> bool:
    """`figure` (as the README writes it) is a value RESULTS.md or REPRODUCTION.md holds, to its rounding,
    as a fraction where the README gives a percentage."""
    value = float(figure.replace("−", "-").replace(",", ""))
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    tolerance = 0.5 * 10**-decimals + 1e-9
    return any(abs(s - value) <= tolerance or abs(abs(s) - abs(value)) <= tolerance or abs(100 * s - value) <= tolerance
               for s in SOURCES)


@pytest.mark.parametrize("heading", ["Current results", "The seed experiment"])
def test_every_figure_of_the_readmes_results_is_in_results_md_or_reproduction_md(heading):
    text = section(README, heading)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("make ", "python ")))
    figures = numbers(text)
    assert len(figures) > 10
    missing = [f for f in figures if not recorded(f)]
    assert not missing, f"figures in the README's {heading!r} found in neither RESULTS.md nor REPRODUCTION.md: {missing}"


def test_the_why_of_the_quick_start_quotes_recorded_figures():
    why = section(README, "Quick start")
    why = why[why.index("**Why this recipe.**"):]
    missing = [f for f in numbers(why) if not recorded(f)]
    assert not missing, missing


def test_the_current_results_commits_are_in_the_history():
    commits = set(re.findall(r"\b[0-9a-f]{7}\b", section(README, "Current results")))
    assert len(commits) >= 4
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for commit in commits:
        done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True)
        assert done.returncode == 0, f"{commit} is not a commit of this repository"


def test_the_layout_names_every_top_level_script_and_module():
    layout = section(README, "Layout")
    scripts = [p.name for p in REPO.glob("*.py")]
    package = REPO / "src" / "saesweep"
    modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    subpackages = [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    missing = [name for name in scripts + modules + subpackages if f"`{name}`" not in layout]
    assert not missing, f"README's Layout leaves out {missing}"


def saelens_section() -> str:
    return section(README, "For SAELens users")


def test_the_architecture_table_lists_each_architectures_own_keys():
    """The README's `sae=` table against each architecture's Hyperparameters: every key named in its row
    (or in the row it says it shares them with, "as topk"), and no row for an unknown architecture."""
    from saesweep.sae import ARCHITECTURES

    rows = dict(re.findall(r"^\| `(\w+)`(?: \(default\))? \|(.*)$", README.split("### The SAE and its training")[1],
                           flags=re.M)[:len(ARCHITECTURES)])
    assert set(rows) == set(ARCHITECTURES)
    for name, row in rows.items():
        keys_cell = row.split("|")[2]
        shared = re.findall(r"as (\w+)", keys_cell)
        named = set(re.findall(r"`(\w+)`", keys_cell)) | {k for other in shared for k in re.findall(r"`(\w+)`", rows[other].split("|")[2])}
        assert set(ARCHITECTURES[name].hyperparameters) <= named, (name, keys_cell)


def test_the_saelens_table_names_saesweeps_real_config_keys():
    table = saelens_section().split("**cfg.json**")[0]
    keys = set()
    for row in table.splitlines()[4:]:
        if row.startswith("|"):
            keys |= set(re.findall(r"`([a-z_][a-z0-9_.]*)`", row.split("|")[2]))
    keys -= {"sae", "data", "model", "jsonl"}  # group names and choices
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sae=jumprelu"])
        topk = compose("config", overrides=["sae=topk"])
    missing = [k for k in sorted(keys) if OmegaConf.select(cfg, k, default="∅") == "∅" and OmegaConf.select(topk, k, default="∅") == "∅"]
    assert not missing and {"dict_ratio", "l1_coef", "hook_point", "ctx_len", "n_tokens", "sae.recipe.lr"} <= keys, missing


def test_the_saelens_section_names_real_cfg_json_fields():
    fields_text = saelens_section().split("**cfg.json**")[1].split("**W&B metrics**")[0]
    fields = set(re.findall(r"`([a-z_0-9]+)`", fields_text))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model.path=/m", "data=jsonl", "data.path=/c.jsonl"])
    written = describe_run(cfg, "blocks.2.hook_resid_post", 256, 1024, 1000, 40)
    assert fields - set(written) == set() and len(fields) >= 15


def test_the_saelens_section_names_metrics_saesweep_logs(tmp_path, tiny_model_dir, corpus_path):
    from test_train import tiny_cfg

    metrics_text = saelens_section().split("**W&B metrics**")[1]
    ours = {name for row in metrics_text.splitlines() if row.startswith("| `")
            for name in re.findall(r"`((?:train|eval)/[a-z_0-9]+)`", row.split("|")[2])}
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=csv", "trainer.log_every_n_steps=1")
    train(cfg, tmp_path / "run")
    (metrics_csv,) = (tmp_path / "run").glob("**/metrics.csv")
    logged = set(next(csv.reader(metrics_csv.open())))
    assert len(ours) >= 10 and ours - logged == set(), ours - logged


def test_ci_runs_the_readmes_first_command_from_the_fresh_clone():
    first = code_blocks(section(README, "Quick start"))[0].splitlines()[0]
    assert first.startswith("make install sweep")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make install") < ci.index("make sweep") < ci.index("make test")
    assert (REPO / "Makefile").read_text().splitlines()[0].startswith("# saesweep: `make install` once, then `make sweep`")
