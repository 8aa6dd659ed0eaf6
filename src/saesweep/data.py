"""Text datasets → fixed-length token contexts, split into training and held-out evaluation contexts.

How documents become contexts: documents are shuffled with `data.seed` (the same for every run of
a sweep, so all runs share one split), tokenized without special tokens, and each document is cut
into consecutive pieces of `ctx_len - 1` tokens; every piece gets the BOS token in front, giving
`ctx_len` tokens. A context never spans two documents; the tail of a document shorter than a piece
is dropped. With `prepend_bos: false` pieces are `ctx_len` tokens long and have no BOS. The first
documents of the shuffled order go to the held-out evaluation set until it has `eval_contexts`
contexts; training contexts come from the remaining documents only, so no evaluation token is ever
trained on.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from saesweep.errors import DataError
from saesweep.hub import require_hub

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".parquet")
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TokenSplits:
    """Token contexts of shape [n_contexts, ctx_len], int64."""

    train: torch.Tensor
    eval: torch.Tensor


def load_texts(path: str | None, name: str | None, split: str, text_field: str) -> list[str]:
    """Documents of a local file (`path`) or a Hugging Face hub dataset (`name`)."""
    if path:
        texts = _load_local(Path(path), text_field)
        source = str(path)
    elif name:
        texts = _load_hub(name, split, text_field)
        source = f"{name} (split {split})"
    else:
        raise DataError("no dataset given: set data.name (a hub dataset) or data.path (a local file)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"dataset {source} has no non-empty '{text_field}' documents")
    return texts


def _load_local(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r} does not exist or is not a file")
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return list(_read_jsonl(path, text_field))
    if name.endswith(".txt"):
        return path.read_text(encoding="utf-8").splitlines()
    if name.endswith(".parquet"):
        return _read_parquet(path, text_field)
    raise DataError(f"data.path={str(path)!r} has an unsupported suffix; allowed: {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no} is not valid JSON: {e}") from None
                yield _text_of(record, text_field, f"{path}:{line_no}")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    if text_field not in table.column_names:
        raise DataError(f"{path} has no column '{text_field}'; columns: {table.column_names}")
    return [_text_of({text_field: v}, text_field, str(path)) for v in table.column(text_field).to_pylist()]


def _load_hub(name: str, split: str, text_field: str) -> list[str]:
    require_hub(f"dataset {name!r}", hint="use a local corpus: data=jsonl data.path=FILE", error=DataError)
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets wraps network, missing-split and format errors alike
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the hub: {e}. "
            "For a local corpus use data=jsonl data.path=FILE"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no field '{text_field}'; fields: {ds.column_names}")
    return [_text_of({text_field: v}, text_field, name) for v in ds[text_field]]


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: record has no field '{text_field}' (set data.text_field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' is {type(value).__name__}, not text")
    return value


def make_contexts(
    texts: Sequence[str],
    tokenizer,
    ctx_len: int,
    n_train_contexts: int,
    n_eval_contexts: int,
    prepend_bos: bool,
    seed: int,
) -> TokenSplits:
    """Cut shuffled documents into contexts: first the evaluation contexts, then the training ones."""
    bos = _bos_token_id(tokenizer) if prepend_bos else None
    piece_len = ctx_len - 1 if prepend_bos else ctx_len
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    eval_pieces: list[list[int]] = []
    train_pieces: list[list[int]] = []
    for doc_pieces in _pieces_by_document((texts[i] for i in order), tokenizer, piece_len):
        if len(eval_pieces) < n_eval_contexts:
            eval_pieces.extend(doc_pieces[: n_eval_contexts - len(eval_pieces)])
        else:
            train_pieces.extend(doc_pieces[: n_train_contexts - len(train_pieces)])
            if len(train_pieces) == n_train_contexts:
                break
    if len(eval_pieces) < n_eval_contexts or len(train_pieces) < n_train_contexts:
        have = (len(eval_pieces) + len(train_pieces)) * ctx_len
        want = (n_eval_contexts + n_train_contexts) * ctx_len
        raise DataError(
            f"the dataset gives only {have} tokens in {ctx_len}-token contexts, but {want} are needed "
            f"({n_train_contexts} training + {n_eval_contexts} evaluation contexts): "
            "lower n_tokens or eval.n_tokens, or use a larger dataset"
        )
    return TokenSplits(train=_to_tensor(train_pieces, bos), eval=_to_tensor(eval_pieces, bos))


def held_out_contexts(
    texts: Sequence[str],
    tokenizer,
    ctx_len: int,
    n_train_contexts: int,
    n_eval_contexts: int,
    n_contexts: int,
    prepend_bos: bool,
    seed: int,
) -> torch.Tensor:
    """`n_contexts` contexts that a run made by `make_contexts(...)` with the same arguments never trained on.

    The first `n_eval_contexts` of them are exactly that run's evaluation contexts (the first
    documents of the shuffled order); more come from the documents after the last one training
    read, in the same shuffled order. Both kinds are held out, so any number of report tokens can
    be taken without touching a training document.
    """
    bos = _bos_token_id(tokenizer) if prepend_bos else None
    piece_len = ctx_len - 1 if prepend_bos else ctx_len
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    held_out: list[list[int]] = []
    n_train_seen = 0
    for doc_pieces in _pieces_by_document((texts[i] for i in order), tokenizer, piece_len):
        if len(held_out) < n_eval_contexts:  # the run's evaluation documents
            held_out.extend(doc_pieces[: n_eval_contexts - len(held_out)])
        elif n_train_seen < n_train_contexts:  # a training document: skipped whole
            n_train_seen += len(doc_pieces)
        else:
            held_out.extend(doc_pieces)
        if len(held_out) >= n_contexts:
            break
    held_out = held_out[:n_contexts]
    if len(held_out) < n_contexts:
        raise DataError(
            f"the dataset holds only {len(held_out) * ctx_len} tokens in {ctx_len}-token contexts that the run "
            f"never trained on, but {n_contexts * ctx_len} are asked for: lower the number of held-out tokens"
        )
    return _to_tensor(held_out, bos)


def _bos_token_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token; set data.prepend_bos=false")
    return int(bos)


def _pieces_by_document(texts: Iterator[str], tokenizer, piece_len: int) -> Iterator[list[list[int]]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            yield from _cut(batch, tokenizer, piece_len)
            batch = []
    if batch:
        yield from _cut(batch, tokenizer, piece_len)


def _cut(batch: list[str], tokenizer, piece_len: int) -> Iterator[list[list[int]]]:
    # verbose=False: documents are longer than the model's context on purpose, we cut them ourselves
    ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
    for doc in ids:
        yield [doc[i : i + piece_len] for i in range(0, len(doc) - piece_len + 1, piece_len)]


def _to_tensor(pieces: list[list[int]], bos: int | None) -> torch.Tensor:
    tokens = torch.tensor(pieces, dtype=torch.long)
    if bos is None:
        return tokens
    return torch.cat([torch.full((len(pieces), 1), bos, dtype=torch.long), tokens], dim=1)
