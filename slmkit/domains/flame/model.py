"""FLAME's model: training with the retrieval term (`flame_train`), repair, completion, search, and the
evaluation (`flame_eval`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from slmkit.domains.flame.corpus import completion_prefix
from slmkit.domains.flame.formulas import check_formula, equivalent
from slmkit.domains.flame.noise import COMPLETE, REPAIR, TASK_PROMPTS
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.train import RUNS_DIR

TRAINED = "runs/flame/tune/model"  # where `slm flame train` leaves the fine-tuned model


def normalise(formula: str) -> str:
    """Whitespace dropped and letters upper-cased outside string literals (Excel ignores both)."""
    parts = re.split(r'("[^"]*")', formula.strip())
    return "".join(p if p.startswith('"') else re.sub(r"\s+", "", p).upper() for p in parts)


def _read(path: Path, split: str | None = None) -> list[dict]:
    from slmkit.data.records import read_jsonl

    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm flame data --out {path.parent}` first")
    return [row for _, row in read_jsonl(path) if split is None or row.get("split") == split]


def pooled(states, mask):
    """Mean of the encoder states over real tokens, L2-normalised: FLAME's formula embedding."""
    import torch

    mask = mask[..., None].to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def retrieval_objective(weight: float, prompts: list[list[int]] = (), temperature: float = 0.05):
    """The seq2seq loss plus `weight` x an in-batch contrastive loss (InfoNCE): each input's embedding must be
    nearer its own target formula's than the batch's other targets (a target that appears twice is not a
    negative for itself). The input is embedded as `search` embeds a query - without its task prompt (token
    ids in `prompts`, e.g. those of "repair: "). Held-out loss is the seq2seq loss alone, comparable with a
    run without the term."""
    import torch

    def objective(model, batch, generator):
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        keep = labels != -100
        if not model.training or not weight or len(labels) < 2:
            return out.loss, int(keep.sum())
        pad, encoder = model.config.pad_token_id or 0, model.get_encoder()
        queries = torch.full_like(batch["input_ids"], pad)
        for row, (ids, n) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1).tolist(),
                                           strict=True)):
            cut = max([len(p) for p in prompts if ids[:len(p)] == p and len(p) < n] or [0])
            queries[row, :n - cut] = torch.tensor(ids[cut:n])
        q_mask = queries != pad
        q = pooled(encoder(input_ids=queries, attention_mask=q_mask.long()).last_hidden_state, q_mask)
        d = pooled(encoder(input_ids=labels.masked_fill(~keep, pad), attention_mask=keep.long()).last_hidden_state,
                   keep)
        same = (labels[:, None, :] == labels[None, :, :]).all(-1) & ~torch.eye(len(labels), dtype=torch.bool,
                                                                                device=labels.device)
        sims = (q @ d.T / temperature).masked_fill(same, float("-inf"))
        contrast = torch.nn.functional.cross_entropy(sims, torch.arange(len(labels), device=labels.device))
        return out.loss + weight * contrast, int(keep.sum())

    return objective


def flame_train(
    data: Path = Path("data/flame"),
    model: str = "flame-nano",
    pretrain_steps: int = 600,
    run: str = "flame",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    retrieval_weight: float = 0.0,
    progress: bool = True,
) -> dict:
    """Pretrain a FLAME model on formulas (tail masking, random noise, span masking, user-inspired noise: each asks for
    the whole formula), then fine-tune it for repair and completion (and retrieval).

    Pretrain `model` (a zoo spec, built with DATA's formula tokenizer, or a checkpoint) on DATA/pretrain.jsonl
    - FLAME's objectives, each asking for the whole formula back from a damaged one (`pretrain_steps`; 0
    skips) - then fine-tune it on DATA/tasks.jsonl (repair and completion; with `retrieval_weight` > 0, plus
    the contrastive retrieval term). Returns both stages' summaries; the model is RUNS_DIR/RUN/tune/model.

    Args:
        data: Directory written by `slm flame data`.
        model: FLAME zoo spec (flame-nano, flame-60m) or a checkpoint.
        pretrain_steps: Pretraining steps on FLAME's objectives: the whole formula back from a damaged one (0 = skip).
        retrieval_weight: Weight of the contrastive retrieval term in fine-tuning (each input nearer its own formula
            than the batch's others; 0 = off).
    """
    from dataclasses import replace

    from transformers import AutoTokenizer

    from slmkit.methods.finetune import finetune
    from slmkit.methods.pretrain import initialise

    data = Path(data)
    for name in ("pretrain.jsonl", "tasks.jsonl", "tokenizer/tokenizer.json"):
        if not (data / name).is_file():
            raise SlmError(f"{data / name} not found: run `slm flame data --out {data}` first")
    with (data / "pretrain.jsonl").open() as f:
        if '"prompt"' not in f.readline():
            raise SlmError(f"{data / 'pretrain.jsonl'} holds plain formulas from an older `slm flame data`; run "
                           f"`slm flame data --out {data}` again for FLAME's damaged -> whole-formula pairs")
    args = (train_args or FinetuneArgs()).validate()
    summary = {}
    base = initialise(model, data / "tokenizer", Path(runs_dir) / run / "init", args.seq_len, args.seed)
    if pretrain_steps:
        done = Path(runs_dir) / run / "pretrain" / "model"
        if not done.is_dir():
            summary["pretrain"] = finetune(base, str(data / "pretrain.jsonl"), "chat", val_fraction=0.02,
                                           lora=False, run=f"{run}/pretrain", runs_dir=runs_dir, resume=resume,
                                           train_args=replace(args, steps=pretrain_steps), progress=progress)
        base = str(done)
    objective = None  # fine-tuning's own seq2seq loss
    if retrieval_weight:
        tok = AutoTokenizer.from_pretrained(data / "tokenizer")
        objective = retrieval_objective(retrieval_weight,
                                        [tok(p, add_special_tokens=False).input_ids for p in TASK_PROMPTS])
    summary["tune"] = finetune(base, str(data / "tasks.jsonl"), "chat", val_fraction=0.02, lora=False,
                               run=f"{run}/tune", runs_dir=runs_dir, resume=resume, train_args=args,
                               progress=progress, objective=objective)
    return summary


def _generate(loaded, prompts: list[str], batch_size: int, max_new_tokens: int = 160) -> list[str]:
    from slmkit.client import LocalLM
    from slmkit.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [t.strip() for t in LocalLM(loaded, batch_size).generate(prompts, params, chat=False)]


def repair(broken: list[str], model: str = TRAINED, batch_size: int = 16) -> list[str]:
    """Fix broken formulas (last-mile repair).

    Args:
        broken: Broken formulas.
        model: A trained FLAME model directory.
        batch_size: Formulas decoded together.
    """
    from slmkit.models import load

    return _generate(load(model, dtype="fp32"), [REPAIR + f for f in broken], batch_size)


def complete(prefixes: list[str], model: str = TRAINED, batch_size: int = 16) -> list[str]:
    """Complete formulas from what was typed so far.

    Args:
        prefixes: Formula beginnings.
        model: A trained FLAME model directory.
        batch_size: Formulas decoded together.
    """
    from slmkit.models import load

    return _generate(load(model, dtype="fp32"), [COMPLETE + p for p in prefixes], batch_size)


def report_pairs(outputs: list[str], args: dict, out) -> None:
    """Each input beside what the model made of it."""
    inputs = args.get("broken") or args["prefixes"]
    for x, y in zip(inputs, outputs, strict=True):
        out.print(f"{x}  ->  {y}", highlight=False)


def embed(loaded, texts: list[str], batch_size: int = 64):
    """`pooled` encoder states of a FLAME model for each text."""
    import torch

    tok, net = loaded.tokenizer, loaded.model
    rows = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            states = net.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows.append(pooled(states.last_hidden_state, batch["attention_mask"]))
    return torch.cat(rows)


def nearest(loaded, queries: list[str], collection: list[str], top: int):
    """(cosine similarities, indices) of the `top` formulas of `collection` closest to each query, best first."""
    return (embed(loaded, queries) @ embed(loaded, collection).T).topk(min(top, len(collection)))


def search(query: str, model: str = TRAINED, data: Path = Path("data/flame"), top: int = 5) -> list[tuple[float, str]]:
    """Retrieve the formulas of a collection closest to a query (mean-pooled encoder embeddings).

    Args:
        query: A partial formula or words.
        model: A trained FLAME model directory.
        data: The formula collection (`slm flame data`).
        top: Results.
    """
    from slmkit.models import load

    collection = [r["formula"] for r in _read(Path(data) / "formulas.jsonl")]
    scores, best = nearest(load(model, dtype="fp32"), [query], collection, top)
    return [(float(v), collection[i]) for v, i in zip(scores[0].tolist(), best[0].tolist(), strict=True)]


def report_search(hits: list[tuple[float, str]], args: dict, out) -> None:
    for score, formula in hits:
        out.print(f"{score:.3f}  {formula}", highlight=False)


def _equivalence(tests: list[dict], fixed: list[str]) -> dict:
    """Evaluation-equivalence on random sheets, over the pairs whose reference `formulas` can evaluate."""
    model = copy = count = 0
    for t, y in zip(tests, fixed, strict=True):
        verdict = equivalent(y, t["fixed"])
        if verdict is None:
            continue
        count += 1
        model += verdict
        copy += bool(equivalent(t["broken"], t["fixed"]))
    return {"equivalence_pairs": count, "equivalence": model / max(count, 1), "copy_equivalence": copy / max(count, 1)}


def token_accuracy(loaded, pairs: list[tuple[str, str]], batch_size: int = 32) -> float:
    """Teacher-forced accuracy: the share of target tokens the model predicts given the right prefix. It moves
    long before exact match does (an exact repair needs nearly every token), so it tracks early training."""
    import torch

    from slmkit.data.sft import seq2seq_batch, seq2seq_examples

    right = total = 0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            examples = [seq2seq_examples(loaded.tokenizer, p)[0] for p in pairs[start:start + batch_size]]
            batch = seq2seq_batch(examples, loaded.tokenizer.pad_token_id)
            predicted = loaded.model(**batch).logits.argmax(-1)
            scored = batch["labels"] != -100
            right += int(((predicted == batch["labels"]) & scored).sum())
            total += int(scored.sum())
    return right / max(total, 1)


def flame_eval(model: str = TRAINED, data: Path = Path("data/flame"), limit: int = 300,
               batch_size: int = 16, out: Path | None = None) -> dict:
    """Held-out repair exact match per corruption kind against copying the input, parse rate, completion.

    Held-out last-mile repair (exact match after normalisation, per corruption kind, against copying the
    input; teacher-forced token accuracy), the parse rate of repaired formulas, evaluation-equivalence on
    random sheets, and completion exact match on held-out formulas; retrieval recall: how often `search` with a
    held-out formula's prefix puts that formula first / in the top 5 of the whole collection.

    Args:
        model: A trained FLAME model directory.
        data: Directory written by `slm flame data`.
        limit: Held-out repair pairs / formulas to score.
        batch_size: Inputs decoded together.
        out: Where the results JSON goes (default: MODEL/flame_eval.json).
    """
    from slmkit.models import load

    data = Path(data)
    tests = _read(data / "repair.jsonl", "test")[:limit]
    formulas = _read(data / "formulas.jsonl")
    held_out = [r for r in formulas if r.get("split") == "test"][:limit]
    if not tests:
        raise SlmError(f"{data}/repair.jsonl has no test pairs")
    loaded = load(model, dtype="fp32")
    prompts = [REPAIR + t["broken"] for t in tests]
    fixed = _generate(loaded, prompts, batch_size)
    rng = random.Random(0)
    prefixes = [completion_prefix(r["formula"], rng) for r in held_out]
    completed = _generate(loaded, [COMPLETE + p for p in prefixes], batch_size)
    collection = [r["formula"] for r in formulas]
    top = nearest(loaded, prefixes, collection, 5).indices.tolist()
    where = {f: i for i, f in enumerate(collection)}
    found = [row.index(where[r["formula"]]) if where[r["formula"]] in row else None
             for r, row in zip(held_out, top, strict=True)]
    per_kind: dict = {}
    per_pair: dict[str, list[int]] = {"model": [], "copy": []}  # each held-out pair's outcome, in order
    for t, y in zip(tests, fixed, strict=True):
        k = per_kind.setdefault(t["kind"], {"count": 0, "model": 0, "copy": 0})
        k["count"] += 1
        for arm, guess in (("model", y), ("copy", t["broken"])):
            ok = normalise(guess) == normalise(t["fixed"])
            k[arm] += ok
            per_pair[arm].append(int(ok))
    for k in per_kind.values():
        k["model"], k["copy"] = k["model"] / k["count"], k["copy"] / k["count"]
    n = len(tests)
    tokens = token_accuracy(loaded, [(p, t["fixed"]) for p, t in zip(prompts, tests, strict=True)], batch_size)
    result = {"model": model, "repairs": n, "repair_token_accuracy": tokens,
              "repair_exact": sum(per_pair["model"]) / n, "copy_exact": sum(per_pair["copy"]) / n,
              "per_pair": per_pair,
              "parse_rate": sum(check_formula(y) is None for y in fixed) / n,
              "broken_parse_rate": sum(check_formula(t["broken"]) is None for t in tests) / n,
              "per_kind": per_kind, **_equivalence(tests, fixed), "completions": len(held_out),
              "completion_exact": sum(normalise(y) == normalise(r["formula"])
                                      for r, y in zip(held_out, completed, strict=True)) / max(len(held_out), 1),
              "collection": len(collection), "retrieval_at_1": found.count(0) / max(len(found), 1),
              "retrieval_at_5": sum(k is not None for k in found) / max(len(found), 1),
              "examples": [{"broken": t["broken"], "model": y, "fixed": t["fixed"]} for t, y in
                           list(zip(tests, fixed, strict=True))[:10]]}
    out = Path(out) if out else Path(model) / "flame_eval.json"
    from slmkit.train import write_atomic

    write_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


def report_train(s: dict, args: dict, out) -> None:
    """Print what `slm flame train` reports."""
    out.print(f"done: fine-tuning validation loss {s['tune']['val_loss']:.4f}; model in {s['tune']['run_dir']}/model")


def report_eval(r: dict, args: dict, out) -> None:
    """Print what `slm flame eval` reports."""
    from rich.table import Table

    model = args["model"]
    table = Table("corruption", "count", "model", "copy input", title=f"last-mile repair, {r['repairs']} held-out "
                  f"pairs (parse rate {r['broken_parse_rate']:.2f} -> {r['parse_rate']:.2f})")
    for kind, k in sorted(r["per_kind"].items()):
        table.add_row(kind, str(k["count"]), f"{k['model']:.3f}", f"{k['copy']:.3f}")
    table.add_row("all", str(r["repairs"]), f"{r['repair_exact']:.3f}", f"{r['copy_exact']:.3f}")
    out.print(table)
    out.print(f"evaluation-equivalent on random sheets: {r['equivalence']:.3f} (copy input "
              f"{r['copy_equivalence']:.3f}) over {r['equivalence_pairs']} pairs `formulas` can evaluate")
    out.print(f"repair token accuracy (teacher-forced) {r['repair_token_accuracy']:.3f}")
    out.print(f"completion exact match {r['completion_exact']:.3f} on {r['completions']} held-out formulas")
    out.print(f"retrieval by prefix among {r['collection']} formulas: first {r['retrieval_at_1']:.3f}, top 5 "
              f"{r['retrieval_at_5']:.3f}; -> {args['out'] or Path(model) / 'flame_eval.json'}")
