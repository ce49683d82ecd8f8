"""The `slm flan` commands: build a mixture, instruction-tune on it, evaluate on a held-out cluster, list clusters."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError
from slmkit.methods.flan.collection import ANSWER_SEPARATOR, build_mixture, load_collection, make_items
from slmkit.methods.flan.scoring import zero_shot_accuracy
from slmkit.train import RUNS_DIR, FinetuneArgs

HELP = {  # the help of arguments several workflows here share (see slmkit.workflows)
    "clusters": "Only these clusters (repeatable).",
    "exclude": "Leave out these clusters (repeatable).",
    "examples": "Examples in the mixture.",
    "cap": "Per-task cap for examples-proportional mixing.",
    "few_shot": "Fraction of examples rendered few-shot.",
    "cot": "Fraction of rationale-bearing tasks' examples rendered as chain of thought (0 = no CoT).",
}


def training_rows(rows: list[dict], chat: bool) -> list[dict]:
    """Chat models learn the mixture as user/assistant turns (their template, as at inference); others as
    prompt/completion text with the answer on the line after the prompt (as `zero_shot_accuracy` asks)."""
    if not chat:
        return [{**r, "prompt": r["prompt"] + ANSWER_SEPARATOR} for r in rows]
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
