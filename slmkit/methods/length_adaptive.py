"""Length-Adaptive Distillation (LAD): a small encoder distilled so that it stays accurate under dynamic
token pruning, then a search for the length configurations worth running.

Token pruning (the Length-Adaptive Transformer, Kim & Cho 2021). After each layer the tokens are ranked by
*attention significance* - the attention the layer's real queries pay them, summed over heads and queries -
and only the top fraction goes on to the next layer ([CLS] always stays). A **length configuration** gives
that fraction of the input's tokens per layer, e.g. (1.0, 0.6, 0.35, 0.2) for a 4-layer encoder (the first
layer always sees every token). Drop-and-restore: a dropped token keeps the last representation it had, so
the full sequence can be put back together after the last layer (the reconstruction loss reads it; token
tasks would too).

LAD (Length-Adaptive Distillation: general and task distillation customised for pruning):
1. **general distillation** - on unlabelled text, under random length configurations, the student
   *imitates* the teacher's hidden states (student layer i against teacher layer `layer_map[i]`) on the
   tokens it kept and *reconstructs* the teacher's last-layer representation of every token from its
   restored sequence (both mean squared errors);
2. **task distillation with the sandwich rule** - every step trains the full length, the smallest
   configuration and `sandwich` random ones (LengthDrop: each layer keeps (1 - p) of the previous layer's
   tokens, p ~ U(0, max_drop)), each against the teacher's soft labels at temperature T plus the gold label;
3. **`prune_search`** - length configurations sampled from mild to well beyond the trained range are
   scored on a validation split by accuracy and FLOPs; the speed-accuracy frontier is plotted and the
   cheapest configuration within `tolerance` accuracy points of the unpruned model is saved with the model
   (`length_config.json`), which `classify()` (`slm classify`) applies.

Supported encoders: BERT-family sequence classifiers (BERT / MiniLM, RoBERTa) from `transformers`, run with
eager attention so the attention probabilities can be read.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.methods.kd import soft_cross_entropy, use_eager_attention

LENGTH_CONFIG = "length_config.json"

# --- the pruned encoder forward --------------------------------------------------------------------------


def encoder_parts(model):
    """(embeddings, layers, head) of a BERT-family sequence classifier; head maps the final hidden states
    ([CLS] first) to logits."""
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
        raise SlmError(f"token pruning supports BERT-family encoders (BERT, MiniLM, RoBERTa); got "
                       f"{type(model).__name__}")
    if getattr(base, "pooler", None) is not None and hasattr(model, "dropout"):  # BERT: pooler over [CLS]
        def head(seq):
            return model.classifier(model.dropout(base.pooler(seq)))
    else:  # RoBERTa: the classification head reads [CLS] itself
        def head(seq):
            return model.classifier(seq)
    return base.embeddings, base.encoder.layer, head


@dataclass
class PrunedOutput:
    logits: object
    states: list  # per layer: (hidden of the kept tokens, their positions in the input, validity mask)
    restored: object | None  # the last layer's states put back at every input position (drop-and-restore)


def pruned_forward(model, input_ids, attention_mask, lengths=None, *, restore: bool = False) -> PrunedOutput:
    """Run a BERT-family classifier keeping `lengths[i]` of each input's real tokens at layer i (None = all)."""
    import torch

    embeddings, layers, head = encoder_parts(model)
    if lengths is not None and len(lengths) != len(layers):
        raise SlmError(f"a length configuration for this model has {len(layers)} entries (got {len(lengths)})")
    h = embeddings(input_ids=input_ids)
    batch, width, dim = h.shape
    valid = attention_mask.bool()
    real = valid.sum(1)  # each input's token count: length fractions refer to it
    index = torch.arange(width, device=h.device).expand(batch, width)
    full = h if restore else None
    captured: dict = {}  # the attention probabilities of the layer that just ran (read only when pruning)
    hooks = [] if lengths is None else [
        layer.attention.self.register_forward_hook(lambda mod, inp, out: captured.__setitem__("probs", out[1]))
        for layer in layers]
    states = []
    try:
        for i, layer in enumerate(layers):
            additive = (~valid)[:, None, None, :].to(h.dtype) * torch.finfo(h.dtype).min
            h = layer(h, additive)
            states.append((h, index, valid))
            if restore:
                full = full.scatter(1, index[..., None].expand(-1, -1, dim), h)
            if lengths is None or i + 1 == len(layers):
                continue
            keep = torch.minimum(valid.sum(1), torch.clamp(torch.ceil(lengths[i + 1] * real.float()).long(), min=1))
            k = int(keep.max())
            if k >= h.shape[1]:
                continue
            attn = captured.pop("probs")
            if attn is None:
                raise SlmError("token pruning needs eager attention: call use_eager_attention(model) first")
            score = (attn * valid[:, None, :, None]).sum((1, 2))  # attention each token receives
            score = score.masked_fill(~valid, float("-inf"))
            score[:, 0] = float("inf")  # [CLS]
            top = score.topk(k, dim=1).indices  # by significance
            kept = torch.arange(k, device=h.device)[None, :] < keep[:, None]
            order = top.sort(1)  # back to input order ([CLS] first)
            top, kept = order.values, kept.gather(1, order.indices)
            h = h.gather(1, top[..., None].expand(-1, -1, dim))
            index, valid = index.gather(1, top), valid.gather(1, top) & kept
    finally:
        for hook in hooks:
            hook.remove()
    return PrunedOutput(head(h), states, full)


# --- length configurations and their cost ----------------------------------------------------------------


def layer_tokens(lengths, real: int) -> list[int]:
    """Tokens each layer processes for an input of `real` tokens."""
    counts, n = [], real
    for i, fraction in enumerate(lengths or [1.0]):
        if i:
            n = min(n, max(1, math.ceil(fraction * real)))
        counts.append(n)
    return counts


def encoder_flops(config, lengths, real_lengths) -> float:
    """Mean forward FLOPs per input of the encoder layers (projections, attention, feed-forward) under
    `lengths` (None = unpruned), over inputs of the given real token counts."""
    d, ff, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0.0
    for real in real_lengths:
        counts = layer_tokens(lengths or [1.0] * n_layers, int(real))
        total += sum(2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * ff) for n in counts)
    return total / max(len(real_lengths), 1)


def sample_lengths(n_layers: int, max_drop: float, generator=None) -> tuple[float, ...]:
    """LengthDrop: each layer keeps (1 - p) of the previous layer's tokens, p ~ U(0, max_drop)."""
    import torch

    drops = torch.rand(n_layers - 1, generator=generator) * max_drop
    lengths = [1.0]
    for p in drops.tolist():
        lengths.append(lengths[-1] * (1 - p))
    return tuple(round(x, 4) for x in lengths)


def smallest_lengths(n_layers: int, max_drop: float) -> tuple[float, ...]:
    return tuple(round((1 - max_drop) ** i, 4) for i in range(n_layers))


def check_lengths(lengths, n_layers: int, where: str) -> tuple[float, ...]:
    lengths = tuple(float(x) for x in lengths)
    if len(lengths) != n_layers or lengths[0] != 1.0 or any(not 0 < x <= 1 for x in lengths) or \
            any(b > a for a, b in zip(lengths, lengths[1:], strict=False)):
        raise SlmError(f"{where}: a length configuration is {n_layers} non-increasing fractions in (0, 1] starting "
                       f"at 1.0 (got {list(lengths)})")
    return lengths


# --- LAD objectives (plug into slmkit.train.train) -------------------------------------------------------


def _masked_mse(a, b, mask):
    per_token = ((a.float() - b.float()) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def general_objective(teacher, layer_map: list[int], max_drop: float):
    """LAD stage 1: imitate the teacher's mapped hidden states on kept tokens and reconstruct its last layer
    from the restored sequence, under a random length configuration."""
    import torch

    def objective(model, batch, generator):
        with torch.no_grad():
            hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states
        n_layers = len(layer_map)
        lengths = sample_lengths(n_layers, max_drop, generator) if model.training else None
        out = pruned_forward(model, batch["input_ids"], batch["attention_mask"], lengths, restore=True)
        imitation = 0.0
        for (h, index, valid), t in zip(out.states, layer_map, strict=True):
            target = hidden[t + 1].gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
            imitation = imitation + _masked_mse(h, target, valid.float())
        reconstruction = _masked_mse(out.restored, hidden[-1], batch["attention_mask"].float())
        return imitation / n_layers + reconstruction, len(batch["input_ids"])

    return objective


def task_objective(teacher, temperature: float, alpha: float, max_drop: float, sandwich: int):
    """LAD stage 2: soft labels from the teacher at temperature T (weight alpha) plus the gold label (weight
    1 - alpha), averaged over the sandwich of length configurations (full length only when evaluating)."""
    import torch

    def objective(model, batch, generator):
        with torch.no_grad():
            soft = torch.softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits.float() / temperature, -1)
        n_layers = len(encoder_parts(model)[1])
        configs = [None]
        if model.training:
            configs += [smallest_lengths(n_layers, max_drop)]
            configs += [sample_lengths(n_layers, max_drop, generator) for _ in range(sandwich)]
        loss = 0.0
        for lengths in configs:
            logits = pruned_forward(model, batch["input_ids"], batch["attention_mask"], lengths).logits
            hard = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            loss = loss + alpha * soft_cross_entropy(logits, soft, temperature) + (1 - alpha) * hard
        return loss / len(configs), len(batch["input_ids"])

    return objective


# --- evaluation and the search ---------------------------------------------------------------------------


def evaluate_lengths(model, data, lengths, batch_size: int = 32, *, items: bool = False) -> dict:
    """Accuracy, mean FLOPs per input and wall time of `model` on `data` (a ClassificationData) under
    `lengths` (None = unpruned); with `items`, each example's 0/1 outcome too (for intervals)."""
    import torch

    model.eval()
    outcomes, seconds = [], 0.0
    with torch.no_grad():
        for batch in data.eval_batches(batch_size, 0, len(data)):
            start = time.perf_counter()
            logits = pruned_forward(model, batch["input_ids"], batch["attention_mask"], lengths).logits
            seconds += time.perf_counter() - start
            outcomes += (logits.argmax(-1) == batch["labels"]).int().tolist()
    real = [len(ids) for ids, _ in data.examples]
    return {"lengths": list(lengths) if lengths else None, "accuracy": sum(outcomes) / len(data),
            "flops": encoder_flops(model.config, lengths, real), "seconds": seconds} | (
        {"items": outcomes} if items else {})


def frontier(points: list[dict]) -> list[dict]:
    """The configurations no other beats on both FLOPs (lower) and accuracy (higher), cheapest first."""
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (p["flops"], -p["accuracy"])):
        if p["accuracy"] > best:
            out.append(p)
            best = p["accuracy"]
    return out


def search_lengths(model, data, *, candidates: int, max_drop: float, tolerance: float, seed: int,
                   progress: bool = True) -> dict:
    """Score the unpruned model and `candidates` sampled length configurations on `data`; choose the cheapest
    within `tolerance` accuracy points (percent) of unpruned."""
    import torch

    from slmkit.progress import Progress

    n_layers = len(encoder_parts(model)[1])
    gen = torch.Generator().manual_seed(seed)
    configs = [smallest_lengths(n_layers, max_drop)]
    # each candidate draws its own drop ceiling in [0.1, 0.9]: from mild to well beyond the trained range
    configs += [sample_lengths(n_layers, 0.1 + 0.8 * float(torch.rand(1, generator=gen)), gen)
                for _ in range(candidates - 1)]
    full = evaluate_lengths(model, data, None)
    points = []
    with Progress(disable=not progress) as bar:
        for lengths in bar.track(configs, description="length configurations"):
            points.append(evaluate_lengths(model, data, lengths))
    good = [p for p in points if p["accuracy"] >= full["accuracy"] - tolerance / 100]
    chosen = min(good, key=lambda p: p["flops"]) if good else full
    return {"full": full, "points": points, "frontier": frontier(points + [full]), "chosen": chosen}


def save_length_config(model_dir: Path, lengths, search: dict | None = None) -> Path:
    from slmkit.train import write_atomic

    out = Path(model_dir) / LENGTH_CONFIG
    write_atomic(out, json.dumps({"lengths": list(lengths) if lengths else None, "search": search}, indent=2) + "\n")
    return out


def load_length_config(model_dir: Path):
    path = Path(model_dir) / LENGTH_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["lengths"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SlmError(f"{path}: not a length configuration ({e})") from e


def plot_frontier(search: dict, out: Path, test_curves: dict | None = None,
                  unpruned: dict | None = None) -> Path | None:
    """Left: validation accuracy against FLOPs for every configuration tried, the frontier and the chosen one.
    Right (with `test_curves`, name -> evaluations under some of those configurations): each model's test accuracy
    drop from its own unpruned accuracy (`unpruned`), against FLOPs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    full = search["full"]["flops"]
    fig, axes = plt.subplots(1, 2 if test_curves else 1, figsize=(12 if test_curves else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    pts, fr, c = search["points"], search["frontier"], search["chosen"]
    ax.scatter([p["flops"] / full for p in pts], [p["accuracy"] for p in pts], s=12, alpha=0.5,
               label="sampled configurations")
    ax.plot([p["flops"] / full for p in fr], [p["accuracy"] for p in fr], "o-", label="frontier")
    ax.scatter([c["flops"] / full], [c["accuracy"]], s=120, marker="*", color="red", zorder=5, label="chosen")
    ax.axhline(search["full"]["accuracy"], color="gray", lw=0.8, ls=":", label="unpruned")
    ax.set_title("length search (validation)")
    ax.set_ylabel("accuracy")
    for name, rows in (test_curves or {}).items():
        right = axes[0][1]
        base = unpruned[name]
        right.scatter([r["flops"] / base["flops"] for r in rows],
                      [100 * (base["accuracy"] - r["accuracy"]) for r in rows], s=14, alpha=0.7,
                      label=name.upper() + " student")
        right.set_title("the validation frontier's configurations on the test split")
        right.set_ylabel("accuracy drop (points)")
    for a in axes[0]:
        a.set_xlabel("encoder FLOPs (fraction of unpruned)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- workflows: search for a trained model, classify with its configuration ------------------------------


def prune_search(
    model: str,
    data: str = "spam-assassin",
    candidates: int = 40,
    max_drop: float = 0.5,
    tolerance: float = 1.0,
    val_size: int = 300,
    test_size: int = 600,
    seq_len: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Find token-pruning length configurations on the speed-accuracy frontier; save the chosen one with the model
    (length_config.json, applied by `slm classify`).

    Score `candidates` length configurations of a classifier directory on the validation split of `data`
    (the split `slm distill` holds out), save the cheapest within `tolerance` accuracy points of unpruned as
    MODEL/length_config.json, plot the frontier to MODEL/frontier.png, and report the chosen configuration on
    the test split.

    Args:
        model: A sequence-classifier directory (e.g. runs/NAME/lad/model).
        data: The data the model was distilled on (its validation split is searched).
        candidates: Length configurations to try.
        max_drop: Largest per-layer drop ratio of the trained range.
        tolerance: Accuracy points the chosen configuration may lose.
        val_size: Validation examples (as in `slm distill`).
        test_size: Test examples (as in `slm distill`).
        seq_len: Tokens per input.
        seed: Seed of the sampled configurations.
    """
    from slmkit.data.sft import ClassificationData, load_classification, split_rows
    from slmkit.models import load

    loaded = load(model, dtype="fp32")
    if loaded.task != "classifier" or loaded.path is None:
        raise SlmError(f"{model}: prune-search needs a sequence-classifier directory (e.g. runs/NAME/lad/model)")
    net, tok = loaded.model, loaded.tokenizer
    labels = [net.config.id2label[i] for i in range(net.config.num_labels)]
    _, val_rows, test_rows = split_rows(load_classification(data), val_size, test_size)
    val, test = (ClassificationData(tok, r, labels, seq_len) for r in (val_rows, test_rows))
    use_eager_attention(net)
    search = search_lengths(net, val, candidates=candidates, max_drop=max_drop, tolerance=tolerance, seed=seed,
                            progress=progress)
    chosen = search["chosen"]["lengths"]
    save_length_config(loaded.path, chosen, {k: search[k] for k in ("full", "chosen", "frontier")})
    plot_frontier(search, loaded.path / "frontier.png")
    evaluate_lengths(net, test, None)  # warm-up
    full, pruned = evaluate_lengths(net, test, None, items=True), evaluate_lengths(net, test, chosen, items=True)
    return {"model": str(loaded.path), "chosen": chosen, "frontier": search["frontier"], "test_full": full,
            "test_pruned": pruned, "flops_ratio": full["flops"] / pruned["flops"],
            "speedup": full["seconds"] / pruned["seconds"]}


def classify(model: str, texts: list[str], lengths: tuple[float, ...] | None = None, seq_len: int = 512) -> list[dict]:
    """Label texts with a classifier, under its token-pruning length configuration when it has one.

    Args:
        model: A sequence-classifier directory.
        texts: Texts to label ('-' reads one text per line from stdin).
        lengths: Token-pruning fractions per layer, e.g. 1,0.6,0.4,0.3 (default: the model's length_config.json, if
            any).
        seq_len: Longest input in tokens (longer texts are cut).
    """
    import torch

    from slmkit.models import load

    if list(texts) == ["-"]:
        from slmkit.data.records import read_stdin

        texts = [line for line in read_stdin().splitlines() if line.strip()]

    loaded = load(model, dtype="fp32")
    if loaded.task != "classifier":
        raise SlmError(f"{model} is a {loaded.task} model, not a sequence classifier")
    net, tok = loaded.model, loaded.tokenizer
    where = "--lengths" if lengths else f"{model}/{LENGTH_CONFIG}"
    lengths = lengths or (load_length_config(loaded.path) if loaded.path else None)
    if lengths:
        lengths = check_lengths(lengths, net.config.num_hidden_layers, where)
        use_eager_attention(net)
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tok([text], truncation=True, max_length=seq_len, return_tensors="pt")
            logits = pruned_forward(net, batch["input_ids"], batch["attention_mask"], lengths).logits[0] if lengths \
                else net(**batch).logits[0]
            probs = torch.softmax(logits.float(), -1)
            best = int(probs.argmax())
            out.append({"text": text, "label": net.config.id2label[best], "probability": float(probs[best]),
                        "lengths": list(lengths) if lengths else None})
    return out


def report_labels(rows: list[dict], args: dict, out) -> None:
    for r in rows:
        out.print(f"{r['label']}\t{r['probability']:.3f}\t{r['text'][:80]!r}")


def report_search(r: dict, args: dict, out) -> None:
    """Print what `slm prune-search` reports."""
    from rich.table import Table

    table = Table("lengths per layer", "val accuracy", "FLOPs (M)", title="frontier (validation)")
    for p in r["frontier"]:
        table.add_row(str(p["lengths"] or "unpruned"), f"{p['accuracy']:.3f}", f"{p['flops'] / 1e6:,.0f}")
    out.print(table)
    out.print(f"chosen {r['chosen']}: test accuracy {r['test_full']['accuracy']:.3f} -> "
              f"{r['test_pruned']['accuracy']:.3f}, {r['flops_ratio']:.2f}x fewer FLOPs, {r['speedup']:.2f}x faster; "
              f"saved to {r['model']}/length_config.json")
