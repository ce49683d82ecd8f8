"""The cached steps between a corpus and training: a tokenizer (packaged, a model's, or trained BPE) and the
packed token cache, both keyed by what they were made from so a change of data or tokenizer rebuilds them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from slmkit.data import corpora
from slmkit.data.packing import prepare, tokenizer_fingerprint
from slmkit.errors import SlmError
from slmkit.models import cache_dir


def source_key(source: str) -> str:
    """A short name plus a hash of where the data is and when it last changed."""
    if source in corpora.CORPORA:
        return source
    path = Path(source).expanduser().resolve()
    if not path.exists():
        next(corpora.documents(source), None)  # raises the helpful "no corpus or file named" error
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)[:40]
    return f"{slug}-{hashlib.sha256(stamp.encode()).hexdigest()[:10]}"


def resolve_tokenizer(name: str, data: str, *, progress: bool = True):
    """`bpe:N` trains (once, cached) an N-token byte-level BPE on `data`; anything else is loaded."""
    from slmkit.data.tokenizers import load_tokenizer, train_bpe

    if name.startswith("bpe:"):
        try:
            vocab = int(name.split(":", 1)[1])
        except ValueError as e:
            raise SlmError(f"tokenizer '{name}': expected bpe:N with N a number, e.g. bpe:8192") from e
        out = cache_dir() / "tokenizers" / f"{source_key(data)}-bpe{vocab}"
        if not (out / "tokenizer.json").is_file():
            if progress:
                print(f"training a {vocab}-token byte-level BPE on {data} -> {out}")
            tmp = out.with_name(out.name + ".tmp")
            train_bpe(corpora.documents(data), vocab, tmp)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out)
        return load_tokenizer(str(out))
    return load_tokenizer(name)


def prepare_corpus(data: str, tokenizer, *, val_fraction: float = 0.05, progress: bool = True) -> Path:
    out = cache_dir() / "data" / f"{source_key(data)}-{tokenizer_fingerprint(tokenizer)}"
    return prepare(corpora.documents(data), tokenizer, out, val_fraction=val_fraction, source=data,
                   progress=progress)


def prepare_data(data: str, tokenizer: str = "bpe:8192", val_fraction: float = 0.05) -> dict:
    """Tokenise a corpus into a memory-mapped token cache with a train/validation split (by document).

    Args:
        data: A packaged corpus (`slm data list`), a .txt/.jsonl file or directory, or a saved HF datasets directory.
        tokenizer: llama2, a model or tokenizer path, or bpe:N.
        val_fraction: Fraction of documents held out for validation.
    """
    from slmkit.data.packing import PackedTokens

    path = prepare_corpus(data, resolve_tokenizer(tokenizer, data), val_fraction=val_fraction)
    return {"data": data, "cache": str(path), **PackedTokens.open(path, "train").meta}


def report(r: dict, args: dict, out) -> None:
    out.print(f"{r['data']}: {r['documents']} documents, {r['tokens']['train']:,} train / {r['tokens']['val']:,} "
              f"validation tokens (vocab {r['vocab_size']}) -> {r['cache']}")
