"""Phi's synthetic "textbook" data: a teacher model writes textbook sections and exercises with solutions
on a list of topics; near-duplicates are removed.

Diversity comes from the topic list, the kind of text, a rotating audience and sampling (a seed per
sample). Output is JSONL (`text`, `topic`, `kind`, `sample`) that `slm pretrain --data` reads directly; a
run appends to its output and skips what is already there, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from slmkit.data.records import read_jsonl, read_text
from slmkit.errors import SlmError

KINDS = {
    "textbook": "Write a short textbook section that teaches {topic} to {audience}. Explain the idea clearly, "
                "then give a small worked example.",
    "exercise": "Write one exercise about {topic} for {audience}, then its complete worked solution.",
}
AUDIENCES = ["a beginner", "a high-school student", "a university student", "a curious adult"]


def read_topics(topics: str) -> list[str]:
    """A file with one topic per line, or a comma-separated list."""
    path = Path(topics).expanduser()
    items = read_text(path).splitlines() if path.is_file() else topics.split(",")
    items = [t.strip() for t in items if t.strip() and not t.strip().startswith("#")]
    if not items:
        raise SlmError(f"no topics in {topics!r}")
    return list(dict.fromkeys(items))


def _audience(topic: str, sample: int) -> str:
    """A rotating audience, stable across runs (not Python's per-process string hash)."""
    return AUDIENCES[(sample + int(hashlib.sha256(topic.encode()).hexdigest(), 16)) % len(AUDIENCES)]


def _normal(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def synthesize(topics: str, out: Path, *, teacher: str | None = None, kinds: tuple[str, ...] = ("textbook", "exercise"),
               per_topic: int = 1, max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.95,
               seed: int = 0, batch_size: int = 8, near_duplicate: float = 0.92, progress: bool = True) -> dict:
    """Phi-style synthetic data: a teacher writes textbook sections and exercises on your topics; exact and
    near-duplicates (MiniLM cosine >= 0.92) are dropped. Re-running resumes.

    Ask `teacher` (a local model, default the embedded one, or an endpoint `http://host:port/v1#model`)
    for texts; append the new, non-duplicate ones.

    Args:
        topics: A file with one topic per line, or a comma-separated list.
        out: JSONL to append to (text, topic, kind, sample).
        teacher: Teacher: a model (zoo name, directory, .gguf; default the embedded one) or an endpoint
            http://host:port/v1#model.
        kinds: textbook and/or exercise.
        per_topic: Samples per topic and kind.
        max_new_tokens: Longest text in tokens.
        temperature: Sampling temperature.
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches this.
        seed: Sampling seed.
        batch_size: Prompts the teacher answers together.
        near_duplicate: A text whose MiniLM cosine similarity to a kept one reaches this is dropped.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from slmkit.client import open_lm
    from slmkit.data.quality import Embedder
    from slmkit.generate import SamplingParams
    from slmkit.progress import Progress

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SlmError(f"unknown kind '{unknown[0]}' (choose from {', '.join(KINDS)})")
    out = Path(out)
    done, texts = set(), []
    if out.is_file():
        for _, row in read_jsonl(out):
            done.add((row["topic"], row["kind"], row["sample"]))
            texts.append(row["text"])
    jobs = [(t, k, i) for t in read_topics(topics) for k in kinds for i in range(per_topic)
            if (t, k, i) not in done]
    summary = {"requested": len(jobs), "written": 0, "duplicates": 0, "out": str(out)}
    if not jobs:
        return summary
    lm = open_lm(teacher)
    embed = Embedder()
    vectors = embed(texts) if texts else torch.empty(0, 384)
    seen = {hashlib.sha256(_normal(t).encode()).hexdigest() for t in texts}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, Progress(
            TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            disable=not progress) as bar:
        task = bar.add_task("", total=len(jobs))
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            prompts = [KINDS[k].format(topic=t, audience=_audience(t, i)) for t, k, i in batch]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed + start)
            for (t, k, i), text in zip(batch, lm.generate(prompts, params), strict=True):
                text = text.strip()
                key = hashlib.sha256(_normal(text).encode()).hexdigest()
                vec = embed([text])
                if not text or key in seen or (len(vectors) and float((vectors @ vec.T).max()) >= near_duplicate):
                    # an exact copy (after normalising case and punctuation) or a near-duplicate by meaning
                    summary["duplicates"] += 1
                    continue
                seen.add(key)
                vectors = torch.cat([vectors, vec])
                f.write(json.dumps({"text": text, "topic": t, "kind": k, "sample": i}) + "\n")
                f.flush()
                summary["written"] += 1
            bar.advance(task, len(batch))
    return summary


def report(s: dict, args: dict, out) -> None:
    """Print what `slm data synthesize` reports."""
    out.print(f"wrote {s['written']} new texts ({s['duplicates']} duplicates dropped) -> {s['out']}")
