"""SuperICL (Xu et al., 2023, "Small Models are Valuable Plug-ins for Large Language Models").

A small fine-tuned classifier (the plug-in) labels every in-context demonstration and the test input with
its prediction and confidence; the large model reads

    Input: <text>
    Plug-in prediction: <label> (confidence 0.93)
    Label: <gold label>

for each demonstration, then the test input with the plug-in's prediction, and gives the final label. It can
follow a confident plug-in and override an unsure one, using what it knows and what the demonstrations show.
Demonstrations are sampled at random or retrieved by nearest neighbour (MiniLM sentence embeddings). The large
model is local (labels scored by log-likelihood) or an OpenAI-compatible endpoint (labels read from its reply).

`supericl()` reports the accuracy of the plug-in alone, in-context learning alone (the same demonstrations
without plug-in lines) and SuperICL on a held-out labelled set, and writes every prediction. With `folds` it
cross-fits: each fold is tested with a plug-in fine-tuned on the other folds, so every example is a test item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.data.corpora import write_jsonl
from slmkit.errors import SlmError


@dataclass
class Prediction:
    label: str
    confidence: float


class PlugIn:
    """A fine-tuned sequence classifier (a `slm finetune --task classify` run, or any HF classifier dir)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def load(cls, path: str | Path) -> PlugIn:
        from slmkit.models import load

        loaded = load(str(path), dtype="fp32")
        if loaded.task != "classifier":
            raise SlmError(f"{path} is a {loaded.task} model; the plug-in must be a sequence classifier "
                           "(train one with `slm finetune --task classify`)")
        return cls(loaded.model, loaded.tokenizer)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[Prediction]:
        import torch

        preds = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt")
                probs = self.model(**enc).logits.float().softmax(-1)
                conf, idx = probs.max(-1)
                preds += [Prediction(self.labels[i], float(c)) for i, c in zip(idx.tolist(), conf, strict=True)]
        return preds


def train_plugin(rows: list[dict], out_dir: Path, *, base: str = "all-minilm-l6-v2", steps: int = 60, seed: int = 0,
                 progress: bool = True) -> Path:
    """Fine-tune `base` with a classification head on `rows` (the training engine's classify task)."""
    from slmkit.methods.finetune import FinetuneArgs, finetune

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(rows, out_dir / "plugin_train.jsonl")
    args = FinetuneArgs(steps=steps, batch_size=16, seq_len=128, lr=1e-4, warmup_steps=max(1, steps // 10),
                        eval_every=0, save_every=0, log_every=max(1, steps // 6), seed=seed)
    finetune(base, data=str(data), task="classify", val_fraction=0.1, run="plugin", runs_dir=out_dir,
             train_args=args, progress=progress)
    return out_dir / "plugin" / "model"


# --- prompts ---------------------------------------------------------------------------------------------


def header(labels: list[str]) -> str:
    return f"Classify each input. The possible labels are: {', '.join(labels)}.\n\n"


def render_example(text: str, label: str | None, plugin: Prediction | None, plugin_name: str) -> str:
    """One block of a (Super)ICL prompt; `label` None leaves it open for the model to complete."""
    lines = [f"Input: {' '.join(text.split())}"]
    if plugin is not None:
        lines.append(f"{plugin_name} prediction: {plugin.label} (confidence {plugin.confidence:.2f})")
    lines.append("Label:" if label is None else f"Label: {label}")
    return "\n".join(lines)


def build_prompt(demos: list[tuple[str, str, Prediction]], text: str, pred: Prediction | None, labels: list[str],
                 plugin_name: str = "Plug-in") -> str:
    """SuperICL prompt when `pred` is given, plain ICL (no plug-in lines anywhere) when it is None."""
    blocks = [render_example(t, gold, p if pred is not None else None, plugin_name) for t, gold, p in demos]
    blocks.append(render_example(text, None, pred, plugin_name))
    return header(labels) + "\n\n".join(blocks)


def pick_demonstrations(train_vecs, test_vec, k: int, retrieval: str, rng: np.random.Generator) -> list[int]:
    """Indices of k demonstrations: the nearest neighbours (most similar last, next to the test input) or a
    random sample."""
    if retrieval == "knn":
        sims = (train_vecs @ test_vec).numpy()
        return [int(i) for i in np.argsort(sims)[-k:]]
    if retrieval == "random":
        return [int(i) for i in rng.choice(len(train_vecs), size=min(k, len(train_vecs)), replace=False)]
    raise SlmError(f"unknown retrieval '{retrieval}' (knn or random)")


# --- the workflow ----------------------------------------------------------------------------------------


def predict_fold(train: list[dict], test: list[dict], plug: PlugIn, lm, embed, *, shots: int, retrieval: str,
                 explain: bool, seed: int, progress: bool = True) -> list[dict]:
    """Plug-in, ICL and SuperICL predictions for each test row, demonstrations drawn from `train`."""
    from slmkit.generate import SamplingParams
    from slmkit.progress import Progress

    labels = plug.labels
    train_vecs, test_vecs = embed([r["text"] for r in train]), embed([r["text"] for r in test])
    train_preds = plug.predict([r["text"] for r in train])
    test_preds = plug.predict([r["text"] for r in test])
    rng = np.random.default_rng(seed)
    options = [" " + label for label in labels]
    records = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"SuperICL with {lm.name}", total=len(test))
        for i, row in enumerate(test):
            idx = pick_demonstrations(train_vecs, test_vecs[i], shots, retrieval, rng)
            demos = [(train[j]["text"], train[j]["label"], train_preds[j]) for j in idx]
            prompts = [build_prompt(demos, row["text"], None, labels),
                       build_prompt(demos, row["text"], test_preds[i], labels)]
            icl, sup = lm.choose(prompts, options)
            rec = {"text": row["text"], "label": row["label"], "plugin": test_preds[i].label,
                   "plugin_confidence": round(test_preds[i].confidence, 4),
                   "icl": labels[icl] if icl is not None else None,
                   "supericl": labels[sup] if sup is not None else test_preds[i].label}
            rec["overrode_plugin"] = rec["supericl"] != rec["plugin"]
            if explain and rec["overrode_plugin"]:
                why = prompts[1] + f" {rec['supericl']}\nExplanation for overriding the prediction:"
                rec["explanation"] = lm.generate([why], SamplingParams(max_new_tokens=48, stop=["\n\n"]),
                                                 chat=False)[0].strip()
            records.append(rec)
            bar.advance(task)
    return records


def supericl(
    data: str = "chatterbot-topics",
    test_data: str | None = None,
    test_fraction: float = 0.3,
    plugin: str | None = None,
    plugin_base: str = "all-minilm-l6-v2",
    plugin_steps: int = 60,
    large: str | None = None,
    shots: int = 8,
    retrieval: str = "knn",
    explain: bool = False,
    limit: int | None = None,
    folds: int = 0,
    seed: int = 0,
    out_dir: Path = Path("runs/supericl"),
    progress: bool = True,
) -> dict:
    """SuperICL: a small fine-tuned classifier's predictions and confidences go into the large model's in-context
    demonstrations; reports plug-in alone, ICL alone and SuperICL accuracy on held-out data.

    Accuracy of the plug-in alone, ICL alone and SuperICL on held-out labelled data.

    `data`: labelled {"text", "label"} JSONL or a packaged set; `test_data` is the held-out set (default: a
    `test_fraction` split of `data`, by seed). `plugin`: a trained classifier directory; without it one is
    fine-tuned from `plugin_base` on the training split. `large`: local model or endpoint (default: the
    embedded model). `explain`: when SuperICL overrides the plug-in, ask the large model why.

    Args:
        data: Labelled {"text", "label"} JSONL or a packaged set.
        test_data: Held-out labelled set (default: a split of --data).
        test_fraction: Held-out fraction when --test-data is not given.
        plugin: A trained classifier directory (default: fine-tune --plugin-base on the training split).
        plugin_base: Encoder to fine-tune as the plug-in.
        plugin_steps: Plug-in fine-tuning steps.
        large: The large model: local (default: the embedded model) or an endpoint http://host:port/v1#model.
        shots: Demonstrations per prompt.
        retrieval: knn (MiniLM nearest neighbours) or random demonstrations.
        explain: Ask the large model to explain when it overrides the plug-in.
        limit: Evaluate at most this many held-out examples (per fold).
        folds: Cross-fitting: split --data into this many folds; each fold is tested with a plug-in fine-tuned on
            the others, so every example is a test item once (0: one --test-fraction split).
        seed: Split, sampling and training seed.
        out_dir: Where supericl.json and predictions.jsonl go.
    """
    from slmkit.client import open_lm
    from slmkit.data.quality import Embedder
    from slmkit.data.sft import load_classification, split

    if shots < 1:
        raise SlmError(f"--shots must be >= 1 (got {shots})")
    if folds < 0 or folds == 1:
        raise SlmError(f"--folds must be 0 (one split) or at least 2 (got {folds})")
    if folds and (test_data or plugin):
        raise SlmError("--folds fine-tunes one plug-in per fold on --data: it takes neither --test-data nor --plugin")
    rows = load_classification(data)
    if folds > len(rows) // 2:
        raise SlmError(f"{data}: {len(rows)} examples are too few for {folds} folds")
    if folds:
        order = np.random.default_rng(seed).permutation(len(rows))
        parts = [([rows[i] for k, i in enumerate(order) if k % folds != f], [rows[i] for i in order[f::folds]])
                 for f in range(folds)]
    else:
        parts = [(rows, load_classification(test_data)) if test_data else split(rows, test_fraction, seed)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = open_lm(large)
    embed = Embedder()
    records, labels = [], None
    for f, (train, test) in enumerate(parts):
        test = test[:limit] if limit else test
        plug = PlugIn.load(plugin) if plugin else PlugIn.load(train_plugin(
            train, out_dir / f"fold{f}" if folds else out_dir, base=plugin_base, steps=plugin_steps, seed=seed + f,
            progress=progress))
        labels = plug.labels
        unknown = sorted({r["label"] for r in train + test} - set(labels))
        if unknown:
            raise SlmError(f"label '{unknown[0]}' is not one the plug-in predicts ({', '.join(labels)})")
        fold = predict_fold(train, test, plug, lm, embed, shots=shots, retrieval=retrieval, explain=explain,
                            seed=seed + f, progress=progress)
        records += [{**r, "fold": f} for r in fold] if folds else fold
    n = len(records)
    overrides = [r for r in records if r["overrode_plugin"]]
    result = {"data": data, "test_examples": n, "train_examples": len(parts[0][0]), "folds": folds, "labels": labels,
              "large": lm.name, "shots": shots, "retrieval": retrieval,
              "accuracy": {name: sum(r[name] == r["label"] for r in records) / n
                           for name in ("plugin", "icl", "supericl")},
              "overrides": len(overrides), "overrides_correct": sum(r["supericl"] == r["label"] for r in overrides),
              "overrides_plugin_was_correct": sum(r["plugin"] == r["label"] for r in overrides)}
    write_jsonl(records, out_dir / "predictions.jsonl")
    (out_dir / "supericl.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict, args: dict, out) -> None:
    """Print what `slm supericl` reports."""
    shots = args["shots"]
    retrieval = args["retrieval"]
    out_dir = args["out_dir"]
    acc = r["accuracy"]
    out.print(f"{r['test_examples']} held-out examples, {shots} {retrieval} demonstrations, large model {r['large']}")
    for name, label in (("plugin", "plug-in alone"), ("icl", "ICL alone"), ("supericl", "SuperICL")):
        out.print(f"  {label:14s} {acc[name]:.3f}")
    out.print(f"  SuperICL overrode the plug-in {r['overrides']} times ({r['overrides_correct']} correctly); "
              f"results -> {Path(out_dir) / 'supericl.json'}")
