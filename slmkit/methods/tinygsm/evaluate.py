"""TinyGSM's evaluation: pass@1, majority vote over executed answers and verifier best-of-N on held-out
problems (`gsm_eval`), with a plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.methods.tinygsm.data import matches, test_problems
from slmkit.methods.tinygsm.generator import Sample, majority, solve
from slmkit.methods.tinygsm.verifier import verifier_scores
from slmkit.train import RUNS_DIR


def best_of_n(problems: list[dict], solved: list[list[Sample]], scores: list[list[float]] | None,
              ns: list[int]) -> dict:
    """pass@1 (the mean correctness of single samples), and per N: majority vote over the first N samples'
    executed answers, and the verifier's top-scored sample among them; `per_problem` keeps each problem's
    outcome in every arm, for intervals over problems."""
    correct = [[matches(s.answer(), p["answer"]) for s in sols] for p, sols in zip(problems, solved, strict=True)]
    per = {"pass@1": [sum(c) / len(c) for c in correct], "majority": {}, "verifier": {}}
    for n in ns:
        per["majority"][n] = [int(matches(majority(sols[:n]), p["answer"]))
                              for p, sols in zip(problems, solved, strict=True)]
        if scores is not None:
            picks = [max(range(min(n, len(sc))), key=sc.__getitem__) for sc in scores]
            per["verifier"][n] = [int(c[i]) for c, i in zip(correct, picks, strict=True)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"problems": len(problems), "pass@1": mean(per["pass@1"]),
            "majority": {n: mean(v) for n, v in per["majority"].items()},
            "verifier": {n: mean(v) for n, v in per["verifier"].items()}, "per_problem": per}


def plot_best_of_n(result: dict, out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted(result["majority"])
    ax.axhline(result["pass@1"], color="gray", linestyle="--", label="pass@1")
    ax.plot(ns, [result["majority"][n] for n in ns], "o-", label="majority vote")
    if result["verifier"]:
        ax.plot(ns, [result["verifier"][n] for n in ns], "s-", label="verifier best-of-N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def gsm_eval(
    generator: str,
    verifier: str | None = None,
    test: str = "gsm_symbolic",
    problems: int = 100,
    n: list[int] | None = None,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    run: str = "gsm-eval",
    runs_dir: Path = RUNS_DIR,
    seed: int = 0,
    engine: str = "torch",
    unsandboxed: bool = False,
    progress: bool = True,
) -> dict:
    """pass@1, majority vote and verifier best-of-N on held-out problems, with a plot of accuracy against N.

    Sample max(n) programs per test problem, execute them, and report pass@1, majority vote and (with a
    verifier) verifier best-of-N for each N, with a plot. Samples are kept in the run directory: a rerun with
    another verifier reuses them.

    Args:
        generator: The generator (runs/NAME/model).
        verifier: The verifier (runs/NAME/model from verify-train).
        test: gsm_symbolic (GSM8K-style), heldout-stories (unseen chains of events) or heldout-templates (unseen
            hand-written templates).
        problems: Test problems.
        n: N values for best-of-N (repeatable; default 1 4 16 48).
        temperature: Sampling temperature.
        max_new_tokens: Longest program in tokens.
        seed: Sampling seed.
    """
    from slmkit.engines import open_model
    from slmkit.sandbox import Sandbox

    ns = sorted(n or [1, 4, 16, 48])
    run_dir = Path(runs_dir) / run
    run_dir.mkdir(parents=True, exist_ok=True)
    items = test_problems(test, problems)
    key = {"generator": generator, "test": test, "problems": problems, "samples": ns[-1], "temperature": temperature,
           "seed": seed} | ({"engine": engine} if engine != "torch" else {})
    cache = run_dir / "samples.jsonl"
    rows = [row for _, row in read_jsonl(cache)] if cache.is_file() else []
    if rows and rows[0].get("key") == key:
        solved = [[Sample(**s) for s in row["samples"]] for row in rows]
    else:
        with Sandbox(2, unsandboxed=unsandboxed) as sandbox:
            solved = solve(open_model(generator, engine, progress=progress), [p["question"] for p in items], sandbox,
                           samples=ns[-1], temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                           progress=progress, partial=run_dir / "samples.partial.jsonl")
        write_jsonl([{"key": key, **p, "samples": [s.__dict__ for s in sols]} for p, sols in zip(items, solved,
                                                                                               strict=True)], cache)
        (run_dir / "samples.partial.jsonl").unlink(missing_ok=True)
    scores = None
    if verifier:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        model = AutoModelForTokenClassification.from_pretrained(verifier)
        tok = AutoTokenizer.from_pretrained(verifier)
        flat = verifier_scores(model, tok, [s.program for sols in solved for s in sols], progress=progress)
        scores = [flat[i * ns[-1]:(i + 1) * ns[-1]] for i in range(len(solved))]
    result = {**key, "verifier_model": verifier, **best_of_n(items, solved, scores, ns)}
    (run_dir / "gsm_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_best_of_n(result, run_dir / "best_of_n.png", f"{test}: {len(items)} problems")
    return result


def report(r: dict, args: dict, out) -> None:
    """Print what `slm gsm eval` reports."""
    from rich.table import Table

    test = args["test"]
    run = args["run"]
    runs_dir = args["runs_dir"]
    table = Table("N", "majority vote", "verifier best-of-N", title=f"{test}: {r['problems']} problems, pass@1 "
                  f"{r['pass@1']:.3f}")
    for k in r["majority"]:
        table.add_row(str(k), f"{r['majority'][k]:.3f}", f"{r['verifier'][k]:.3f}" if r["verifier"] else "-")
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'gsm_eval.json'}, plot -> {Path(runs_dir) / run / 'best_of_n.png'}")
