"""Synthetic textbook data from the embedded teacher: real generation, deduplication, resumable output."""

import json

import pytest

from slmkit.data.synthesize import read_topics, synthesize
from slmkit.errors import SlmError


def test_synthesize_writes_dedupes_and_resumes(tmp_path, smol):
    out = tmp_path / "synthetic.jsonl"
    s = synthesize("prime numbers, Python lists", out, kinds=("textbook", "exercise"), max_new_tokens=40,
                   progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert s["requested"] == 4 and s["written"] + s["duplicates"] == 4 and len(rows) == s["written"] >= 3
    assert {r["topic"] for r in rows} == {"prime numbers", "Python lists"}
    assert all(len(r["text"].split()) >= 10 for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    again = synthesize("prime numbers, Python lists", out, kinds=("textbook", "exercise"), max_new_tokens=40,
                       progress=False)  # nothing left to do: the finished samples are skipped
    assert again["requested"] == 4 - s["written"]
    # an exact duplicate is never written twice: re-running with the same seed yields the same texts
    out2 = tmp_path / "twice.jsonl"
    synthesize("prime numbers", out2, kinds=("textbook",), per_topic=2, max_new_tokens=24, seed=5, progress=False)
    texts = [json.loads(line)["text"] for line in out2.read_text().splitlines()]
    assert len(texts) == len(set(texts))


def test_topics_and_errors(tmp_path):
    f = tmp_path / "topics.txt"
    f.write_text("# maths\nfractions\n\nfractions\ngeometry\n")
    assert read_topics(str(f)) == ["fractions", "geometry"]
    with pytest.raises(SlmError, match="unknown kind 'poem'"):
        synthesize("x", tmp_path / "o.jsonl", kinds=("poem",), progress=False)
    with pytest.raises(SlmError, match="cannot reach the endpoint"):
        synthesize("x", tmp_path / "o.jsonl", teacher="http://127.0.0.1:9/v1#m", progress=False)
