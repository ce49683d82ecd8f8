"""Supervised fine-tuning (SFT) of a language model on chat or prompt/completion data.

The loss is on answer tokens only: for chat data every assistant turn is trained (multi-turn masking) and
user/system turns are context; for prompt/completion data the completion (and end token) is trained.
Fine-tuning is full, or LoRA adapters (`peft`) on every linear layer, merged into the saved model at the end
(the adapter is kept beside it). Runs go through the one training loop in `slmkit/train.py`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmkit.errors import SlmError
from slmkit.train import TrainArgs, evaluate, train


@dataclass
class FinetuneArgs(TrainArgs):
    """TrainArgs with fine-tuning defaults (short, low learning rate, no weight decay)."""

    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Examples per process per micro-batch."})
    seq_len: int = field(default=512, metadata={"help": "Longest example in tokens (longer ones are cut)."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (LoRA; use ~2e-5 for full)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)."})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    eval_every: int = field(default=50, metadata={"help": "Steps between validation runs (0 = only at end)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0 = only at end)."})


# --- data ------------------------------------------------------------------------------------------------


def chatterbot_conversations(language: str = "english") -> list[list[dict]]:
    """The English dialogues of the PyPI package `chatterbot-corpus` as chat messages."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SlmError("the chatterbot corpus is not installed: run `pip install --no-deps chatterbot-corpus`")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    conversations = []
    for path in sorted(root.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in turns if t is not None]
            if len(turns) >= 2:
                conversations.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)])
    return conversations


PACKAGED = {"chatterbot-en": chatterbot_conversations}


def load_records(source: str) -> list[list[dict] | tuple[str, str]]:
    """Chat conversations (lists of messages) or (prompt, completion) pairs from a packaged set or JSONL."""
    from slmkit.data.corpora import read_jsonl

    if source in PACKAGED:
        return PACKAGED[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlmError(f"no fine-tuning data named '{source}' (a .jsonl file, or one of: {', '.join(PACKAGED)})")
    records = []
    for where, row in read_jsonl(path):
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in msgs):
                raise SlmError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
            if not any(m["role"] == "assistant" for m in msgs):
                raise SlmError(f"{where}: the conversation has no assistant turn to learn from")
            records.append(msgs)
        elif "prompt" in row and "completion" in row:
            records.append((str(row["prompt"]), str(row["completion"])))
        else:
            raise SlmError(f"{where}: expected \"messages\" or \"prompt\" + \"completion\" fields")
    if not records:
        raise SlmError(f"{path} holds no examples")
    return records


def chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; labels are -100 except on assistant turns."""
    from slmkit.generate import format_prompt

    full = _without_generation_prompt(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            prefix = format_prompt(tokenizer, messages[:i])  # the context, ending with the assistant header
            if not full.startswith(prefix):
                raise SlmError("the chat template does not render conversations incrementally; use "
                               "prompt/completion data for this model")
            spans.append((len(prefix), len(_without_generation_prompt(tokenizer, messages[:i + 1]))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if any(s <= a and b <= e for s, e in spans) and b > a else -100
              for tid, (a, b) in zip(enc.input_ids, enc.offset_mapping, strict=True)]
    return enc.input_ids, labels


def _without_generation_prompt(tokenizer, messages):
    from slmkit.generate import DEFAULT_SYSTEM

    if not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def completion_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=True).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


class SFTData:
    """Tokenised examples served as padded batches in a (seed, step)-determined order, like PackedTokens."""

    def __init__(self, tokenizer, records, seq_len: int):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples = []
        for r in records:
            ids, labels = chat_example(tokenizer, r) if isinstance(r, list) else completion_example(tokenizer, *r)
            ids, labels = ids[:seq_len], labels[:seq_len]
            if any(label != -100 for label in labels):
                self.examples.append((ids, labels))
        if not self.examples:
            raise SlmError("no example has an answer within --seq-len tokens")

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, items):
        import torch

        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (i, lab) in enumerate(items):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(lab)] = torch.tensor(lab)
            mask[row, :len(i)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        n = len(self.examples)
        items = []
        for j in range(batch_size):
            epoch, pos = divmod((step * world + rank) * batch_size + j, n)
            items.append(self.examples[int(np.random.default_rng([seed, epoch]).permutation(n)[pos])])
        return self.collate(items)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int):
        for start in range(0, min(len(self.examples), batch_size * max_batches), batch_size):
            yield self.collate(self.examples[start:start + batch_size])


def sft_objective(model, batch, generator):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, int((batch["labels"][:, 1:] != -100).sum())


# --- the workflow ----------------------------------------------------------------------------------------


def split(records, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, round(len(records) * val_fraction))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def add_lora(model, r: int, alpha: int, dropout: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def finetune(
    model: str | None = None,
    data: str = "chatterbot-en",
    val_data: str | None = None,
    val_fraction: float = 0.1,
    lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    run: str = "finetune",
    runs_dir: Path = Path("runs"),
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune a causal LM (default: the embedded model) on chat or prompt/completion data; returns the
    run summary with the held-out answer loss before and after."""
    from slmkit.models import load

    args = (train_args or FinetuneArgs()).validate()
    records = load_records(data)
    if val_data:
        train_records, val_records = records, load_records(val_data)
    else:
        if len(records) < 2:
            raise SlmError(f"{data} has {len(records)} example(s); need at least 2 to hold one out")
        train_records, val_records = split(records, val_fraction, args.seed)
    loaded = load(model, dtype="fp32")
    if loaded.task != "causal-lm":
        raise SlmError(f"{loaded.name} is a {loaded.task} model; `slm finetune` trains causal LMs")
    tok = loaded.tokenizer
    if tok is None:
        raise SlmError(f"{loaded.name} has no tokenizer to fine-tune with")
    train_set, val_set = SFTData(tok, train_records, args.seq_len), SFTData(tok, val_records, args.seq_len)
    net = add_lora(loaded.model, lora_r, lora_alpha, lora_dropout) if lora else loaded.model
    before = evaluate(net, sft_objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    config = {"workflow": "finetune", "model": loaded.name, "data": data, "val_data": val_data, "lora": lora,
              "lora_r": lora_r, "lora_alpha": lora_alpha, "train_examples": len(train_set),
              "val_examples": len(val_set), "trainable_parameters": trainable, "val_loss_before": before}
    summary = train(net, tok, train_set, val_set, sft_objective, args, Path(runs_dir) / run, resume=resume,
                    config=config, progress=progress)
    summary.update(val_loss_before=before, val_ppl_before=math.exp(before), trainable_parameters=trainable,
                   run_dir=str(Path(runs_dir) / run))
    return summary
