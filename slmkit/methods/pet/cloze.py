"""PET's pattern-verbalizer pairs and cloze scoring: the mask slot for masked LMs, the next word for causal LMs;
the PET objective (cross-entropy over verbalizer logits plus an auxiliary LM loss)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.data.sft import SFTData
from slmkit.errors import SlmError


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
