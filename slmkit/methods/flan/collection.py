"""The FLAN task collection: tasks and their clusters, templates, examples, rendering, and the mixture."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError

PACKAGED_TASKS = Path(__file__).resolve().parents[2] / "data" / "flan" / "tasks.yaml"
ANSWER_SEPARATOR = "\n"  # plain (non-chat) models read prompt, newline, answer: in training and evaluation alike



@dataclass
class Task:
    name: str
    cluster: str
    source: str
    options: list[str] | None = None
    templates: list[str] | None = None
    cot: str | None = None
    turn: bool = False
    size: int = 1000  # examples available to the mixture (procedural tasks: how many to generate)
    config: dict | None = None  # reasoning-gym generator options (e.g. {max_terms: 3, max_digits: 2})
    labels: dict[str, str] | None = None  # classification sets: the words shown for their labels ({ham: not spam})
    max_chars: int | None = None  # cut longer inputs (long emails) at a word boundary


@dataclass
class Item:
    question: str
    answer: str
    task: Task
    options: list[str] | None = None
    rationale: str | None = None
    entry: dict | None = None  # the reasoning-gym entry, for its scorer


@dataclass
class Collection:
    tasks: list[Task]
    templates: list[str]
    turned_around: list[str]
    options_suffix: str
    cot_trigger: str
    cot_target: str
    clusters: dict[str, list[str]] = field(default_factory=dict)


def load_collection(*extra: Path | None) -> Collection:
    """The packaged tasks and templates, extended by YAML files of the same shape (tasks, templates)."""
    import yaml

    def read(path: Path) -> dict:
        if not path.is_file():
            raise SlmError(f"task file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise SlmError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict):
            raise SlmError(f"{path}: expected a mapping with 'tasks' (and optionally 'templates')")
        return data

    base = read(PACKAGED_TASKS)
    tasks = [_task(t, PACKAGED_TASKS, i) for i, t in enumerate(base["tasks"])]
    templates = list(base["templates"])
    for path in (Path(e) for e in extra if e is not None):
        user = read(path)
        templates += list(user.get("templates", []))
        names = {t.name for t in tasks}
        for i, t in enumerate(user.get("tasks", [])):
            task = _task(t, path, i)
            if task.name in names:
                raise SlmError(f"{path}: tasks[{i}]: a task named '{task.name}' already exists")
            tasks.append(task)
    clusters: dict[str, list[str]] = {}
    for t in tasks:
        clusters.setdefault(t.cluster, []).append(t.name)
    return Collection(tasks, templates, base["turned_around"], base["options_suffix"], base["cot_trigger"],
                      base["cot_target"], clusters)


def _task(raw: dict, path: Path, i: int) -> Task:
    if not isinstance(raw, dict) or not {"name", "cluster", "source"} <= raw.keys():
        raise SlmError(f"{path}: tasks[{i}] needs 'name', 'cluster' and 'source'")
    unknown = sorted(set(raw) - {f for f in Task.__dataclass_fields__})
    if unknown:
        raise SlmError(f"{path}: tasks[{i}]: unknown field '{unknown[0]}'")
    for tpl in raw.get("templates") or []:
        if "{question}" not in tpl:
            raise SlmError(f"{path}: tasks[{i}] ({raw['name']}): template {tpl!r} has no {{question}} slot")
    return Task(**raw)


# --- examples --------------------------------------------------------------------------------------------


def _chain_sum_rationale(entry: dict) -> str:
    terms = entry["metadata"]["expression"].split()
    total, steps = int(terms[0]), []
    for op, num in zip(terms[1::2], terms[2::2], strict=True):
        new = total + int(num) if op == "+" else total - int(num)
        steps.append(f"{total} {op} {num} = {new}.")
        total = new
    return " ".join(steps)


def _leg_counting_rationale(entry: dict) -> str:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"].items()
    parts = [f"{n} {a} have {n} × {ANIMALS[a]} = {n * ANIMALS[a]} legs." for a, n in animals]
    return " ".join(parts) + " Adding them up gives " + str(entry["metadata"]["total_legs"]) + "."


def _answer_cot(entry: dict) -> str:
    return entry["metadata"]["answer_cot"].split("####")[0].strip()


RATIONALES = {"chain_sum": _chain_sum_rationale, "leg_counting": _leg_counting_rationale, "answer_cot": _answer_cot}


def make_items(task: Task, n: int, seed: int) -> list[Item]:
    """`n` examples of a task, deterministic from (task, seed)."""
    if task.source.startswith("reasoning_gym:"):
        import reasoning_gym

        name = task.source.split(":", 1)[1]
        try:  # an unknown generator or a bad config fails here or at the first entry
            ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **(task.config or {}))
            entries = [ds[i] for i in range(n)]
        except Exception as e:
            raise SlmError(f"task {task.name}: reasoning-gym cannot make '{name}' ({type(e).__name__}: {e})") from e
        rationale = RATIONALES.get(task.cot) if task.cot else None
        items = []
        for entry in entries:
            items.append(Item(entry["question"].strip(), str(entry["answer"]), task, task.options,
                              rationale(entry) if rationale else None, {"dataset": ds, "entry": entry}))
        return items
    from slmkit.data.extraction import EXTRACTION
    from slmkit.data.sft import CLASSIFICATION, load_classification

    if task.source in CLASSIFICATION:
        rows = load_classification(task.source)
        shown = {label: (task.labels or {}).get(label, label) for label in {r["label"] for r in rows}}
        labels = sorted(shown.values())
        random.Random(seed).shuffle(rows)
        return [Item(_cut(r["text"], task.max_chars), shown[r["label"]], task, labels) for r in rows[:n]]
    if task.source in EXTRACTION:
        return [Item(r["question"], r["answer"], task, r.get("options") or task.options)
                for r in EXTRACTION[task.source](n, seed)]

    path = Path(task.source).expanduser()
    if not path.is_file():
        raise SlmError(f"task {task.name}: source {task.source} is not reasoning_gym:NAME, a packaged set or a file")
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row.get("question"), str) or "answer" not in row:
            raise SlmError(f"{where}: a task example needs \"question\" (string) and \"answer\"")
        rows.append(Item(row["question"], str(row["answer"]), task, row.get("options") or task.options,
                         row.get("rationale")))
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _cut(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def render(item: Item, template: str, collection: Collection, fmt: str = "zero",
           exemplars: list[Item] = ()) -> tuple[str, str]:
    """(prompt, target) for one example in one template and format."""
    def prompt_of(it: Item) -> str:
        text = template.format(question=it.question)
        if it.options:
            text += collection.options_suffix.format(options="\n".join(f"- {o}" for o in it.options))
        return text

    if fmt == "cot":  # the plain template: others ask for "only the final answer"
        if not item.rationale:
            raise SlmError(f"task {item.task.name} has no chain-of-thought rationale")
        template = "{question}"
        return (prompt_of(item) + collection.cot_trigger,
                collection.cot_target.format(rationale=item.rationale, answer=item.answer))
    prompt = prompt_of(item)
    if fmt == "few":
        prompt = "\n\n".join(prompt_of(e) + "\n" + e.answer for e in exemplars) + "\n\n" + prompt
    return prompt, item.answer


def build_mixture(collection: Collection, *, clusters: list[str] | None = None, exclude: list[str] | None = None,
                  examples: int = 3000, cap: int = 500, few_shot: float = 0.2, cot: float = 0.5,
                  shots: int = 2, turned: float = 0.05, multiple_choice: float = 0.3, choices: int = 4,
                  seed: int = 0) -> list[dict]:
    """Instruction data: each task contributes in proportion to min(size, cap); each example gets a random
    template; a `few_shot` fraction is few-shot; of the tasks that have rationales a `cot` fraction is
    chain-of-thought; a `turned` fraction of `turn: true` tasks is turned around; a `multiple_choice`
    fraction of free-form examples gets an OPTIONS list (the answer among `choices - 1` answers of other
    examples of the task), which teaches picking from a list of options."""
    unknown = sorted(set((clusters or []) + (exclude or [])) - collection.clusters.keys())
    if unknown:
        raise SlmError(f"unknown cluster '{unknown[0]}' (clusters: {', '.join(sorted(collection.clusters))})")
    tasks = [t for t in collection.tasks if (not clusters or t.cluster in clusters)
             and t.cluster not in (exclude or [])]
    if not tasks:
        raise SlmError("no tasks left to mix")
    weights = [min(t.size, cap) for t in tasks]
    rng = random.Random(seed)
    rows = []
    for task, weight in zip(tasks, weights, strict=True):
        n = max(1, round(examples * weight / sum(weights)))
        pool = make_items(task, n + shots, seed=seed * 1000 + 17)
        items, spare = pool[:n], pool[n:]
        templates = task.templates or collection.templates
        answers = sorted({it.answer for it in pool})
        for item in items:
            distractors = [a for a in answers if a != item.answer]
            if not item.options and len(distractors) >= choices - 1 and rng.random() < multiple_choice:
                options = rng.sample(distractors, choices - 1) + [item.answer]
                rng.shuffle(options)
                item = Item(item.question, item.answer, task, options, None, item.entry)
            if item.rationale and rng.random() < cot:
                fmt = "cot"
            else:
                fmt = "few" if rng.random() < few_shot else "zero"
            if task.turn and rng.random() < turned:
                prompt, target = rng.choice(collection.turned_around).format(answer=item.answer), item.question
                fmt = "turned"
            else:
                prompt, target = render(item, rng.choice(templates), collection, fmt, spare if fmt == "few" else ())
            rows.append({"prompt": prompt, "completion": target, "task": task.name, "cluster": task.cluster,
                         "format": fmt})
    rng.shuffle(rows)
    return rows
