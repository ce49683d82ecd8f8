"""Reading tasks whose answer is taken from the text (extraction), built from Brown corpus paragraphs.

FLAN's held-out clusters are kinds of task a model never practised in tuning; these give slmkit's task
collection a cluster of that kind from packaged text: find the number a passage mentions, quote what it
puts in quotation marks, pick which of four words it contains. Each is deterministic from a seed and
answered by copying from the passage, so a model that understands the instruction can do it zero-shot.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

NUMBER = re.compile(r"^\$?\d[\d,.]*%?$")
STRIP = '.,;:()"?!'


@lru_cache(maxsize=1)
def paragraphs(min_words: int = 15, max_words: int = 70) -> tuple[str, ...]:
    """Brown corpus paragraphs of `min_words`..`max_words` words, in corpus order."""
    from slmkit.data.corpora import _brown_samples

    return tuple(p for _, _, ps in _brown_samples() for p in ps if min_words <= len(p.split()) <= max_words)


def _numbers(text: str) -> list[str]:
    return [w.strip(STRIP) for w in text.split() if NUMBER.match(w.strip(STRIP))]


def number_in_passage(n: int, seed: int) -> list[dict]:
    """Passages that mention exactly one number: which number is it?"""
    pool = [p for p in paragraphs() if len(_numbers(p)) == 1]
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [{"question": f"{p}\n\nWhich number does this passage mention?", "answer": _numbers(p)[0].rstrip(".,")}
            for p in picked]


def quote_in_passage(n: int, seed: int) -> list[dict]:
    """Passages with one quotation of 2-8 words: what is quoted?"""
    pool = [p for p in paragraphs() if p.count('"') == 2 and 2 <= len(p.split('"')[1].split()) <= 8]
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [{"question": f"{p}\n\nWhat words does this passage put in quotation marks?",
             "answer": p.split('"')[1].strip(STRIP + " ")} for p in picked]


def word_in_passage(n: int, seed: int, choices: int = 4) -> list[dict]:
    """Which of `choices` words (of seven letters or more) appears in the passage? The others come from other
    passages and do not appear in this one."""
    rng = random.Random(seed)
    pool = list(paragraphs())
    long_words = sorted({w.strip(STRIP).lower() for p in pool for w in p.split() if len(w.strip(STRIP)) >= 7
                         and w.strip(STRIP).isalpha()})
    rows = []
    for p in rng.sample(pool, min(n, len(pool))):
        present = sorted({w.strip(STRIP).lower() for w in p.split() if w.strip(STRIP).isalpha()})
        candidates = [w for w in present if len(w) >= 7]
        if not candidates:
            continue
        answer = rng.choice(candidates)
        others = []
        while len(others) < choices - 1:
            w = rng.choice(long_words)
            if w not in present and w not in others:
                others.append(w)
        options = others + [answer]
        rng.shuffle(options)
        rows.append({"question": f"{p}\n\nWhich of these words appears in the passage?", "answer": answer,
                     "options": options})
    return rows


EXTRACTION = {"brown-numbers": number_in_passage, "brown-quotes": quote_in_passage, "brown-words": word_in_passage}
