"""EFT decoding speed against the large model alone, and speculative EFT against plain EFT, in one run.

    python benchmarks/eft.py [--large NAME] [--small-ft DIR] [--small-base DIR] [--new-tokens 96] [--draft 4]

Defaults: the embedded SmolLM2-135M as the large base and the small pair the EFT recipes train
(`slm run recipes/eft-small-base.yaml`, then `recipes/eft-small-ft.yaml`). Every run is batch 1, greedy, on
the same prompts. Reports ms per generated token for the large model alone, EFT (three models) and
speculative EFT (the small fine-tuned model drafts), the EFT/large ratio (goal <= 1.3x), the speculative
speed-up and draft acceptance, and checks that speculative output equals plain EFT output. Writes
benchmarks/results/eft.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from slmkit.generate import SamplingParams, generate
from slmkit.methods import eft

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "What is your favourite book?",
           "How do computers work?", "Do you like music?"]


def per_token_ms(fn, prompts, after_warmup=None) -> tuple[float, list[str]]:
    fn(prompts[0])  # warm-up
    if after_warmup:
        after_warmup()
    times, texts = [], []
    for p in prompts:
        start = time.perf_counter()
        completion = fn(p)
        times.append((time.perf_counter() - start) / max(completion.completion_tokens, 1) * 1000)
        texts.append(completion.text)
    return statistics.median(times), texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", default=None)
    ap.add_argument("--small-ft", default="runs/eft-small-ft/model")
    ap.add_argument("--small-base", default="runs/eft-small-base/model")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--draft", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eft.json")
    args = ap.parse_args()
    for path in (args.small_ft, args.small_base):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: train the small pair first with `slm run recipes/eft-small-base.yaml`"
                             " and `slm run recipes/eft-small-ft.yaml` (or pass --small-ft/--small-base)")

    models = eft.load_eft(args.large, args.small_ft, args.small_base, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    stats: dict = {}
    runs = {
        "large_alone": lambda p: generate(models.large_base, [p], params)[0],
        "eft": lambda p: eft.eft_generate(models, [p], params, beta=args.beta)[0],
        "speculative_eft": lambda p: generate(models.small_ft, [p], params,
                                              decode=eft.decoder(models, args.beta, args.draft, stats))[0],
    }
    results, texts = {}, {}
    for name, fn in runs.items():
        results[name], texts[name] = per_token_ms(fn, PROMPTS, stats.clear)
        if name == "speculative_eft":
            accepted, drafted = stats.get("accepted", 0), stats.get("drafted", 0)
        print(f"{name:16s} {results[name]:6.1f} ms/token")
    same = sum(a == b for a, b in zip(texts["eft"], texts["speculative_eft"], strict=True))
    summary = {
        "large": models.large_base.name, "small_ft": args.small_ft, "small_base": args.small_base,
        "dtype": str(models.large_base.model.dtype), "new_tokens": args.new_tokens, "draft": args.draft,
        "ms_per_token": {k: round(v, 2) for k, v in results.items()},
        "eft_vs_large": round(results["eft"] / results["large_alone"], 3),
        "speculative_speedup_vs_eft": round(results["eft"] / results["speculative_eft"], 3),
        "draft_acceptance": round(accepted / drafted, 3) if drafted else None,
        "speculative_output_equal_to_eft": f"{same}/{len(PROMPTS)}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"EFT / large alone: {summary['eft_vs_large']}x (goal <= 1.3x); speculative EFT speed-up over EFT: "
          f"{summary['speculative_speedup_vs_eft']}x; speculative output equal to EFT: {same}/{len(PROMPTS)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
