"""Readable tokens: byte-level BPE pieces of multi-byte characters are merged in running text and
escaped alone, never shown as U+FFFD, on the reference tokenizer and in a whole report."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import REFERENCE_MODEL, requires_reference, synthetic_documents
from saesweep.report import build_report
from saesweep.tokens import ReadableTokens
from test_report import fast_settings, make_sae, write_run

MIXED = "Übersetzung: 中文文档 und 日本語のドキュメント — naïve café ✓ 🙂 end"
REPLACEMENT = "\ufffd"


def pieces_that_decode_to_replacement(tokenizer, ids: list[int]) -> list[int]:
    return [i for i in ids if REPLACEMENT in tokenizer.decode([i])]


@requires_reference()
def test_reference_tokenizer_pieces_merge_into_the_text_and_escape_alone():
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    partial = pieces_that_decode_to_replacement(tokenizer, ids)
    assert partial, "the case under test: some tokens hold part of a character"
    readable = ReadableTokens(tokenizer)
    shown = readable.sequence(ids)
    assert "".join(shown) == MIXED and len(shown) == len(ids)
    assert all(REPLACEMENT not in t for t in shown)
    alone = readable.single(partial)
    assert all(REPLACEMENT not in t and "⟨0x" in t for t in alone)
    # a piece's escapes are exactly its bytes: ⟨0xE4⟩⟨0xB8⟩ …
    first = readable.token_bytes(partial[0])
    assert "".join(f"⟨0x{b:02X}⟩" for b in first if b >= 0x80) in alone[0]


def test_a_stray_byte_in_running_text_is_an_escape(tiny_model):
    readable = ReadableTokens(tiny_model.tokenizer)
    ids = tiny_model.tokenizer("中", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # one byte per token in the tiny vocabulary
    assert readable.sequence(ids) == ["中", "", ""]  # the character on its first byte's token
    assert readable.sequence(ids[1:]) == ["⟨0xB8⟩", "⟨0xAD⟩"]  # its lead byte cut off: no character left
    assert readable.single(ids) == ["⟨0xE4⟩", "⟨0xB8⟩", "⟨0xAD⟩"]


@pytest.fixture(scope="module")
def non_ascii_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("non_ascii") / "docs.jsonl"
    docs = [f"{text[:60]} {MIXED} {text[60:]}" for text in synthetic_documents(300, seed=5)]
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


def test_no_page_of_a_report_on_byte_piece_tokens_has_a_replacement_character(tmp_path, tiny_model, tiny_model_dir,
                                                                             non_ascii_corpus):
    sae = make_sae(tiny_model.cfg.d_model, 16, seed=2)
    run = write_run(tmp_path / "run", sae, tiny_model_dir, non_ascii_corpus, "blocks.0.hook_resid_post")
    built = build_report(run, fast_settings(top_n=8), model=tiny_model)
    shown = {t for f in built.data["features"] for e in f["top_examples"] for t in e["tokens"]}
    assert "中" in "".join(shown) or "日" in "".join(shown)  # the report shows the non-ASCII text
    pages = [built.index_html, built.features_json, *(built.report_dir / "features").glob("*.html")]
    assert len(pages) == 2 + 8
    for page in pages:
        assert REPLACEMENT not in page.read_text(encoding="utf-8"), page
    assert "\\ufffd" not in built.features_json.read_text().lower()
