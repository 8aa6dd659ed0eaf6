import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REFERENCE_CORPUS, REFERENCE_MODEL, REPO, requires_reference, synthetic_documents
from saesweep.data import ContextSource, load_texts, make_contexts
from saesweep.errors import DataError


def test_local_formats_read_the_same_documents(tmp_path):
    docs = ["first doc", "second doc", "third doc"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d, "meta": {}}) + "\n" for d in docs))
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz", "a.txt", "a.parquet"):
        assert load_texts(str(tmp_path / name), None, "train", "text") == docs


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no non-empty 'text' documents"),
        ('{"body": "x"}\n', "no field 'text'"),
        ('{"text": 3}\n', "is int, not text"),
        ("{not json\n", "not valid JSON"),
    ],
)
def test_bad_jsonl_is_a_clear_data_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_texts(str(path), None, "train", "text")


def test_missing_file_and_unknown_suffix_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"), None, "train", "text")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"x\.csv.*allowed: \.jsonl"):
        load_texts(str(tmp_path / "x.csv"), None, "train", "text")


def test_contexts_have_bos_fixed_length_and_eval_documents_are_never_trained_on(tiny_model):
    tok = tiny_model.tokenizer
    # each document is a distinct repeated word, so a context reveals which document it came from
    words = ["cat", "dog", "tree", "river", "stone", "house", "mat", "blue"]
    docs = [" ".join([w] * 60) for w in words]
    splits = make_contexts(docs, tok, ctx_len=9, n_train_contexts=20, n_eval_contexts=6, prepend_bos=True, seed=0)
    assert splits.train.shape == (20, 9) and splits.eval.shape == (6, 9)
    assert (splits.train[:, 0] == tok.bos_token_id).all() and (splits.eval[:, 0] == tok.bos_token_id).all()

    def doc_of(ctx):
        text = tok.decode(ctx[1:])
        return {w for w in words if w in text.split()}

    eval_docs = set().union(*(doc_of(c) for c in splits.eval))
    train_docs = set().union(*(doc_of(c) for c in splits.train))
    assert eval_docs and train_docs and not (eval_docs & train_docs)


def test_same_seed_same_split_and_no_bos_option(tiny_model):
    docs = [f"document number {i} " * 20 for i in range(40)]
    a = make_contexts(docs, tiny_model.tokenizer, 8, 30, 5, True, seed=3)
    b = make_contexts(docs, tiny_model.tokenizer, 8, 30, 5, True, seed=3)
    assert (a.train == b.train).all() and (a.eval == b.eval).all()
    c = make_contexts(docs, tiny_model.tokenizer, 8, 30, 5, False, seed=3)
    assert c.train.shape == (30, 8) and (c.train[:, 0] != tiny_model.tokenizer.bos_token_id).any()


def test_too_little_text_says_how_many_tokens_there_are(tiny_model):
    with pytest.raises(DataError, match=r"only 0 evaluation tokens .* but 250 are asked for"):
        make_contexts(["a few words only"] * 3, tiny_model.tokenizer, 25, 90, 10, True, seed=0)
    docs = synthetic_documents(20)
    with pytest.raises(DataError, match=r"only \d+ training tokens .* but 250000 are needed"):
        make_contexts(docs, tiny_model.tokenizer, 25, 10_000, 10, True, seed=0)


def document_of_piece(source: ContextSource, doc_indices) -> dict[tuple[int, ...], int]:
    """Each piece (tokens after BOS) of these documents → its document (random word sequences: unique)."""
    return {
        tuple(piece.tolist()): doc
        for doc, pieces in zip(doc_indices, source._pieces(doc_indices), strict=True)
        for piece in pieces
    }


def test_training_contexts_are_mixed_across_documents_in_a_seeded_order(tiny_model):
    # about 14 pieces per document: the pool holds those of about 70 documents
    source = ContextSource(synthetic_documents(300), tiny_model.tokenizer, 16, True, seed=0, mix_pool_contexts=1024)
    owner = document_of_piece(source, source.train_docs)
    batches = list(source.train_batches(batch_contexts=64))
    first = [owner[tuple(row[1:].tolist())] for row in batches[0]]
    # 64 adjacent contexts from ≥ 30 documents (document after document: 5)
    assert len(set(first)) >= 30
    every = torch.cat(batches)
    assert len(every) == len(owner)  # every piece of every training document, once
    assert not set(owner.values()) & set(source.heldout_docs)
    again = torch.cat(list(ContextSource(synthetic_documents(300), tiny_model.tokenizer, 16, True, seed=0,
                                         mix_pool_contexts=1024).train_batches(batch_contexts=50)))
    assert torch.equal(every, again)  # same seed, same order, whatever the batch size


def test_held_out_contexts_are_spread_over_documents_a_few_each(tiny_model):
    source = ContextSource(synthetic_documents(300), tiny_model.tokenizer, 16, True, seed=0)
    owner = document_of_piece(source, source.heldout_docs)
    held = source.held_out_contexts(45)
    docs = [owner[tuple(row[1:].tolist())] for row in held.tokens]
    assert held.n_documents == len(set(docs)) == 30  # every held-out document, before any gives a second
    assert max(docs.count(d) for d in set(docs)) == 2
    assert len({tuple(r) for r in held.tokens.tolist()}) == 45


def test_one_context_per_document_is_each_documents_first_piece(tiny_model):
    texts = synthetic_documents(100)
    tok = tiny_model.tokenizer
    source = ContextSource(texts, tok, 16, True, seed=0, contexts_per_document=1, mix_pool_contexts=32)
    firsts = {i: tuple(tok(texts[i], add_special_tokens=False)["input_ids"][:15]) for i in range(len(texts))}
    trained = torch.cat(list(source.train_batches(batch_contexts=16)))
    assert sorted(tuple(r[1:].tolist()) for r in trained) == sorted(firsts[i] for i in source.train_docs)
    held = source.held_out_contexts(10)
    assert sorted(tuple(r[1:].tolist()) for r in held.tokens) == sorted(firsts[i] for i in source.heldout_docs)
    with pytest.raises(DataError, match="the 10 held-out documents give only 160 evaluation tokens"):
        source.held_out_contexts(11, "evaluation")


@requires_reference()
def test_reference_default_eval_set_spans_hundreds_of_held_out_documents():
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from saesweep.data import context_source

    data = OmegaConf.load(REPO / "conf" / "data" / "jsonl.yaml")
    config = OmegaConf.load(REPO / "conf" / "config.yaml")
    data.path = str(REFERENCE_CORPUS)
    source = context_source(data, AutoTokenizer.from_pretrained(REFERENCE_MODEL), config.ctx_len)
    held = source.held_out_contexts(-(-config.eval.n_tokens // config.ctx_len))
    assert held.n_documents >= 500
    assert not set(source.heldout_docs) & set(source.train_docs)
    assert len(source.heldout_docs) + len(source.train_docs) == len(source.texts)


def test_text_that_is_not_utf8_names_the_file_line_and_byte_offset(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_bytes("één\nok\n".encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=rf"{txt}: line 3, byte offset 12: b'\\xe9\\n' is not UTF-8 text"):
        load_texts(str(txt), None, "train", "text")
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(DataError, match=rf"{packed}: line 2, byte offset 30"):
        load_texts(str(packed), None, "train", "text")
    txt.write_bytes("één\r\nok\n\nlast".encode())
    assert load_texts(str(txt), None, "train", "text") == ["één", "ok", "last"]
