"""`slm flan proof`: FLAN's held-out-cluster evaluation as the papers ran it, with seeds.

A plain pretrained base (not instruction-tuned; by default the packaged Gemma-3-270M) answers the tasks of
the held-out clusters zero-shot. Then it is instruction-tuned on every other cluster, in arms:

    all-s{i}    all training clusters, chain of thought mixed in, seed i   FLAN: held-out accuracy rises
    nocot-s{i}  the same clusters without CoT examples, seed i             Flan-T5: CoT data keeps reasoning
    k{n}-s0     the first n training clusters (in a seeded order)          FLAN: accuracy as clusters grow

Each arm is its own training run under RUN/arms/ and leaves `heldout.json` there (each item's outcome), so
a rerun skips finished arms and resumes an interrupted one: the proof spans sessions. Every arm is scored
on the same held-out items, and the CoT arms also on chain-of-thought prompts of unseen problems of the
tasks that have rationales. `flan_proof.json` gathers the arms; `scaling.png` draws held-out accuracy
against the number of training clusters.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.methods.flan.collection import load_collection, make_items
from slmkit.methods.flan.scoring import zero_shot_accuracy
from slmkit.methods.flan.workflows import HELP, flan_train  # noqa: F401 (HELP: the help of shared arguments)
from slmkit.train import RUNS_DIR, FinetuneArgs, write_atomic

EVAL_SEED = 99991  # the item seed of held-out examples (training mixtures use seed * 1000 + 17)
# Each arm's tuning: ~12 min for the 270M base on 2 CPU cores (LoRA; the answers are short)
PROOF_TRAIN = dict(steps=120, batch_size=4, seq_len=256, lr=5e-4, warmup_steps=10, eval_every=0, save_every=40)


def arm_plan(training: list[str], seeds: int, scaling: list[int], cot_arms: bool) -> dict[str, dict]:
    """The arms to run, in order: {name: {"clusters", "cot_data", "seed"}} (cot_data: CoT examples are mixed in)."""
    arms = {f"all-s{s}": {"clusters": training, "cot_data": True, "seed": s} for s in range(seeds)}
    if cot_arms:
        arms |= {f"nocot-s{s}": {"clusters": training, "cot_data": False, "seed": s} for s in range(seeds)}
    order = random.Random(0).sample(training, len(training))
    for k in sorted(set(scaling)):
        if not 1 <= k < len(training):
            raise SlmError(f"--scaling {k}: a number of training clusters from 1 to {len(training) - 1} "
                           f"(all {len(training)} are the all-s* arms)")
        arms[f"k{k}-s0"] = {"clusters": sorted(order[:k]), "cot_data": True, "seed": 0}
    return arms


def _score(loaded, held_items, cot_items, collection, *, rank: bool, progress: bool) -> dict:
    out = {"heldout": zero_shot_accuracy(loaded, held_items, collection, rank=rank, progress=progress)}
    if cot_items:
        out["cot"] = zero_shot_accuracy(loaded, cot_items, collection, fmt="cot", max_new_tokens=160,
                                        progress=progress)
    return out


def _write(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def flan_proof(
    model: str = "gemma3-270m",
    held_out: list[str] | None = None,
    seeds: int = 3,
    scaling: list[int] | None = None,
    cot_arms: bool = True,
    tasks_file: Path | None = None,
    examples: int = 1200,
    cap: int = 500,
    few_shot: float = 0.2,
    cot: float = 0.5,
    eval_per_task: int = 40,
    cot_eval_per_task: int = 20,
    rank: bool = False,
    lora: bool = True,
    run: str = "flan-proof",
    runs_dir: Path = RUNS_DIR,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """FLAN's proof with seeds: a plain base, held-out clusters, tuned arms (all clusters, no CoT, fewer clusters).

    Score a plain pretrained base zero-shot on held-out clusters, instruction-tune it on the other clusters in
    arms (all clusters x seeds, the same without CoT x seeds, the first k clusters for the scaling view), and
    score every arm on the same held-out items. Resumable: a rerun skips finished arms.

    Args:
        model: A plain (not instruction-tuned) base: gemma3-270m (packaged), a pretrained run, a directory.
        held_out: Clusters never seen in tuning (default: classification and extraction).
        seeds: Seeds of the all-cluster arms (and of the no-CoT arms).
        scaling: Numbers of training clusters for the scaling arms (default 1, 3, 5).
        cot_arms: Also tune without chain-of-thought examples (Flan-T5's comparison).
        eval_per_task: Held-out items per task.
        cot_eval_per_task: Unseen problems per rationale-bearing task, answered with a chain-of-thought prompt.
        rank: Score OPTIONS tasks by rank classification (the likeliest option) instead of the generated answer.
    """
    from slmkit.models import load

    held_out = list(held_out or ["classification", "extraction"])
    scaling = [1, 3, 5] if scaling is None else list(scaling)
    collection = load_collection(tasks_file)
    unknown = [c for c in held_out if c not in collection.clusters]
    if unknown:
        raise SlmError(f"unknown cluster '{unknown[0]}' (clusters: {', '.join(sorted(collection.clusters))})")
    if seeds < 1:
        raise SlmError("--seeds must be at least 1")
    training = sorted(c for c in collection.clusters if c not in held_out)
    if not training:
        raise SlmError("every cluster is held out: nothing is left to tune on")
    arms = arm_plan(training, seeds, scaling, cot_arms)
    run_dir = Path(runs_dir) / run
    (run_dir / "arms").mkdir(parents=True, exist_ok=True)
    held_items = [it for t in collection.tasks if t.cluster in held_out
                  for it in make_items(t, eval_per_task, seed=EVAL_SEED)]
    cot_items = [it for t in collection.tasks if t.cluster in training and t.cot
                 for it in make_items(t, cot_eval_per_task, seed=EVAL_SEED)] if cot_arms else []

    setup = dict(model=model, held_out=held_out, training=training, eval_per_task=eval_per_task, rank=rank,
                 task_clusters={t.name: t.cluster for t in collection.tasks if t.cluster in held_out})
    base_file = run_dir / "base.json"
    if not base_file.is_file():
        _write(base_file, _score(load(model, dtype="auto", progress=progress), held_items, cot_items, collection,
                                 rank=rank, progress=progress))
    result = gather(run_dir, **setup)
    for name, arm in arms.items():
        arm_dir = run_dir / "arms" / name
        if (arm_dir / "heldout.json").is_file():
            continue
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]arm {name}[/]: tuning on {', '.join(arm['clusters'])}"
                                       f"{'' if arm['cot_data'] else ' (no CoT)'}")
        args = replace(train_args or FinetuneArgs(**PROOF_TRAIN), seed=arm["seed"])
        summary = flan_train(model, tasks_file=tasks_file, clusters=arm["clusters"], examples=examples, cap=cap,
                             few_shot=few_shot, cot=cot if arm["cot_data"] else 0.0, lora=lora, run=name,
                             runs_dir=run_dir / "arms", resume=(arm_dir / "metrics.jsonl").is_file(),
                             seed=arm["seed"], train_args=args, progress=progress)
        scores = _score(load(summary["model_dir"], dtype="auto", progress=progress), held_items,
                        cot_items if name.startswith(("all-", "nocot-")) else [], collection, rank=rank,
                        progress=progress)
        _write(arm_dir / "heldout.json", {**arm, **scores, "val_loss": summary.get("val_loss"),
                                          "mixture_examples": summary["mixture_examples"]})
        result = gather(run_dir, **setup)
    return result


def gather(run_dir: Path, **setup) -> dict:
    """flan_proof.json from base.json and every finished arm's heldout.json, and scaling.png (both written
    atomically after each arm, so an unfinished proof shows what it has)."""
    arms = {}
    for path in sorted((run_dir / "arms").glob("*/heldout.json")):
        arms[path.parent.name] = json.loads(path.read_text())
    result = {**setup, "base": json.loads((run_dir / "base.json").read_text()), "arms": arms}
    _write(run_dir / "flan_proof.json", result)
    plot_scaling(result, run_dir / "scaling.png")
    return result


def _accuracy(scores: dict, tasks: list[str] | None) -> float:
    """The mean over `tasks` (default: all) of an accuracy result's task accuracies."""
    return sum(scores["tasks"][t] for t in tasks) / len(tasks) if tasks else scores["mean"]


def scaling_points(result: dict, tasks: list[str] | None = None) -> list[tuple[int, list[float]]]:
    """(number of training clusters, held-out accuracies over `tasks`) from the untuned base (0) through the k-cluster
    arms to all clusters (one value per seed)."""
    points = [(0, [_accuracy(result["base"]["heldout"], tasks)])]
    everything: list[float] = []
    for name, arm in sorted(result["arms"].items()):
        if name.startswith("k"):
            points.append((len(arm["clusters"]), [_accuracy(arm["heldout"], tasks)]))
        elif name.startswith("all-"):
            everything.append(_accuracy(arm["heldout"], tasks))
    if everything:
        points.append((len(result["training"]), everything))
    return sorted(points)


def plot_scaling(result: dict, out: Path) -> Path | None:
    """FLAN's scaling view: held-out zero-shot accuracy against the number of clusters tuned on, for both held-out
    clusters together (seeds as dots) and for each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = scaling_points(result)
    xs = [k for k, _ in points]
    ax.plot(xs, [sum(v) / len(v) for _, v in points], "o-", lw=2, label="held-out clusters (mean over seeds)")
    for k, values in points:
        ax.scatter([k] * len(values), values, color="gray", s=12, zorder=3)
    for cluster in result["held_out"]:
        tasks = sorted(t for t, c in result["task_clusters"].items() if c == cluster)
        cluster_points = scaling_points(result, tasks)
        ax.plot([k for k, _ in cluster_points], [sum(v) / len(v) for _, v in cluster_points], "s--", lw=1, ms=4,
                label=cluster)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.set_xlabel("task clusters in instruction tuning (0 = untuned base)")
    ax.set_ylabel("held-out zero-shot accuracy")
    ax.set_title(f"FLAN: {result['model']}, {result['eval_per_task']} items per held-out task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def report(r: dict, args: dict, out) -> None:
    """Print what `slm flan proof` reports."""
    from rich.table import Table

    table = Table("arm", "tuned on", "held-out accuracy", "CoT accuracy",
                  title=f"FLAN proof: {r['model']}, held out {', '.join(r['held_out'])}")
    base = r["base"]
    table.add_row("untuned base", "-", f"{base['heldout']['mean']:.3f}",
                  f"{base['cot']['mean']:.3f}" if "cot" in base else "")
    for name, arm in r["arms"].items():
        table.add_row(name, f"{len(arm['clusters'])} clusters{'' if arm['cot_data'] else ', no CoT'}",
                      f"{arm['heldout']['mean']:.3f}", f"{arm['cot']['mean']:.3f}" if "cot" in arm else "")
    out.print(table)
    out.print(f"results -> {Path(args['runs_dir']) / args['run'] / 'flan_proof.json'}")
