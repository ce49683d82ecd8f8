"""LLaVA-ϕ's evaluation: accuracy per question type with and without the image and beside the question
prior (`llava_eval`), and linear probes of what the tower sees (`probe_tower`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from slmkit.domains.llava_phi.model import load_llava
from slmkit.domains.llava_phi.scenes import GRID, IMAGE_TOKEN, scene_of
from slmkit.domains.llava_phi.train import read_conversations
from slmkit.errors import SlmError

TRAINED = "runs/llava/stage2/model"  # where the stage-2 recipe leaves the model


def normalise_answer(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(words)


def answered(reply: str, want: str) -> bool:
    """The reply's first normalised words are the expected answer (whole words: "none" is not "no")."""
    return (normalise_answer(reply) + " ").startswith(normalise_answer(want) + " ")


def _answers(model, processor, prompts: list[str], images: list | None, max_new_tokens: int) -> list[str]:
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    if images is None:
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return [tok.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def question_prior(path: Path) -> dict[str, str]:
    """The most frequent training answer to each question (PATH: stage2.jsonl; empty when missing): the best a
    blind assistant can do from the question alone, the baseline a model's text-only answers are read against."""
    from collections import Counter

    if not path.is_file():
        return {}
    answers: dict[str, Counter] = {}
    for row in read_conversations(path):
        turns = row["messages"]
        for ask, reply in zip(turns, turns[1:], strict=False):
            if ask["role"] == "user" and reply["role"] == "assistant":
                answers.setdefault(ask["content"].replace(IMAGE_TOKEN, "").strip(), Counter())[reply["content"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in answers.items()}


def llava_eval(model: str = TRAINED, data: Path = Path("data/llava"), limit: int = 600,
               batch_size: int = 16, out: Path | None = None, progress: bool = True) -> dict:
    """Held-out visual question accuracy by type, with the image and from the text alone.

    Accuracy on held-out visual questions (DATA/test.jsonl) by question type, with the image and without it
    (the same model answering from the text alone: the baseline the image must beat), and the question prior
    (each question's most frequent training answer). An answer is right when its normalised first words are
    the expected answer; each type also lists its most frequent mistakes (expected, answered, times).

    Args:
        model: A LLaVA-ϕ checkpoint.
        data: Directory written by `slm llava data` (or a LLaVA-format JSONL file).
        limit: Held-out questions to answer.
        batch_size: Questions answered together.
        out: Where the results JSON goes (default: MODEL/llava_eval.json).
    """
    from collections import Counter

    from PIL import Image

    from slmkit.data.records import read_jsonl
    from slmkit.generate import format_prompt
    from slmkit.progress import Progress

    path = Path(data) / "test.jsonl" if Path(data).is_dir() else Path(data)
    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm llava data` first")
    tests = [row for _, row in read_jsonl(path)][:limit]
    prior = question_prior(path.parent / "stage2.jsonl")
    net, processor = load_llava(model)
    tok = processor.tokenizer
    per_type: dict[str, dict] = {}
    examples = []
    outcomes: dict[str, list[int]] = {"image": [], "text_only": [], "prior": []}  # per question, in order
    with Progress(disable=not progress) as bar:
        task = bar.add_task("answering", total=len(tests))
        for i in range(0, len(tests), batch_size):
            batch = tests[i:i + batch_size]
            with_image = [format_prompt(tok, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q['question']}"}])
                          for q in batch]
            text_only = [format_prompt(tok, [{"role": "user", "content": q["question"]}]) for q in batch]
            images = [Image.open(path.parent / q["image"]).convert("RGB") for q in batch]
            seen = _answers(net, processor, with_image, images, 6)
            blind = _answers(net, processor, text_only, None, 6)
            for q, a, b in zip(batch, seen, blind, strict=True):
                t = per_type.setdefault(q["type"], {"count": 0, "image": 0, "text_only": 0, "prior": 0,
                                                    "mistakes": Counter()})
                t["count"] += 1
                right = answered(a, q["answer"])
                if not right:
                    t["mistakes"][q["answer"], " ".join(normalise_answer(a).split()[:3])] += 1
                for key, ok in (("image", right), ("text_only", answered(b, q["answer"])),
                                ("prior", answered(prior.get(q["question"], ""), q["answer"]))):
                    t[key] += ok
                    outcomes[key].append(int(ok))
                if len(examples) < 12:
                    examples.append({**q, "with_image": a, "text_only": b})
            bar.advance(task, len(batch))
    n = max(len(tests), 1)
    result = {"model": model, "questions": len(tests),
              "accuracy": sum(t["image"] for t in per_type.values()) / n,
              "text_only_accuracy": sum(t["text_only"] for t in per_type.values()) / n,
              "prior_accuracy": sum(t["prior"] for t in per_type.values()) / n,
              "per_type": {k: {"count": t["count"], "image": t["image"] / t["count"],
                               "text_only": t["text_only"] / t["count"], "prior": t["prior"] / t["count"],
                               "mistakes": [[want, got, k] for (want, got), k in t["mistakes"].most_common(5)]}
                           for k, t in sorted(per_type.items())},
              "per_question": outcomes, "examples": examples}
    out = Path(out) if out else Path(model) / "llava_eval.json"
    from slmkit.train import write_atomic

    write_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


# --- what the tower sees ---------------------------------------------------------------------------------


def probe_tower(model: str = TRAINED, data: Path = Path("data/llava"), images: int = 1600,
                held_out: float = 0.25, steps: int = 300, progress: bool = True) -> dict:
    """Linear probes on the tower features the projector reads: each grid cell's shape and colour, and the number of
    shapes - does the tower see what the questions ask, before the language model learns to say it?

    Linear probes on the features a LLaVA-ϕ checkpoint's projector reads (its tower's `vision_feature_layer`
    patches): from the mean patch feature of each 3x3 grid cell, the shape and the colour in that cell (or none;
    shape also scored on small and large shapes apart), and from all cells together the number of shapes;
    trained on stage-1 images, scored on held-out ones beside the majority answer. High probe accuracy with low
    question accuracy means the language model, not the tower, is what has not learned yet.

    Args:
        model: A LLaVA-ϕ checkpoint.
        data: Directory written by `slm llava data` (or a LLaVA-format JSONL file).
        images: Stage-1 images to probe.
        held_out: Fraction of the images the probes are scored on.
        steps: Training steps of each linear probe.
    """
    import torch
    from PIL import Image

    from slmkit.progress import Progress

    path = Path(data) / "stage1.jsonl"
    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm llava data` first")
    rows = read_conversations(path)[:images]
    cut = int(len(rows) * (1 - held_out))
    if cut < 8 or cut == len(rows):
        raise SlmError(f"{path}: {len(rows)} images are too few to probe (need a training and a held-out part)")
    scenes = [scene_of(next(m["content"] for m in r["messages"] if m["role"] == "assistant")) for r in rows]
    net, processor = load_llava(model)
    layers = net.config.vision_feature_layer
    layers = layers if isinstance(layers, list) else [layers]
    feats = []
    with Progress(disable=not progress) as bar, torch.no_grad():
        task = bar.add_task("tower features", total=len(rows))
        for i in range(0, len(rows), 64):
            pics = [Image.open(r["image"]).convert("RGB") for r in rows[i:i + 64]]
            pixels = processor.image_processor(images=pics, return_tensors="pt")["pixel_values"]
            hidden = net.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            patches = torch.cat([hidden[k][:, 1:] for k in layers], -1)  # CLS dropped, as the projector reads
            g = int(patches.shape[1] ** 0.5)
            grid = patches.reshape(len(pics), g, g, -1)
            span = [slice(k * g // 3, math.ceil((k + 1) * g / 3)) for k in range(3)]  # a cell's patch rows/columns
            feats.append(torch.stack([grid[:, span[r], span[c]].mean((1, 2)) for r, c in GRID], 1))
            bar.advance(task, len(pics))
    x = torch.cat(feats)  # images x 9 cells x features
    x = (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)

    def probe(inputs, labels: list[str], occupied=None) -> dict:
        names = sorted(set(labels))
        y = torch.tensor([names.index(v) for v in labels])
        torch.manual_seed(0)
        head = torch.nn.Linear(inputs.shape[1], len(names))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
        n = cut * len(labels) // len(rows)

        def loss():  # logistic regression, lightly L2-regularised, solved to convergence
            opt.zero_grad()
            value = torch.nn.functional.cross_entropy(head(inputs[:n]), y[:n]) + 1e-4 * head.weight.square().sum()
            value.backward()
            return value

        opt.step(loss)
        keep = torch.ones(len(labels) - n, dtype=torch.bool) if occupied is None else occupied[n:]
        right = (head(inputs[n:]).argmax(-1) == y[n:])[keep]
        majority = max(torch.bincount(y[n:][keep]).tolist()) / max(int(keep.sum()), 1)
        return {"accuracy": right.float().mean().item(), "majority": majority}

    shapes, colours, small = [], [], []
    for s in scenes:
        cell = {(t.row, t.col): t for t in s}
        for t in map(cell.get, GRID):
            shapes.append(t.shape if t else "none")
            colours.append(t.colour if t else "none")
            small.append(t is not None and not t.large)
    occupied, small = torch.tensor([v != "none" for v in shapes]), torch.tensor(small)
    flat = x.reshape(-1, x.shape[-1])
    return {"model": model, "images": len(rows), "held_out": len(rows) - cut,
            "shape_per_cell": probe(flat, shapes, occupied), "colour_per_cell": probe(flat, colours, occupied),
            "shape_per_cell_small": probe(flat, shapes, small),  # the same probe, scored on small shapes only
            "shape_per_cell_large": probe(flat, shapes, occupied & ~small),
            "count": probe(x.reshape(len(rows), -1), [str(len(s)) for s in scenes])}


def report_eval(r: dict, args: dict, out) -> None:
    """Print what `slm llava eval` reports."""
    from rich.table import Table

    model = args["model"]
    table = Table("question type", "count", "with image", "text only", "question prior", "top mistakes (with image)",
                  title="LLaVA-ϕ on held-out questions")
    for kind, t in r["per_type"].items():
        mistakes = ", ".join(f"{want}→{got or '∅'} ×{k}" for want, got, k in t["mistakes"][:2])
        table.add_row(kind, str(t["count"]), f"{t['image']:.3f}", f"{t['text_only']:.3f}", f"{t['prior']:.3f}",
                      mistakes)
    table.add_row("all", str(r["questions"]), f"{r['accuracy']:.3f}", f"{r['text_only_accuracy']:.3f}",
                  f"{r['prior_accuracy']:.3f}", "")
    out.print(table)
    out.print(f"-> {args['out'] or Path(model) / 'llava_eval.json'}")


def report_probe(r: dict, args: dict, out) -> None:
    """Print what `slm llava probe` reports."""
    from rich.table import Table

    model = args["model"]
    table = Table("probe", "held-out accuracy", "majority answer", title=f"What {model}'s tower features hold "
                  f"({r['held_out']} held-out images)")
    for name in ("shape_per_cell", "shape_per_cell_small", "shape_per_cell_large", "colour_per_cell", "count"):
        table.add_row(name.replace("_", " "), f"{r[name]['accuracy']:.3f}", f"{r[name]['majority']:.3f}")
    out.print(table)
