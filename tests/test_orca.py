"""Orca 2: strategy choice, prompt erasure, ChatML for students without a template, and the proof workflow
end to end with the embedded model as teacher and a tiny student."""

import copy
import json

import pytest
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.methods import orca
from slmkit.methods.finetune import FinetuneArgs

TINY_ARGS = dict(steps=2, batch_size=2, seq_len=192, eval_every=0, save_every=0, log_every=1)


@pytest.fixture(scope="module")
def collection():
    return orca.load_collection(orca.ORCA_TASKS)


def test_strategies_and_tie_break():
    assert len(orca.STRATEGIES) == 5 and "direct-answer" in orca.STRATEGIES
    assert orca.best_strategy({"direct-answer": 0.5, "step-by-step": 0.5, "recall-then-generate": 0.25}) == \
        "step-by-step"
    assert orca.best_strategy({"direct-answer": 0.75, "step-by-step": 0.5}) == "direct-answer"


def test_items_split_and_erasure(collection):
    train, held = orca.split_items(collection, ["sum_small", "syllogism"], 30, 30)
    for task in train:
        assert not {it.question for it in train[task]} & {it.question for it in held[task]}
    item = held["syllogism"][0]
    record = orca.erased(item, collection, "Step one... The answer is Yes. ")
    system, user, answer = record["messages"]
    assert system == {"role": "system", "content": orca.GENERIC_SYSTEM}  # the strategy prompt is erased
    assert "OPTIONS" in user["content"] and answer["content"].endswith("Yes.")
    assert all(it.task.config for it in train["sum_small"])  # the small variant's generator options
    with pytest.raises(SlmError, match="unknown task 'nope'"):
        orca.split_items(collection, ["nope"], 2, 2)


def test_chatml_for_students_without_a_template(tiny_causal, tmp_path):
    tiny = copy.deepcopy(tiny_causal.tokenizer)
    tiny.chat_template = None
    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "plain")
    tiny.save_pretrained(tmp_path / "plain")
    data = tmp_path / "o.jsonl"
    rows = [{"messages": [{"role": "system", "content": orca.GENERIC_SYSTEM}, {"role": "user", "content": f"{i}+1?"},
                          {"role": "assistant", "content": f"The answer is {i + 1}."}]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = orca.orca_train(data, str(tmp_path / "plain"), lora=False, run="s", runs_dir=tmp_path,
                        train_args=FinetuneArgs(**TINY_ARGS), progress=False)
    converted = [json.loads(line) for line in (tmp_path / "s" / "chatml.jsonl").read_text().splitlines()]
    assert converted[0]["prompt"].startswith("<|im_start|>system\n" + orca.GENERIC_SYSTEM + "<|im_end|>\n")
    assert converted[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert converted[0]["completion"].endswith("<|im_end|>") and (tmp_path / "s" / "model").is_dir()
    assert r["val_loss"] > 0
    with pytest.raises(SlmError, match="Orca data not found"):
        orca.orca_train(tmp_path / "none.jsonl", str(tmp_path / "plain"))


def test_a_teacher_that_is_never_right_is_refused(tiny_causal, tmp_path):
    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "t")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "t")
    with pytest.raises(SlmError, match="answered no training item correctly"):
        orca.orca_data(tmp_path / "o.jsonl", str(tmp_path / "t"), ["sum_small"], per_task=2, probe=2, attempts=1,
                       strategies=["direct-answer"], progress=False)


def test_orca_eval_end_to_end(tiny_causal, tmp_path):
    """The embedded model teaches syllogisms under each strategy; two tiny students train and are scored."""
    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "student")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "student")
    r = orca.orca_eval(str(tmp_path / "student"), None, ["syllogism"], per_task=6, probe=2, attempts=1,
                       eval_per_task=3, lora=False, run="o", runs_dir=tmp_path,
                       train_args=FinetuneArgs(**TINY_ARGS), progress=False)
    report = json.loads((tmp_path / "o" / "orca.strategies.json").read_text())
    assert set(report["strategy_accuracy"]["syllogism"]) == set(orca.STRATEGIES)
    assert r["chosen"]["syllogism"] == orca.best_strategy(report["strategy_accuracy"]["syllogism"])
    direct = [json.loads(line) for line in (tmp_path / "o" / "direct.jsonl").read_text().splitlines()]
    assert direct and {row["strategy"] for row in direct} == {"direct-answer"}
    assert all(row["messages"][0]["content"] == orca.GENERIC_SYSTEM for row in direct)
    assert set(r["accuracy"]) == {"untuned", "direct", "erasure", "teacher_with_strategy"}
    [c] = proof_claims("orca", tmp_path / "o" / "orca_eval.json", intervals=True)
    assert c["arms"] == {"erasure": r["accuracy"]["erasure"]["mean"], "direct": r["accuracy"]["direct"]["mean"]}
    assert all(0 <= r["accuracy"][k]["mean"] <= 1 for k in r["accuracy"])
    assert (tmp_path / "o" / "erasure" / "model").is_dir() and (tmp_path / "o" / "orca_eval.json").is_file()
