"""Text datasets → fixed-length token contexts, split into training and held-out contexts.

How documents become contexts (docs/METHODS.md, "Data"):
- Documents are shuffled with `data.seed` (the same for every run of a sweep, so all runs share one
  split). The first `heldout_fraction` of them are held out: never trained on, the source of every
  evaluation and report token. The rest are training documents.
- A document is tokenized without special tokens and cut into consecutive pieces of `ctx_len - 1`
  tokens, each given the BOS token in front (`ctx_len` tokens; with `prepend_bos: false`, pieces
  of `ctx_len` and no BOS). A context never spans two documents; a tail shorter than a piece is
  dropped. `contexts_per_document=k` keeps only each document's first k pieces (k=1 is the seed experiment's
  setting: the first ctx_len tokens of each document).
- Held-out contexts are spread over documents: a seeded random piece of every held-out document,
  then a second random piece of every document that has one, and so on. Any prefix of that order
  is as spread as it can be, so the evaluation set (the first eval.n_tokens) is part of every
  report's held-out set.
- Training contexts are mixed across documents as they are made: pieces pass through a pool of
  `mix_pool_contexts` and leave it in a seeded random order, so any window of the activation store
  is close to a sample of the training corpus (and a small store is not a few documents).
- Extra held-out sets (`eval.sets`, `eval_set_description`) are corpora never trained on: all their
  documents are held out, and their contexts are spread over them the same way.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

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
        return [piece for _, line in _text_lines(path) for piece in line.splitlines()]
    if name.endswith(".parquet"):
        return _read_parquet(path, text_field)
    raise DataError(f"data.path={str(path)!r} has an unsupported suffix; allowed: {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no} is not valid JSON: {e}") from None
        yield _text_of(record, text_field, f"{path}:{line_no}")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, gunzipped when its name ends in .gz; bytes that are
    not UTF-8 are one DataError naming the file, the line and the byte offset (of the uncompressed text)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: line {line_no}, byte offset {offset + e.start}: {raw[e.start:e.start + 4]!r} is not "
                        f"UTF-8 text ({e.reason}); allowed: UTF-8 (re-encode the file, e.g. iconv -t utf-8)"
                    ) from None
                offset += len(raw)
    except (OSError, EOFError) as e:
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


@dataclass(frozen=True)
class HeldOutContexts:
    tokens: torch.Tensor  # [n_contexts, ctx_len] int64
    n_documents: int  # distinct held-out documents they come from


class ContextSource:
    """The contexts of a document collection under the data rules above: held-out and training."""

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer,
        ctx_len: int,
        prepend_bos: bool,
        seed: int,
        heldout_fraction: float = 0.1,
        contexts_per_document: int | None = None,
        mix_pool_contexts: int = 65536,
    ):
        if not 0 < heldout_fraction <= 1:
            raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1]")
        self.texts = texts
        self.tokenizer = tokenizer
        self.ctx_len = ctx_len
        self.seed = seed
        self.bos = bos_token_id(tokenizer) if prepend_bos else None
        self.piece_len = ctx_len - 1 if prepend_bos else ctx_len
        self.contexts_per_document = contexts_per_document
        self.mix_pool_contexts = mix_pool_contexts
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        # 1: an evaluation-only corpus (eval.sets), every document held out
        n_heldout = len(texts) if heldout_fraction == 1 else min(max(1, round(heldout_fraction * len(texts))), len(texts) - 1)
        self.heldout_docs = order[:n_heldout]
        self.train_docs = order[n_heldout:]

    def held_out_contexts(self, n_contexts: int, purpose: str = "held-out") -> HeldOutContexts:
        """The first `n_contexts` held-out contexts: round r takes the r-th piece of each held-out
        document in a per-document random order, documents in the shuffled order."""
        generator = torch.Generator().manual_seed(self.seed)
        docs = [d[torch.randperm(len(d), generator=generator)] for d in self._pieces(self.heldout_docs)]
        docs = [d for d in docs if len(d)]
        available = sum(len(d) for d in docs)
        if available < n_contexts:
            raise DataError(
                f"the {len(self.heldout_docs)} held-out documents give only {available * self.ctx_len} {purpose} "
                f"tokens in {self.ctx_len}-token contexts, but {n_contexts * self.ctx_len} are asked for: raise "
                "data.heldout_fraction, lower eval.n_tokens (or report.n_tokens), or use a larger dataset"
            )
        chosen: list[torch.Tensor] = []
        have = 0
        for round_index in range(max(len(d) for d in docs)):
            round_pieces = [d[round_index] for d in docs if len(d) > round_index][: n_contexts - have]
            chosen.extend(round_pieces)
            have += len(round_pieces)
            if have == n_contexts:
                break
        # round 0 takes one piece from each document, so the first len(docs) contexts are all distinct
        return HeldOutContexts(self._to_tensor(torch.stack(chosen)), min(n_contexts, len(docs)))

    def train_batches(self, batch_contexts: int) -> Iterator[torch.Tensor]:
        """Training contexts in batches of `batch_contexts`, in a seeded order that mixes documents: each
        new piece enters a pool of `mix_pool_contexts`, and once the pool is full it takes the place
        of a random piece, which is emitted."""
        rng = random.Random(self.seed)
        pool: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        for doc_pieces in self._pieces(self.train_docs):
            for piece in doc_pieces:
                if len(pool) < self.mix_pool_contexts:
                    pool.append(piece)
                    continue
                slot = rng.randrange(len(pool))
                batch.append(pool[slot])
                pool[slot] = piece
                if len(batch) == batch_contexts:
                    yield self._to_tensor(torch.stack(batch))
                    batch = []
        rng.shuffle(pool)
        for piece in pool:
            batch.append(piece)
            if len(batch) == batch_contexts:
                yield self._to_tensor(torch.stack(batch))
                batch = []
        if batch:
            yield self._to_tensor(torch.stack(batch))

    def _pieces(self, doc_indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """Each document's pieces [n_pieces, piece_len], tokenized a batch of documents at a time."""
        piece_len, limit = self.piece_len, self.contexts_per_document
        for start in range(0, len(doc_indices), _TOKENIZE_BATCH):
            batch = [self.texts[i] for i in doc_indices[start : start + _TOKENIZE_BATCH]]
            # verbose=False: documents are longer than the model's context on purpose, we cut them ourselves
            ids = self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for doc in ids:
                n_pieces = len(doc) // piece_len if limit is None else min(len(doc) // piece_len, limit)
                yield torch.tensor(doc[: n_pieces * piece_len], dtype=torch.long).reshape(n_pieces, piece_len)

    def _to_tensor(self, pieces: torch.Tensor) -> torch.Tensor:
        if self.bos is None:
            return pieces
        return torch.cat([torch.full((len(pieces), 1), self.bos, dtype=torch.long), pieces], dim=1)


def context_source(dataset: Mapping, tokenizer, ctx_len: int) -> ContextSource:
    """The ContextSource of a dataset description (`data.*` of a config, or `dataset` of a cfg.json)."""
    texts = load_texts(dataset["path"], dataset["name"], dataset["split"], dataset["text_field"])
    return ContextSource(
        texts,
        tokenizer,
        ctx_len,
        prepend_bos=dataset["prepend_bos"],
        seed=dataset["seed"],
        heldout_fraction=dataset["heldout_fraction"],
        contexts_per_document=dataset["contexts_per_document"],
        mix_pool_contexts=dataset["mix_pool_contexts"],
    )


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
    **source_options,
) -> TokenSplits:
    """Training and evaluation contexts in memory (`source_options`: those of ContextSource)."""
    source = ContextSource(texts, tokenizer, ctx_len, prepend_bos, seed, **source_options)
    eval_contexts = source.held_out_contexts(n_eval_contexts, "evaluation").tokens
    train: list[torch.Tensor] = []
    have = 0
    for batch in source.train_batches(batch_contexts=max(n_train_contexts, 1)):
        train.append(batch[: n_train_contexts - have])
        have += len(train[-1])
        if have == n_train_contexts:
            return TokenSplits(train=torch.cat(train), eval=eval_contexts)
    raise not_enough_text(ctx_len, have, n_train_contexts, "training")


def bos_token_id(tokenizer) -> int:
    """The token a context begins with: the tokenizer's BOS, else its EOS (GPT-NeoX: <|endoftext|>)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token; set data.prepend_bos=false")
    return int(bos)


EVAL_SET_KEYS = {"path": None, "name": None, "split": "train", "text_field": "text", "contexts_per_document": None}


def eval_set_description(cfg: DictConfig, set_name: str) -> dict:
    """The dataset description (as `dataset_description`'s) of the extra held-out set `eval.sets.<set_name>`:
    a corpus never trained on, so every document is held out; BOS and the shuffle seed are the training data's."""
    spec = cfg.eval.sets[set_name]  # checked by config.check_eval_sets
    description = {key: spec.get(key, default) for key, default in EVAL_SET_KEYS.items()}
    if description["path"]:
        description["path"] = str(Path(description["path"]).resolve())
    return description | {
        "prepend_bos": cfg.data.prepend_bos, "seed": cfg.data.seed, "heldout_fraction": 1.0, "mix_pool_contexts": 1,
    }


def dataset_description(cfg: DictConfig) -> dict:
    """What decides the contexts: the dataset, its split and text field, BOS, the shuffle seed, the
    held-out documents, the pieces taken per document and the mixing of training contexts. For
    synthetic activations (data=synthetic): the generator's knobs, which decide them alike."""
    if cfg.data.get("name") == "synthetic":
        return OmegaConf.to_container(cfg.data, resolve=True)
    return {
        "name": cfg.data.name,
        "path": str(Path(cfg.data.path).resolve()) if cfg.data.path else None,
        "split": cfg.data.split,
        "text_field": cfg.data.text_field,
        "prepend_bos": cfg.data.prepend_bos,
        "seed": cfg.data.seed,
        "heldout_fraction": cfg.data.heldout_fraction,
        "contexts_per_document": cfg.data.contexts_per_document,
        "mix_pool_contexts": cfg.data.mix_pool_contexts,
    }
