"""PET's members and their ensemble: one model per PVP, accuracy-weighted soft labels, iPET's pseudo-labelled
sets, and the final classifier that distils the soft labels."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.data.sft import ClassificationData
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs, accuracy, add_lora, classification_objective, classifier_from
from slmkit.methods.pet.cloze import PVP, Cloze, ClozeData, cloze_logits, pet_objective
from slmkit.train import train


@dataclass
class Member:
    """One trained PVP model, kept as its logits on the unlabelled and test sets."""

    pattern: int
    weight: float  # accuracy on the labelled set before training
    unlabeled: np.ndarray
    test: np.ndarray
    test_accuracy: float = 0.0


def logit_accuracy(logits: np.ndarray, gold: np.ndarray) -> float:
    return float((logits.argmax(-1) == gold).mean()) if len(gold) else 0.0


def ensemble_logits(members: list[Member], which: str) -> np.ndarray:
    """The members' logits averaged with their weights (accuracy before training)."""
    weights = np.array([max(m.weight, 1e-3) for m in members])
    stacked = np.stack([getattr(m, which) for m in members])
    return np.tensordot(weights / weights.sum(), stacked, axes=1)


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def pseudo_labelled(probs: np.ndarray, texts: list[str], labels: list[str], count: int, proportions: np.ndarray,
                    rng: np.random.Generator) -> list[dict]:
    """iPET's new training examples: per label (in the labelled set's proportions), unlabelled examples the
    ensemble assigns to it, drawn without replacement with probability proportional to its confidence."""
    chosen = []
    guess = probs.argmax(-1)
    for k, label in enumerate(labels):
        pool = np.flatnonzero(guess == k)
        want = min(len(pool), round(count * proportions[k]))
        if want:
            p = probs[pool, k] / probs[pool, k].sum()
            chosen += [{"text": texts[i], "label": label} for i in rng.choice(pool, want, replace=False, p=p)]
    return chosen


def train_member(source: str, pvp: PVP, index: int, labels: list[str], train_rows: list[dict], labelled: list[dict],
                 unlabeled: list[str], test: list[dict], args: FinetuneArgs, run_dir: Path, *, lora: bool,
                 aux_weight: float, progress: bool) -> Member:
    """Fine-tune one PVP model on `train_rows`; keep its logits on the unlabelled and test sets (the weights
    are dropped afterwards; the LoRA adapter stays in the run directory)."""
    import torch

    from slmkit.models import load

    done = run_dir / "member.npz"
    if done.is_file():
        saved = np.load(done)
        return Member(index, float(saved["weight"]), saved["unlabeled"], saved["test"], float(saved["test_accuracy"]))
    loaded = load(source, dtype="fp32", progress=False)
    if loaded.task not in ("causal-lm", "masked-lm") or loaded.tokenizer is None:
        raise SlmError(f"{source}: PET needs a causal or masked language model with a tokenizer")
    masked, tok = loaded.task == "masked-lm", loaded.tokenizer
    cloze = Cloze(tok, pvp, labels, args.seq_len, masked)
    net = loaded.model
    labelled_data = ClozeData(cloze, labelled, labels)
    before = cloze_logits(net, labelled_data, cloze.word_ids, masked)
    gold_labelled = np.array([labels.index(r["label"]) for r in labelled])
    weight = logit_accuracy(before, gold_labelled)
    torch.manual_seed(args.seed)  # the adapter's initialisation too: a stage gives the same model however it runs
    if lora:
        net = add_lora(net, 16, 32, 0.05, None if masked else "CAUSAL_LM")
    data = ClozeData(cloze, train_rows, labels, unlabeled if aux_weight else ())
    train(net, tok, data, labelled_data, pet_objective(cloze, aux_weight), args, run_dir,
          resume=True, config={"workflow": "pet", "model": source, "pattern": pvp.pattern,
                                 "verbalizer": pvp.verbalizer, "train_examples": len(train_rows)}, progress=progress)
    un = cloze_logits(net, ClozeData(cloze, [{"text": t, "label": labels[0]} for t in unlabeled], labels),
                      cloze.word_ids, masked, progress=f"pattern {index}: scoring the unlabelled set" if progress
                      else None)
    te = cloze_logits(net, ClozeData(cloze, test, labels), cloze.word_ids, masked,
                      progress=f"pattern {index}: scoring the test set" if progress else None)
    acc = logit_accuracy(te, np.array([labels.index(r["label"]) for r in test]))
    np.savez(run_dir / ".member.npz", weight=weight, unlabeled=un, test=te, test_accuracy=acc)
    (run_dir / ".member.npz").rename(done)
    for heavy in ("model", "checkpoints"):  # the logits are what the ensemble needs
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return Member(index, weight, un, te, acc)


class SoftLabelData(ClassificationData):
    """Texts with probability vectors over the labels (the ensemble's soft labels)."""

    def __init__(self, tokenizer, texts: list[str], probs: np.ndarray, seq_len: int):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.examples = [(tokenizer(t, truncation=True, max_length=seq_len).input_ids, p.tolist())
                         for t, p in zip(texts, probs, strict=True)]

    def collate(self, items):
        import torch

        batch = super().collate([(ids, 0) for ids, _ in items])
        batch["labels"] = torch.tensor([p for _, p in items], dtype=torch.float32)
        return batch


def soft_label_objective(temperature: float):
    from slmkit.methods.kd import soft_cross_entropy

    def objective(model, batch, generator):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return soft_cross_entropy(logits, batch["labels"], temperature), len(logits)

    return objective


def train_classifier(source: str, labels: list[str], rows: list[dict] | None, soft: tuple[list[str], np.ndarray] | None,
                     test: list[dict], args: FinetuneArgs, run_dir: Path, *, lora: bool, temperature: float,
                     progress: bool) -> dict:
    """A sequence classifier over `source` trained on hard labels (`rows`: the plain fine-tuning baseline) or on
    soft labels (`soft`: PET's final model); returns its test accuracy."""
    import torch

    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.manual_seed(args.seed)  # the new head and the adapter: the same classifier whatever ran before
    net, tok = classifier_from(source, labels)
    if lora:
        net = add_lora(net, 16, 32, 0.05, "SEQ_CLS")
    test_set = ClassificationData(tok, test, labels, args.seq_len)
    if soft is None:
        data, objective = ClassificationData(tok, rows, labels, args.seq_len), classification_objective
    else:
        data, objective = SoftLabelData(tok, *soft, args.seq_len), soft_label_objective(temperature)
    train(net, tok, data, data, objective, args, run_dir, resume=True,
          config={"workflow": "pet", "model": source, "stage": run_dir.name, "train_examples": len(data)},
          progress=progress)
    result = {"test_accuracy": accuracy(net, test_set), "train_examples": len(data)}
    done.write_text(json.dumps(result) + "\n")
    return result
