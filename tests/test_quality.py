"""Phi's textbook-quality filter: a real MiniLM encoder and a classifier trained on the packaged seed set."""

import json

import pytest

from slmkit.data.quality import DEFAULT_SEED, Embedder, QualityClassifier, filter_corpus, read_seed
from slmkit.errors import SlmError


@pytest.fixture(scope="module")
def embed():
    return Embedder()


def test_seed_classifier_generalises_to_held_out_examples(embed):
    texts, labels = read_seed(DEFAULT_SEED)
    x = embed(texts)
    held = list(range(0, len(texts), 4))  # every 4th example is held out
    train = [i for i in range(len(texts)) if i not in held]
    clf = QualityClassifier.fit(x[train], [labels[i] for i in train])
    predictions = (clf.score(x[held]) > 0.5).long().tolist()
    accuracy = sum(p == labels[i] for p, i in zip(predictions, held, strict=True)) / len(held)
    assert accuracy >= 0.8, accuracy


def test_filter_keeps_the_instructive_documents(tmp_path):
    good = ["A variable names a value. In x = 5, the name x refers to the integer five, and x + 1 evaluates to 6.",
            "To convert a temperature from Celsius to Fahrenheit, multiply by 9/5 and add 32: 20 C is 68 F.",
            "def area(r):\n    \"\"\"Return the area of a circle of radius r.\"\"\"\n    return 3.14159 * r * r"]
    bad = ["BUY NOW!!! 50% OFF all items, free shipping, click the link, offer ends tonight!!!",
           "2023-01-01 00:00:01 DEBUG conn=7 ok\n2023-01-01 00:00:02 DEBUG conn=7 ok",
           "Home | Shop | Blog | Login | Cart | FAQ | Careers | Press | Legal"]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [bad[0], good[0], bad[1], good[1], bad[2],
                                                                      good[2]]))
    s = filter_corpus(str(corpus), tmp_path / "kept.jsonl", keep=0.5, progress=False)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert s["kept"] == 3 and sorted(r["text"] for r in kept) == sorted(good)
    assert (tmp_path / "kept.png").stat().st_size > 1000


def test_bad_seed_files(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "good"}\n')
    with pytest.raises(SlmError, match=r"seed.jsonl:2: a seed example needs"):
        read_seed(seed)
    seed.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(SlmError, match="both labels"):
        read_seed(seed)
