import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_documents
from saesweep.data import load_texts, make_contexts
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
    with pytest.raises(DataError, match=r"only 0 evaluation tokens .* but 250 are needed"):
        make_contexts(["a few words only"] * 3, tiny_model.tokenizer, 25, 90, 10, True, seed=0)
    docs = synthetic_documents(20)
    with pytest.raises(DataError, match=r"only \d+ training tokens .* but 250000 are needed"):
        make_contexts(docs, tiny_model.tokenizer, 25, 10_000, 10, True, seed=0)
