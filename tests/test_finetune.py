"""Supervised fine-tuning: answer-only loss masks, data errors, LoRA SFT of the embedded model, resume."""

import json
import shutil

import pytest

from slmkit.data import sft
from slmkit.data.sft import chat_example, completion_example, load_records
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs, finetune
from slmkit.models import load
from slmkit.train import read_metrics

FACTS = [("Zorblat", "teal"), ("Mivvik", "amber"), ("Quenzor", "violet"), ("Drapple", "crimson"),
         ("Snorvin", "olive"), ("Plimbus", "indigo"), ("Vostrel", "maroon"), ("Grumbix", "silver"),
         ("Yarnock", "coral"), ("Feltwin", "ivory"), ("Hobblex", "jade"), ("Trenlow", "scarlet")]


def _answered(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])


def test_chat_loss_mask_covers_every_assistant_turn_only(tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue."}]
    ids, labels = chat_example(tokenizer, msgs)
    trained = _answered(tokenizer, ids, labels)
    assert "Hello!" in trained and "Blue." in trained
    assert "Hi there" not in trained and "Name a colour" not in trained and "helpful assistant" not in trained
    assert trained.count("<|im_end|>") == 2  # the model learns to end its turns


def test_completion_loss_mask(tokenizer):
    ids, labels = completion_example(tokenizer, "Q: 2+2?\nA:", " 4")
    assert _answered(tokenizer, ids, labels) == " 4" + tokenizer.eos_token


def test_seq2seq_examples_one_per_answer(tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue."}]
    (in1, out1), (in2, out2) = sft.seq2seq_examples(tokenizer, msgs)
    assert tokenizer.decode(in1) == "Hi there" and tokenizer.decode(out1) == "Hello!" + tokenizer.eos_token
    assert tokenizer.decode(in2) == "Hi there\nHello!\nName a colour" and tokenizer.decode(out2).startswith("Blue.")
    [(i, o)] = sft.seq2seq_examples(tokenizer, ("Q: 2+2?", "4"))
    assert tokenizer.decode(i) == "Q: 2+2?" and tokenizer.decode(o) == "4" + tokenizer.eos_token


def test_group_by_length_keeps_a_seeded_epoch_and_cuts_padding(tokenizer):
    import random

    rng = random.Random(0)
    records = [("x " * rng.randint(1, 120), "y") for _ in range(300)]
    plain = sft.SFTData(tokenizer, records, 256)
    grouped = sft.SFTData(tokenizer, records, 256, group_by_length=True)
    order = grouped.order(seed=3, epoch=0, batch_size=8)
    assert sorted(order.tolist()) == list(range(300))  # every example once per epoch
    assert (order == sft.SFTData(tokenizer, records, 256, group_by_length=True).order(3, 0, 8)).all()
    assert not (order == grouped.order(3, 1, 8)).all()

    def padding(data):
        batches = [data.train_batch(step, 8, 256, seed=3) for step in range(30)]
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(grouped) < padding(plain) / 4


def test_sft_data_errors(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(SlmError, match=r"sft.jsonl:2: the conversation has no assistant turn"):
        load_records(str(f))
    f.write_text('{"question": "a"}\n')
    with pytest.raises(SlmError, match=r"sft.jsonl:1: expected \"messages\""):
        load_records(str(f))
    with pytest.raises(SlmError, match="no fine-tuning data named"):
        load_records("nowhere.jsonl")
    assert len(load_records("chatterbot-en")) > 100


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "facts.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What colour is a {thing}?"},
                          {"role": "assistant", "content": f"A {thing} is {colour}."}]} for thing, colour in FACTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_sft_lowers_held_out_answer_loss_and_resumes(tmp_path, facts_file, smol):
    args = dict(steps=16, batch_size=4, seq_len=96, eval_every=0, save_every=8, log_every=2, lr=1e-3)
    s = finetune(data=str(facts_file), val_fraction=0.25, run="lora", runs_dir=tmp_path,
                 train_args=FinetuneArgs(**args), progress=False)
    assert s["val_loss"] < s["val_loss_before"] - 0.3, s  # the answer pattern carries to unseen facts
    assert s["trainable_parameters"] < 0.1 * smol.model.num_parameters()
    run = tmp_path / "lora"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    merged = load(str(run / "model"), dtype="fp32")  # a plain HF model: the adapter is merged in
    assert merged.model.num_parameters() == smol.model.num_parameters()
    assert "lora" not in " ".join(merged.model.state_dict())

    # resume: continue a copy of the run from its step-8 checkpoint; the curve must match the original
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(run / "checkpoints" / "step-0000008", copy / "checkpoints" / "step-0000008")
    (copy / "checkpoints" / "latest").write_text("step-0000008")
    shutil.copy(run / "metrics.jsonl", copy / "metrics.jsonl")
    finetune(data=str(facts_file), val_fraction=0.25, run="copy", runs_dir=tmp_path, resume=True,
             train_args=FinetuneArgs(**args), progress=False)
    a = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(copy) if "loss" in r}
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4


def test_minilm_classifier_learns_chatterbot_topics(tmp_path):
    """A real encoder (packaged MiniLM) with a new head, on a real 4-topic question set."""
    s = finetune(task="classify", data="chatterbot-topics", val_fraction=0.2, run="topics", runs_dir=tmp_path,
                 train_args=FinetuneArgs(steps=40, batch_size=16, seq_len=64, lr=1e-4, warmup_steps=4,
                                         eval_every=0, save_every=0, log_every=10), progress=False)
    assert s["val_accuracy"] >= 0.75 and s["val_accuracy"] > s["val_accuracy_before"] + 0.3, s
    classifier = load(str(tmp_path / "topics" / "model"), dtype="fp32")
    assert classifier.task == "classifier"
    assert set(classifier.model.config.id2label.values()) == {"ai", "coding", "psychology", "trivia"}


def test_classification_data_errors(tmp_path):
    from slmkit.data.sft import load_classification

    f = tmp_path / "cls.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(SlmError, match=r"cls.jsonl:2: a classification example needs"):
        load_classification(str(f))
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(SlmError, match="at least two different labels"):
        load_classification(str(f))


def test_answer_only_head_matches_the_full_model_loss(tiny_causal, tokenizer):
    """sft_objective computes logits only where answers are scored; the loss must equal HF's own."""
    import torch

    from slmkit.data.sft import SFTData
    from slmkit.methods.finetune import sft_objective

    records = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Answer " * i}]
               for i in range(1, 5)]
    batch = SFTData(tokenizer, records, seq_len=128).collate(SFTData(tokenizer, records, 128).examples)
    with torch.no_grad():
        ours, n = sft_objective(tiny_causal.model, batch, None)
        full = tiny_causal.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum()) and abs(float(ours) - float(full)) < 1e-5


def test_qlora_trains_adapters_on_a_4bit_base_and_saves_a_full_precision_model(tmp_path, facts_file, tokenizer):
    """QLoRA (bitsandbytes NF4 on CPU) with TensorBoard logging on a small random Llama."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("tensorboard")
    import torch
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.models import save_pretrained_atomic

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    base_dir = save_pretrained_atomic(LlamaForCausalLM(config), tokenizer, tmp_path / "base")
    args = FinetuneArgs(steps=12, batch_size=4, seq_len=64, eval_every=0, save_every=6, log_every=2, lr=1e-2,
                        tensorboard=True)
    s = finetune(str(base_dir), str(facts_file), val_fraction=0.25, qlora=True, run="q", runs_dir=tmp_path,
                 train_args=args, progress=False)
    assert s["val_loss"] < s["val_loss_before"], s
    assert json.loads((tmp_path / "q" / "config.json").read_text())["qlora"] is True
    quantised = load(str(base_dir), dtype="fp32", quantize="nf4").model
    assert type(quantised.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert quantised.get_memory_footprint() < load(str(base_dir), dtype="fp32").model.get_memory_footprint()
    merged = load(str(tmp_path / "q" / "model"), dtype="fp32").model  # a plain fp32 model
    assert "lora" not in " ".join(merged.state_dict()) and merged.dtype == torch.float32
    reference = PeftModel.from_pretrained(load(str(base_dir), dtype="fp32").model, tmp_path / "q" / "adapter")
    ids = torch.tensor([tokenizer("What colour is a Zorblat?").input_ids])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
    events = EventAccumulator(str(tmp_path / "q" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8, 10, 12] and "val_loss" in events.Tags()["scalars"]
    with pytest.raises(SlmError, match="--qlora trains LoRA adapters"):
        finetune(str(base_dir), str(facts_file), lora=False, qlora=True, runs_dir=tmp_path)
    with pytest.raises(SlmError, match="random-initialised spec"):
        load("tinyllama-nano", quantize="nf4")


def test_split_rows_keeps_groups_together_and_plain_rows_in_the_old_order(tmp_path):
    import numpy as np

    from slmkit.data.sft import load_classification, split_rows

    plain = [{"text": f"t{i}", "label": str(i % 2)} for i in range(50)]
    train, val, test = split_rows(plain, 5, 10)
    order = np.random.default_rng(12345).permutation(50)  # the seeded order every earlier run used
    assert [r["text"] for r in test] == [f"t{i}" for i in order[:10]] and len(val) == 5 and len(train) == 35
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"passage {i}", "label": str(i % 3), "group": f"doc{i // 7}"}) + "\n"
                         for i in range(70)))
    rows = load_classification(str(f))
    train, val, test = split_rows(rows, 10, 10)
    groups = [{r["group"] for r in part} for part in (train, val, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(test) == 14 and len(val) == 14 and len(train) == 42  # whole documents of 7 passages
    with pytest.raises(SlmError, match="groups of examples are too few"):
        split_rows(rows, 30, 35)


def test_brown_genres_are_passages_labelled_by_coarse_genre():
    from collections import Counter

    from slmkit.data.sft import load_classification

    rows = load_classification("brown-genres")
    labels = Counter(r["label"] for r in rows)
    assert set(labels) == {"press", "nonfiction", "learned", "fiction"} and min(labels.values()) > 1000
    assert len({r["group"] for r in rows}) == 500 and all(len(r["text"].split()) == 90 for r in rows)
    assert rows[0]["group"] == "ca01" and rows[0]["label"] == "press"
