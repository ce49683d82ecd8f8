"""`slm pet`: fixed splits, PET and iPET generations against plain fine-tuning over seeds, the plot and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slmkit.data.sft import load_classification, split_rows
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.methods.pet.cloze import load_pvps
from slmkit.methods.pet.ensemble import (
    Member,
    ensemble_logits,
    logit_accuracy,
    pseudo_labelled,
    softmax,
    train_classifier,
    train_member,
)
from slmkit.train import RUNS_DIR


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
                                  "ensemble": logit_accuracy(ensemble_logits(generation, "test"), gold),
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
