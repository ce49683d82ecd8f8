"""UL2R (Tay et al., 2022, "Transcending Scaling Laws with 0.1% Extra Compute"): continue training a
pretrained model for a small fraction of its pretraining compute on UL2's mixture of denoisers.

Each training window becomes one denoising example, announced by a mode token:
  - R, regular span corruption ([NLU]): ~15% of tokens in short spans (mean 3 or 8) are replaced by
    sentinels; the target lists each sentinel followed by the tokens it hid.
  - X, extreme corruption ([NLG]): long spans (mean 32-64) or a high rate (50%).
  - S, sequential ([S2S]): a prefix of the window is the input, the rest is the target (prefix-LM).
A decoder-only model reads `mode + corrupted input + target` as a **prefix LM**: attention is
bidirectional over the input part and causal over the target, and the loss is on the target only. An
encoder-decoder (T5) model gets the input on the encoder and the target on the decoder (span corruption).
Sentinels (`<extra_id_N>`) and mode tokens are added to the tokenizer when missing.

`ul2r()` measures the miniature proof before and after: infilling loss (R-denoiser targets on held-out
windows, fixed corruption) and left-to-right perplexity on the same windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.data.sft import seq2seq_batch
from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR, TrainArgs

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
SENTINELS = 64


@dataclass(frozen=True)
class Denoiser:
    kind: str  # R, X or S
    mean_span: float  # R/X: mean corrupted span length; S: unused
    rate: float  # R/X: fraction of tokens corrupted; S: unused
    weight: float  # share of the mixture


DEFAULT_DENOISERS = "R:3:0.15:0.3,R:8:0.15:0.2,X:3:0.5:0.1,X:32:0.15:0.1,S:0:0:0.3"


def parse_denoisers(spec: str) -> list[Denoiser]:
    """`KIND:MEAN_SPAN:RATE:WEIGHT,...` (see DEFAULT_DENOISERS) -> denoisers."""
    out = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            kind, mean, rate, weight = fields[0].upper(), float(fields[1]), float(fields[2]), float(fields[3])
        except (IndexError, ValueError) as e:
            raise SlmError(f"denoiser {part!r}: expected KIND:MEAN_SPAN:RATE:WEIGHT, e.g. R:3:0.15:0.5") from e
        if kind not in MODE_TOKENS:
            raise SlmError(f"denoiser {part!r}: kind must be R, X or S")
        if kind != "S" and not (mean >= 1 and 0 < rate < 1):
            raise SlmError(f"denoiser {part!r}: needs mean span >= 1 and 0 < rate < 1")
        if weight <= 0:
            raise SlmError(f"denoiser {part!r}: weight must be > 0")
        out.append(Denoiser(kind, mean, rate, weight))
    return out


def add_ul2_tokens(tokenizer, model) -> list[int]:
    """Add the mode tokens and sentinels the tokenizer lacks (resizing the model's embeddings); return the
    sentinel ids."""
    wanted = list(MODE_TOKENS.values()) + [f"<extra_id_{i}>" for i in range(SENTINELS)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(SENTINELS)])


# --- making examples -------------------------------------------------------------------------------------


def span_mask(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's random span mask: about `rate`·length tokens in spans of mean length `mean_span`, spans and gaps
    of random lengths, starting with a gap. True marks corrupted tokens."""
    n_noise = int(min(max(round(length * rate), 1), length - 1))
    n_spans = int(max(1, min(round(n_noise / mean_span), n_noise, length - n_noise, SENTINELS)))

    def segments(total: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, total), n_spans - 1, replace=False)) if n_spans > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)

    noise, gaps = segments(n_noise), segments(length - n_noise)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for gap, span in zip(gaps, noise, strict=True):
        pos += gap
        mask[pos:pos + span] = True
        pos += span
    return mask


def make_example(ids: list[int], denoiser: Denoiser, mode_id: int, sentinels: list[int], eos: int,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(inputs, targets) for one window."""
    if denoiser.kind == "S":
        split = int(rng.integers(1, len(ids)))
        return [mode_id] + ids[:split], ids[split:] + [eos]
    mask = span_mask(len(ids), denoiser.rate, denoiser.mean_span, rng)
    inputs, targets, k = [mode_id], [], -1
    for i, tok in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                k += 1
                inputs.append(sentinels[k])
                targets.append(sentinels[k])
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs, targets + [eos]


def prefix_lm_batch(examples: list[tuple[list[int], list[int]]], pad: int, dtype):
    """Decoder-only batch: input_ids, labels (target tokens only) and a 4D additive attention mask that is
    bidirectional over each row's input part and causal over its target, with right padding masked."""
    import torch

    width = max(len(i) + len(t) for i, t in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    allowed = torch.zeros((len(examples), width, width), dtype=torch.bool)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for row, (inp, tgt) in enumerate(examples):
        n, total = len(inp), len(inp) + len(tgt)
        ids[row, :total] = torch.tensor(inp + tgt)
        labels[row, n:total] = torch.tensor(tgt)
        allowed[row, :total, :total] = causal[:total, :total]
        allowed[row, :n, :n] = True  # the prefix sees itself both ways
        allowed[row, total:, 0] = True  # padding rows attend somewhere (never used) to avoid NaNs
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask[:, None]}


class UL2Objective:
    """The training objective: each window of a packed batch becomes one denoising example."""

    def __init__(self, tokenizer, model, denoisers: list[Denoiser]):
        self.denoisers = denoisers
        self.weights = np.array([d.weight for d in denoisers]) / sum(d.weight for d in denoisers)
        self.sentinels = add_ul2_tokens(tokenizer, model)
        self.modes = {k: tokenizer.convert_tokens_to_ids(v) for k, v in MODE_TOKENS.items()}
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.encoder_decoder = bool(model.config.is_encoder_decoder)

    def examples(self, windows, rng: np.random.Generator, denoiser: Denoiser | None = None):
        out = []
        for row in windows.tolist():
            d = denoiser or self.denoisers[rng.choice(len(self.denoisers), p=self.weights)]
            out.append(make_example(row, d, self.modes[d.kind], self.sentinels, self.eos, rng))
        return out

    def batch(self, examples, dtype):
        return seq2seq_batch(examples, self.pad) if self.encoder_decoder else prefix_lm_batch(examples, self.pad, dtype)

    def __call__(self, model, batch, generator):
        import torch

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        inputs = self.batch(self.examples(batch, np.random.default_rng(seed)), _dtype(model))
        inputs = {k: v.to(batch.device) for k, v in inputs.items()}
        out = model(**inputs)
        return out.loss, int((inputs["labels"] != -100).sum())


def _dtype(model):
    return next(model.parameters()).dtype


# --- the miniature proof ---------------------------------------------------------------------------------


def measure(model, objective: UL2Objective, windows, *, batch_size: int = 8) -> dict:
    """On `windows`: infilling loss (R denoiser: mean span 3, 15%, a fixed corruption) over all target tokens
    and over the hidden text tokens alone (without the sentinel and end tokens a model must also learn to
    emit), and left-to-right perplexity; `per_window` keeps each window's scored tokens and infilling loss."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1234)
    special = torch.tensor(objective.sentinels + [objective.eos])
    sums = {"infilling_loss": [0.0, 0], "infilling_text_loss": [0.0, 0], "lm": [0.0, 0]}
    per_window: dict[str, list] = {"tokens": [], "infilling_loss": []}  # for intervals over windows
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            inputs = objective.batch(objective.examples(chunk, rng, Denoiser("R", 3, 0.15, 1.0)), _dtype(model))
            logits = model(**inputs).logits.float()
            labels = inputs["labels"]
            if not objective.encoder_decoder:  # a decoder predicts position i + 1 from position i
                logits, labels = logits[:, :-1], labels[:, 1:]
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            scored = labels != -100
            text = scored & ~torch.isin(labels, special)
            for key, keep in (("infilling_loss", scored), ("infilling_text_loss", text)):
                sums[key][0] += float(losses[keep].sum())
                sums[key][1] += int(keep.sum())
            for row_losses, row_scored in zip(losses, scored, strict=True):
                n = int(row_scored.sum())
                per_window["tokens"].append(n)
                per_window["infilling_loss"].append(float(row_losses[row_scored].sum()) / max(1, n))
            if not objective.encoder_decoder:
                out = model(input_ids=chunk, labels=chunk)
                n = chunk.numel() - chunk.shape[0]
                sums["lm"][0] += float(out.loss) * n
                sums["lm"][1] += n
    model.train(was_training)
    result = {key: total / count for key, (total, count) in sums.items() if key != "lm" and count}
    result["per_window"] = per_window
    if sums["lm"][1]:
        result["l2r_ppl"] = math.exp(sums["lm"][0] / sums["lm"][1])
    return result


def pretraining_tokens(model: str) -> int | None:
    """Tokens a `slm pretrain` run trained on, read from its metrics (for `runs/NAME/model`)."""
    metrics = Path(model).expanduser().parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    tokens = [json.loads(line).get("tokens") for line in metrics.read_text().splitlines() if line.strip()]
    tokens = [t for t in tokens if t]
    return max(tokens) if tokens else None


def ul2r(
    model: str,
    data: str = "python-docs",
    denoisers: str = DEFAULT_DENOISERS,
    budget: float = 0.1,
    pretrain_tokens: int | None = None,
    eval_windows: int = 64,
    run: str = "ul2r",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: TrainArgs | None = None,
    progress: bool = True,
) -> dict:
    """UL2R: continued training with UL2's mixture of denoisers (prefix-LM for decoder-only models, span corruption for
    T5); reports infilling loss and left-to-right perplexity before and after.

    Continue training `model` (a checkpoint) with the UL2 mixture of denoisers for `budget` x its
    pretraining tokens (read from its run, or `pretrain_tokens`); `train_args.steps` overrides the budget.
    Returns infilling loss and left-to-right perplexity before and after.

    Args:
        model: The pretrained checkpoint to continue (e.g. runs/NAME/model from `slm pretrain`).
        data: Corpus name, .txt/.jsonl file or directory.
        denoisers: KIND:MEAN_SPAN:RATE:WEIGHT,... with KIND R (regular), X (extreme) or S (sequential/prefix-LM).
        budget: Extra compute as a fraction of the pretraining tokens (read from the run's metrics, or
            --pretrain-tokens); --steps overrides.
        pretrain_tokens: Tokens the model was pretrained on.
        eval_windows: Validation windows measured before and after.
        resume: Continue runs/NAME from its latest checkpoint.
    """
    import torch

    from slmkit.data.packing import PackedTokens
    from slmkit.data.prepare import prepare_corpus
    from slmkit.models import load
    from slmkit.train import TrainArgs, train

    args = train_args or TrainArgs(lr=3e-4, warmup_steps=20, batch_size=8, seq_len=256)
    loaded = load(model, dtype="fp32")
    if loaded.task not in ("causal-lm", "seq2seq") or loaded.tokenizer is None:
        raise SlmError(f"{model}: UL2R continues a causal LM or a T5-style model that has a tokenizer")
    tok = loaded.tokenizer
    data_dir = prepare_corpus(data, tok, progress=progress)  # tokenised before new tokens are added
    train_data, val_data = PackedTokens.open(data_dir, "train"), PackedTokens.open(data_dir, "val")
    seq_len = args.seq_len
    n_val = min(eval_windows, val_data.windows(seq_len))
    if n_val < 1:
        raise SlmError(f"{data}: the validation split is shorter than one {seq_len}-token window")
    windows = torch.from_numpy(np.stack([val_data.window(i, seq_len) for i in range(n_val)]).astype(np.int64))
    objective = UL2Objective(tok, loaded.model, parse_denoisers(denoisers))
    before = measure(loaded.model, objective, windows)
    budget_tokens = pretrain_tokens or pretraining_tokens(model)
    tokens_per_step = args.batch_size * args.grad_accum * seq_len
    if budget_tokens and args.steps == TrainArgs.steps:  # steps not set: derive them from the budget
        args.steps = max(1, round(budget * budget_tokens / tokens_per_step))
    config = {"workflow": "ul2r", "model": model, "data": data, "denoisers": denoisers, "budget": budget,
              "pretrain_tokens": budget_tokens, "before": before}
    summary = train(loaded.model, tok, train_data, val_data, objective, args, Path(runs_dir) / run,
                    resume=resume, config=config, progress=progress)
    after = measure(loaded.model, objective, windows)
    result = {"model": model, "steps": args.steps, "extra_tokens": args.steps * tokens_per_step,
              "pretrain_tokens": budget_tokens,
              "extra_compute": args.steps * tokens_per_step / budget_tokens if budget_tokens else None,
              "before": before, "after": after, "val_loss": summary.get("val_loss"),
              "run_dir": str(Path(runs_dir) / run)}
    if "l2r_ppl" in before:
        result["l2r_ppl_change"] = after["l2r_ppl"] / before["l2r_ppl"] - 1
    (Path(runs_dir) / run / "ul2r.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict, args: dict, out) -> None:
    """Print what `slm ul2r` reports."""
    b, a = r["before"], r["after"]
    extra = f" ({r['extra_compute']:.1%} of pretraining)" if r["extra_compute"] else ""
    out.print(f"UL2R: {r['steps']} steps, {r['extra_tokens']:,} tokens{extra}")
    out.print(f"  infilling loss        {b['infilling_loss']:.3f} -> {a['infilling_loss']:.3f} (hidden text tokens "
              f"only: {b['infilling_text_loss']:.3f} -> {a['infilling_text_loss']:.3f})")
    if "l2r_ppl" in b:
        out.print(f"  left-to-right ppl     {b['l2r_ppl']:.2f} -> {a['l2r_ppl']:.2f} ({r['l2r_ppl_change']:+.1%})")
    out.print(f"results -> {Path(r['run_dir']) / 'ul2r.json'}")
