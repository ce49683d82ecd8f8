"""FLAN and Flan-T5 instruction tuning (Wei et al., 2022, "Finetuned Language Models Are Zero-Shot Learners";
Chung et al., 2022, "Scaling Instruction-Finetuned Language Models").

Many tasks, each rendered through about ten natural-language templates (some "turned around": from the
answer, write the question), with an `OPTIONS:` list for classification, in zero-shot, few-shot and
chain-of-thought formats; mixed in proportion to each task's size up to a per-task cap. The evaluation that
makes FLAN's point holds out a whole task cluster: tune on every other cluster, then measure zero-shot
accuracy on the held-out one, before and after.

Tasks come from `slmkit/data/flan/tasks.yaml` (reasoning-gym generators with their scorers, grouped in
clusters, plus a topic-classification set) and from users' YAML files of the same shape. Everything is
deterministic from a seed. The mixture is prompt/completion JSONL that `slm finetune` trains on (chat
models get it through their chat template, with the loss on the answer only).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR, FinetuneArgs

PACKAGED_TASKS = Path(__file__).resolve().parents[1] / "data" / "flan" / "tasks.yaml"

HELP = {  # the help of arguments several workflows here share (see slmkit.workflows)
    "clusters": "Only these clusters (repeatable).",
    "exclude": "Leave out these clusters (repeatable).",
    "examples": "Examples in the mixture.",
    "cap": "Per-task cap for examples-proportional mixing.",
    "few_shot": "Fraction of examples rendered few-shot.",
    "cot": "Fraction of rationale-bearing tasks' examples rendered as chain of thought (0 = no CoT).",
}
FORMATS = ("zero", "few", "cot")


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
    from slmkit.data.sft import CLASSIFICATION, load_classification

    if task.source in CLASSIFICATION:
        rows = load_classification(task.source)
        labels = sorted({r["label"] for r in rows})
        random.Random(seed).shuffle(rows)
        return [Item(r["text"], r["label"], task, labels) for r in rows[:n]]

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


# --- scoring ---------------------------------------------------------------------------------------------


def extract_answer(text: str) -> str:
    """The answer in a reply: after "the answer is" when present, else the first non-empty line, without an
    "Answer:" prefix or trailing period."""
    found = re.findall(r"answer is[:\s]*(.+)", text, flags=re.IGNORECASE)
    line = found[-1] if found else next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(answer|a)\s*[:.]\s*", "", line.strip(), flags=re.IGNORECASE)
    return line.strip().rstrip(".").strip()


def is_correct(item: Item, reply: str) -> bool:
    """Options: the option the reply names (first, as a whole word); otherwise the extracted answer, checked
    by the task's scorer (reasoning-gym) or by case-insensitive equality."""
    if item.options:
        from slmkit.client import match_option

        picked = match_option(reply, item.options)
        answer = item.options[picked] if picked is not None else ""
    else:
        answer = extract_answer(reply)
    if item.entry is not None:
        return item.entry["dataset"].score_answer(answer, item.entry["entry"]) >= 1.0
    return answer.lower() == item.answer.lower()


def rank_choice(loaded, prompt: str, options: list[str]) -> str:
    """FLAN's rank classification: the option with the highest log-likelihood as the reply."""
    from slmkit.evaluate import best_option
    from slmkit.generate import format_prompt, is_chat_model

    chat = is_chat_model(loaded.tokenizer)
    text = format_prompt(loaded.tokenizer, prompt) if chat else prompt + "\n"
    return options[best_option(loaded, text, options, templated=chat)]


def zero_shot_accuracy(loaded, items: list[Item], collection: Collection, *, batch_size: int = 16,
                       max_new_tokens: int = 32, rank: bool = False, progress: bool = True) -> dict:
    """Zero-shot accuracy per task with the first template: greedy generation, or with `rank` the likeliest
    option for tasks that have OPTIONS (FLAN's rank classification). Returns {"tasks", "mean", "items"}: each
    task's accuracy, their mean, and each item's 0/1 outcome per task (in the order given)."""
    from slmkit.generate import SamplingParams, generate
    from slmkit.progress import Progress

    params = SamplingParams(max_new_tokens=max_new_tokens)
    correct: dict[str, list[int]] = {}
    with Progress(disable=not progress) as bar:
        job = bar.add_task(f"zero-shot eval of {loaded.name}", total=len(items))
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [render(it, (it.task.templates or collection.templates)[0], collection)[0] for it in batch]
            if rank and all(it.options for it in batch):
                replies = [rank_choice(loaded, p, it.options) for p, it in zip(prompts, batch, strict=True)]
            else:
                replies = [c.text for c in generate(loaded, prompts, params)]
            for it, reply in zip(batch, replies, strict=True):
                correct.setdefault(it.task.name, []).append(int(is_correct(it, reply)))
            bar.advance(job, len(batch))
    tasks = {name: sum(v) / len(v) for name, v in correct.items()}
    return {"tasks": tasks, "mean": sum(tasks.values()) / len(tasks), "items": correct}


# --- workflows -------------------------------------------------------------------------------------------


def training_rows(rows: list[dict], chat: bool) -> list[dict]:
    """Chat models learn the mixture as user/assistant turns (their template, as at inference); others as
    prompt/completion text."""
    if not chat:
        return rows
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
             **{k: r[k] for k in ("task", "cluster", "format")}} for r in rows]


def flan_build(out: Path, *, tasks_file: Path | None = None, clusters: list[str] | None = None,
               exclude: list[str] | None = None, examples: int = 3000, cap: int = 500, few_shot: float = 0.2,
               cot: float = 0.5, seed: int = 0) -> dict:
    """Render tasks through their templates (zero-shot, few-shot, CoT, turned around, OPTIONS) into a mixture.

    Write an instruction mixture as prompt/completion JSONL (with task, cluster and format per row).

    Args:
        out: The mixture, prompt/completion JSONL.
        seed: Seed: the same seed writes the same mixture.
    """
    collection = load_collection(tasks_file)
    rows = build_mixture(collection, clusters=clusters, exclude=exclude, examples=examples, cap=cap,
                         few_shot=few_shot, cot=cot, seed=seed)
    write_jsonl(rows, out)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["format"]] = counts.get(r["format"], 0) + 1
    return {"out": str(out), "examples": len(rows), "tasks": len({r["task"] for r in rows}), "formats": counts}


def flan_train(
    model: str | None = None,
    data: Path | None = None,
    tasks_file: Path | None = None,
    clusters: list[str] | None = None,
    exclude: list[str] | None = None,
    examples: int = 3000,
    cap: int = 500,
    few_shot: float = 0.2,
    cot: float = 0.5,
    lora: bool = True,
    run: str = "flan",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    seed: int = 0,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Instruction-tune a decoder-only model or a T5 (e.g. -m flan-t5-nano after `slm ul2r`/pretraining, or a Flan-T5
    directory) on a FLAN mixture.

    Instruction-tune a decoder-only or an encoder-decoder (T5) model on a FLAN mixture: `data` (from
    `slm flan build`), or one built here from the task collection (`clusters`/`exclude`, mixing options).
    Chat models learn it through their chat template; the run's mixture is kept in the run directory.

    Args:
        data: A mixture from `slm flan build` (default: build one here from the options below).
    """
    from slmkit.generate import is_chat_model
    from slmkit.methods.finetune import FinetuneArgs, finetune
    from slmkit.models import load

    run_dir = Path(runs_dir) / run
    if data is not None:
        rows = [row for _, row in read_jsonl(Path(data))] if Path(data).is_file() else None
        if rows is None:
            raise SlmError(f"mixture file not found: {data}")
    else:
        rows = build_mixture(load_collection(tasks_file), clusters=clusters, exclude=exclude, examples=examples,
                             cap=cap, few_shot=few_shot, cot=cot, seed=seed)
    loaded = load(model, dtype="auto", progress=progress)  # for its kind (chat template, encoder-decoder)
    chat = is_chat_model(loaded.tokenizer) if loaded.tokenizer is not None else False
    del loaded
    mixture = write_jsonl(training_rows(rows, chat), run_dir / "mixture.jsonl")
    args = train_args or FinetuneArgs(seed=seed)
    summary = finetune(model, data=str(mixture), task="chat", val_fraction=0.05, lora=lora, run=run,
                       runs_dir=runs_dir, resume=resume, train_args=args, progress=progress)
    formats: dict[str, int] = {}
    for r in rows:
        formats[r.get("format", "?")] = formats.get(r.get("format", "?"), 0) + 1
    return {**summary, "mixture_examples": len(rows), "formats": formats, "model_dir": str(run_dir / "model")}


def flan_eval(
    model: str | None = None,
    held_out: str = "logic",
    tasks_file: Path | None = None,
    examples: int = 2000,
    cap: int = 500,
    few_shot: float = 0.2,
    cot: float = 0.5,
    eval_per_task: int = 50,
    rank: bool = False,
    lora: bool = True,
    run: str = "flan",
    runs_dir: Path = RUNS_DIR,
    seed: int = 0,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """FLAN's held-out-cluster test: zero-shot accuracy on one cluster, instruction tuning on all the others, zero-shot
    accuracy again.

    FLAN's held-out-cluster evaluation: zero-shot accuracy on the `held_out` cluster's tasks, then
    instruction tuning on a mixture of all other clusters, then zero-shot accuracy again (`rank`: OPTIONS
    tasks scored by rank classification instead of generation).

    Args:
        held_out: The cluster to hold out (see `slm flan list`).
        eval_per_task: Held-out examples per task.
        rank: Score OPTIONS tasks by rank classification (the likeliest option) instead of reading the generated
            answer.
    """
    from slmkit.models import load

    collection = load_collection(tasks_file)
    if held_out not in collection.clusters:
        raise SlmError(f"unknown cluster '{held_out}' (clusters: {', '.join(sorted(collection.clusters))})")
    run_dir = Path(runs_dir) / run
    eval_items = [it for t in collection.tasks if t.cluster == held_out
                  for it in make_items(t, eval_per_task, seed=seed * 1000 + 99991)]  # a seed training never uses
    before = zero_shot_accuracy(load(model, dtype="auto"), eval_items, collection, rank=rank, progress=progress)
    summary = flan_train(model, tasks_file=tasks_file, exclude=[held_out], examples=examples, cap=cap,
                         few_shot=few_shot, cot=cot, lora=lora, run=run, runs_dir=runs_dir, seed=seed,
                         train_args=train_args, progress=progress)
    after = zero_shot_accuracy(load(summary["model_dir"], dtype="auto"), eval_items, collection, rank=rank,
                               progress=progress)
    result = {"held_out": held_out, "held_out_tasks": collection.clusters[held_out],
              "trained_clusters": sorted(c for c in collection.clusters if c != held_out),
              "mixture_examples": summary["mixture_examples"], "formats": summary["formats"], "cot_fraction": cot,
              "eval_per_task": eval_per_task, "before": before, "after": after, "val_loss": summary.get("val_loss")}
    (run_dir / "flan_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report_build(r: dict, args: dict, out) -> None:
    """Print what `slm flan build` reports."""
    out.print(f"wrote {r['examples']} examples of {r['tasks']} tasks ({r['formats']}) -> {r['out']}")


def report_train(r: dict, args: dict, out) -> None:
    """Print what `slm flan train` reports."""
    out.print(f"trained on {r['mixture_examples']} examples ({r['formats']}); val loss {r['val_loss_before']:.3f} -> "
              f"{r['val_loss']:.3f}; model -> {r['model_dir']}")


def report_eval(r: dict, args: dict, out) -> None:
    """Print what `slm flan eval` reports."""
    from rich.table import Table

    held_out = args["held_out"]
    run = args["run"]
    runs_dir = args["runs_dir"]
    table = Table("held-out task", "zero-shot before", "after instruction tuning",
                  title=f"FLAN: trained on {', '.join(r['trained_clusters'])}; held out: {held_out}")
    for task, acc in r["before"]["tasks"].items():
        table.add_row(task, f"{acc:.3f}", f"{r['after']['tasks'][task]:.3f}")
    table.add_row("[bold]mean[/]", f"{r['before']['mean']:.3f}", f"[bold]{r['after']['mean']:.3f}[/]")
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'flan_eval.json'}")


def flan_list(tasks_file: Path | None = None) -> dict[str, list[str]]:
    """Task clusters and their tasks."""
    return dict(sorted(load_collection(tasks_file).clusters.items()))


def report_list(clusters: dict[str, list[str]], args: dict, out) -> None:
    for cluster, names in clusters.items():
        out.print(f"[bold]{cluster}[/]: {', '.join(names)}")
