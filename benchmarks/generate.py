"""Generation speed of slmkit against its peers, measured on the same model in the same run.

    python benchmarks/generate.py [--model NAME_OR_PATH] [--new-tokens 128] [--repeats 3]

Measures, on the embedded SmolLM2-135M by default:
  * batch-1 decode speed (new tokens / second, prompt included) of `slmkit.generate`,
  * batch-8 throughput (all new tokens / second),
for slmkit (dtype auto), plain Hugging Face `generate` as a user gets it (`from_pretrained` defaults), HF
`generate` in slmkit's dtype, and llama.cpp on the same GGUF when `llama-cpp-python` is installed.
Every run generates exactly the same number of tokens (EOS ignored). Also measures the machine's memory
read bandwidth and reports each engine's batch-1 speed as a fraction of the bandwidth limit
(bandwidth / bytes of weights read per token). Writes benchmarks/results/generate.json and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from slmkit import generate as g
from slmkit.models import embedded_gguf, load

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BATCH = ["Explain photosynthesis to a child.", "List five uses for a paperclip.", "What is a prime number?",
         "Describe the water cycle.", "Give advice to a new programmer.", "Why is the sky blue?",
         "Summarise the plot of Romeo and Juliet.", "How do vaccines work?"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth() -> float:
    """Bytes per second read by a large reduction (a 1 GiB buffer, far larger than any cache)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / timed(lambda: x.sum(), 5)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    # a tied embedding matrix is read once per token as the LM head; the input row lookup is negligible
    return total


def bench_slmkit(loaded, new_tokens: int, repeats: int) -> dict:
    params = g.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    batch_params = g.SamplingParams(max_new_tokens=new_tokens // 2, ignore_eos=True)
    t1 = timed(lambda: g.generate(loaded, [PROMPT], params), repeats)
    t8 = timed(lambda: g.generate(loaded, BATCH, batch_params), repeats)
    return {"batch1_tok_s": new_tokens / t1, "batch8_tok_s": len(BATCH) * (new_tokens // 2) / t8}


def bench_hf(model, tokenizer, new_tokens: int, repeats: int) -> dict:
    """Plain `model.generate` on the same chat-formatted prompts, greedy, exactly `new_tokens` tokens."""
    tokenizer.padding_side = "left"

    def run(prompts, n):
        texts = [g.format_prompt(tokenizer, p) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    t1 = timed(lambda: run([PROMPT], new_tokens), repeats)
    t8 = timed(lambda: run(BATCH, new_tokens // 2), repeats)
    return {"batch1_tok_s": new_tokens / t1, "batch8_tok_s": len(BATCH) * (new_tokens // 2) / t8}


def bench_llamacpp(gguf: Path, tokenizer, new_tokens: int, repeats: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    text = g.format_prompt(tokenizer, PROMPT)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)

    def run():
        llm.reset()
        for n, _ in enumerate(llm.generate(tokens, temp=0.0, reset=True)):
            if n + 1 >= new_tokens:
                break

    return {"batch1_tok_s": new_tokens / timed(run, repeats), "batch8_tok_s": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="zoo name, HF dir or GGUF (default: the embedded model)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    loaded = load(args.model)
    print(f"model {loaded.name} from {loaded.path}; slmkit dtype {loaded.model.dtype}; "
          f"{torch.get_num_threads()} threads")
    results: dict = {"model": loaded.name, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "engines": {}}
    engines = results["engines"]
    engines["slmkit"] = bench_slmkit(loaded, args.new_tokens, args.repeats)
    print("slmkit", engines["slmkit"])
    packed_bytes = weight_bytes(loaded.model)

    plain = AutoModelForCausalLM.from_pretrained(loaded.path).eval()  # what a plain HF script gets
    engines["hf_generate_default"] = {**bench_hf(plain, loaded.tokenizer, args.new_tokens, args.repeats),
                                      "dtype": str(plain.dtype)}
    print("hf_generate_default", engines["hf_generate_default"])
    default_bytes = weight_bytes(plain)
    del plain
    same = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval()
    engines["hf_generate_same_dtype"] = {**bench_hf(same, loaded.tokenizer, args.new_tokens, args.repeats),
                                         "dtype": str(same.dtype)}
    print("hf_generate_same_dtype", engines["hf_generate_same_dtype"])
    del same

    gguf = embedded_gguf() if args.model is None else (Path(args.model) if args.model.endswith(".gguf") else None)
    llama = bench_llamacpp(gguf, loaded.tokenizer, args.new_tokens, args.repeats) if gguf else None
    if llama:
        engines["llama_cpp"] = llama
        print("llama_cpp", llama)

    bandwidth = memory_bandwidth()
    results["memory_read_GB_s"] = bandwidth / 1e9
    limits = {"slmkit": packed_bytes, "hf_generate_default": default_bytes, "hf_generate_same_dtype": packed_bytes}
    if llama:
        limits["llama_cpp"] = gguf.stat().st_size
    for name, nbytes in limits.items():
        limit = bandwidth / nbytes
        engines[name]["bandwidth_limit_tok_s"] = limit
        engines[name]["fraction_of_limit"] = engines[name]["batch1_tok_s"] / limit
    ours = engines["slmkit"]
    results["ratios"] = {
        "batch1_vs_hf_default": ours["batch1_tok_s"] / engines["hf_generate_default"]["batch1_tok_s"],
        "batch1_vs_hf_same_dtype": ours["batch1_tok_s"] / engines["hf_generate_same_dtype"]["batch1_tok_s"],
        "batch8_vs_hf_default": ours["batch8_tok_s"] / engines["hf_generate_default"]["batch8_tok_s"],
        "batch8_vs_hf_same_dtype": ours["batch8_tok_s"] / engines["hf_generate_same_dtype"]["batch8_tok_s"],
    }
    if llama:
        results["ratios"]["batch1_vs_llama_cpp"] = ours["batch1_tok_s"] / llama["batch1_tok_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'engine':26s} {'batch-1 tok/s':>14s} {'batch-8 tok/s':>14s} {'% of bw limit':>14s}")
    for name, r in engines.items():
        b8 = f"{r['batch8_tok_s']:.1f}" if r.get("batch8_tok_s") else "-"
        print(f"{name:26s} {r['batch1_tok_s']:14.1f} {b8:>14s} {100 * r['fraction_of_limit']:13.1f}%")
    for k, v in results["ratios"].items():
        print(f"{k:28s} {v:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
