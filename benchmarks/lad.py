"""Token-pruning speed of a Length-Adaptive Distillation student on this CPU, against the same student
unpruned and against transformers' own forward of it, measured in the same run.

    python benchmarks/lad.py [--run runs/lad-spam-minilm] [--batch-sizes 1 32] [--repeats 3]

Run `slm run recipes/lad-spam-minilm.yaml` (or lad-brown-minilm6.yaml, then `--run runs/lad-brown-minilm6`)
first. On the run's held-out test split (600 SpamAssassin emails, 128 tokens; the run's own data and split
sizes are read from its distill.json) it times, for the LAD student and the plain-KD student: transformers'
forward (SDPA attention, unpruned: the peer), slmkit's forward unpruned, and slmkit's forward under the chosen length
configuration (`RUN/lad/model/length_config.json`); best of `repeats` passes over the split. Reports
accuracy, encoder FLOPs per email and speed-ups as ratios (goal: >= 2x fewer FLOPs and >= 1.6x faster within
1 accuracy point). Writes benchmarks/results/lad.json (lad-brown.json, ... for other runs: the run's name
after `lad-`, up to the first `-`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def timed_accuracy(fn, batches, repeats: int) -> tuple[float, float]:
    best, correct = float("inf"), 0
    for _ in range(repeats):
        start, correct = time.perf_counter(), 0
        for batch in batches:
            correct += int((fn(batch).argmax(-1) == batch["labels"]).sum())
        best = min(best, time.perf_counter() - start)
    return best, correct / sum(len(b["labels"]) for b in batches)


def main() -> None:
    import torch

    from slmkit.data.sft import ClassificationData, load_classification, split_rows
    from slmkit.methods.length_adaptive import encoder_flops, load_length_config, pruned_forward
    from slmkit.models import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/lad-spam-minilm"))
    ap.add_argument("--data", default=None, help="the run's classification data (default: from its distill.json)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    config = json.loads((args.run / "distill.json").read_text()) if (args.run / "distill.json").is_file() else {}
    lengths = load_length_config(args.run / "lad" / "model")
    if lengths is None:
        raise SystemExit(f"{args.run}/lad/model has no length_config.json: run recipes/lad-spam-minilm.yaml first")
    rows = load_classification(args.data or config.get("data", "spam-assassin"))
    _, _, test_rows = split_rows(rows, config.get("val_size", 300), config.get("test_size", 600))
    results: dict = {"lengths": lengths, "test_examples": len(test_rows), "threads": torch.get_num_threads()}
    for name in ("lad", "kd"):
        if not (args.run / name / "model").is_dir():
            continue
        loaded = load(str(args.run / name / "model"), dtype="fp32")
        net, tok = loaded.model.eval(), loaded.tokenizer
        labels = [net.config.id2label[i] for i in range(net.config.num_labels)]
        data = ClassificationData(tok, test_rows, labels, args.seq_len)
        real = [len(ids) for ids, _ in data.examples]
        results[name] = {"flops_unpruned": encoder_flops(net.config, None, real),
                         "flops_pruned": encoder_flops(net.config, lengths, real)}
        for bs in args.batch_sizes:
            batches = list(data.eval_batches(bs, 0, len(data)))
            row = {}
            with torch.no_grad():
                net.set_attn_implementation("sdpa")
                row["transformers"] = timed_accuracy(
                    lambda b, net=net: net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                    batches, args.repeats)
                net.set_attn_implementation("eager")
                for key, cfg in (("unpruned", None), ("pruned", lengths)):
                    row[key] = timed_accuracy(lambda b, cfg=cfg, net=net: pruned_forward(
                        net, b["input_ids"], b["attention_mask"], cfg).logits, batches, args.repeats)
            results[name][f"batch_{bs}"] = {
                **{k: {"seconds": s, "accuracy": a} for k, (s, a) in row.items()},
                "speedup_vs_unpruned": row["unpruned"][0] / row["pruned"][0],
                "speedup_vs_transformers": row["transformers"][0] / row["pruned"][0],
                "accuracy_drop_points": 100 * (row["unpruned"][1] - row["pruned"][1])}
        results[name]["flops_ratio"] = results[name]["flops_unpruned"] / results[name]["flops_pruned"]
        print(f"{name}: FLOPs {results[name]['flops_ratio']:.2f}x fewer; " + "; ".join(
            f"batch {bs}: {r['speedup_vs_unpruned']:.2f}x vs unpruned, {r['speedup_vs_transformers']:.2f}x vs "
            f"transformers, accuracy {r['unpruned']['accuracy']:.3f} -> {r['pruned']['accuracy']:.3f}"
            for bs in args.batch_sizes for r in [results[name][f"batch_{bs}"]]))
    task = args.run.name.removeprefix("lad-").split("-")[0]
    out = Path(__file__).parent / "results" / ("lad.json" if task == "spam" else f"lad-{task}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
