"""Which GGUF the default llama.cpp engine runs: the embedded model's packaged Q4_1 file against q8_0 and f16 exports
of its dequantised weights, each beside the torch fp32 engine, measured in one run.

    python benchmarks/engines.py [--tokens 8192]

For each: perplexity on packaged text (python-docs, the same windows for all), the greedy answers to eight factual
questions (does each carry the fact the torch engine's answer carries?), the largest next-token logit difference
from torch fp32 and between a prompt decoded alone and in a batch of eight, prefill tok/s on a ~400-token prompt,
decode tok/s at batch 1, and aggregate decode tok/s with 1 / 4 / 16 sequences decoding together (64 greedy steps).
Writes benchmarks/results/engines.json. Goal (the default engine answers what the model answers): perplexity
within 1% of torch fp32 and every fact the same.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from generate import timed  # benchmarks/generate.py: the median of repeats after a warm-up

from slmkit.engines import LlamaCppEngine, open_llamacpp
from slmkit.evaluate import perplexity
from slmkit.export import to_gguf
from slmkit.generate import SamplingParams, format_prompt, generate
from slmkit.models import cache_dir, embedded_gguf, load

# (question, the word its answer must hold): the torch engine answers every one with its word
FACTS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
         ("Which planet is the largest in our solar system?", "Jupiter"),
         ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the chemical formula of water?", "H2O"),
         ("What is the capital of Germany?", "Berlin"), ("What is the largest ocean on Earth?", "Pacific"),
         ("Who developed the theory of relativity?", "Einstein")]
LONG = "The history of lighthouses begins with fires lit on hilltops to guide ships into harbour. " * 24


def facts(loaded) -> list[dict]:
    out = generate(loaded, [q for q, _ in FACTS], SamplingParams(max_new_tokens=40))
    return [{"question": q, "fact": word, "answer": c.text, "holds": word in c.text}
            for (q, word), c in zip(FACTS, out, strict=True)]


def last_logits(loaded, prompts: list[list[int]]):
    """Next-token logits after each prompt (token ids), the prompts decoded together in one batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    if loaded.model is None:
        loaded.engine.reserve(len(prompts), len(prompts) * width)
        return loaded.engine.sequences(ids, mask).prefill(ids)[:, -1]
    from slmkit.generate import CachedLM

    return CachedLM(loaded.model, ids, mask).prefill(ids)[:, -1].float()


def drift(loaded, reference) -> dict:
    """Largest |logit difference| over the eight questions' next-token logits: against torch fp32 (`reference`),
    and between each prompt decoded alone and decoded in a batch of eight (what else runs changes the answer?)."""
    tok = loaded.tokenizer
    prompts = [tok(format_prompt(tok, q), add_special_tokens=False).input_ids for q, _ in FACTS]
    together = last_logits(loaded, prompts)
    alone = torch.cat([last_logits(loaded, [p]) for p in prompts])
    return {"max_logit_diff_vs_torch": round(float((alone - reference).abs().max()), 4),
            "max_logit_diff_alone_vs_batch": round(float((alone - together).abs().max()), 4)}


def speeds(loaded) -> dict:
    """Prefill tok/s on LONG, decode tok/s at batch 1, aggregate decode tok/s for 1 / 4 / 16 sequences."""
    ids = loaded.tokenizer(LONG, add_special_tokens=False, return_tensors="pt").input_ids
    ones = torch.ones_like(ids)
    if loaded.model is None:
        engine: LlamaCppEngine = loaded.engine
        engine.reserve(16, 16 * (ids.shape[1] + 80))

        def prefill():
            engine.sequences(ids, ones).prefill(ids)

        def decode(rows: int, steps: int = 64):
            lm = engine.sequences(ids[:, :8].repeat(rows, 1), ones[:, :8].repeat(rows, 1))
            logits = lm.prefill()
            for _ in range(steps):
                logits = lm.step(logits[:, -1].argmax(-1)[:, None])
    else:
        from slmkit.generate import CachedLM

        def prefill():
            CachedLM(loaded.model, ids, ones).prefill(ids)

        def decode(rows: int, steps: int = 64):
            x, m = ids[:, :8].repeat(rows, 1), ones[:, :8].repeat(rows, 1)
            lm = CachedLM(loaded.model, x, m)
            logits = lm.prefill(x)
            for _ in range(steps):
                logits = lm.step(logits[:, -1].argmax(-1)[:, None])

    prefill_s = timed(prefill, 3)
    result = {"prompt_tokens": ids.shape[1], "prefill_tok_s": round(ids.shape[1] / prefill_s, 1)}
    for rows in (1, 4, 16):
        seconds = timed(lambda rows=rows: decode(rows), 2)
        result[f"decode_tok_s_{rows}"] = round(rows * 64 / seconds, 1)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of python-docs for perplexity")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engines.json")
    args = ap.parse_args()
    torch_fp32 = load(None, dtype="fp32", progress=False)
    directory = torch_fp32.path
    arms = {"torch fp32": torch_fp32, "llama.cpp packaged Q4_1": open_llamacpp(str(embedded_gguf()), progress=False)}
    for quant in ("q8_0", "f16"):
        gguf = cache_dir() / "gguf" / f"benchmark-{quant}.gguf"
        if not gguf.is_file():
            to_gguf(str(directory), gguf, quant, progress=False)
        loaded = open_llamacpp(str(gguf), progress=False)
        arms[f"llama.cpp {quant} export"] = loaded
    results = {}
    tok = torch_fp32.tokenizer
    reference = torch.cat([last_logits(torch_fp32, [tok(format_prompt(tok, q), add_special_tokens=False).input_ids])
                           for q, _ in FACTS])
    for name, loaded in arms.items():
        ppl = perplexity(loaded, "python-docs", tokens=args.tokens, seq_len=512, progress=False)
        answers = facts(loaded)
        results[name] = {"perplexity": round(ppl["perplexity"], 4), "facts_held": sum(a["holds"] for a in answers),
                         "answers": answers, **drift(loaded, reference), **speeds(loaded)}
        r = results[name]
        print(f"{name:26s} ppl {r['perplexity']:8.4f}  facts {r['facts_held']}/8  |dlogit| vs torch "
              f"{r['max_logit_diff_vs_torch']} alone vs batch {r['max_logit_diff_alone_vs_batch']}  "
              f"prefill {r['prefill_tok_s']:6.1f}"
              f"  decode 1/4/16: {r['decode_tok_s_1']}/{r['decode_tok_s_4']}/{r['decode_tok_s_16']} tok/s")
    reference = results["torch fp32"]["perplexity"]
    for r in results.values():
        r["perplexity_vs_torch"] = round(r["perplexity"] / reference - 1, 5)
    out = {"model": torch_fp32.name, "perplexity_data": f"python-docs, first {args.tokens} tokens, 512-token windows",
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
           "arms": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
