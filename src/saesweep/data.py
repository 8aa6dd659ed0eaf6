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


class ContextSource:
    """The contexts of a document collection in the fixed order of `seed`: evaluation first, then training."""

    def __init__(self, texts: Sequence[str], tokenizer, ctx_len: int, prepend_bos: bool, seed: int):
        self.texts = texts
        self.tokenizer = tokenizer
        self.ctx_len = ctx_len
        self.bos = _bos_token_id(tokenizer) if prepend_bos else None
        self.piece_len = ctx_len - 1 if prepend_bos else ctx_len
        self.order = list(range(len(texts)))
        random.Random(seed).shuffle(self.order)

    def eval_contexts(self, n_contexts: int) -> tuple[torch.Tensor, int]:
        """The first `n_contexts` contexts [n, ctx_len], and how many documents they used."""
        pieces: list[list[int]] = []
        for n_docs, doc_pieces in enumerate(self._pieces_by_document(0), 1):
            pieces.extend(doc_pieces[: n_contexts - len(pieces)])
            if len(pieces) == n_contexts:
                return self._to_tensor(pieces), n_docs
        raise not_enough_text(self.ctx_len, len(pieces), n_contexts, "evaluation")

    def train_batches(self, n_eval_docs: int, batch_contexts: int) -> Iterator[torch.Tensor]:
        """Training contexts in batches of `batch_contexts`, from the documents after the `n_eval_docs`
        evaluation documents (see `eval_contexts`)."""
        batch: list[list[int]] = []
        for doc_pieces in self._pieces_by_document(n_eval_docs):
            for piece in doc_pieces:
                batch.append(piece)
                if len(batch) == batch_contexts:
                    yield self._to_tensor(batch)
                    batch = []
        if batch:
            yield self._to_tensor(batch)

    def held_out_contexts(self, n_eval_contexts: int, n_train_contexts: int, n_contexts: int) -> torch.Tensor:
        """`n_contexts` contexts that a run with these evaluation and training context counts never
        trained on: its evaluation contexts first, then contexts of the documents after the last one
        its training read (a partly read document is skipped whole)."""
        eval_contexts, n_eval_docs = self.eval_contexts(n_eval_contexts)
        if n_contexts <= n_eval_contexts:
            return eval_contexts[:n_contexts]
        n_more = n_contexts - n_eval_contexts
        pieces: list[list[int]] = []
        n_train_seen = 0
        for doc_pieces in self._pieces_by_document(n_eval_docs):
            if n_train_seen < n_train_contexts:  # a training document
                n_train_seen += len(doc_pieces)
                continue
            pieces.extend(doc_pieces[: n_more - len(pieces)])
            if len(pieces) == n_more:
                return torch.cat([eval_contexts, self._to_tensor(pieces)])
        raise DataError(
            f"the dataset holds only {(n_eval_contexts + len(pieces)) * self.ctx_len} tokens in {self.ctx_len}-token "
            f"contexts that the run never trained on, but {n_contexts * self.ctx_len} are asked for: "
            "lower the number of held-out tokens"
        )

    def _pieces_by_document(self, first_doc: int) -> Iterator[list[list[int]]]:
        piece_len = self.piece_len
        for start in range(first_doc, len(self.order), _TOKENIZE_BATCH):
            batch = [self.texts[i] for i in self.order[start : start + _TOKENIZE_BATCH]]
            # verbose=False: documents are longer than the model's context on purpose, we cut them ourselves
            ids = self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for doc in ids:
                yield [doc[i : i + piece_len] for i in range(0, len(doc) - piece_len + 1, piece_len)]

    def _to_tensor(self, pieces: list[list[int]]) -> torch.Tensor:
        tokens = torch.tensor(pieces, dtype=torch.long).reshape(len(pieces), self.piece_len)
        if self.bos is None:
            return tokens
        return torch.cat([torch.full((len(pieces), 1), self.bos, dtype=torch.long), tokens], dim=1)


def not_enough_text(ctx_len: int, have_contexts: int, want_contexts: int, purpose: str) -> DataError:
    return DataError(
        f"the dataset gives only {have_contexts * ctx_len} {purpose} tokens in {ctx_len}-token contexts, "
        f"but {want_contexts * ctx_len} are needed: lower n_tokens or eval.n_tokens, or use a larger dataset"
    )


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
    source = ContextSource(texts, tokenizer, ctx_len, prepend_bos, seed)
    eval_contexts, n_eval_docs = source.eval_contexts(n_eval_contexts)
    train: list[torch.Tensor] = []
    have = 0
    for batch in source.train_batches(n_eval_docs, batch_contexts=max(n_train_contexts, 1)):
        train.append(batch[: n_train_contexts - have])
        have += len(train[-1])
        if have == n_train_contexts:
            return TokenSplits(train=torch.cat(train), eval=eval_contexts)
    raise not_enough_text(ctx_len, have, n_train_contexts, "training")


def _bos_token_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token; set data.prepend_bos=false")
    return int(bos)
