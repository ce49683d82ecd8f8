"""Training throughput of slmkit's loop against a bare PyTorch loop: same model, data, optimizer, batch.

    python benchmarks/train.py [--model tinyllama-nano] [--steps 60] [--batch-size 8] [--seq-len 256]

Each engine runs in its own child process (so peak memory is its own): slmkit's `train()` (accelerate,
logging, metrics, progress off) and a hand-written loop (forward, backward, clip, AdamW step, LR schedule).
Tokens/s is measured after the first 10 steps. Writes benchmarks/results/train.json and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 10


def setup(model_name: str, seq_len: int):
    from slmkit.data.packing import PackedTokens
    from slmkit.data.prepare import prepare_corpus, resolve_tokenizer
    from slmkit.methods.pretrain import build_or_load

    tok = resolve_tokenizer("bpe:8192", "python-docs", progress=False)
    data = PackedTokens.open(prepare_corpus("python-docs", tok, progress=False), "train")
    model, _ = build_or_load(model_name, tok, seq_len, seed=0)
    return tok, data, model


def run_bare(args) -> float:
    import torch

    from slmkit.train import TrainArgs, lr_lambda, make_optimizer

    _, data, model = setup(args.model, args.seq_len)
    targs = TrainArgs(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len)
    torch.manual_seed(0)
    model.train()
    opt = make_optimizer(model, targs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(targs))
    for step in range(args.steps):
        if step == WARMUP:
            t0 = time.perf_counter()
        batch = data.train_batch(step, args.batch_size, args.seq_len, 0)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (args.steps - WARMUP) * args.batch_size * args.seq_len / (time.perf_counter() - t0)


def run_slmkit(args) -> float:
    from slmkit.methods.pretrain import causal_lm_objective
    from slmkit.train import TrainArgs, read_metrics, train

    tok, data, model = setup(args.model, args.seq_len)
    targs = TrainArgs(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=0,
                      save_every=0, eval_batches=1, log_every=WARMUP)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, tok, data, data, causal_lm_objective, targs, Path(tmp) / "run", progress=False)
        rows = [r for r in read_metrics(Path(tmp) / "run") if "tokens_per_s" in r][1:]  # skip the warm-up window
    return sum(r["tokens_per_s"] for r in rows) / len(rows)


def child(args) -> None:
    tps = run_bare(args) if args.engine == "bare" else run_slmkit(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tps, "peak_rss_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinyllama-nano")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each engine; best is kept")
    ap.add_argument("--engine", choices=["bare", "slmkit"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = ap.parse_args()
    if args.engine:
        return child(args)
    setup(args.model, args.seq_len)  # build the tokenizer and token cache once, outside the timings
    results: dict = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "engines": {}}
    for _ in range(args.repeats):
        for engine in ("bare", "slmkit"):
            cmd = [sys.executable, __file__, "--engine", engine, "--model", args.model, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            best = results["engines"].get(engine)
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                results["engines"][engine] = r
            print(engine, r)
    e = results["engines"]
    results["ratio_slmkit_vs_bare"] = e["slmkit"]["tokens_per_s"] / e["bare"]["tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"slmkit {e['slmkit']['tokens_per_s']:.0f} tok/s, bare torch {e['bare']['tokens_per_s']:.0f} tok/s: "
          f"ratio {results['ratio_slmkit_vs_bare']:.3f}; peak RSS {e['slmkit']['peak_rss_mb']:.0f} MB vs "
          f"{e['bare']['peak_rss_mb']:.0f} MB -> {args.out}")


if __name__ == "__main__":
    main()
