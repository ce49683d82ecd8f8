"""Knowledge distillation and Length-Adaptive Distillation: the pruned encoder forward against transformers'
own forward, the attention-significance ranking, FLOP counts, the search, and the `slm distill` workflows
(classifier + LAD on tiny BERTs over MiniLM's tokenizer, LM distillation on tiny Llamas)."""

import json

import pytest
import torch
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.methods import length_adaptive as lad
from slmkit.methods.distill import distill
from slmkit.methods.finetune import FinetuneArgs
from slmkit.methods.kd import keep_layers, soft_cross_entropy


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from slmkit.models import load

    return load("all-minilm-l6-v2", dtype="fp32").tokenizer


def tiny_bert(tokenizer, layers=4, seed=0, labels=("ham", "spam")):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                        attn_implementation="eager")
    return BertForSequenceClassification(config).eval()


TEXTS = ["Win a free cruise now, click here to claim your prize today", "Meeting moved to Thursday at ten",
         "Cheap meds online, no prescription needed, order now", "Can you review my patch before lunch?"]


def test_pruned_forward_matches_transformers_and_keeps_the_most_attended_tokens(minilm_tokenizer):
    model = tiny_bert(minilm_tokenizer)
    batch = minilm_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, output_attentions=True)
        full = lad.pruned_forward(model, batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(full.logits, ref.logits, atol=1e-5)
        lengths = (1.0, 0.5, 0.5, 0.25)
        out = lad.pruned_forward(model, batch["input_ids"], batch["attention_mask"], lengths, restore=True)
    real = batch["attention_mask"].sum(1)
    # layer 1 sees, per input, ceil(0.5 * its tokens): [CLS] plus those layer 0 attended to most
    _, index, valid = out.states[1]
    significance = (ref.attentions[0] * batch["attention_mask"][:, None, :, None]).sum((1, 2))
    for b in range(len(TEXTS)):
        n = int(real[b])
        kept = set(index[b][valid[b]].tolist())
        assert len(kept) == -(-n // 2) and 0 in kept
        score = significance[b, :n].clone()
        score[0] = float("inf")
        assert kept == set(score.topk(len(kept)).indices.tolist())
        assert [len(set(i[b][v[b]].tolist())) for _, i, v in out.states] == lad.layer_tokens(lengths, n)
    # drop-and-restore: a token dropped after layer 0 keeps its layer-0 state; [CLS] ends with the last state
    h0 = out.states[0][0]
    dropped = next(p for p in range(int(real[0])) if p not in set(out.states[1][1][0].tolist()))
    assert torch.allclose(out.restored[0, dropped], h0[0, dropped])
    assert torch.allclose(out.restored[:, 0], out.states[-1][0][:, 0])


def test_roberta_prunes_too(tokenizer):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=130, num_labels=3, pad_token_id=1,
        attn_implementation="eager")).eval()
    ids = torch.randint(5, len(tokenizer), (2, 20))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(lad.pruned_forward(model, ids, mask).logits, model(input_ids=ids, attention_mask=mask)
                              .logits, atol=1e-5)
        assert lad.pruned_forward(model, ids, mask, (1.0, 0.5, 0.3)).states[2][0].shape[1] == 6


def test_lengths_flops_and_frontier(minilm_tokenizer):
    model = tiny_bert(minilm_tokenizer)
    full = lad.encoder_flops(model.config, None, [100])
    d, ff = 32, 64
    assert full == 4 * 2 * (4 * 100 * d * d + 2 * 100 * 100 * d + 2 * 100 * d * ff)
    assert lad.layer_tokens((1.0, 0.5, 0.3, 0.1), 100) == [100, 50, 30, 10]
    assert 2.0 < full / lad.encoder_flops(model.config, (1.0, 0.5, 0.3, 0.1), [100]) < 2.6
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = lad.sample_lengths(4, 0.5, gen)
        assert lengths[0] == 1.0 and all(0.5 * a - 1e-4 <= b <= a for a, b in zip(lengths, lengths[1:], strict=False))
        assert lad.check_lengths(lengths, 4, "x") == lengths
    assert lad.smallest_lengths(3, 0.5) == (1.0, 0.5, 0.25)
    with pytest.raises(SlmError, match="non-increasing"):
        lad.check_lengths([1.0, 0.5, 0.7, 0.2], 4, "cfg.json")
    with pytest.raises(SlmError, match="4 non-increasing"):
        lad.check_lengths([1.0, 0.5], 4, "cfg.json")
    points = [{"flops": 1, "accuracy": 0.5}, {"flops": 2, "accuracy": 0.4}, {"flops": 3, "accuracy": 0.9},
              {"flops": 2, "accuracy": 0.7}]
    assert [(p["flops"], p["accuracy"]) for p in lad.frontier(points)] == [(1, 0.5), (2, 0.7), (3, 0.9)]


def test_soft_cross_entropy_and_layer_cutting(minilm_tokenizer, tiny_causal):
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    probs = torch.softmax(logits / 2, -1)
    entropy = -(probs * probs.log()).sum(-1).mean() * 4
    assert torch.isclose(soft_cross_entropy(logits, probs, 2.0), entropy)  # minimum at the teacher itself
    assert soft_cross_entropy(logits.flip(-1), probs, 2.0) > entropy
    bert = keep_layers(tiny_bert(minilm_tokenizer, layers=4), [0, 3])
    assert bert.config.num_hidden_layers == 2 and len(bert.bert.encoder.layer) == 2
    ids = torch.tensor([[101, 2054, 102]])
    assert bert(input_ids=ids).logits.shape == (1, 2)
    import copy

    llama = keep_layers(copy.deepcopy(tiny_causal.model), [1])
    assert llama.model.layers[0].self_attn.layer_idx == 0 and llama.config.num_hidden_layers == 1
    assert llama.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    with pytest.raises(SlmError, match="student-layers"):
        keep_layers(tiny_bert(minilm_tokenizer), [0, 7])


def _spam_jsonl(path, n=120):
    rows = []
    for i in range(n):
        spam = i % 2 == 0
        words = (["free", "prize", "click", "winner", "cash"] if spam else
                 ["meeting", "review", "lunch", "patch", "notes"])
        rows.append({"text": f"{words[i % 5]} {words[(i * 3) % 5]} message number {i} {words[(i + 2) % 5]}",
                     "label": "spam" if spam else "ham"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_length_adaptive_distillation_workflow(tmp_path, minilm_tokenizer):
    """Teacher fine-tuned here, LAD stages 1-2, the plain-KD student, the search, the saved configuration
    and `slm classify` applying it: one end-to-end path on tiny BERTs."""
    from typer.testing import CliRunner

    from slmkit.cli import app

    teacher_dir = tmp_path / "tiny-bert"
    tiny_bert(minilm_tokenizer, layers=4).bert.save_pretrained(teacher_dir)  # an encoder: fine-tuned first
    minilm_tokenizer.save_pretrained(teacher_dir)
    data = _spam_jsonl(tmp_path / "spam.jsonl")
    args = FinetuneArgs(steps=30, batch_size=8, seq_len=16, lr=5e-3, warmup_steps=2, eval_every=0, save_every=0,
                        log_every=5, eval_batches=2)
    r = distill(str(teacher_dir), None, str(data), student_layers=[0, 1, 3], teacher_steps=30,
                length_adaptive=True, general_steps=10, candidates=6, val_size=20, test_size=30, run="lad",
                runs_dir=tmp_path, train_args=args, progress=False)
    run = tmp_path / "lad"
    assert r["teacher_test_accuracy"] >= 0.9, r  # the words give the label away
    assert r["lad"]["full"]["accuracy"] >= 0.8 and r["kd"]["full"]["accuracy"] >= 0.8, r
    assert r["student_parameters"] < r["teacher_parameters"]
    chosen = r["chosen_lengths"]
    assert len(chosen) == 3 and chosen[0] == 1.0 and r["lad"]["flops_ratio"] >= 1.0
    [c] = proof_claims("lad", tmp_path / "lad" / "distill.json", intervals=True)  # a bootstrap over test examples
    assert c["arms"] == {"pruned": r["lad"]["pruned"]["accuracy"], "unpruned": r["lad"]["full"]["accuracy"]}
    assert c["margin"] == 0.01 and len(r["lad"]["pruned"]["items"]) == r["examples"]["test"]
    for f in ("distill.json", "frontier.png", "search.json", "general/loss.png", "lad/model/length_config.json",
              "kd/model/config.json", "teacher/model/config.json"):
        assert (run / f).is_file(), f
    search = json.loads((run / "search.json").read_text())
    pruned_frontier = [p for p in search["frontier"] if p["lengths"] is not None]
    assert len(search["points"]) == 6 and len(search["test_curves"]["kd"]) == len(pruned_frontier)
    assert [c["lengths"] for c in search["test_curves"]["lad"]] == [p["lengths"] for p in pruned_frontier]
    again = distill(str(teacher_dir), None, str(data), student_layers=[0, 1, 3], length_adaptive=True,
                    val_size=20, test_size=30, run="lad", runs_dir=tmp_path, train_args=args, progress=False)
    assert again == r  # a finished run is reported, not retrained
    (run / "distill.json").unlink()  # finished stages are reloaded (with SDPA attention) and measured again
    again = distill(str(teacher_dir), None, str(data), student_layers=[0, 1, 3], length_adaptive=True,
                    candidates=6, val_size=20, test_size=30, run="lad", runs_dir=tmp_path, train_args=args,
                    progress=False)
    assert again["chosen_lengths"] == chosen and again["lad"]["full"]["accuracy"] == r["lad"]["full"]["accuracy"]
    model = run / "lad" / "model"
    labelled = lad.classify(str(model), ["free prize click", "meeting review notes"], seq_len=16)
    assert [x["label"] for x in labelled] == ["spam", "ham"] and labelled[0]["lengths"] == chosen
    result = CliRunner().invoke(app, ["classify", str(model), "cash winner prize", "--lengths", "1,0.5,0.5"])
    assert result.exit_code == 0 and result.output.startswith("spam"), result.output
    result = CliRunner().invoke(app, ["classify", str(model), "x", "--lengths", "1,0.5"])
    assert isinstance(result.exception, SlmError) and "--lengths: a length configuration is 3" in str(result.exception)
    searched = lad.prune_search(str(model), str(data), candidates=4, val_size=20, test_size=30, seq_len=16,
                                progress=False)
    assert searched["chosen"] == json.loads((model / "length_config.json").read_text())["lengths"]
    assert (model / "frontier.png").is_file()


def test_lm_distillation_lowers_the_students_loss_and_checks_vocabularies(tmp_path, tiny_causal, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher_dir = tmp_path / "teacher"
    tiny_causal.model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"the cat {i} sat on the mat. " * 30)
    args = FinetuneArgs(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0,
                        log_every=4, eval_batches=2)
    r = distill(str(teacher_dir), str(teacher_dir), str(corpus), task="lm", student_layers=[1],
                hidden_weight=0.1, attention_weight=0.1, run="lm", runs_dir=tmp_path, train_args=args,
                progress=False)
    rows = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < losses[0] and r["student_parameters"] < r["teacher_parameters"]
    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(SlmError, match="same tokenizer"):
        distill(str(teacher_dir), str(other), str(corpus), task="lm", run="bad",
                runs_dir=tmp_path, train_args=args, progress=False)
    with pytest.raises(SlmError, match="not a sequence classifier"):
        distill(str(teacher_dir), None, str(_spam_jsonl(tmp_path / "s.jsonl")), teacher_steps=0, val_size=10,
                test_size=10, run="c", runs_dir=tmp_path, train_args=args, progress=False)
