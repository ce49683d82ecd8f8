"""FLAN: task collection, templates and formats, deterministic mixing, scoring, and the held-out-cluster
workflow end to end on a tiny model."""

import json
import subprocess
import sys

import pytest
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.methods import flan


@pytest.fixture(scope="module")
def collection():
    return flan.load_collection()


def test_packaged_collection_has_clusters_and_ten_templates(collection):
    assert {"arithmetic", "algorithmic", "logic", "graphs", "classification"} <= collection.clusters.keys()
    assert len(collection.templates) == 10 and all("{question}" in t for t in collection.templates)
    assert len({t.name for t in collection.tasks}) == len(collection.tasks) >= 20


def test_user_tasks_and_bad_task_files(tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text('{"question": "Capital of France?", "answer": "Paris"}\n'
                    '{"question": "Capital of Italy?", "answer": "Rome"}\n')
    extra = tmp_path / "mine.yaml"
    extra.write_text(f"templates: ['Tell me: {{question}}']\n"
                     f"tasks:\n  - {{name: capitals, cluster: geography, source: '{data}'}}\n")
    c = flan.load_collection(extra)
    assert c.clusters["geography"] == ["capitals"] and c.templates[-1] == "Tell me: {question}"
    rows = flan.build_mixture(c, clusters=["geography"], examples=10, few_shot=0, seed=1)
    assert {r["completion"] for r in rows} == {"Paris", "Rome"}
    for text, message in [("tasks:\n  - {name: x, cluster: y}\n", "needs 'name', 'cluster' and 'source'"),
                          ("tasks:\n  - {name: chain_sum, cluster: y, source: z}\n", "already exists"),
                          ("tasks:\n  - {name: x, cluster: y, source: z, colour: red}\n", "unknown field 'colour'"),
                          ("tasks:\n  - {name: x, cluster: y, source: z, templates: ['no slot']}\n", "no {question}")]:
        extra.write_text(text)
        with pytest.raises(SlmError, match=message):
            flan.load_collection(extra)
    with pytest.raises(SlmError, match="unknown cluster 'nope'"):
        flan.build_mixture(c, exclude=["nope"])


def test_mixture_is_deterministic_and_holds_out_a_cluster(collection):
    a = flan.build_mixture(collection, exclude=["logic"], examples=400, seed=3)
    b = flan.build_mixture(collection, exclude=["logic"], examples=400, seed=3)
    assert a == b
    assert "logic" not in {r["cluster"] for r in a}
    formats = {r["format"] for r in a}
    assert {"zero", "few", "cot"} <= formats
    per_task = {}
    for r in a:
        per_task[r["task"]] = per_task.get(r["task"], 0) + 1
    assert max(per_task.values()) - min(per_task.values()) <= 1  # equal sizes under the cap: equal shares
    few = next(r for r in a if r["format"] == "few")
    assert few["prompt"].count("\n\n") >= 2
    # free-form tasks are sometimes rendered as multiple choice: the answer is one of four OPTIONS
    mc = [r for r in a if r["task"] == "chain_sum" and "OPTIONS:" in r["prompt"]]
    assert mc and all(f"- {r['completion']}\n" in r["prompt"] + "\n" for r in mc)
    assert all(r["prompt"].split("OPTIONS:\n")[1].count("\n- ") == 3 for r in mc)
    assert flan.build_mixture(collection, exclude=["logic"], examples=400, seed=4) != a


def test_rendering_options_cot_and_rationales(collection):
    chain = next(t for t in collection.tasks if t.name == "chain_sum")
    item = flan.make_items(chain, 3, seed=0)[2]
    prompt, target = flan.render(item, collection.templates[0], collection, "cot")
    assert prompt.endswith("Let's think step by step.")
    assert target.endswith(f"So the answer is {item.answer}.")
    assert item.rationale.split("= ")[-1].rstrip(".") == item.answer  # the rationale computes the answer
    topics = next(t for t in collection.tasks if t.cluster == "classification")
    cls = flan.make_items(topics, 1, seed=0)[0]
    prompt, target = flan.render(cls, topics.templates[0], collection)
    assert "OPTIONS:\n- ai\n- botprofile" in prompt and target in cls.options
    legs = flan.make_items(next(t for t in collection.tasks if t.name == "leg_counting"), 1, seed=0)[0]
    assert legs.rationale.endswith(f"gives {legs.answer}.")


def test_scoring(collection):
    syllogism = flan.make_items(next(t for t in collection.tasks if t.name == "syllogism"), 2, seed=0)
    item = syllogism[0]
    other = "No" if item.answer == "Yes" else "Yes"
    assert flan.is_correct(item, f"{item.answer}, because the premises say so.")
    assert flan.is_correct(item, f"The answer is {item.answer}.")
    assert not flan.is_correct(item, other)
    chain = flan.make_items(next(t for t in collection.tasks if t.name == "chain_sum"), 1, seed=0)[0]
    assert flan.is_correct(chain, f"Answer: {chain.answer}\nThat is all.")
    assert not flan.is_correct(chain, "I do not know")
    assert flan.extract_answer("Let me see... so the answer is 42.") == "42"


def test_rank_classification_picks_the_likely_option(smol, collection):
    assert flan.rank_choice(smol, "What is the capital of France?", ["Berlin", "Paris", "Rome"]) == "Paris"
    topics = next(t for t in collection.tasks if t.cluster == "classification")
    items = flan.make_items(topics, 4, seed=0)
    r = flan.zero_shot_accuracy(smol, items, collection, rank=True, progress=False)
    assert set(r["tasks"]) == {"chatterbot_topics"} and 0 <= r["mean"] <= 1


def test_flan_eval_end_to_end_on_a_tiny_model(tiny_causal, tmp_path):
    import copy

    from slmkit.methods.finetune import FinetuneArgs

    model = copy.deepcopy(tiny_causal.model)
    model.config.max_position_embeddings = 1024  # room for few-shot prompts (rotary positions have no table)
    model.save_pretrained(tmp_path / "tiny")
    tiny_causal.tokenizer.save_pretrained(tmp_path / "tiny")
    r = flan.flan_eval(str(tmp_path / "tiny"), "logic", examples=40, eval_per_task=3, lora=False, run="f",
                       runs_dir=tmp_path, train_args=FinetuneArgs(steps=3, batch_size=2, seq_len=128, eval_every=0,
                                                                  save_every=0, log_every=1), progress=False)
    assert set(r["before"]["tasks"]) == {"syllogism", "aiw", "knights_knaves", "propositional_logic"}
    assert "logic" not in r["trained_clusters"]
    rows = [json.loads(line) for line in (tmp_path / "f" / "mixture.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][1]["role"] == "assistant" for r in rows)  # a chat model gets chat turns
    assert json.loads((tmp_path / "f" / "flan_eval.json").read_text())["held_out"] == "logic"
    assert [len(v) for v in r["after"]["items"].values()] == [3] * 4  # each item's outcome is kept
    assert r["after"]["mean"] == sum(map(sum, r["after"]["items"].values())) / 12


def test_flan_proof_arms_resume_claims_and_plot(tiny_causal, tmp_path):
    """`slm flan proof` on a plain (no chat template) tiny model: the base is scored once, every arm tunes on the
    clusters it names (CoT or not) and is scored on the same held-out items; a rerun redoes only a missing arm;
    the FLAN and Flan-T5 claims carry seed intervals."""
    import copy

    from slmkit.methods.finetune import FinetuneArgs

    model = copy.deepcopy(tiny_causal.model)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "plain")
    tok = copy.deepcopy(tiny_causal.tokenizer)
    tok.chat_template = None  # a plain base, as the proof asks for
    tok.save_pretrained(tmp_path / "plain")
    args = FinetuneArgs(steps=2, batch_size=2, seq_len=128, eval_every=0, save_every=0, log_every=1)

    def proof():
        return flan.flan_proof(str(tmp_path / "plain"), seeds=2, scaling=[1], examples=40, eval_per_task=2,
                               cot_eval_per_task=1, lora=False, run="p", runs_dir=tmp_path, train_args=args,
                               progress=False)

    r = proof()
    run = tmp_path / "p"
    assert sorted(r["arms"]) == ["all-s0", "all-s1", "k1-s0", "nocot-s0", "nocot-s1"]
    assert r["held_out"] == ["classification", "extraction"] and len(r["arms"]["k1-s0"]["clusters"]) == 1
    assert set(r["task_clusters"].values()) == {"classification", "extraction"}
    assert all(arm["heldout"]["tasks"].keys() == r["task_clusters"].keys() for arm in r["arms"].values())
    assert "cot" in r["arms"]["nocot-s1"] and "cot" not in r["arms"]["k1-s0"]  # CoT prompts: the CoT comparison
    for name, arm in r["arms"].items():
        rows = [json.loads(line) for line in (run / "arms" / name / "mixture.jsonl").read_text().splitlines()]
        assert {row["cluster"] for row in rows} == set(arm["clusters"]) and arm["seed"] == int(name[-1])
        assert all(row["prompt"].endswith("\n") for row in rows)  # plain model: the answer on the next line
        assert arm["cot_data"] or not any(row["format"] == "cot" for row in rows)
    assert (run / "scaling.png").stat().st_size > 0
    assert flan.heldout.scaling_points(r) == [(0, [r["base"]["heldout"]["mean"]]), (1, [r["arms"]["k1-s0"]["heldout"][
        "mean"]]), (7, [r["arms"][f"all-s{i}"]["heldout"]["mean"] for i in (0, 1)])]
    kept = {n: (run / "arms" / n / "heldout.json").stat().st_mtime_ns for n in r["arms"]}
    (run / "arms" / "all-s1" / "heldout.json").unlink()
    again = proof()
    assert again["arms"]["all-s1"]["heldout"]["items"] == r["arms"]["all-s1"]["heldout"]["items"]
    assert all((run / "arms" / n / "heldout.json").stat().st_mtime_ns == t for n, t in kept.items() if n != "all-s1")
    claims = proof_claims("flan", run / "flan_proof.json", intervals=True)
    assert [c["claim"].rsplit(" on ", 1)[1] for c in claims] == [
        "the held-out clusters", "held-out classification", "held-out extraction"]
    cot = proof_claims("flan-t5-cot", run / "flan_proof.json", intervals=True)
    assert [c.get("margin", 0) for c in cot] == [0, 0.05]
    with pytest.raises(SlmError, match="unknown cluster 'nope'"):
        flan.flan_proof(str(tmp_path / "plain"), held_out=["nope"], run="q", runs_dir=tmp_path)
    with pytest.raises(SlmError, match="--scaling 7"):
        flan.flan_proof(str(tmp_path / "plain"), scaling=[7], run="q", runs_dir=tmp_path)


def test_flan_train_instruction_tunes_a_t5_with_lora(tiny_seq2seq, tmp_path):
    """The encoder-decoder path: the mixture stays prompt/completion, LoRA (seq2seq) trains and merges, and the
    tuned model generates and ranks options."""
    import copy

    from slmkit.evaluate import option_logprobs
    from slmkit.methods.finetune import FinetuneArgs
    from slmkit.models import load

    copy.deepcopy(tiny_seq2seq.model).save_pretrained(tmp_path / "t5")
    tok = copy.deepcopy(tiny_seq2seq.tokenizer)
    tok.chat_template = None  # as T5 tokenizers: no chat template
    tok.save_pretrained(tmp_path / "t5")
    r = flan.flan_train(str(tmp_path / "t5"), clusters=["arithmetic"], examples=48, run="ft", runs_dir=tmp_path,
                        train_args=FinetuneArgs(steps=16, batch_size=4, seq_len=128, lr=1e-2, eval_every=0,
                                                save_every=0, log_every=4), progress=False)
    assert r["val_loss"] < r["val_loss_before"] - 0.5, r
    rows = [json.loads(line) for line in (tmp_path / "ft" / "mixture.jsonl").read_text().splitlines()]
    assert rows and all("prompt" in row and "messages" not in row for row in rows)
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()
    tuned = load(r["model_dir"], dtype="fp32")
    assert tuned.task == "seq2seq" and "lora" not in " ".join(tuned.model.state_dict())
    scores = option_logprobs(tuned, "What is 2 + 2?", ["4", "five hundred"])
    assert len(scores) == 2 and scores[1] < scores[0] < 0  # more tokens, lower log-likelihood
    with pytest.raises(SlmError, match="mixture file not found"):
        flan.flan_train(str(tmp_path / "t5"), data=tmp_path / "none.jsonl", run="x", runs_dir=tmp_path)


def test_flan_build_command(tmp_path):
    out = tmp_path / "mix.jsonl"
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "flan", "build", "--out", str(out), "--examples", "60",
                        "--exclude", "classification", "--cot", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 40 and not any(row["format"] == "cot" for row in rows)
    assert {"prompt", "completion", "task", "cluster", "format"} <= rows[0].keys()
