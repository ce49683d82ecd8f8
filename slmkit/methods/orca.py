"""Orca 2 explanation tuning (Mitra et al., 2023, "Orca 2: Teaching Small Language Models How to Reason").

A teacher answers each task under several reasoning strategies, each announced by its own system prompt
(step by step, recall then generate, recall-reason-generate, extract then generate, direct answer). The
strategy for a task is the one whose answers the task's scorer accepts most often; the teacher's answers
under that strategy become training data, kept only where the scorer accepts them. The student then learns
those answers under one generic system prompt: **prompt erasure** — it sees what the teacher wrote but not
the instruction that made the teacher write it, so it must learn when to reason which way. Loss on the
answer tokens only, in ChatML (chat models use their template; others get ChatML text).

Tasks and scorers come from the FLAN collection (`slmkit/methods/flan/collection.py`: reasoning-gym generators and the
packaged classification set, plus users' YAML). The teacher is a local model or an OpenAI-compatible
endpoint (`http://host:port/v1#model`).

`orca_data` writes the data, `orca_train` trains a student on it, `orca_eval` runs the miniature proof: a
student trained with prompt erasure against one trained on direct answers, on held-out items of the same tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.errors import SlmError
from slmkit.methods.flan import Collection, Item, is_correct, load_collection, make_items, render
from slmkit.train import RUNS_DIR, FinetuneArgs

FINAL = "End with a last line of the form: The answer is <answer>."
STRATEGIES = {
    "step-by-step": "Solve the problem step by step. Write each step of the work on its own line, then give "
                    "the result. " + FINAL,
    "recall-then-generate": "First recall the facts, definitions or rules that the question depends on, then "
                            "use them to answer. " + FINAL,
    "recall-reason-generate": "First recall the facts or rules that matter here, then reason with them step by "
                              "step, then answer. " + FINAL,
    "extract-then-generate": "First list the information the question gives (quantities, names, conditions), "
                             "then work out the answer from that list. " + FINAL,
    "direct-answer": "Give only the final answer, without any explanation, as: The answer is <answer>.",
}
GENERIC_SYSTEM = "You are a careful assistant. Read the question closely and answer it correctly."
ORCA_TASKS = Path(__file__).resolve().parents[1] / "data" / "orca" / "tasks.yaml"
TRAIN_SEED, EVAL_SEED = 17, 99991  # item seeds of training and held-out items (as in flan/heldout.py)
DEFAULT_TASKS = ("syllogism", "isomorphic_strings", "letter_counting", "number_sequence", "sum_small")
HELP = {  # the help of arguments several workflows here share (see slmkit.workflows)
    "teacher": "Teacher: a model (zoo name, directory, .gguf; default the embedded one) or an endpoint "
               "http://host:port/v1#model.",
    "tasks": "Tasks (repeatable; names from `slm flan list` or slmkit/data/orca/tasks.yaml). Default: "
             f"{', '.join(DEFAULT_TASKS)}.",
    "per_task": "Training items per task the teacher answers.",
    "probe": "Items per task on which every strategy is tried to pick one.",
    "attempts": "Answers tried per item until one is accepted (greedy, then sampled).",
    "max_new_tokens": "Longest answer in tokens (explanations need room).",
}


def question(item: Item, collection: Collection) -> str:
    """The user turn for an item: the question itself, with its OPTIONS list when it has one."""
    return render(item, "{question}", collection)[0]


def split_items(collection: Collection, tasks: list[str], n_train: int, n_eval: int, seed: int = 0):
    """Training and held-out items per task; held-out questions that also occur in training are dropped."""
    by_name = {t.name: t for t in collection.tasks}
    unknown = [t for t in tasks if t not in by_name]
    if unknown:
        raise SlmError(f"unknown task '{unknown[0]}' (see `slm flan list`)")
    train, held_out = {}, {}
    for name in tasks:
        train[name] = make_items(by_name[name], n_train, seed=seed * 1000 + TRAIN_SEED)
        seen = {it.question for it in train[name]}
        held_out[name] = [it for it in make_items(by_name[name], n_eval, seed=seed * 1000 + EVAL_SEED)
                          if it.question not in seen] if n_eval else []
    return train, held_out


def answers(lm, items: list[Item], collection: Collection, system: str, params) -> list[str]:
    return lm.generate([question(it, collection) for it in items], params, system=system)


def choose_strategies(teacher, probe: dict[str, list[Item]], collection: Collection, params,
                      strategies: list[str], progress: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy of the teacher under each strategy on each task's probe items: {task: {strategy: accuracy}}."""
    from slmkit.progress import Progress

    table: dict[str, dict[str, float]] = {}
    with Progress(disable=not progress) as bar:
        job = bar.add_task("teacher under each strategy", total=len(strategies) * sum(map(len, probe.values())))
        for task, items in probe.items():
            for s in strategies:
                replies = answers(teacher, items, collection, STRATEGIES[s], params)
                table.setdefault(task, {})[s] = sum(map(is_correct, items, replies)) / len(items)
                bar.advance(job, len(items))
    return table


def best_strategy(accuracies: dict[str, float]) -> str:
    """The most accurate strategy; ties go to the one listed first in STRATEGIES (explanations before the
    direct answer)."""
    order = list(STRATEGIES)
    return max(accuracies, key=lambda s: (accuracies[s], -order.index(s)))


def erased(item: Item, collection: Collection, reply: str) -> dict:
    """A training record with prompt erasure: the generic system prompt in place of the strategy's."""
    return {"messages": [{"role": "system", "content": GENERIC_SYSTEM},
                         {"role": "user", "content": question(item, collection)},
                         {"role": "assistant", "content": reply.strip()}]}


def orca_data(
    out: Path,
    teacher: str | None = None,
    tasks: list[str] | None = None,
    tasks_file: Path | None = None,
    per_task: int = 64,
    probe: int = 16,
    attempts: int = 2,
    strategies: list[str] | None = None,
    max_new_tokens: int = 320,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The teacher answers every task under each strategy's system prompt; the most accurate strategy per task is kept,
    and its scorer-accepted answers are written under the generic system prompt (prompt erasure).

    Explanation-tuning data: per task, the teacher's accuracy under each strategy on `probe` items picks
    the strategy; then the teacher answers `per_task` training items under it (greedy first, then up to
    `attempts - 1` samples at temperature 0.7 for items still unanswered) and answers the scorer accepts are
    written with the generic system prompt. Also writes OUT's `.strategies.json` (accuracy table, choices).

    Args:
        out: The training data, chat JSONL (with task, strategy).
        strategies: Strategies to try (repeatable; default all).
        seed: Item and sampling seed.
    """
    from slmkit.client import open_lm
    from slmkit.generate import SamplingParams

    strategies = strategies or list(STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SlmError(f"unknown strategy '{unknown[0]}' (strategies: {', '.join(STRATEGIES)})")
    collection = load_collection(ORCA_TASKS, tasks_file)
    tasks = tasks or list(DEFAULT_TASKS)
    train, _ = split_items(collection, tasks, per_task + probe, 0, seed)
    lm = open_lm(teacher)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    table = choose_strategies(lm, {t: items[:probe] for t, items in train.items()}, collection, greedy, strategies,
                              progress)
    chosen = {t: best_strategy(acc) for t, acc in table.items()}
    rows, kept = [], {}
    for task, items in train.items():
        todo, accepted = items[probe:], {}
        for attempt in range(attempts):
            params = greedy if attempt == 0 else SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7,
                                                                top_p=0.95, seed=seed * 100 + attempt)
            replies = answers(lm, todo, collection, STRATEGIES[chosen[task]], params)
            accepted.update({it.question: (it, r) for it, r in zip(todo, replies, strict=True) if is_correct(it, r)})
            todo = [it for it in todo if it.question not in accepted]
            if not todo:
                break
        kept[task] = len(accepted)
        rows += [{**erased(it, collection, r), "task": task, "strategy": chosen[task]} for it, r in accepted.values()]
    if not rows:
        raise SlmError(f"the teacher {lm.name} answered no training item correctly under any strategy; use a "
                       "stronger teacher or easier tasks")
    write_jsonl(rows, out)
    report = {"out": str(out), "teacher": lm.name, "examples": len(rows), "strategy_accuracy": table,
              "chosen": chosen, "kept_per_task": kept, "items_per_task": per_task}
    Path(out).with_suffix(".strategies.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def orca_train(
    data: Path,
    model: str | None = None,
    lora: bool = True,
    run: str = "orca",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Train a student on Orca data: the generic system prompt, loss on the answers only (ChatML).

    Train a student on Orca data (from `orca_data`): chat turns under the generic system prompt, loss on
    the answers only.

    Args:
        data: Orca data from `slm orca data`.
    """
    from slmkit.methods.finetune import FinetuneArgs, finetune

    if not Path(data).is_file():
        raise SlmError(f"Orca data not found: {data} (write it with `slm orca data`)")
    return finetune(model, data=str(chatml_records(Path(data), model, Path(runs_dir) / run)), task="chat",
                    val_fraction=0.05, lora=lora, run=run, runs_dir=runs_dir, resume=resume,
                    train_args=train_args or FinetuneArgs(), progress=progress)


def to_chatml(messages: list[dict], generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def chatml_records(data: Path, model: str | None, run_dir: Path) -> Path:
    """`data` as it is for chat models; for a model without a chat template, prompt/completion rows in
    ChatML text (the completion is the answer and its end marker)."""
    from slmkit.data.records import check_messages, read_jsonl
    from slmkit.generate import is_chat_model
    from slmkit.models import load

    loaded = load(model, dtype="auto", progress=False)
    if loaded.task != "causal-lm":
        raise SlmError(f"{loaded.name} is a {loaded.task} model; Orca students are causal LMs")
    if loaded.tokenizer is not None and is_chat_model(loaded.tokenizer):
        return data
    rows = []
    for where, row in read_jsonl(data):
        msgs = check_messages(row.get("messages"), where)
        if msgs[-1]["role"] != "assistant":
            raise SlmError(f"{where}: an Orca record is a conversation ending with the assistant's answer")
        rows.append({"prompt": to_chatml(msgs[:-1], generation_prompt=True),
                     "completion": msgs[-1]["content"] + "<|im_end|>"})
    return write_jsonl(rows, run_dir / "chatml.jsonl")


def accuracy(lm, items: dict[str, list[Item]], collection: Collection, *, system: str = GENERIC_SYSTEM,
             max_new_tokens: int = 320, progress: bool = True) -> dict:
    """Greedy accuracy per task of a model (`client.open_lm`) under `system` (ChatML text for local models
    without a chat template): {"tasks", "mean", "items"}, the last each item's 0/1 outcome per task."""
    from slmkit.client import LocalLM
    from slmkit.generate import SamplingParams, is_chat_model
    from slmkit.progress import Progress

    params = SamplingParams(max_new_tokens=max_new_tokens, stop=["<|im_end|>"])
    chat = not isinstance(lm, LocalLM) or (lm.loaded.tokenizer is not None and is_chat_model(lm.loaded.tokenizer))
    result, outcomes = {}, {}
    with Progress(disable=not progress) as bar:
        job = bar.add_task(f"held-out accuracy of {lm.name}", total=sum(map(len, items.values())))
        for task, its in items.items():
            if chat:
                replies = answers(lm, its, collection, system, params)
            else:
                prompts = [to_chatml([{"role": "system", "content": system},
                                      {"role": "user", "content": question(it, collection)}], True) for it in its]
                replies = lm.generate(prompts, params, chat=False)
            outcomes[task] = [int(is_correct(it, reply)) for it, reply in zip(its, replies, strict=True)]
            result[task] = sum(outcomes[task]) / len(its)
            bar.advance(job, len(its))
    return {"tasks": result, "mean": sum(result.values()) / len(result), "items": outcomes}




def orca_eval(
    model: str | None = None,
    teacher: str | None = None,
    tasks: list[str] | None = None,
    tasks_file: Path | None = None,
    per_task: int = 64,
    probe: int = 16,
    attempts: int = 2,
    eval_per_task: int = 40,
    max_new_tokens: int = 320,
    lora: bool = True,
    run: str = "orca",
    runs_dir: Path = RUNS_DIR,
    seed: int = 0,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """The Orca proof: a student trained with prompt erasure on the best strategy's answers vs one trained on the
    teacher's direct answers, on held-out items.

    The miniature proof. Two students from the same model, trained the same way on data from the same
    teacher, filtered by the same scorer: `erasure` on the answers of each task's best strategy (Orca), `direct`
    on the teacher's direct answers (the direct-answer strategy for every task). Greedy accuracy of the
    untuned model and both students on held-out items of the same tasks, all under the generic system prompt,
    and of the teacher under each task's chosen strategy prompt for reference.

    Args:
        eval_per_task: Held-out items per task.
    """
    from slmkit.client import open_lm
    from slmkit.methods.finetune import FinetuneArgs

    collection = load_collection(ORCA_TASKS, tasks_file)
    tasks = tasks or list(DEFAULT_TASKS)
    run_dir = Path(runs_dir) / run
    _, held_out = split_items(collection, tasks, per_task + probe, eval_per_task, seed)
    common = dict(teacher=teacher, tasks=tasks, tasks_file=tasks_file, per_task=per_task, probe=probe,
                  attempts=attempts, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    data = {"erasure": orca_data(run_dir / "orca.jsonl", **common),
            "direct": orca_data(run_dir / "direct.jsonl", strategies=["direct-answer"], **common)}
    args = train_args or FinetuneArgs(seed=seed)
    for name, d in data.items():
        orca_train(Path(d["out"]), model, lora=lora, run=f"{run}/{name}", runs_dir=runs_dir, train_args=args,
                   progress=progress)
    scores = {"untuned": accuracy(open_lm(model), held_out, collection, max_new_tokens=max_new_tokens,
                                  progress=progress)}
    for name in data:
        scores[name] = accuracy(open_lm(str(run_dir / name / "model")), held_out, collection,
                                max_new_tokens=max_new_tokens, progress=progress)
    teacher_lm = open_lm(teacher)
    chosen = data["erasure"]["chosen"]
    scores["teacher_with_strategy"] = {"tasks": {
        t: accuracy(teacher_lm, {t: held_out[t]}, collection, system=STRATEGIES[chosen[t]],
                    max_new_tokens=max_new_tokens, progress=False)["mean"]
        for t in tasks}}
    scores["teacher_with_strategy"]["mean"] = sum(scores["teacher_with_strategy"]["tasks"].values()) / len(tasks)
    result = {"model": model, "teacher": data["erasure"]["teacher"], "tasks": tasks,
              "strategy_accuracy": data["erasure"]["strategy_accuracy"], "chosen": chosen,
              "examples": {name: d["examples"] for name, d in data.items()},
              "held_out_per_task": {t: len(v) for t, v in held_out.items()}, "accuracy": scores, "steps": args.steps}
    (run_dir / "orca_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report_data(r: dict, args: dict, out) -> None:
    """Print what `slm orca data` reports."""
    from rich.table import Table

    per_task = args["per_task"]
    probe = args["probe"]
    table = Table("task", *next(iter(r["strategy_accuracy"].values())), "chosen", "kept",
                  title=f"teacher {r['teacher']}: accuracy per strategy on {probe} probe items")
    for t, acc in r["strategy_accuracy"].items():
        table.add_row(t, *(f"{a:.2f}" for a in acc.values()), r["chosen"][t], f"{r['kept_per_task'][t]}/{per_task}")
    out.print(table)
    out.print(f"wrote {r['examples']} examples -> {r['out']}")


def report_train(r: dict, args: dict, out) -> None:
    """Print what `slm orca train` reports."""
    out.print(f"val loss {r['val_loss_before']:.3f} -> {r['val_loss']:.3f}; model -> {Path(r['run_dir']) / 'model'}")


def report_eval(r: dict, args: dict, out) -> None:
    """Print what `slm orca eval` reports."""
    from rich.table import Table

    run = args["run"]
    runs_dir = args["runs_dir"]
    acc = r["accuracy"]
    table = Table("task", "strategy", "untuned", "direct student", "erasure student", "teacher + strategy",
                  title=f"Orca: held-out accuracy under the generic system prompt (teacher {r['teacher']})")
    for t in r["tasks"]:
        table.add_row(t, r["chosen"][t], *(f"{acc[k]['tasks'][t]:.3f}" for k in
                                          ("untuned", "direct", "erasure", "teacher_with_strategy")))
    table.add_row("[bold]mean[/]", "", *(f"{acc[k]['mean']:.3f}" for k in
                                       ("untuned", "direct", "erasure", "teacher_with_strategy")))
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'orca_eval.json'}")
