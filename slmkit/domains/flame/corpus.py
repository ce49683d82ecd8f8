"""FLAME's corpus: formulas deduplicated by sketch, held out by sketch, repair and pretraining pairs and the
formula tokenizer (`flame_data`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from slmkit.domains.flame.formulas import FORMULA_PIECES, FORMULA_SPLIT, check_formula, random_formula, sketch
from slmkit.domains.flame.noise import COMPLETE, CORRUPTIONS, PRETRAIN_VARIANTS, REPAIR, corrupt, pretrain_pair
from slmkit.errors import SlmError


def formula_corpus(count: int, seed: int = 0, max_depth: int = 3, progress: bool = False) -> list[str]:
    """`count` distinct-sketch formulas that tokenise and parse, deterministic from `seed`."""
    from slmkit.progress import Progress

    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("formulas", total=count)
        while len(out) < count:
            tries += 1
            if tries > 50 * count + 1000:
                raise SlmError(f"only {len(out)} distinct formula sketches after {tries} tries; ask for fewer")
            f = random_formula(rng, max_depth)
            if len(f) > 200 or check_formula(f) is not None:
                continue
            key = sketch(f)
            if key in seen:
                continue
            seen.add(key)
            out.append(f)
            bar.advance(task)
    return out


def flame_data(out: Path, count: int = 20000, seed: int = 0, test_fraction: float = 0.05, vocab_size: int = 4096,
               progress: bool = True) -> dict:
    """Generate the formula corpus (checked with openpyxl and `formulas`, deduplicated by sketch), last-mile repair
    pairs by corruption kind, and a formula-aware BPE tokenizer.

    Write the FLAME corpus: formulas.jsonl (train/test; every formula has its own sketch, so test shapes are
    unseen in training), repair.jsonl (broken -> fixed, with the corruption kind), pretrain.jsonl (damaged ->
    whole formula, `PRETRAIN_VARIANTS` per training formula, one objective each), tasks.jsonl (the repair and
    completion fine-tuning pairs) and tokenizer/ (a byte-level BPE over the training formulas with
    formula-aware pre-tokenisation; FLAME uses ~16K at real size), all deterministic from `seed`.

    Args:
        out: Output directory.
        count: Formulas (one per sketch).
        seed: Seed: the same seed writes the same corpus.
        test_fraction: Fraction of formulas held out for testing.
        vocab_size: BPE vocabulary of the formula tokenizer.
    """
    from slmkit.data.tokenizers import train_bpe
    from slmkit.train import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formulas_ = formula_corpus(count, seed, progress=progress)
    rng = random.Random(seed + 1)
    rows, repairs = [], []
    for f in formulas_:
        split = "test" if rng.random() < test_fraction else "train"
        rows.append({"formula": f, "sketch": sketch(f), "split": split})
        kinds_done = set()
        for _ in range(2):  # two corruptions of different kinds when the formula allows
            broken = corrupt(f, rng)
            if broken and broken[0] not in kinds_done:
                kinds_done.add(broken[0])
                repairs.append({"broken": broken[1], "fixed": f, "kind": broken[0], "split": split})
    tasks = [{"prompt": REPAIR + r["broken"], "completion": r["fixed"]} for r in repairs if r["split"] == "train"]
    tasks += [{"prompt": COMPLETE + completion_prefix(r["formula"], rng), "completion": r["formula"]}
              for r in rows if r["split"] == "train"]
    rng.shuffle(tasks)
    pretrain = [pair for r in rows if r["split"] == "train" for _ in range(PRETRAIN_VARIANTS)
                if (pair := pretrain_pair(r["formula"], rng))]
    for name, data in (("formulas.jsonl", rows), ("repair.jsonl", repairs), ("pretrain.jsonl", pretrain),
                       ("tasks.jsonl", tasks)):
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in data))
    train_bpe([r["formula"] for r in rows if r["split"] == "train"], vocab_size, out / "tokenizer", FORMULA_SPLIT)
    kinds = {k: sum(r["kind"] == k for r in repairs) for k in CORRUPTIONS}
    return {"formulas": len(rows), "test": sum(r["split"] == "test" for r in rows), "repairs": len(repairs),
            "kinds": kinds, "out": str(out)}


def completion_prefix(formula: str, rng: random.Random) -> str:
    """The first 30-70% of a formula's pieces (what a user has typed so far)."""
    pieces = re.findall(FORMULA_PIECES, formula)
    return "".join(pieces[:max(2, round(len(pieces) * rng.uniform(0.3, 0.7)))])


def report(r: dict, args: dict, out) -> None:
    """Print what `slm flame data` reports."""
    kinds = ", ".join(f"{k} {v}" for k, v in r["kinds"].items())
    out.print(f"{r['formulas']} formulas ({r['test']} test), {r['repairs']} repair pairs ({kinds}) -> {r['out']}")
