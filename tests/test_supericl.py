"""SuperICL: prompts, demonstration retrieval, label scoring, and the whole workflow on real models
(a MiniLM plug-in fine-tuned here, the embedded model as the large model)."""

import json

import numpy as np
import pytest
import torch
from conftest import proof_claims

from slmkit.client import LocalLM, match_option
from slmkit.errors import SlmError
from slmkit.evaluate import option_logprobs
from slmkit.methods.supericl import Prediction, build_prompt, pick_demonstrations, supericl


def test_option_logprobs_match_full_forwards(tiny_causal):
    prompt, options = "The weather today is", [" sunny", " very cold and wet", " x"]
    scores = option_logprobs(tiny_causal, prompt, options)
    tok = tiny_causal.tokenizer
    for option, score in zip(options, scores, strict=True):
        ids = tok(prompt + option).input_ids
        n_prompt = len(tok(prompt).input_ids)
        with torch.no_grad():
            logprobs = tiny_causal.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(float(logprobs[j - 1, ids[j]]) for j in range(n_prompt, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_local_large_model_chooses_the_likely_option(smol):
    lm = LocalLM(smol)
    assert lm.choose(["The capital of France is", "The capital of Italy is"], [" Paris", " Rome", " Berlin"]) == [0, 1]


def test_prompts_and_parsing():
    demos = [("What is AI?", "ai", Prediction("ai", 0.97)), ("Who wrote Hamlet?", "trivia", Prediction("ai", 0.41))]
    sup = build_prompt(demos, "What is Python?", Prediction("coding", 0.88), ["ai", "coding", "trivia"])
    icl = build_prompt(demos, "What is Python?", None, ["ai", "coding", "trivia"])
    assert sup.startswith("Classify each input. The possible labels are: ai, coding, trivia.")
    assert "Input: Who wrote Hamlet?\nPlug-in prediction: ai (confidence 0.41)\nLabel: trivia" in sup
    assert sup.endswith("Input: What is Python?\nPlug-in prediction: coding (confidence 0.88)\nLabel:")
    assert "prediction" not in icl and icl.endswith("Input: What is Python?\nLabel:")
    assert match_option(" coding\n", ["ai", "coding"]) == 1
    assert match_option("The label is trivia.", ["ai", "coding", "trivia"]) == 2
    assert match_option("no idea", ["ai", "coding"]) is None
    assert match_option("positive", ["pos", "positive"]) == 1


def test_knn_demonstrations_put_the_nearest_last():
    vecs = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1]]), dim=-1)
    query = torch.nn.functional.normalize(torch.tensor([1.0, 0.05]), dim=0)
    assert pick_demonstrations(vecs, query, 2, "knn", np.random.default_rng(0)) == [3, 0]
    random = pick_demonstrations(vecs, query, 3, "random", np.random.default_rng(0))
    assert len(set(random)) == 3


def test_supericl_end_to_end(tmp_path):
    r = supericl("chatterbot-topics", plugin_steps=30, shots=4, limit=12, out_dir=tmp_path, progress=False)
    assert r["test_examples"] == 12 and set(r["labels"]) == {"ai", "coding", "psychology", "trivia"}
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for name in ("plugin", "icl", "supericl"):
        assert r["accuracy"][name] == pytest.approx(sum(row[name] == row["label"] for row in rows) / 12)
    assert r["accuracy"]["plugin"] >= 0.5  # the fine-tuned plug-in is far above chance (0.25)
    claims = proof_claims("supericl", tmp_path / "supericl.json", intervals=True)  # a bootstrap over 12 questions
    assert [c["arms"]["SuperICL"] for c in claims] == [r["accuracy"]["supericl"]] * 2
    assert (tmp_path / "plugin" / "model" / "config.json").is_file()
    # the trained plug-in is reusable
    again = supericl("chatterbot-topics", plugin=str(tmp_path / "plugin" / "model"), shots=4, limit=4,
                     retrieval="random", out_dir=tmp_path / "again", progress=False)
    assert again["test_examples"] == 4


def test_supericl_cross_fitting_tests_each_fold_with_a_plugin_that_never_saw_it(tmp_path):
    r = supericl("chatterbot-topics", plugin_steps=10, shots=2, limit=3, folds=2, out_dir=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert r["test_examples"] == 6 and r["folds"] == 2 and [row["fold"] for row in rows] == [0, 0, 0, 1, 1, 1]
    for f in (0, 1):
        trained = {json.loads(line)["text"] for line in (tmp_path / f"fold{f}" / "plugin_train.jsonl").open()}
        tested = {row["text"] for row in rows if row["fold"] == f}
        assert tested and not tested & trained  # the fold's plug-in never saw its test questions
        assert (tmp_path / f"fold{f}" / "plugin" / "model" / "config.json").is_file()
    assert r["train_examples"] == len((tmp_path / "fold0" / "plugin_train.jsonl").read_text().splitlines())
    assert [c["over"] for c in proof_claims("supericl", tmp_path / "supericl.json", intervals=True)] == [
        "6 test questions"] * 2
    for bad, message in (({"folds": 1}, "at least 2"), ({"folds": 3, "plugin": "x"}, "neither --test-data"),
                         ({"folds": 1000}, "too few for 1000 folds")):
        with pytest.raises(SlmError, match=message):
            supericl("chatterbot-topics", out_dir=tmp_path / "bad", progress=False, **bad)
