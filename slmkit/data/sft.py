"""Supervised examples for every fine-tuning workflow: packaged conversations and labelled sets, chat and
prompt/completion records turned into (token ids, labels) with the loss on answer tokens only, batching for
decoders and encoder-decoders (`SFTData`), and text/label data for classifiers (`ClassificationData`) with
seeded, group-respecting splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slmkit.data.packing import epoch_order
from slmkit.errors import SlmError


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
PACKAGED = {"chatterbot-en": chatterbot_conversations}


def _spam_assassin() -> list[dict]:
    from slmkit.data.spam import spam_assassin

    return spam_assassin()


def _brown_genres() -> list[dict]:
    from slmkit.data.corpora import brown_genres

    return brown_genres()
TOPICS_14 = ("ai", "botprofile", "computers", "emotion", "food", "greetings", "literature", "money", "movies",
             "politics", "psychology", "science", "sports", "trivia")  # every chatterbot topic with >= 10 questions
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


def split(records, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, round(len(records) * val_fraction))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]
