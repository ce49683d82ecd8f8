"""TinyGSM data: procedural problems whose programs return their answers, teacher programs accepted only
when they execute to the known answer, user data errors, and no overlap with the gsm_symbolic test set."""

import json
import subprocess
import sys

import pytest
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.methods import tinygsm as g
from slmkit.sandbox import Limits, Sandbox, bwrap_command


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(2, Limits(timeout=1.0), unsandboxed=bwrap_command() is None) as sb:
        yield sb


def test_procedural_programs_return_their_answers(sandbox):
    problems = g.procedural(300, seed=3, templates=list(g.TEMPLATES))
    assert {p.template for p in problems} == set(g.TEMPLATES) and len(g.TEMPLATES) >= 12
    assert len({p.question for p in problems}) > 290  # varied wording and quantities
    results = sandbox.map([p.program for p in problems])
    assert [r.value for r in results] == [p.answer for p in problems]
    p = problems[0]
    assert p.program.startswith('def solution():\n    """' + p.question + '"""') and "return" in p.program
    assert not any(p.template in g.HELD_OUT_TEMPLATES for p in g.procedural(200, seed=0))
    assert g.procedural(5, seed=1)[0].question == g.procedural(5, seed=1)[0].question  # deterministic


def test_stories_compose_events_and_hold_out_unseen_chains(sandbox):
    problems = g.procedural(400, seed=5, templates=g.STORY_TEMPLATES)
    assert len(g.STORY_TEMPLATES) == 7 * (1 + 7 + 49) * 3 and 0.1 < len(g.HELD_OUT_STORIES) / 1197 < 0.2
    results = sandbox.map([p.program for p in problems])
    assert [r.value for r in results] == [p.answer for p in problems] and min(p.answer for p in problems) > 0
    p = next(p for p in problems if p.template.count("+") == 2)  # three events: a longer program
    assert len(p.steps) >= 5 and p.question.count(".") >= 4
    training = g.procedural(1000, seed=0)
    assert sum(t.template.startswith("story:") for t in training) == 500  # half stories, half hand-written
    assert not {t.template for t in training} & set(g.HELD_OUT_STORIES + g.HELD_OUT_TEMPLATES)
    test = g.test_problems("heldout-stories", 30)
    assert {t["template"] for t in test} <= set(g.HELD_OUT_STORIES) and len({t["template"] for t in test}) > 20
    long_test = g.test_problems("heldout-long-stories", 20)
    assert all(t["template"].count("+") == 3 for t in long_test)  # four events: longer than any training story
    verifier_split = g.procedural(200, seed=1, templates=[t for t in g.LONG_STORY_TEMPLATES
                                                          if t not in g.HELD_OUT_LONG_STORIES])
    assert not {p.template for p in verifier_split} & {t["template"] for t in long_test}
    assert g.training_problems("long-stories", 5)[0]["question"] == verifier_split[0].question
    with pytest.raises(SlmError, match="unknown template 'story:fly:count'"):
        g.procedural(1, templates=["story:fly:count"])


def test_teacher_programs_are_kept_only_when_they_return_the_answer(sandbox):
    rows = [{"question": "2 apples and 3 apples?", "answer": 5} for _ in range(4)]
    replies = ["Sure!\n```python\ndef solution():\n    a = 2\n    b = 3\n    return a + b\n```",
               "def solution():\n    return 6",  # runs, wrong answer
               "def solution():\n    while True:\n        pass",  # never returns
               "I think the answer is 5."]  # no program
    assert g.accept_programs(sandbox, rows, replies) == 1
    assert rows[0]["program"].startswith("def solution") and "```" not in rows[0]["program"]
    assert all("program" not in r for r in rows[1:])


def test_overlap_check_catches_a_copied_test_problem():
    test = [t["question"] for t in g.gsm_symbolic(20)]
    assert g.overlap(test[:5], test[:5]) == 5 and g.overlap(test[:5], test) >= 5
    assert g.overlap([p.question for p in g.procedural(500)], test) == 0


def test_gsm_data_command_with_user_problems(tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"question": "A pack has 6 pens. How many pens in 7 packs?", "answer": 42,
                                "program": "def solution():\n    return 6 * 7"}) + "\n")
    out = tmp_path / "gsm.jsonl"
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "gsm", "data", "--out", str(out), "--procedural", "60",
                        "--user", str(user), "--test-size", "50"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 61 and {"question", "program", "answer", "source"} <= rows[0].keys()
    assert "test overlap 0" in r.stdout

    user.write_text(json.dumps({"question": "6 times 7?", "answer": 41, "program": "def solution():\n    return 42"})
                    + "\n")
    with pytest.raises(SlmError, match="does not return its answer"):
        g.gsm_data(out, procedural=5, user=user, test_size=0, progress=False)
    user.write_text('{"question": "no answer"}\n')
    with pytest.raises(SlmError, match=r"mine.jsonl:1: a problem needs"):
        g.gsm_data(out, procedural=5, user=user, test_size=0, progress=False)


def test_program_body_normalises_any_solution():
    program = 'def solution():\n    """Q?"""\n    a = 2  # two\n    b = a * 3\n    return b\n'
    assert g.program_body(program) == "    a = 2\n    b = a * 3\n    return b\n"
    assert g.program_body("def solution():\n  return 1") == "    return 1\n"
    with pytest.raises(SlmError, match="no `def solution"):
        g.program_body("x = 1")


def test_generator_trains_and_samples_programs(tiny_causal, tmp_path, sandbox):
    import copy

    from slmkit.methods.finetune import FinetuneArgs
    from slmkit.models import load

    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "tiny")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "gsm.jsonl"
    g.gsm_data(data, procedural=48, test_size=0, progress=False)
    r = g.gsm_train(str(tmp_path / "tiny"), data, lora=False, run="gen", runs_dir=tmp_path,
                    train_args=FinetuneArgs(steps=12, batch_size=4, seq_len=256, lr=3e-3, eval_every=0, save_every=0,
                                            log_every=4), progress=False)
    assert r["val_loss"] < r["val_loss_before"] - 1.0
    first = json.loads((tmp_path / "gen" / "programs.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith('def solution():\n    """') and first["completion"].startswith("    ")
    generator = load(str(tmp_path / "gen" / "model"), dtype="fp32")
    questions = [p.question for p in g.procedural(2, seed=9)]
    solved = g.solve(generator, questions, sandbox, samples=3, max_new_tokens=24, progress=False)
    assert [len(s) for s in solved] == [3, 3]
    assert all(s.program.startswith(g.program_prompt(q)) for q, ss in zip(questions, solved, strict=True)
               for s in ss)
    for s in (s for ss in solved for s in ss):  # each status and answer is what running the program gives
        again = sandbox.run(s.program)
        assert s.status == again.status and (s.status != "ok" or s.value == again.value), (s, again)

    # resumable: an interrupted run's programs are kept and only the missing ones are sampled
    partial = tmp_path / "partial.jsonl"
    g.solve(generator, questions, sandbox, samples=3, max_new_tokens=24, progress=False, partial=partial)
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 6 and json.loads(lines[0])["key"]["seed"] == 0
    first = json.loads(lines[1])
    planted = g.program_prompt(questions[first["i"] // 3]) + "    return 42\n"
    partial.write_text("\n".join([lines[0], json.dumps({"i": first["i"], "text": planted}), lines[2], '{"i": 5, "te']))
    again = [s for ss in g.solve(generator, questions, sandbox, samples=3, max_new_tokens=24, progress=False,
                                 partial=partial) for s in ss]
    assert again[first["i"]].program == planted and again[first["i"]].value == 42  # read back, not resampled
    assert len(partial.read_text().splitlines()) == 1 + 6  # the cut-off line dropped, the 4 missing appended
    other = g.solve(generator, questions[:1], sandbox, samples=3, max_new_tokens=24, seed=1, progress=False,
                    partial=partial)  # other settings: the file starts over
    assert all(s.value != 42 for s in other[0]) and len(partial.read_text().splitlines()) == 1 + 3


def test_gsm_eval_samples_on_the_llamacpp_engine(tmp_path, sandbox):
    """`--engine llamacpp`: the embedded model's GGUF samples the programs (continuous batching in llama.cpp); each
    is executed and scored like a torch sample, and the samples are cached under a key naming the engine."""
    r = g.gsm_eval("smollm2-135m", test="heldout-templates", problems=2, n=[1, 2], temperature=0.7,
                   max_new_tokens=48, run="ev", runs_dir=tmp_path, engine="llamacpp", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert r["engine"] == "llamacpp" and [len(row["samples"]) for row in rows] == [2, 2]
    for row in rows:
        for s in row["samples"]:
            assert s["program"].startswith(g.program_prompt(row["question"]))
            again = sandbox.run(s["program"])
            assert s["status"] == again.status
    assert r["pass@1"] == sum(g.matches(g.Sample(**s).answer(), row["answer"]) for row in rows
                              for s in row["samples"]) / 4


def test_majority_vote():
    s = [g.Sample("", "ok", 3), g.Sample("", "error"), g.Sample("", "ok", 5), g.Sample("", "ok", 5.0)]
    assert g.majority(s) == 5.0 and g.majority([g.Sample("", "timeout")]) is None


def test_best_of_n_counts():
    problems = [{"answer": 5}, {"answer": 7}]
    solved = [[g.Sample("", "ok", 4), g.Sample("", "ok", 5), g.Sample("", "ok", 5), g.Sample("", "ok", 6)],
              [g.Sample("", "ok", 1), g.Sample("", "error"), g.Sample("", "ok", 7), g.Sample("", "ok", 1)]]
    scores = [[0.1, 0.9, 0.2, 0.3], [0.2, 0.1, 0.8, 0.9]]
    r = g.best_of_n(problems, solved, scores, [1, 2, 4])
    assert r["pass@1"] == 3 / 8
    assert r["majority"] == {1: 0.0, 2: 0.0, 4: 0.5}  # ties go to the answer reached first
    assert r["verifier"] == {1: 0.0, 2: 0.5, 4: 0.5}


def test_verifier_trains_scores_and_drives_best_of_n(tiny_causal, tmp_path):
    """verify-train on labelled samples (right programs and degenerate ones), then gsm_eval with the verifier."""
    import copy

    from slmkit.methods.finetune import FinetuneArgs

    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "gen")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "gen")
    rows = []
    for p in g.procedural(40, seed=2):
        prompt, body = g.program_prompt(p.question), g.program_body(p.program)
        wrong = "    answer = 0\n    return answer\n"
        rows += [{"prompt": prompt, "completion": body, "correct": True},
                 {"prompt": prompt, "completion": wrong, "correct": False}]
    run = tmp_path / "ver"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # reused, not re-sampled
    r = g.verify_train(str(tmp_path / "gen"), run="ver", runs_dir=tmp_path,
                       train_args=FinetuneArgs(steps=40, batch_size=8, seq_len=160, lr=1e-2, eval_every=0,
                                               save_every=0, log_every=10), progress=False)
    assert r["samples"] == 80 and r["correct_fraction"] == 0.5
    assert r["val_loss"] < r["val_loss_before"] - 0.3 and r["val_auc"] > 0.8
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 1

    e = g.gsm_eval(str(tmp_path / "gen"), str(run / "model"), test="heldout-templates", problems=3, n=[1, 2],
                   max_new_tokens=16, run="ev", runs_dir=tmp_path, progress=False)
    assert e["problems"] == 3 and set(e["majority"]) == {1, 2} and set(e["verifier"]) == {1, 2}
    assert (tmp_path / "ev" / "best_of_n.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "ev" / "gsm_eval.json").read_text())
    assert saved["verifier_model"] == str(run / "model")
    verifier, majority = proof_claims("tinygsm", tmp_path / "ev" / "gsm_eval.json", intervals=True)  # at the largest N
    assert verifier["arms"] == {"verifier": e["verifier"][2], "majority": e["majority"][2]}
    assert majority["arms"] == {"majority": e["majority"][2], "pass@1": e["pass@1"]}
    with pytest.raises(SlmError, match="unknown test set"):
        g.test_problems("gsm8k", 2)

    # the value at the last token separates right programs from wrong ones it was trained on
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    verifier = AutoModelForTokenClassification.from_pretrained(run / "model")
    scores = g.verifier_scores(verifier, AutoTokenizer.from_pretrained(run / "model"),
                               [r["prompt"] + r["completion"] for r in rows])
    right, wrong = scores[0::2], scores[1::2]
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.1


def test_verifier_from_lower_layers_trains_only_the_top(tiny_causal, tmp_path):
    """layers keeps the base's first layers; train_layers freezes the embeddings and the layers below the top."""
    import copy

    from slmkit.methods.finetune import FinetuneArgs

    copy.deepcopy(tiny_causal.model).save_pretrained(tmp_path / "gen")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "gen")
    rows = []
    for n in range(3, 13):
        prompt = g.program_prompt(f"Ann has {n} pens. How many pens does Ann have?")
        rows += [{"prompt": prompt, "completion": f"    return {n}\n", "correct": True},
                 {"prompt": prompt, "completion": "    return 0\n", "correct": False}]
    (tmp_path / "ver").mkdir()
    (tmp_path / "ver" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = g.verify_train(str(tmp_path / "gen"), layers=1, train_layers=1, run="ver", runs_dir=tmp_path,
                       train_args=FinetuneArgs(steps=10, batch_size=4, seq_len=64, lr=1e-3, eval_every=0,
                                               save_every=0, log_every=10), progress=False)
    assert r["trainable_parameters"] < sum(p.numel() for p in tiny_causal.model.model.layers[0].parameters()) + 200
    config = json.loads((tmp_path / "ver" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    import torch
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ver" / "model" / "model.safetensors")
    original = tiny_causal.model.state_dict()
    assert not any(k.startswith("model.layers.1.") for k in saved)
    assert torch.equal(saved["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(SlmError, match="train_layers must be in 1..1"):
        g.verify_train(str(tmp_path / "gen"), layers=1, train_layers=2, run="ver", runs_dir=tmp_path, progress=False)
