"""PET and iPET (Schick & Schütze, 2021: "Exploiting Cloze Questions for Few Shot Text Classification and
Natural Language Inference"; "It's Not Just Size That Matters: Small Language Models Are Also Few-Shot
Learners").

Classification as a cloze question. A *pattern* turns an input into text with a mask slot
("{text} All in all, this email is {mask}."), a *verbalizer* maps each label to a word (spam → "spam",
ham → "fine"); a pattern-verbalizer pair (PVP) scores a label by the language model's logit for its word at
the mask. With a masked LM the slot is the mask token; with a causal LM the text up to `{mask}` is the prompt
and each word is scored as the next token.

PET, with a handful of labelled examples and many unlabelled ones:
1. one model per PVP is fine-tuned on the labelled examples: cross-entropy over the verbalizer logits, plus
   a small auxiliary language-modelling loss on unlabelled text (weight `aux_weight`, 1e-4 as in PET);
2. the ensemble (each member weighted by its accuracy on the labelled set before training) soft-labels the
   unlabelled set: softmax of the weighted mean logits at temperature T = 2;
3. a final sequence classifier learns those soft labels (`slmkit.methods.kd.soft_cross_entropy`).
iPET repeats step 1 in generations: each member of generation g trains on the labels plus examples the
ensemble of a random subset of the other generation-(g-1) members labelled, drawn with probability
proportional to confidence and in the labelled set's label proportions, the set growing `growth`-fold per
generation; the last generation's ensemble labels the data for the final classifier.

`pet()` also trains the plain fine-tuning baseline (the same model with a classification head on the same
labels) and reports every accuracy on one held-out test set.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.data.sft import ClassificationData, SFTData, load_classification, split_rows
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs, accuracy, add_lora, classification_objective, classifier_from
from slmkit.train import RUNS_DIR, train

# --- pattern-verbalizer pairs ----------------------------------------------------------------------------


@dataclass
class PVP:
    pattern: str  # holds {text} and {mask}
    verbalizer: dict[str, str]  # label -> word

    def __post_init__(self):
        if "{text}" not in self.pattern or self.pattern.count("{mask}") != 1:
            raise SlmError(f"pattern {self.pattern!r} needs one {{text}} and one {{mask}}")


DEFAULT_PVPS = {
    "spam-assassin": {
        "verbalizer": {"spam": "spam", "ham": "fine"},
        "patterns": ["{text}\nQuestion: is this email spam? Answer: it is {mask}",
                     "Email:\n{text}\nThis email looks {mask}",
                     "{text}\nIn one word, the message above is {mask}"],
    },
}


def load_pvps(data: str, pvps: str | None) -> list[PVP]:
    """PVPs from a YAML file ({verbalizer: {label: word}, patterns: [...]}), or the packaged ones for `data`."""
    import yaml

    if pvps is None:
        if data not in DEFAULT_PVPS:
            raise SlmError(f"no packaged patterns for '{data}': pass --pvps FILE.yaml with `verbalizer:` and "
                           "`patterns:`")
        spec = DEFAULT_PVPS[data]
    else:
        path = Path(pvps)
        if not path.is_file():
            raise SlmError(f"patterns file not found: {path}")
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec.get("verbalizer"), dict) or not isinstance(spec.get("patterns"), list):
            raise SlmError(f"{path}: needs `verbalizer:` (label: word) and `patterns:` (a list of templates)")
    return [PVP(p, {str(k): str(v) for k, v in spec["verbalizer"].items()}) for p in spec["patterns"]]


class Cloze:
    """How one model reads one PVP: the token ids of a filled-in pattern, the position whose logits score the
    verbalizer words, and the word token ids."""

    def __init__(self, tokenizer, pvp: PVP, labels: list[str], max_len: int, masked: bool):
        missing = [label for label in labels if label not in pvp.verbalizer]
        if missing:
            raise SlmError(f"the verbalizer has no word for label '{missing[0]}'")
        self.tok, self.pvp, self.max_len, self.masked = tokenizer, pvp, max_len, masked
        if masked and tokenizer.mask_token_id is None:
            raise SlmError("this tokenizer has no mask token: use a causal LM or a masked LM with one")
        self.head, tail = pvp.pattern.split("{mask}")
        self.tail = tail if masked else ""  # a causal LM stops reading at the slot
        self.word_ids = []
        for label in labels:
            ids = tokenizer(" " + pvp.verbalizer[label], add_special_tokens=False).input_ids
            self.word_ids.append(ids[0])  # a word is scored by its first token
        if len(set(self.word_ids)) < len(labels):
            raise SlmError(f"verbalizer words {list(pvp.verbalizer.values())} share a first token; choose words "
                           "that differ from the first letter on")
        skeleton = (self.head + self.tail).replace("{text}", "")  # the pattern's own tokens, plus room for specials
        self.text_budget = max(8, max_len - len(tokenizer(skeleton, add_special_tokens=False).input_ids) - 4)

    def encode(self, text: str) -> tuple[list[int], int]:
        """(input ids, position scored); the text is cut so the pattern always fits `max_len`."""
        text = self.tok.decode(self.tok(text, add_special_tokens=False).input_ids[:self.text_budget])
        prompt = self.head.replace("{text}", text).rstrip()
        ids = self.tok(prompt).input_ids
        if not self.masked:
            return ids, len(ids) - 1
        if ids and ids[-1] == self.tok.sep_token_id:  # encoder tokenizers close the sequence: reopen it
            ids = ids[:-1]
        position = len(ids)
        ids = ids + [self.tok.mask_token_id] + self.tok(self.tail.replace("{text}", text), add_special_tokens=False
                                                        ).input_ids
        if self.tok.sep_token_id is not None:
            ids.append(self.tok.sep_token_id)
        return ids, position


class ClozeData(SFTData):
    """Filled-in patterns with their labels, batched like SFTData; causal LMs are padded on the left so the
    scored position is the last one. With `unlabeled` texts every training batch also carries a batch of them
    for the auxiliary language-modelling loss."""

    def __init__(self, cloze: Cloze, rows: list[dict], labels: list[str], unlabeled: list[str] = ()):
        tok = cloze.tok
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.left = not cloze.masked
        index = {label: i for i, label in enumerate(labels)}
        self.examples = [(*cloze.encode(r["text"]), index[r["label"]]) for r in rows]
        self.unlabeled = [tok(t, truncation=True, max_length=cloze.max_len).input_ids for t in unlabeled]

    def pad_rows(self, seqs: list[list[int]], left: bool):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, span], mask[row, span] = torch.tensor(s), 1
        return ids, mask

    def collate(self, items):
        import torch

        ids, mask = self.pad_rows([i for i, _, _ in items], self.left)
        positions = [ids.shape[1] - 1 if self.left else p for _, p, _ in items]
        return {"input_ids": ids, "attention_mask": mask, "positions": torch.tensor(positions),
                "labels": torch.tensor([label for *_, label in items])}

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        batch = super().train_batch(step, batch_size, seq_len, seed, rank, world)
        if self.unlabeled:
            pick = np.random.default_rng([seed, step, rank]).choice(len(self.unlabeled), batch_size)
            batch["aux_ids"], batch["aux_mask"] = self.pad_rows([self.unlabeled[i] for i in pick], left=False)
        return batch


def verbalizer_logits(model, batch, word_ids: list[int], masked: bool):
    """[batch, labels] logits of each label's word at each example's scored position (fp32)."""
    import torch

    mask = batch["attention_mask"]
    if masked:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        logits = logits[torch.arange(len(logits)), batch["positions"]]
    else:  # left-padded: the last position; positions count real tokens only; the head runs there only
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1).logits[:, -1]
    return logits[:, word_ids].float()


def pet_objective(cloze: Cloze, aux_weight: float):
    """PET's loss: (1 - a) * cross-entropy over the verbalizer logits + a * language-modelling loss on
    unlabelled text (masked tokens for a masked LM, next tokens for a causal LM)."""
    import torch

    from slmkit.methods.pretrain import mask_tokens

    def objective(model, batch, generator):
        loss = torch.nn.functional.cross_entropy(verbalizer_logits(model, batch, cloze.word_ids, cloze.masked),
                                                 batch["labels"])
        if aux_weight and "aux_ids" in batch:
            ids, mask = batch["aux_ids"], batch["aux_mask"]
            if cloze.masked:
                inputs, targets = mask_tokens(ids.cpu(), cloze.tok, generator)
                inputs, targets = inputs.to(ids.device), targets.to(ids.device)
            else:
                inputs, targets = ids, ids.masked_fill(mask == 0, -100)
            lm = model(input_ids=inputs, attention_mask=mask, labels=targets).loss
            loss = (1 - aux_weight) * loss + aux_weight * lm
        return loss, len(batch["labels"])

    return objective


def cloze_logits(model, data: ClozeData, word_ids: list[int], masked: bool, batch_size: int = 16,
                 progress: str | None = None) -> np.ndarray:
    """Verbalizer logits of every example; `progress`: the description of a progress bar (None: no bar)."""
    import torch

    from slmkit.progress import Progress

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), Progress(disable=progress is None) as bar:
        task = bar.add_task(progress or "", total=len(data))
        for start in range(0, len(data), batch_size):
            batch = data.collate(data.examples[start:start + batch_size])
            out.append(verbalizer_logits(model, batch, word_ids, masked).numpy())
            bar.advance(task, len(batch["labels"]))
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, len(word_ids)), dtype=np.float32)


# --- the PET workflow ------------------------------------------------------------------------------------


@dataclass
class Member:
    """One trained PVP model, kept as its logits on the unlabelled and test sets."""

    pattern: int
    weight: float  # accuracy on the labelled set before training
    unlabeled: np.ndarray
    test: np.ndarray
    test_accuracy: float = 0.0


def _accuracy(logits: np.ndarray, gold: np.ndarray) -> float:
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
    weight = _accuracy(before, gold_labelled)
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
    acc = _accuracy(te, np.array([labels.index(r["label"]) for r in test]))
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


def split_data(rows: list[dict], train_size: int, unlabeled_size: int, test_size: int, seed: int):
    """A fixed test set and unlabelled pool (the same for every seed) and `train_size` labelled examples drawn
    with `seed` from the rest."""
    if len(rows) < test_size + unlabeled_size + train_size:
        raise SlmError(f"{len(rows)} examples are too few for {train_size} labelled + {unlabeled_size} unlabelled + "
                       f"{test_size} test")
    rest, unlabeled_rows, test = split_rows(rows, unlabeled_size, test_size)
    unlabeled = [r["text"] for r in unlabeled_rows]
    labelled = [rest[i] for i in np.random.default_rng(seed).choice(len(rest), train_size, replace=False)]
    if len({r["label"] for r in labelled}) < 2:
        raise SlmError(f"seed {seed}: the {train_size} labelled examples hold one label only; use more")
    return labelled, unlabeled, test


def pet(
    model: str | None = None,
    data: str = "spam-assassin",
    pvps: str | None = None,
    train_size: int = 32,
    unlabeled_size: int = 500,
    test_size: int = 500,
    seeds: list[int] | None = None,
    ipet: int = 0,
    growth: int = 5,
    others: float = 0.25,
    aux_weight: float = 1e-4,
    temperature: float = 2.0,
    lora: bool = True,
    final_steps: int = 0,
    baseline: bool = True,
    run: str = "pet",
    runs_dir: Path = RUNS_DIR,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """PET / iPET: cloze patterns + verbalizers learn from a few labels; the pattern models' ensemble labels unlabelled
    text for a final classifier. Reports test accuracy against plain fine-tuning, per seed.

    PET (and with `ipet` > 0, iPET for that many generations) from `train_size` labelled examples of `data`
    ({"text", "label"} JSONL or a packaged set), against plain fine-tuning of the same model, per seed.

    `model` is a causal LM (default: the embedded model; each label word is scored as the next word) or a masked
    LM (scored at its mask token). `pvps` is a YAML file of patterns and a verbalizer (packaged for
    spam-assassin). Every stage keeps its result in the run directory: a rerun skips what is done, and
    an interrupted stage continues from its last checkpoint.

    Args:
        data: Labelled {"text", "label"} JSONL or a packaged set (spam-assassin, chatterbot-topics).
        pvps: YAML with `verbalizer:` (label: word) and `patterns:` (templates with {text} and {mask}); packaged for
            spam-assassin.
        train_size: Labelled examples.
        unlabeled_size: Unlabelled examples (labels hidden).
        test_size: Held-out test examples.
        seeds: Seeds for the labelled draw and training (repeatable; default 0; replaces --seed).
        ipet: iPET generations after PET (0 = PET only).
        growth: iPET: training-set growth factor per generation.
        others: iPET: the fraction of the other pattern models whose ensemble labels each model's next set.
        aux_weight: Weight of the auxiliary LM loss on unlabelled text.
        temperature: Soft-label temperature for the final classifier.
        final_steps: Steps for the final classifier (0 = --steps).
        baseline: Also fine-tune the same model plainly on the labels.
    """
    from dataclasses import replace

    args = (train_args or FinetuneArgs()).validate()
    source = model or "smollm2-135m"
    pairs = load_pvps(data, pvps)
    rows = load_classification(data)
    labels = sorted({r["label"] for r in rows})
    if ipet < 0 or growth < 1 or not 0 < others <= 1:
        raise SlmError("--ipet must be >= 0, --growth >= 1 and --others in (0, 1]")
    run_dir = Path(runs_dir) / run
    per_seed = []
    for seed in seeds or [0]:
        labelled, unlabeled, test = split_data(rows, train_size, unlabeled_size, test_size, seed)
        gold = np.array([labels.index(r["label"]) for r in test])
        proportions = np.array([sum(r["label"] == label for r in labelled) for label in labels]) / len(labelled)
        seed_dir, seed_args = run_dir / f"seed-{seed}", replace(args, seed=seed)
        final_args = replace(seed_args, steps=final_steps or args.steps)
        common = {"lora": lora, "progress": progress}
        result: dict = {"seed": seed, "labelled": len(labelled), "unlabeled": len(unlabeled), "test": len(test)}
        if baseline:
            result["fine-tuning"] = train_classifier(source, labels, labelled, None, test, seed_args,
                                                     seed_dir / "fine-tuning", temperature=temperature,
                                                     **common)["test_accuracy"]
        generation: list[Member] = []
        for g in range(ipet + 1):
            rng = np.random.default_rng([seed, g])
            previous, generation = generation, []
            for k, pvp in enumerate(pairs):
                train_rows = labelled
                if g:  # iPET: labels from the ensemble of a random subset of the other members
                    pool = [m for m in previous if m.pattern != k] or previous
                    pick = rng.choice(len(pool), max(1, round(others * len(pool))), replace=False)
                    probs = softmax(ensemble_logits([pool[i] for i in pick], "unlabeled"))
                    train_rows = labelled + pseudo_labelled(probs, unlabeled, labels,
                                                            len(labelled) * (growth ** g - 1), proportions, rng)
                generation.append(train_member(source, pvp, k, labels, train_rows, labelled, unlabeled, test,
                                               seed_args, seed_dir / f"gen-{g}" / f"pattern-{k}",
                                               aux_weight=aux_weight, **common))
            result[f"gen-{g}"] = {"patterns": [m.test_accuracy for m in generation],
                                  "ensemble": _accuracy(ensemble_logits(generation, "test"), gold),
                                  "train_examples": len(train_rows)}
            if g in (0, ipet):
                soft = softmax(ensemble_logits(generation, "unlabeled"), temperature)
                name = "pet" if g == 0 else "ipet"
                result[name] = train_classifier(source, labels, None, (unlabeled, soft), test, final_args,
                                                seed_dir / name, temperature=temperature, **common)["test_accuracy"]
        per_seed.append(result)
    methods = [m for m in ("fine-tuning", "pet", "ipet") if m in per_seed[0]]
    summary = {"model": source, "data": data, "train_size": train_size, "seeds": [r["seed"] for r in per_seed],
               "mean": {m: float(np.mean([r[m] for r in per_seed])) for m in methods},
               "std": {m: float(np.std([r[m] for r in per_seed])) for m in methods}, "per_seed": per_seed}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pet.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_pet(summary, run_dir / "pet.png")
    return summary


def plot_pet(summary: dict, out: Path) -> Path | None:
    """Test accuracy per method: mean over seeds with the spread, and each seed as a dot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary["mean"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(methods, [summary["mean"][m] for m in methods], yerr=[summary["std"][m] for m in methods], capsize=6,
           color=["#999999", "#4c72b0", "#55a868"][:len(methods)])
    for i, m in enumerate(methods):
        ax.plot([i] * len(summary["per_seed"]), [r[m] for r in summary["per_seed"]], "k.", alpha=0.6)
    low = min(r[m] for r in summary["per_seed"] for m in methods)
    ax.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.1), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{summary['data']}: {summary['train_size']} labels, {len(summary['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(r: dict, args: dict, out) -> None:
    """Print what `slm pet` reports."""
    from rich.table import Table

    run = args["run"]
    runs_dir = args["runs_dir"]
    table = Table("method", "mean", "std", *[f"seed {s}" for s in r["seeds"]],
                  title=f"{r['data']}: {r['train_size']} labels, test accuracy")
    for m in r["mean"]:
        table.add_row(m, f"{r['mean'][m]:.3f}", f"{r['std'][m]:.3f}", *[f"{s[m]:.3f}" for s in r["per_seed"]])
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'pet.json'}, plot -> {Path(runs_dir) / run / 'pet.png'}")
