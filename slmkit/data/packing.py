"""Tokenise documents once into memory-mapped token files with a train/val split, and read them back as
packed fixed-length windows in a deterministic, resumable order.

Documents are joined with the tokenizer's end-of-text token between them (TinyLlama / GPT style packing:
a window may span a document boundary, marked by that token). The split is by document, so no validation
text is seen in training. The order of training windows is a function of (seed, step) alone: a resumed
run reads exactly the windows an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.errors import SlmError


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]


def prepare(docs: Iterable[str], tokenizer, out_dir: Path, *, val_fraction: float = 0.05, seed: int = 0,
            source: str = "", progress: bool = True) -> Path:
    """Write train.bin / val.bin (uint16 or uint32 token ids) and meta.json to out_dir, atomically."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from slmkit.progress import Progress

    out_dir = Path(out_dir)
    if (out_dir / "meta.json").is_file():
        return out_dir
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SlmError("the tokenizer has no end-of-text token to separate documents")
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise SlmError(f"{source or 'the data'} has {len(docs)} non-empty document(s); need at least 2 "
                       "(one for validation)")
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(docs) * val_fraction))
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[rng.permutation(len(docs))[:n_val]] = True
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    files = {split: open(tmp / f"{split}.bin", "wb") for split in counts}
    with Progress(TextColumn("tokenising {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task(source, total=len(docs))
        for start in range(0, len(docs), 256):
            chunk = docs[start:start + 256]
            for i, ids in enumerate(tokenizer(chunk, add_special_tokens=False).input_ids):
                split = "val" if is_val[start + i] else "train"
                arr = np.asarray([*ids, eos], dtype=dtype)
                files[split].write(arr.tobytes())
                counts[split] += len(arr)
            bar.advance(task, len(chunk))
    for f in files.values():
        f.close()
    meta = {"source": source, "documents": len(docs), "val_documents": int(n_val), "tokens": counts,
            "dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer), "eos_token_id": eos,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class PackedTokens:
    """One split of a prepared token cache, read through a memory map."""

    tokens: np.ndarray
    meta: dict

    @classmethod
    def open(cls, data_dir: Path, split: str) -> PackedTokens:
        data_dir = Path(data_dir)
        meta_file = data_dir / "meta.json"
        if not meta_file.is_file():
            raise SlmError(f"{data_dir} is not a prepared token cache (meta.json missing); run `slm data prepare`")
        meta = json.loads(meta_file.read_text())
        tokens = np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        return cls(tokens, meta)

    def windows(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def window(self, index: int, seq_len: int) -> np.ndarray:
        return np.asarray(self.tokens[index * seq_len:(index + 1) * seq_len], dtype=np.int64)

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        """Rows of global step `step` for process `rank`: windows in a per-epoch random order (seeded)."""
        import torch

        n = self.windows(seq_len)
        if n < 1:
            raise SlmError(f"the training split has {len(self.tokens)} tokens, fewer than one sequence of "
                           f"{seq_len}; lower --seq-len or add data")
        rows = []
        for j in range(batch_size):
            g = (step * world + rank) * batch_size + j
            epoch, pos = divmod(g, n)
            order = epoch_order(n, seed, epoch)
            rows.append(self.window(int(order[pos]), seq_len))
        return torch.from_numpy(np.stack(rows))

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int):
        """The first non-overlapping windows of the split, in order: the same every evaluation."""
        import torch

        n = min(self.windows(seq_len), batch_size * max_batches)
        if n < 1:
            raise SlmError(f"the validation split has {len(self.tokens)} tokens, fewer than one sequence of "
                           f"{seq_len}; lower --seq-len or add data")
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            yield torch.from_numpy(np.stack([self.window(i, seq_len) for i in idx]))


_ORDER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded random order of n items in one epoch (cached: every batch of the epoch reuses it)."""
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _ORDER_CACHE[key]


def unigram_logp(train: PackedTokens, vocab_size: int) -> np.ndarray:
    """Log-probability of each token id under the training split's token frequencies (add-one)."""
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1
    return np.log(counts / counts.sum())


def unigram_perplexity(train: PackedTokens, val: PackedTokens, vocab_size: int) -> float:
    """Perplexity of the validation tokens under the training split's token frequencies (add-one): the
    baseline a language model must beat."""
    val_ids = np.asarray(val.tokens, dtype=np.int64)
    return float(np.exp(-unigram_logp(train, vocab_size)[val_ids].mean()))
