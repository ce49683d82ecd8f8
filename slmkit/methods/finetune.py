"""Supervised fine-tuning (SFT) of a language model on chat or prompt/completion data, and fine-tuning of an
encoder with a classification head on text/label data.

The loss is on answer tokens only: for chat data every assistant turn is trained (multi-turn masking) and
user/system turns are context; for prompt/completion data the completion (and end token) is trained.
Fine-tuning is full, or LoRA adapters (`peft`) on every linear layer, merged into the saved model at the end
(the adapter is kept beside it). Runs go through the one training loop in `slmkit/train.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmkit.data.packing import epoch_order
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
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch examples of similar length together (less padding; the order stays seeded)."})


# --- data ------------------------------------------------------------------------------------------------


def _chatterbot_root(language: str) -> Path:
    from slmkit.models import package_path

    return package_path("chatterbot-corpus", f"data/{language}")


def chatterbot_conversations(language: str = "english") -> list[list[dict]]:
    """The English dialogues of the PyPI package `chatterbot-corpus` as chat messages."""
    import yaml

    root = _chatterbot_root(language)
    conversations = []
    for path in sorted(root.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in turns if t is not None]
            if len(turns) >= 2:
                conversations.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)])
    return conversations


def chatterbot_topics(categories=("ai", "coding", "psychology", "trivia"), per_class: int = 100) -> list[dict]:
    """A real text-classification set: which chatterbot topic file a user question comes from."""
    import yaml

    root = _chatterbot_root("english")
    rows = []
    for category in categories:
        data = yaml.safe_load((root / f"{category}.yml").read_text(encoding="utf-8"))
        questions = [str(turns[0]) for turns in data.get("conversations", []) if turns]
        rows += [{"text": q, "label": category} for q in dict.fromkeys(questions)][:per_class]
    return rows


TOPICS_14 = ("ai", "botprofile", "computers", "emotion", "food", "greetings", "literature", "money", "movies",
             "politics", "psychology", "science", "sports", "trivia")  # every chatterbot topic with >= 10 questions

PACKAGED = {"chatterbot-en": chatterbot_conversations}


def _spam_assassin() -> list[dict]:
    from slmkit.data.spam import spam_assassin

    return spam_assassin()


def _brown_genres() -> list[dict]:
    from slmkit.data.corpora import brown_genres

    return brown_genres()


CLASSIFICATION = {"chatterbot-topics": chatterbot_topics,
                  "chatterbot-topics14": lambda: chatterbot_topics(TOPICS_14),
                  "spam-assassin": _spam_assassin,
                  "brown-genres": _brown_genres}


def load_records(source: str) -> list[list[dict] | tuple[str, str]]:
    """Chat conversations (lists of messages) or (prompt, completion) pairs from a packaged set or JSONL."""
    from slmkit.data.records import check_messages, check_text, read_jsonl

    if source in PACKAGED:
        return PACKAGED[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlmError(f"no fine-tuning data named '{source}' (a .jsonl file, or one of: {', '.join(PACKAGED)})")
    records = []
    for where, row in read_jsonl(path):
        if "messages" in row:
            records.append(check_messages(row["messages"], where, need_assistant=True))
        elif "prompt" in row and "completion" in row:
            records.append((check_text(row["prompt"], where, "prompt"), check_text(row["completion"], where,
                                                                                   "completion")))
        else:
            raise SlmError(f"{where}: expected \"messages\" or \"prompt\" + \"completion\" fields")
    if not records:
        raise SlmError(f"{path} holds no examples")
    return records


def chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; labels are -100 except on assistant turns."""
    from slmkit.generate import format_prompt

    full = format_prompt(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            prefix = format_prompt(tokenizer, messages[:i])  # the context, ending with the assistant header
            if not full.startswith(prefix):
                raise SlmError("the chat template does not render conversations incrementally; use "
                               "prompt/completion data for this model")
            spans.append((len(prefix), len(format_prompt(tokenizer, messages[:i + 1], generation_prompt=False))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if any(s <= a and b <= e for s, e in spans) and b > a else -100
              for tid, (a, b) in zip(enc.input_ids, enc.offset_mapping, strict=True)]
    return enc.input_ids, labels


def completion_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=True).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def seq2seq_examples(tokenizer, record) -> list[tuple[list[int], list[int]]]:
    """Encoder-decoder (T5) examples of one record: (input ids, target ids). A conversation gives one example
    per assistant turn, with the turns before it as the input."""
    eos = [tokenizer.eos_token_id]
    if not isinstance(record, list):
        prompt, completion = record
        return [(tokenizer(prompt).input_ids, tokenizer(completion, add_special_tokens=False).input_ids + eos)]
    out = []
    for i, m in enumerate(record):
        if m["role"] == "assistant" and i > 0:
            context = "\n".join(f"{t['role']}: {t['content']}" if t["role"] == "system" else t["content"]
                                 for t in record[:i])
            target = tokenizer(m["content"], add_special_tokens=False).input_ids + eos
            out.append((tokenizer(context).input_ids, target))
    return out


def seq2seq_batch(examples, pad: int):
    """Padded encoder inputs with their mask, and decoder labels (-100 on padding)."""
    import torch

    w_in, w_out = max(len(i) for i, _ in examples), max(len(t) for _, t in examples)
    ids = torch.full((len(examples), w_in), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), w_in), dtype=torch.long)
    labels = torch.full((len(examples), w_out), -100, dtype=torch.long)
    for row, (inp, tgt) in enumerate(examples):
        ids[row, :len(inp)], mask[row, :len(inp)] = torch.tensor(inp), 1
        labels[row, :len(tgt)] = torch.tensor(tgt)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SFTData:
    """Tokenised examples served as padded batches in a (seed, step)-determined order, like PackedTokens.
    Subclasses fill `examples` themselves and keep the plain order unless they set `group_by_length`."""

    group_by_length = False
    _grouped: tuple = (None, None)

    def __init__(self, tokenizer, records, seq_len: int, encoder_decoder: bool = False,
                 group_by_length: bool = False):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_decoder = encoder_decoder
        self.examples = []
        for r in records:
            if encoder_decoder:  # (input, target) pairs; each side is cut to seq_len
                self.examples += [(i[:seq_len], t[:seq_len]) for i, t in seq2seq_examples(tokenizer, r)]
                continue
            ids, labels = chat_example(tokenizer, r) if isinstance(r, list) else completion_example(tokenizer, *r)
            ids, labels = ids[:seq_len], labels[:seq_len]
            if any(label != -100 for label in labels):
                self.examples.append((ids, labels))
        if not self.examples:
            raise SlmError("no example has an answer within --seq-len tokens")
        self.group_by_length = group_by_length

    def order(self, seed: int, epoch: int, batch_size: int):
        """The epoch's seeded order; grouped by length, it is sorted within windows of 64 batches, cut into
        batches, and the full batches shuffled (seeded), so each batch holds examples of similar length."""
        import numpy as np

        order = epoch_order(len(self.examples), seed, epoch)
        if not self.group_by_length:
            return order
        key = (seed, epoch, batch_size)
        if self._grouped[0] != key:
            lengths = np.array([len(i) + len(t) for i, t in self.examples])[order]
            window = batch_size * 64
            grouped = np.concatenate([order[i:i + window][np.argsort(lengths[i:i + window], kind="stable")]
                                      for i in range(0, len(order), window)])
            full = len(grouped) // batch_size
            shuffled = np.random.default_rng([seed, epoch, 1]).permutation(full)
            grouped = np.concatenate([grouped[k * batch_size:(k + 1) * batch_size] for k in shuffled]
                                     + [grouped[full * batch_size:]])
            self._grouped = (key, grouped)
        return self._grouped[1]

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, items):
        import torch

        if self.encoder_decoder:
            return seq2seq_batch(items, self.pad)
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
            items.append(self.examples[int(self.order(seed, epoch, batch_size)[pos])])
        return self.collate(items)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int):
        for start in range(0, min(len(self.examples), batch_size * max_batches), batch_size):
            yield self.collate(self.examples[start:start + batch_size])


def load_classification(source: str) -> list[dict]:
    """{"text", "label"} rows from a packaged set (chatterbot-topics) or a JSONL file."""
    from slmkit.data.records import read_jsonl

    if source in CLASSIFICATION:
        return CLASSIFICATION[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise SlmError(f"no classification data named '{source}' (a .jsonl file of {{\"text\", \"label\"}}, or "
                       f"one of: {', '.join(CLASSIFICATION)})")
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), (str, int)):
            raise SlmError(f"{where}: a classification example needs \"text\" (string) and \"label\"")
        rows.append({"text": row["text"], "label": str(row["label"]),
                     **({"group": str(row["group"])} if "group" in row else {})})
    if len({r["label"] for r in rows}) < 2:
        raise SlmError(f"{path}: classification needs at least two different labels")
    return rows


def split_rows(rows: list[dict], val_size: int, test_size: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Fixed train / held-out / test splits (one seeded order for every seed), so every model of a run - and every
    run on the same data - is tested on the same examples. Rows that carry a "group" (e.g. passages of one
    document) stay together: whole groups are drawn until each split has at least its size."""
    import numpy as np

    if len(rows) < val_size + test_size + 2:
        raise SlmError(f"{len(rows)} examples are too few for {val_size} validation + {test_size} test")
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(("group", row["group"]) if "group" in row else ("row", i), []).append(i)
    keys = list(groups)
    order = [i for g in np.random.default_rng(12345).permutation(len(keys)) for i in groups[keys[g]]]
    test_end = _whole_groups(rows, order, test_size)
    val_end = _whole_groups(rows, order, test_end + val_size)
    if val_end >= len(order):
        raise SlmError(f"{len(groups)} groups of examples are too few for {val_size} validation + {test_size} test")
    test, val = [rows[i] for i in order[:test_end]], [rows[i] for i in order[test_end:val_end]]
    return [rows[i] for i in order[val_end:]], val, test


def _whole_groups(rows: list[dict], order: list[int], end: int) -> int:
    """`end` moved forward to the first position of `order` where a new group starts."""
    while 0 < end < len(order) and "group" in rows[order[end]] and \
            rows[order[end]]["group"] == rows[order[end - 1]]["group"]:
        end += 1
    return end


class ClassificationData(SFTData):
    """Texts with integer labels, batched like SFTData (same deterministic order)."""

    def __init__(self, tokenizer, rows: list[dict], labels: list[str], seq_len: int):
        self.pad = tokenizer.pad_token_id or 0
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({r["label"] for r in rows} - index.keys())
        if unknown:
            raise SlmError(f"label '{unknown[0]}' does not occur in the training data")
        self.examples = [(tokenizer(r["text"], truncation=True, max_length=seq_len).input_ids, index[r["label"]])
                         for r in rows]

    def collate(self, items):
        import torch

        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (i, _) in enumerate(items):
            ids[row, :len(i)] = torch.tensor(i)
            mask[row, :len(i)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in items])}


def classification_objective(model, batch, generator):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, len(batch["labels"])


def accuracy(model, data: ClassificationData, batch_size: int = 32) -> float:
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in data.eval_batches(batch_size, 0, len(data)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(data)


def classifier_from(source: str, labels: list[str]):
    """A sequence classifier with a fresh head over an encoder checkpoint (e.g. MiniLM or a pretrained run)."""
    from transformers import AutoModelForSequenceClassification

    from slmkit.models import load

    base = load(source, dtype="fp32")
    if base.path is None or base.tokenizer is None:
        raise SlmError(f"{source}: classification fine-tuning needs a pretrained checkpoint with a tokenizer "
                       "(e.g. all-minilm-l6-v2, or runs/NAME/model from `slm pretrain -m roberta-nano`)")
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    if base.tokenizer.pad_token_id is None:  # causal LMs: the head reads the last token before padding
        base.tokenizer.pad_token = base.tokenizer.eos_token
    model.config.pad_token_id = base.tokenizer.pad_token_id
    return model, base.tokenizer


def sft_objective(model, batch, generator):
    """Next-token cross-entropy on answer tokens. The LM head runs only at the positions that are scored:
    with a 49k vocabulary most of an SFT step's time would otherwise go to logits of prompt and padding.
    A batch with `pixel_values` (LLaVA-ϕ) passes the images on; they are spliced in at the image tokens."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    if inner.config.is_encoder_decoder:  # the decoder's labels are all answer tokens (or padding)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, int((batch["labels"] != -100).sum())
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    plain_head = not any(getattr(inner.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not plain_head:
        # DDP must see its own forward (gradient sync); soft-capped heads need the model's own logits
        out = model(**inputs, labels=batch["labels"])
        return out.loss, int(keep.sum())
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep]), int(keep.sum())


# --- the workflow ----------------------------------------------------------------------------------------


def split(records, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, round(len(records) * val_fraction))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def add_lora(model, r: int, alpha: int, dropout: float, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    heads = ["score", "classifier"] if task_type in ("SEQ_CLS", "TOKEN_CLS") else None  # new heads train fully
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        exclude_modules=heads, task_type=task_type)
    return get_peft_model(model, config)


def finetune(
    model: str | None = None,
    data: str = "chatterbot-en",
    task: str = "chat",
    val_data: str | None = None,
    val_fraction: float = 0.1,
    lora: bool | None = None,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    qlora: bool = False,
    run: str = "finetune",
    runs_dir: Path = Path("runs"),
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
    objective=None,
) -> dict:
    """Fine-tune a model and return the run summary with held-out scores before and after.

    task `chat`: a causal LM (default: the embedded model) or an encoder-decoder (T5: the input is the prompt
    or the turns before each answer) on chat or prompt/completion data, loss on answers only; LoRA by default.
    task `classify`: an encoder (default: all-minilm-l6-v2) with a new classification head on {"text", "label"}
    data (default set: chatterbot-topics); full fine-tuning by default.
    `qlora`: the frozen base is loaded in 4-bit NF4 (bitsandbytes) and LoRA adapters train on top; the saved
    model merges the adapter into the full-precision base.
    `objective`: replaces the chat task's loss (`sft_objective`), e.g. FLAME's with its retrieval term.
    """
    args = (train_args or FinetuneArgs()).validate()
    if task not in ("chat", "classify"):
        raise SlmError(f"unknown task '{task}' (chat or classify)")
    if qlora and (task != "chat" or lora is False):
        raise SlmError("--qlora trains LoRA adapters on a 4-bit chat model (not with --full or --task classify)")
    load_fn = load_records if task == "chat" else load_classification
    if task == "classify" and data == "chatterbot-en":
        data = "chatterbot-topics"
    records = load_fn(data)
    if val_data:
        train_records, val_records = records, load_fn(val_data)
    else:
        if len(records) < 2:
            raise SlmError(f"{data} has {len(records)} example(s); need at least 2 to hold one out")
        train_records, val_records = split(records, val_fraction, args.seed)
    if task == "chat":
        net, tok, train_set, val_set, sft = _chat_setup(model, train_records, val_records, args, qlora)
        objective = objective or sft
    else:
        labels = sorted({r["label"] for r in train_records})
        net, tok = classifier_from(model or "all-minilm-l6-v2", labels)
        train_set = ClassificationData(tok, train_records, labels, args.seq_len)
        val_set = ClassificationData(tok, val_records, labels, args.seq_len)
        if objective is not None:
            raise SlmError("a custom objective replaces the chat task's loss (not --task classify)")
        objective = classification_objective
    if lora if lora is not None else task == "chat":
        kind = "SEQ_CLS" if task == "classify" else "SEQ_2_SEQ_LM" if net.config.is_encoder_decoder else "CAUSAL_LM"
        if qlora:
            from peft import prepare_model_for_kbit_training

            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=args.grad_checkpointing)
        net = add_lora(net, lora_r, lora_alpha, lora_dropout, kind)
    before = evaluate(net, objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    extra = {"val_accuracy_before": accuracy(net, val_set)} if task == "classify" else {}
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    config = {"workflow": "finetune", "task": task, "model": model, "data": data, "val_data": val_data,
              "lora": bool(lora if lora is not None else task == "chat"), "lora_r": lora_r, "lora_alpha": lora_alpha,
              "qlora": qlora,
              "train_examples": len(train_set), "val_examples": len(val_set), "trainable_parameters": trainable,
              "val_loss_before": before, **extra}
    summary = train(net, tok, train_set, val_set, objective, args, Path(runs_dir) / run, resume=resume,
                    config=config, progress=progress)
    if task == "classify":
        extra["val_accuracy"] = accuracy(net, val_set)
    summary.update(val_loss_before=before, val_ppl_before=math.exp(before), trainable_parameters=trainable,
                   run_dir=str(Path(runs_dir) / run), **extra)
    return summary


def _chat_setup(model: str | None, train_records, val_records, args: FinetuneArgs, qlora: bool = False):
    from slmkit.models import load

    loaded = load(model, dtype="fp32", quantize="nf4" if qlora else None)
    if loaded.task not in ("causal-lm", "seq2seq"):
        raise SlmError(f"{loaded.name} is a {loaded.task} model; chat fine-tuning trains causal LMs and "
                       "encoder-decoders (use --task classify for encoders)")
    if loaded.tokenizer is None:
        raise SlmError(f"{loaded.name} has no tokenizer to fine-tune with")
    tok, enc_dec = loaded.tokenizer, loaded.task == "seq2seq"
    train_set = SFTData(tok, train_records, args.seq_len, enc_dec, args.group_by_length)
    val_set = SFTData(tok, val_records, args.seq_len, enc_dec)
    return loaded.model, tok, train_set, val_set, sft_objective
