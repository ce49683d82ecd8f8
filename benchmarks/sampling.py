"""Sampling many solutions: continuous batching (`serve.complete_many`, what TinyGSM's `solve` uses) against
fixed batches (`generate` on `batch` prompts at a time, which runs every batch until its longest sample
ends), measured in the same run on the same prompts and sampling settings.

    python benchmarks/sampling.py [--model runs/tinygsm-generator/model] [--problems 8] [--samples 8]

The prompts are TinyGSM program prompts for procedural word problems (`def solution():` + the question),
sampled at temperature 1.0 with TinyGSM's stop strings, up to 256 new tokens. Reports samples/s and
generated tokens/s for each and the speed-up of continuous batching. Writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/tinygsm-generator/model",
                    help="A TinyGSM generator (default; falls back to the embedded model when missing).")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from slmkit.batching import complete_many
    from slmkit.generate import SamplingParams, generate
    from slmkit.methods import tinygsm
    from slmkit.models import load

    model = args.model if Path(args.model).is_dir() else "smollm2-135m"
    loaded = load(model, dtype=args.dtype)
    questions = [p.question for p in tinygsm.procedural(args.problems, seed=123)]
    prompts = [tinygsm.program_prompt(q) for q in questions for _ in range(args.samples)]

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=256, temperature=1.0, top_p=0.95, stop=tinygsm.STOP, seed=i)

    results = {}
    start = time.perf_counter()
    fixed = []
    for first in range(0, len(prompts), args.batch):
        fixed += generate(loaded, prompts[first:first + args.batch], params(first), chat=False)
    results["fixed batches (generate)"] = (time.perf_counter() - start, fixed)
    start = time.perf_counter()
    continuous = complete_many(loaded, prompts, [params(i) for i in range(len(prompts))], max_batch=args.batch)
    results["continuous batching (complete_many)"] = (time.perf_counter() - start, continuous)

    report = {"model": model, "dtype": args.dtype, "prompts": len(prompts), "batch": args.batch, "runs": {}}
    for name, (seconds, done) in results.items():
        tokens = sum(c.completion_tokens for c in done)
        report["runs"][name] = {"seconds": round(seconds, 2), "samples_per_s": round(len(done) / seconds, 3),
                                "tokens_per_s": round(tokens / seconds, 1), "mean_tokens": round(tokens / len(done), 1)}
        print(f"{name:38s} {len(done) / seconds:6.2f} samples/s  {tokens / seconds:7.1f} tok/s  "
              f"({tokens / len(done):.0f} tokens per sample)")
    fixed_s, cont_s = (results[k][0] for k in results)
    report["speedup"] = round(fixed_s / cont_s, 2)
    print(f"continuous batching: {report['speedup']:.2f}x the samples/s of fixed batches")
    out = Path(__file__).parent / "results" / "sampling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
