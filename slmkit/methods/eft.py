"""EFT — emulated fine-tuning, and LM up-scaling (Mitchell et al., 2023, "An Emulator for Fine-Tuning Large
Language Models using Small Language Models").

Fine-tuning changes a model's log-probabilities by some amount; EFT takes that change from a small model pair
and adds it to a large base model, per token, at sampling time:

    log p(x_t | x_<t)  ∝  log p_large_base  +  β · (log p_small_ft − log p_small_base)

β = 1 is plain up-scaling ("what the large model would say had it been fine-tuned like the small one"),
β > 1 strengthens the fine-tuning behaviour, β = 0 is the large base alone. Down-scaling is the mirror:
small base + large (ft − base). No model is trained. The three models must share one vocabulary, and each
keeps its own KV cache (`EFTLM` feeds all three the same tokens and returns the combined log-probabilities,
so the ordinary decode loop in `slmkit/generate.py` samples from it with every usual option).

Speculative EFT (`speculative_tokens`): the small fine-tuned model drafts k tokens greedily, then the large
and small base models score all of them in one forward each; drafts are accepted while they equal the
combined distribution's choice, and the first disagreement is replaced by that choice. The output is the
same as plain greedy EFT, with fewer forwards of the large model.

`answer_nll` measures the miniature proof: held-out answer log-likelihood of the combination for a sweep of β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.generate import CachedLM, SamplingParams, next_tokens


@dataclass
class EFTModels:
    large_base: object  # Loaded
    small_ft: object
    small_base: object
    vocab: int  # the shared vocabulary size; logits beyond it (embedding padding) are dropped


def shared_vocabulary(named: dict[str, object]) -> int:
    """The common vocabulary size of these tokenizers, or a clear error when they tokenise differently."""
    (first, ref), *rest = named.items()
    vocab = ref.get_vocab()
    for name, tok in rest:
        if tok.get_vocab() != vocab:
            other = tok.get_vocab()
            diff = next((t for t in vocab if other.get(t) != vocab[t]), None)
            diff = diff if diff is not None else next(t for t in other if t not in vocab)
            raise SlmError(f"EFT needs one vocabulary: {first} ({len(ref)} tokens) and {name} ({len(tok)} tokens) "
                           f"differ (e.g. token {diff!r}: id {vocab.get(diff)} vs {other.get(diff)}); use models "
                           "that share a tokenizer")
    return len(ref)


def load_eft(large_base: str | None, small_ft: str, small_base: str, *, dtype: str = "auto") -> EFTModels:
    """Load the three roles (large base default: the embedded model) and check that they fit together."""
    from slmkit.client import is_endpoint
    from slmkit.models import load

    roles = {"large base": large_base, "small fine-tuned": small_ft, "small base": small_base}
    for role, spec in roles.items():
        if is_endpoint(spec):
            raise SlmError(f"the {role} model {spec} is an endpoint: EFT combines full next-token distributions "
                           "of all three models at every step, which an OpenAI-compatible endpoint does not return "
                           "(it returns sampled text and at most a few top log-probabilities); use local models")
    loaded = {role: load(spec, dtype=dtype) for role, spec in roles.items()}
    tasks = {ld.task for ld in loaded.values()}
    if not tasks <= {"causal-lm", "seq2seq"} or len(tasks) > 1:
        raise SlmError("EFT combines three causal LMs (or three seq2seq models); got " +
                       ", ".join(f"{role}: {ld.name} ({ld.task})" for role, ld in loaded.items()))
    missing = [ld.name for ld in loaded.values() if ld.tokenizer is None]
    if missing:
        raise SlmError(f"{missing[0]} has no tokenizer; EFT checks the vocabularies before combining models")
    vocab = shared_vocabulary({ld.name: ld.tokenizer for ld in loaded.values()})
    for ld in loaded.values():
        if ld.model.get_output_embeddings().weight.shape[0] < vocab:
            raise SlmError(f"{ld.name} predicts {ld.model.get_output_embeddings().weight.shape[0]} tokens, fewer "
                           f"than its tokenizer's {vocab}")
    return EFTModels(loaded["large base"], loaded["small fine-tuned"], loaded["small base"], vocab)


def combine(large, ft, base, beta: float):
    """EFT log-probabilities from the three models' logits (any leading shape, vocabulary last)."""
    large, ft, base = (x.float().log_softmax(-1) for x in (large, ft, base))
    return (large + beta * (ft - base)).log_softmax(-1)


class EFTLM:
    """Three cached models fed the same tokens; `prefill`/`step` return combined log-probabilities, so this is
    a drop-in for CachedLM in `decode_tokens`. Built as `partial(EFTLM, large=..., base=..., beta=..., vocab=...)`
    and called like CachedLM with the small fine-tuned model."""

    def __init__(self, model, input_ids, attention_mask, *, large, base, beta: float, vocab: int):
        self.parts = [CachedLM(m, input_ids, attention_mask) for m in (large, model, base)]
        self.beta, self.vocab = beta, vocab

    def mix(self, outs):
        return combine(*(o[..., :self.vocab] for o in outs), self.beta)

    def prefill(self, input_ids, keep: int = 1):
        return self.mix([p.prefill(input_ids, keep) for p in self.parts])

    def step(self, ids, keep: int | None = None):
        return self.mix([p.step(ids, keep) for p in self.parts])

    def crop(self, length: int) -> None:
        for p in self.parts:
            p.crop(length)


def speculative_tokens(model, input_ids, attention_mask, params: SamplingParams, eos: set[int], *, large, base,
                       beta: float, vocab: int, draft: int = 4, stats: dict | None = None):
    """Greedy EFT with the small fine-tuned `model` drafting up to `draft` tokens per round (batch 1; the draft
    length adapts to the acceptance). Yields (1,) tensors like `decode_tokens`; the tokens equal plain greedy
    EFT's (exactly in fp32; bf16 rounding can differ between one-token and multi-token forwards). `stats`
    accumulates rounds, drafted and accepted tokens."""
    import torch

    if input_ids.shape[0] != 1:
        raise SlmError("speculative EFT decodes one prompt at a time; give one prompt or drop --speculative")
    if params.temperature > 0:
        raise SlmError("speculative EFT is exact for greedy decoding; use --temperature 0 or drop --speculative")
    stats = stats if stats is not None else {}
    for key in ("rounds", "drafted", "accepted"):  # accumulated over calls
        stats.setdefault(key, 0)
    lm = EFTLM(model, input_ids, attention_mask, large=large, base=base, beta=beta, vocab=vocab)
    large_lm, ft_lm, base_lm = lm.parts
    seen = input_ids

    def pick(logprobs, history):
        return next_tokens(logprobs, params, history, None)

    with torch.inference_mode():
        pending = [pick(lm.prefill(input_ids)[:, -1], seen)]  # tokens to emit; the last is not yet in the caches
    emitted, draft_len = 0, draft
    while True:
        for token in pending:
            yield token
            emitted += 1
            seen = torch.cat([seen, token[:, None]], dim=1)
            if int(token) in eos or emitted >= params.max_new_tokens:
                return
        token = pending[-1]
        with torch.inference_mode():
            k = min(draft_len, params.max_new_tokens - emitted)
            length = large_lm.length()  # cache length before this round's tokens
            ft_logits, drafts, x = [], [], token
            for _ in range(k):  # the small fine-tuned model drafts greedily from its own distribution
                ft_logits.append(ft_lm.step(x[:, None])[:, -1, :vocab])
                x = ft_logits[-1].argmax(-1)
                drafts.append(x)
            ft_logits.append(ft_lm.step(x[:, None])[:, -1, :vocab])
            block = torch.stack([token, *drafts], dim=1)  # (1, k + 1): the pending token and the drafts
            # mixed[:, i]: the EFT distribution after block[:, :i+1]
            mixed = lm.mix([large_lm.step(block), torch.stack(ft_logits, dim=1), base_lm.step(block)])
            accepted, history = 0, seen
            while accepted < k:
                want = pick(mixed[:, accepted], history)
                if int(want) != int(drafts[accepted]):
                    break
                history = torch.cat([history, want[:, None]], dim=1)
                accepted += 1
            pending = drafts[:accepted] + [pick(mixed[:, accepted], history)]
            lm.crop(length + 1 + accepted)
        stats["rounds"] += 1
        stats["drafted"] += k
        stats["accepted"] += accepted
        # adapt the draft length to how well the drafter agrees (as HF's assisted generation does): longer
        # after a fully accepted round, shorter after a rejection, never beyond `draft`
        draft_len = min(draft, draft_len + 2) if accepted == k else max(1, draft_len - 1)


def decoder(models: EFTModels, beta: float, speculative: int = 0, stats: dict | None = None):
    """The token loop for `slmkit.generate.generate/stream(models.small_ft, ..., decode=...)`."""
    from slmkit.generate import decode_tokens

    common = {"large": models.large_base.model, "base": models.small_base.model, "beta": beta, "vocab": models.vocab}
    if speculative:
        return partial(speculative_tokens, draft=speculative, stats=stats, **common)
    return partial(decode_tokens, lm_class=partial(EFTLM, **common))


def eft_generate(models: EFTModels, prompts: list, params: SamplingParams | None = None, *, beta: float = 1.0,
                 speculative: int = 0, system: str | None = None, chat: bool | None = None, on_text=None):
    """Generate with the EFT combination. Prompts are formatted with the small fine-tuned model's chat
    template (its fine-tuning defines the format); the shared vocabulary makes the ids valid for all three."""
    from slmkit.generate import generate

    return generate(models.small_ft, prompts, params, system=system, chat=chat, on_text=on_text,
                    decode=decoder(models, beta, speculative))


# --- the miniature proof: held-out answer log-likelihood against β -----------------------------------------


def answer_nll(models: EFTModels, records, betas: list[float], *, progress: bool = True) -> dict:
    """Mean negative log-likelihood per answer token on held-out chat or prompt/completion records, for the
    large base, the small fine-tuned and small base models alone, and the EFT combination at each β.
    One teacher-forced forward per model and example; every β reuses them. `per_record` keeps each scored
    record's answer tokens and NLL per token in every arm, for intervals over records."""
    import torch

    from slmkit.data.sft import chat_example, completion_example
    from slmkit.progress import Progress

    tok = models.small_ft.tokenizer
    totals = {"large_base": 0.0, "small_ft": 0.0, "small_base": 0.0, **{f"eft_beta_{b:g}": 0.0 for b in betas}}
    count = 0
    per_record: dict[str, list] = {"tokens": [], **{name: [] for name in totals}}
    with Progress(disable=not progress) as bar, torch.inference_mode():
        task = bar.add_task("scoring held-out answers", total=len(records))
        for r in records:
            ids, labels = chat_example(tok, r) if isinstance(r, list) else completion_example(tok, *r)
            ids, labels = torch.tensor([ids]), torch.tensor(labels[1:])
            keep = labels != -100
            if not keep.any():
                continue
            lp = {}
            for name, ld in (("large_base", models.large_base), ("small_ft", models.small_ft),
                             ("small_base", models.small_base)):
                logits = ld.model(input_ids=ids).logits[0, :-1, :models.vocab][keep]
                lp[name] = logits.float().log_softmax(-1)
            target, n = labels[keep][:, None], int(keep.sum())
            nll = {name: -float(lp[name].gather(1, target).sum()) for name in ("large_base", "small_ft", "small_base")}
            for b in betas:
                mixed = (lp["large_base"] + b * (lp["small_ft"] - lp["small_base"])).log_softmax(-1)
                nll[f"eft_beta_{b:g}"] = -float(mixed.gather(1, target).sum())
            for name, value in nll.items():
                totals[name] += value
                per_record[name].append(value / n)
            per_record["tokens"].append(n)
            count += n
            bar.advance(task)
    if not count:
        raise SlmError("no held-out record has answer tokens to score")
    return {name: total / count for name, total in totals.items()} | {"answer_tokens": count,
                                                                       "per_record": per_record}


def eft_eval(small_ft: str, small_base: str, large_base: str | None = None, *, data: str = "chatterbot-en",
             val_fraction: float = 0.1, seed: int = 0, betas: tuple[float, ...] = (0, 0.25, 0.5, 0.75, 1, 1.5, 2),
             limit: int | None = None, out_dir: Path = Path("runs/eft-eval"), dtype: str = "fp32",
             progress: bool = True) -> dict:
    """EFT's miniature proof: held-out answer NLL of the large base alone, the small models alone, and the up-scaled
    combination for each β (table, JSON and a plot).

    The EFT miniature proof: held-out answer NLL of the large base alone vs up-scaled at each β. The held-out
    records are the split `slm finetune` holds out with the same data, `val_fraction` and `seed`.

    Args:
        large_base: The large base (default: the embedded model).
        small_ft: The small fine-tuned model.
        small_base: The small model's base.
        data: Chat or prompt/completion data; the split `slm finetune` holds out (same --val-fraction and --seed) is
            scored.
        val_fraction: Held-out fraction (as in `slm finetune`).
        seed: Split seed (as in `slm finetune`).
        betas: β values to sweep.
        limit: Score at most this many held-out records.
        out_dir: Where eft_eval.json and eft_beta.png go.
        dtype: auto (bf16 where the CPU has bf16 units), fp32, bf16, fp16, or int8 (torch engine: int8 weights, bf16
            activations).
    """
    import json

    from slmkit.data.sft import load_records, split

    models = load_eft(large_base, small_ft, small_base, dtype=dtype)
    _, held_out = split(load_records(data), val_fraction, seed)
    held_out = held_out[:limit] if limit else held_out
    scores = answer_nll(models, held_out, list(betas), progress=progress)
    per_record = scores.pop("per_record")
    best = min(betas, key=lambda b: scores[f"eft_beta_{b:g}"])
    result = {"large_base": models.large_base.name, "small_ft": models.small_ft.name,
              "small_base": models.small_base.name, "data": data, "held_out": len(held_out), "nll": scores,
              "per_record": per_record,
              "best_beta": best, "ppl_large_base": math.exp(scores["large_base"]),
              "ppl_best_eft": math.exp(scores[f"eft_beta_{best:g}"])}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eft_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(plot_betas(scores, list(betas), out_dir / "eft_beta.png"))
    return result


def plot_betas(scores: dict, betas: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(betas, [scores[f"eft_beta_{b:g}"] for b in betas], "o-",
            label="EFT: large base + β·(small ft − small base)")
    ax.axhline(scores["large_base"], color="gray", ls="--", label="large base alone (β = 0)")
    ax.axhline(scores["small_ft"], color="tab:orange", ls=":", label="small fine-tuned alone")
    ax.set_xlabel("β")
    ax.set_ylabel("held-out answer NLL per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(r: dict, args: dict, out) -> None:
    """Print what `slm eft-eval` reports."""
    from rich.table import Table

    data = args["data"]
    out_dir = args["out_dir"]
    table = Table("model", "held-out answer NLL / token", "perplexity",
                  title=f"EFT on {r['held_out']} held-out {data} records ({r['nll']['answer_tokens']} answer tokens)")
    rows = [(f"large base alone ({r['large_base']})", "large_base"),
            (f"small fine-tuned ({r['small_ft']})", "small_ft"),
            (f"small base ({r['small_base']})", "small_base")]
    rows += [(f"EFT β={b:g}" + (" (best)" if b == r["best_beta"] else ""), f"eft_beta_{b:g}") for b in args["betas"]]
    for label, key in rows:
        table.add_row(label, f"{r['nll'][key]:.3f}", f"{math.exp(r['nll'][key]):.2f}")
    out.print(table)
    out.print(f"results -> {Path(out_dir) / 'eft_eval.json'}, plot -> {r['plot']}")
