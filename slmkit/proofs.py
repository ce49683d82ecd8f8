"""The miniature proofs: for each seed system, the commands that measure the paper's effect on this machine, the
result file they leave, and the claims read from it (`slm proofs`, the `/proofs` page).

A claim is one effect the paper predicts, "A beats B on a metric", in the shape of `docs/results/<system>.json`:

    {"claim": "PET beats plain fine-tuning", "metric": "test accuracy", "arms": {"PET": 0.913, "fine-tuning": 0.823},
     "better": "PET", "baseline": "fine-tuning", "lower_is_better": false, "over": "3 seeds",
     "difference_interval": [0.05, 0.13], "holds": true}

`difference_interval` is a 95% interval of better − baseline: a paired t-interval over seeds, or a paired bootstrap
over test items when the result file keeps each item's outcome. `holds` is true only when the interval excludes
zero in the claimed direction, false when it excludes it the other way or the claim's figures point the other way
without one, and null while no interval can be made ("not distinguishable" is null with an interval across zero).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "results"  # committed figures, in a source checkout
# Student's t, 97.5th percentile, by degrees of freedom (1..10); beyond 10 the normal's 1.96 is within 12%
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def seed_interval(better: list[float], baseline: list[float]) -> list[float] | None:
    """95% paired t-interval of the mean difference over seeds (None below two seeds)."""
    diffs = [a - b for a, b in zip(better, baseline, strict=True)]
    if len(diffs) < 2:
        return None
    half = (T975[len(diffs) - 2] if len(diffs) <= 11 else 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return [statistics.mean(diffs) - half, statistics.mean(diffs) + half]


def bootstrap_interval(better: list[float] | dict[str, list[float]], baseline: list[float] | dict[str, list[float]],
                       *, weights: list[float] | None = None, rounds: int = 2000, seed: int = 0) -> list[float] | None:
    """95% paired bootstrap interval of the mean difference over test items (each item's score in both arms).
    Given per-task lists ({task: scores}), items are resampled within each task and the difference is of the
    mean of task means, as the accuracies it qualifies are; given `weights` (e.g. each record's tokens), of the
    weighted mean, as a per-token figure is."""
    if isinstance(better, dict):
        groups = [[(a - b, 1.0) for a, b in zip(better[t], baseline[t], strict=True)] for t in better]
    else:
        groups = [[(a - b, w) for a, b, w in zip(better, baseline, weights or [1.0] * len(better), strict=True)]]
    if sum(map(len, groups)) < 2 or not all(groups):
        return None
    rng = random.Random(seed)

    def mean(sample: list[tuple[float, float]]) -> float:
        return sum(d * w for d, w in sample) / sum(w for _, w in sample)

    means = sorted(sum(mean(rng.choices(g, k=len(g))) for g in groups) / len(groups) for _ in range(rounds))
    return [means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]]


def claim(text: str, metric: str, arms: dict[str, float], better: str, baseline: str, *,
          lower_is_better: bool = False, interval: list[float] | None = None, over: str = "",
          margin: float = 0.0) -> dict:
    """One claim. With a `margin` it is a "does not lose" claim: better >= baseline - margin (holds when the
    interval's low end is above -margin)."""
    sign = -1 if lower_is_better else 1
    if interval is not None:
        low, high = sorted(sign * v for v in interval)
        holds = True if low > -margin else False if high < -margin else None
    else:
        holds = False if sign * (arms[better] - arms[baseline]) <= -margin else None
    out = {"claim": text, "metric": metric, "arms": arms, "better": better, "baseline": baseline,
           "lower_is_better": lower_is_better, "over": over, "difference_interval": interval, "holds": holds}
    return out | ({"margin": margin} if margin else {})


# --- each system's claims, from the result file its command writes ---------------------------------------


def pretraining(r: dict, path: Path) -> list[dict]:
    per = r.get("per_window")
    if not per:  # masked / span objectives: the perplexities alone
        return [claim("pretraining beats the unigram baseline", "validation perplexity",
                      {"model": r["val_ppl"], "unigram": r["unigram_ppl"]}, "model", "unigram", lower_is_better=True,
                      over="the validation split")]
    mean = {arm: sum(v * n for v, n in zip(per[arm], per["tokens"], strict=True)) / sum(per["tokens"])
            for arm in ("model", "unigram")}
    return [claim("pretraining beats the unigram baseline", "validation NLL per token (nats)", mean, "model",
                  "unigram", lower_is_better=True, over=f"{len(per['tokens'])} validation windows",
                  interval=bootstrap_interval(per["model"], per["unigram"], weights=per["tokens"]))]


def eft(r: dict, path: Path) -> list[dict]:
    best = f"eft_beta_{r['best_beta']:g}"
    up = f"up-scaled, β = {r['best_beta']:g}"
    per = r.get("per_record")
    interval = bootstrap_interval(per[best], per["large_base"], weights=per["tokens"]) if per else None
    return [claim("the small pair's fine-tuning helps the large base", "held-out answer NLL",
                  {up: r["nll"][best], "large base": r["nll"]["large_base"]}, up, "large base",
                  lower_is_better=True, interval=interval, over=f"{r['held_out']} held-out answers")]


def supericl(r: dict, path: Path) -> list[dict]:
    items = [json.loads(line) for line in (path.parent / "predictions.jsonl").read_text().splitlines()
             if line.strip()] if (path.parent / "predictions.jsonl").is_file() else []
    out = []
    for other, name in (("plugin", "plug-in"), ("icl", "in-context learning")):
        score = {arm: [float(i[arm] == i["label"]) for i in items] for arm in ("supericl", other)}
        interval = bootstrap_interval(score["supericl"], score[other]) if items else None
        out.append(claim(f"SuperICL beats {name} alone", "accuracy",
                         {"SuperICL": r["accuracy"]["supericl"], name: r["accuracy"][other]}, "SuperICL", name,
                         interval=interval, over=f"{r['test_examples']} test questions"))
    return out


def _items_interval(better: dict, baseline: dict) -> list[float] | None:
    """A bootstrap interval from two accuracy results that kept each item's outcome (`items`), else None."""
    if "items" not in better or "items" not in baseline:
        return None
    return bootstrap_interval(better["items"], baseline["items"])


def _seeds(r: dict, prefix: str, score: str, tasks: list[str] | None = None) -> list[float]:
    """Each seed's accuracy (mean over `tasks`, default all) of the arms PREFIX-s0, PREFIX-s1, ... of a FLAN proof."""
    out = []
    for name in sorted((n for n in r["arms"] if n.rsplit("-s", 1)[0] == prefix), key=lambda n: int(n.rsplit("-s")[1])):
        acc = r["arms"][name].get(score)
        if acc:
            out.append(statistics.mean(acc["tasks"][t] for t in tasks) if tasks else acc["mean"])
    return out


def flan(r: dict, path: Path) -> list[dict]:
    """`slm flan proof`: the all-cluster arms (seeds) against the untuned base, on all held-out clusters and on each."""
    out = []
    clusters = r["task_clusters"]
    groups = {"the held-out clusters": sorted(clusters)} | {
        f"held-out {c}": sorted(t for t, k in clusters.items() if k == c) for c in r["held_out"]}
    for where, tasks in groups.items():
        tuned = _seeds(r, "all", "heldout", tasks)
        if not tuned:
            continue
        base = statistics.mean(r["base"]["heldout"]["tasks"][t] for t in tasks)
        out.append(claim(f"instruction tuning raises zero-shot accuracy on {where}", "zero-shot accuracy",
                         {"tuned": statistics.mean(tuned), "untuned": base}, "tuned", "untuned",
                         interval=seed_interval(tuned, [base] * len(tuned)),
                         over=f"{len(tuned)} seeds, {r['eval_per_task']} items per task"))
    return out


def flan_cot(r: dict, path: Path) -> list[dict]:
    """`slm flan proof`: CoT-mixed arms against the same mixtures without CoT, seed by seed."""
    out = []
    for score, text, margin in (("cot", "chain-of-thought data keeps step-by-step reasoning (CoT prompts, unseen "
                                 "problems)", 0.0),
                                ("heldout", "chain-of-thought data costs no held-out zero-shot accuracy (within "
                                 "5 points)", 0.05)):
        with_cot, without = _seeds(r, "all", score), _seeds(r, "nocot", score)
        n = min(len(with_cot), len(without))
        if not n:
            continue
        out.append(claim(text, "accuracy", {"with CoT": statistics.mean(with_cot[:n]),
                                            "without CoT": statistics.mean(without[:n])}, "with CoT", "without CoT",
                         interval=seed_interval(with_cot[:n], without[:n]), over=f"{n} seeds", margin=margin))
    return out


def ul2r(r: dict, path: Path) -> list[dict]:
    after, before = r["after"].get("per_window"), r["before"].get("per_window")
    interval = bootstrap_interval(after["infilling_loss"], before["infilling_loss"], weights=after["tokens"]) \
        if after and before else None
    return [claim("UL2R teaches infilling", "infilling loss", {"after": r["after"]["infilling_loss"],
                                                               "before": r["before"]["infilling_loss"]},
                  "after", "before", lower_is_better=True, interval=interval,
                  over=f"{len(after['tokens']) if after else '?'} windows, {r['steps']} steps")]


def orca(r: dict, path: Path) -> list[dict]:
    acc = r["accuracy"]
    return [claim("prompt erasure beats training on direct answers", "held-out accuracy",
                  {"erasure": acc["erasure"]["mean"], "direct": acc["direct"]["mean"]}, "erasure", "direct",
                  interval=_items_interval(acc["erasure"], acc["direct"]),
                  over=f"{sum(r['held_out_per_task'].values())} held-out items")]


def pet(r: dict, path: Path) -> list[dict]:
    seeds = r["per_seed"]
    out = []
    for better, baseline, text in (("pet", "fine-tuning", "PET beats plain fine-tuning"),
                                   ("ipet", "pet", "iPET beats PET")):
        if better in r["mean"] and baseline in r["mean"]:
            out.append(claim(text, "test accuracy", {better: r["mean"][better], baseline: r["mean"][baseline]},
                             better, baseline, over=f"{len(seeds)} seeds",
                             interval=seed_interval([s[better] for s in seeds], [s[baseline] for s in seeds])))
    return out


def length_adaptive(r: dict, path: Path) -> list[dict]:
    if "lad" not in r:
        return []
    lad = r["lad"]
    return [claim(f"the pruned student runs {lad['flops_ratio']:.2f}x fewer FLOPs within 1 point of its accuracy",
                  "test accuracy", {"pruned": lad["pruned"]["accuracy"], "unpruned": lad["full"]["accuracy"]},
                  "pruned", "unpruned", margin=0.01, interval=_items_interval(lad["pruned"], lad["full"]),
                  over=f"{r['examples']['test']} test examples")]


def tinygsm(r: dict, path: Path) -> list[dict]:
    n = max(r["majority"], key=int)
    per = r.get("per_problem")
    arms = {"verifier": r["verifier"].get(n), "majority": r["majority"][n], "pass@1": r["pass@1"]}
    outcomes = {"verifier": per["verifier"].get(n), "majority": per["majority"][n], "pass@1": per["pass@1"]} \
        if per else {}
    out = []
    for better, baseline, text in (("verifier", "majority", f"verifier best-of-{n} beats majority vote"),
                                   ("majority", "pass@1", f"majority vote over {n} beats one sample")):
        if arms[better] is None:
            continue
        interval = bootstrap_interval(outcomes[better], outcomes[baseline]) if outcomes.get(better) else None
        out.append(claim(text, "accuracy", {better: arms[better], baseline: arms[baseline]}, better, baseline,
                         interval=interval, over=f"{r['problems']} problems"))
    return out


def flame(r: dict, path: Path) -> list[dict]:
    per = r.get("per_pair")
    return [claim("the model repairs broken formulas better than copying them", "exact repair",
                  {"model": r["repair_exact"], "copy the input": r["copy_exact"]}, "model", "copy the input",
                  interval=bootstrap_interval(per["model"], per["copy"]) if per else None,
                  over=f"{r['repairs']} held-out pairs")]


def slade(r: dict, path: Path) -> list[dict]:
    def interval(v: dict) -> list[float] | None:
        io = v.get("io_per_function")
        return bootstrap_interval(io, [0] * len(io)) if io else None

    return [claim(f"decompiled {level} functions pass their IO tests", "IO accuracy",
                  {"model": v["io_accuracy"], "none": 0.0}, "model", "none", interval=interval(v),
                  over=f"{v['functions']} functions") for level, v in sorted(r["levels"].items())]


def llava(r: dict, path: Path) -> list[dict]:
    per = r.get("per_question")
    return [claim("answers with the image beat the question prior", "accuracy",
                  {"with the image": r["accuracy"], "question prior": r["prior_accuracy"]}, "with the image",
                  "question prior", interval=bootstrap_interval(per["image"], per["prior"]) if per else None,
                  over=f"{r['questions']} questions")]


@dataclass(frozen=True)
class Proof:
    key: str  # docs/results/<key>.json holds its committed figures
    system: str
    doc: str  # the docs page with the full tables and limits
    effect: str  # the paper's effect, at laptop scale
    commands: tuple[str, ...]  # run in this order from the project directory
    result: str  # the result file the last command writes, under the runs directory
    claims: Callable[[dict, Path], list[dict]]
    plot: str | None = None  # the plot beside it (under the runs directory), committed with the figures


PROOFS = [  # key, system, docs page, the effect; the commands, the result file they leave, the claims read from it
    Proof("tinyllama", "TinyLlama", "docs/models.md", "a nano Llama pretrained for minutes beats the unigram baseline",
          ("slm run recipes/tinyllama-nano.yaml",), "tinyllama-nano/pretrain.json", pretraining),
    Proof("litellama", "LiteLlama", "docs/models.md", "the same recipe with GPT-2's BPE beats the unigram baseline",
          ("slm run recipes/litellama-nano.yaml",), "litellama-nano/pretrain.json", pretraining),
    Proof("phi", "Phi", "docs/data.md", "a nano Phi (parallel block, partial rotary) beats the unigram baseline",
          ("slm run recipes/phi-nano.yaml",), "phi-nano/pretrain.json", pretraining),
    Proof("roberta", "RoBERTa", "docs/models.md",
          "masked-LM pretraining with dynamic masking beats the unigram baseline",
          ("slm run recipes/roberta-nano.yaml",), "roberta-nano/pretrain.json", pretraining),
    Proof("flan-t5", "Flan-T5", "docs/flan.md",
          "a T5 span-pretrained beats the unigram baseline, then is instruction-tuned",
          ("slm run recipes/flan-t5-nano.yaml", "slm run recipes/flan-t5-nano-tune.yaml"),
          "flan-t5-nano/pretrain.json", pretraining),
    Proof("eft", "EFT / up-scaling", "docs/eft.md", "a small pair's fine-tuning added to a large base helps it",
          ("slm run recipes/eft-small-base.yaml", "slm run recipes/eft-small-ft.yaml",
           "slm run recipes/eft-upscale.yaml"), "eft-upscale/eft_eval.json", eft, "eft-upscale/eft_beta.png"),
    Proof("supericl", "SuperICL", "docs/supericl.md", "SuperICL beats both the plug-in and in-context learning",
          ("slm run recipes/supericl-topics.yaml",), "supericl-topics/supericl.json", supericl),
    Proof("flan", "FLAN", "docs/flan.md",
          "tuning a plain base on other clusters raises zero-shot accuracy on held-out ones",
          ("slm run recipes/flan-proof.yaml",), "flan-proof/flan_proof.json", flan, "flan-proof/scaling.png"),
    Proof("flan-t5-cot", "Flan-T5 CoT mixture", "docs/flan.md", "chain-of-thought data in the mixture keeps reasoning",
          ("slm run recipes/flan-proof.yaml",), "flan-proof/flan_proof.json", flan_cot),
    Proof("ul2r", "UL2R", "docs/ul2r.md", "a few hundred denoising steps teach infilling, left-to-right quality kept",
          ("slm run recipes/ul2r-nano.yaml",), "ul2r-nano/ul2r.json", ul2r),
    Proof("orca", "Orca 2", "docs/orca.md", "prompt erasure beats training on direct answers",
          ("slm run recipes/orca-smollm2.yaml",), "orca-smollm2/orca_eval.json", orca),
    Proof("pet", "PET / iPET", "docs/pet.md", "with 32 labels, cloze patterns beat plain fine-tuning; iPET beats PET",
          ("slm run recipes/pet-spam-smollm2.yaml",), "pet-spam-smollm2/pet.json", pet, "pet-spam-smollm2/pet.png"),
    Proof("lad", "Length-Adaptive Distillation", "docs/distillation.md",
          "the pruned student runs 2x fewer FLOPs within 1 point of its accuracy",
          ("slm run recipes/lad-brown-minilm6.yaml",), "lad-brown-minilm6/distill.json", length_adaptive,
          "lad-brown-minilm6/frontier.png"),
    Proof("tinygsm", "TinyGSM", "docs/tinygsm.md", "verifier best-of-N beats majority vote beats one sample",
          ("slm run recipes/tinygsm-data.yaml", "slm run recipes/tinygsm-generator.yaml",
           "slm run recipes/tinygsm-verifier.yaml", "slm run recipes/tinygsm-eval.yaml"),
          "tinygsm-eval/gsm_eval.json", tinygsm, "tinygsm-eval/best_of_n.png"),
    Proof("flame", "FLAME", "docs/flame.md", "a nano formula model repairs broken formulas better than copying them",
          ("slm flame data --out data/flame", "slm run recipes/flame-nano.yaml", "slm flame eval"),
          "flame/tune/model/flame_eval.json", flame),
    Proof("slade", "SLaDe", "docs/slade.md", "a nano model decompiles -O0 and -O3 assembly into C that passes IO tests",
          ("slm slade data --out data/slade", "slm run recipes/slade-nano.yaml", "slm slade eval"),
          "slade/train/model/slade_eval.json", slade),
    Proof("llava-phi", "LLaVA-ϕ", "docs/llava-phi.md", "answers with the image beat the same model without it",
          ("slm llava data --out data/llava", "slm run recipes/llava-phi-nano-stage1.yaml",
           "slm run recipes/llava-phi-nano-stage2.yaml", "slm llava eval"),
          "llava/stage2/model/llava_eval.json", llava),
]


def reference(proof: Proof, results_dir: Path = REFERENCE) -> list[dict]:
    """The claims committed in docs/results/<key>.json (a source checkout), or none."""
    path = results_dir / f"{proof.key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    claims = data.get("claims", data) if isinstance(data, dict) else data
    return [c for c in claims if isinstance(c, dict)] if isinstance(claims, list) else []


def status(proof: Proof, runs_dir: Path = RUNS_DIR, results_dir: Path = REFERENCE) -> dict:
    """One proof as `slm proofs` and the page show it: its commands, whether its result is on this machine, the
    claims read from it (or why they could not be), and the reference claims committed in docs/results/."""
    out = {"key": proof.key, "system": proof.system, "doc": proof.doc, "effect": proof.effect,
           "commands": list(proof.commands), "result": proof.result, "run": proof.result.split("/")[0],
           "measured": None, "claims": [], "error": None, "reference": reference(proof, results_dir)}
    path = Path(runs_dir) / proof.result
    if not path.is_file():
        return out
    out["measured"] = path.stat().st_mtime
    try:
        out["claims"] = proof.claims(json.loads(path.read_text()), path)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        out["error"] = f"{path} could not be read as this proof's result ({type(e).__name__}: {e})"
    return out


def proof_status(runs_dir: Path = RUNS_DIR, record: tuple[str, ...] = (), results_dir: Path = REFERENCE) -> list[dict]:
    """The miniature proofs: for each seed system, the commands that measure the paper's effect here, whether they
    have run on this machine, and the claims read from their result files beside those committed in docs/results/.

    Args:
        runs_dir: Where the proofs' commands wrote their runs.
        record: Proofs whose figures measured here become the committed ones: written to RESULTS_DIR/<key>.json
            with the command line, the source commit and the machine (e.g. pet,eft; `all` for every measured one).
        results_dir: Where the committed figures live.
    """
    rows = [status(p, runs_dir, Path(results_dir)) for p in PROOFS]
    keys = {r["key"] for r in rows if r["measured"]} if "all" in record else set(record)
    unknown = keys - {p.key for p in PROOFS}
    if unknown:
        raise SlmError(f"no proof {sorted(unknown)[0]} (proofs: {', '.join(p.key for p in PROOFS)})")
    for r in rows:
        if r["key"] in keys:
            write_reference(r, Path(runs_dir), Path(results_dir))
            r["reference"] = reference(next(p for p in PROOFS if p.key == r["key"]), Path(results_dir))
    return rows


def write_reference(row: dict, runs_dir: Path, results_dir: Path) -> Path:
    """RESULTS_DIR/<key>.json from a proof measured here: its claims, the command line and source commit of the
    workflow that wrote the result (from the run's workflow.jsonl), when and on what machine."""
    import datetime

    from slmkit.runs import last_workflow
    from slmkit.train import write_atomic

    if row["error"] or not row["measured"] or not row["claims"]:
        raise SlmError(f"proof {row['key']}: nothing to record ({row['error'] or 'not measured here: run '}"
                       f"{'' if row['error'] else ' && '.join(row['commands'])})")
    run = last_workflow(runs_dir / row["run"])
    record = {"system": row["system"], "key": row["key"], "effect": row["effect"], "commands": row["commands"],
              "ran": "slm " + " ".join(run["argv"]) if run.get("argv") else None, "source": run.get("source"),
              "measured": datetime.datetime.fromtimestamp(row["measured"], datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine(), "claims": row["claims"]}
    results_dir.mkdir(parents=True, exist_ok=True)
    proof = next(p for p in PROOFS if p.key == row["key"])
    if proof.plot and (runs_dir / proof.plot).is_file():  # the plot of these figures, beside them
        import shutil

        tmp = results_dir / f".{row['key']}.png.tmp"
        shutil.copyfile(runs_dir / proof.plot, tmp)
        tmp.replace(results_dir / f"{row['key']}.png")
        record["plot"] = f"{row['key']}.png"
    path = results_dir / f"{row['key']}.json"
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def machine() -> dict:
    """This machine as the committed figures name it: the CPU model, its cores, and whether it has AVX-512."""
    import os

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    return {"cpu": model, "cores": os.cpu_count(), "avx512": " avx512f" in info}


def verdict(c: dict) -> str:
    return {True: "holds", False: "does not hold", None: "not distinguishable" if c["difference_interval"] else
            "no interval yet"}[c["holds"]]


def arms_text(c: dict) -> str:
    return " vs ".join(f"{name} {value:.3f}" for name, value in c["arms"].items())


def interval_text(c: dict) -> str | None:
    interval = c["difference_interval"]
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else None


def figures(c: dict) -> str:
    return arms_text(c) + (f" (difference {interval_text(c)})" if c["difference_interval"] else "")


def report(rows: list[dict], args: dict, out) -> None:
    """Print what `slm proofs` reports."""
    from rich.table import Table

    table = Table("system", "claim", "measured here", "verdict", "committed (docs/results)", show_lines=True,
                  title=f"miniature proofs, results under {args['runs_dir']}")
    for r in rows:
        claims = r["claims"] or [None]
        for i, c in enumerate(claims):
            ref = next((x for x in r["reference"] if c and x.get("claim") == c["claim"]), None)
            here = figures(c) if c else (r["error"] or "not run here: " + " && ".join(r["commands"]))
            table.add_row(r["system"] if i == 0 else "", c["claim"] if c else r["effect"], here,
                          verdict(c) if c else "", f"{figures(ref)}: {verdict(ref)}" if ref else "")
    out.print(table)
