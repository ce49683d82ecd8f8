"""Generation speed of slmkit's engines against their peers, measured on the same model in the same run.

    python benchmarks/generate.py [--new-tokens 128] [--prompt-tokens 256] [--repeats 3]

On the embedded SmolLM2-135M (batch 1, EOS ignored so every run makes the same number of tokens):
  * decode tok/s (new tokens after the first, prompt excluded) and prefill tok/s (a ~256-token prompt),
  * for: plain Hugging Face `generate` as a user gets it (fp32, the peer of the torch path), slmkit's torch
    engine in fp32, bf16 and int8 (weight-only), slmkit's llama.cpp engine on what it runs for the embedded model
    (an f16 export of its weights), and bare `llama-cpp-python` on the same GGUF (the peer of the llama.cpp engine),
  * batch-8 throughput of slmkit's engines and HF `generate`.
Also measures memory read bandwidth and reports each engine's decode speed as a fraction of its bandwidth
limit (bandwidth / bytes of weights read per token). Writes benchmarks/results/generate.json.
Goals: llama.cpp engine >= 0.95x bare llama.cpp; torch engine >= 2x HF fp32 `generate`.
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
from slmkit.engines import open_model
from slmkit.models import load

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BATCH = ["Explain photosynthesis to a child.", "List five uses for a paperclip.", "What is a prime number?",
         "Describe the water cycle.", "Give advice to a new programmer.", "Why is the sky blue?",
         "Summarise the plot of Romeo and Juliet.", "How do vaccines work?"]
LONG = ("The history of lighthouses begins with fires lit on hilltops to guide ships into harbour. " * 20)


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


def bytes_per_token(model) -> int:
    """Weights read to make one token: every parameter and buffer once, except an input embedding table that
    is not also the output head (only one row of it is read)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and \
        head.weight.data_ptr() == embedding.data_ptr()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.layout != torch.strided:  # oneDNN-packed copies of weights counted once, as the weights
            continue
        if t.data_ptr() in seen or (t is embedding and not tied):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def speeds(run, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """`run(long_prompt, n_new)` generates n_new tokens: decode tok/s from the difference of two lengths,
    prefill tok/s from the long prompt with one new token."""
    short_1 = timed(lambda: run(False, 1), repeats)
    short_n = timed(lambda: run(False, new_tokens), repeats)
    long_1 = timed(lambda: run(True, 1), repeats)
    return {"decode_tok_s": (new_tokens - 1) / (short_n - short_1), "prefill_tok_s": prompt_tokens / long_1,
            "batch1_tok_s": new_tokens / short_n}


def slmkit_engine(loaded, prompt_tokens, new_tokens, repeats) -> dict:
    def run(long, n):  # every call decodes its prompt from scratch (no KV prefix kept between calls)
        g.generate(loaded, [LONG if long else PROMPT], g.SamplingParams(max_new_tokens=n, ignore_eos=True))

    result = speeds(run, prompt_tokens, new_tokens, repeats)
    params = g.SamplingParams(max_new_tokens=new_tokens // 2, ignore_eos=True)  # both engines decode batches
    t8 = timed(lambda: g.generate(loaded, BATCH, params), repeats)
    result["batch8_tok_s"] = len(BATCH) * (new_tokens // 2) / t8
    return result


def hf_generate(model, tokenizer, prompt_tokens, new_tokens, repeats) -> dict:
    """Plain `model.generate` on the same chat-formatted prompts, greedy, exactly the same number of tokens."""
    tokenizer.padding_side = "left"

    def gen(prompts, n):
        texts = [g.format_prompt(tokenizer, p) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    result = speeds(lambda long, n: gen([LONG if long else PROMPT], n), prompt_tokens, new_tokens, repeats)
    t8 = timed(lambda: gen(BATCH, new_tokens // 2), repeats)
    result["batch8_tok_s"] = len(BATCH) * (new_tokens // 2) / t8
    return result


def bare_llamacpp(gguf: Path, tokenizer, prompt_tokens, new_tokens, repeats) -> dict:
    """llama-cpp-python as a user calls it, on the same prompt tokens."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    ids = {long: tokenizer(g.format_prompt(tokenizer, LONG if long else PROMPT), add_special_tokens=False).input_ids
           for long in (False, True)}

    def run(long, n):
        llm.reset()
        for k, _ in enumerate(llm.generate(ids[long], temp=0.0, reset=True), 1):
            if k >= n:
                break

    return speeds(run, prompt_tokens, new_tokens, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    fp32 = load(None, dtype="fp32", progress=False)
    tok = fp32.tokenizer
    prompt_tokens = len(tok(g.format_prompt(tok, LONG), add_special_tokens=False).input_ids)
    bandwidth = memory_bandwidth()
    print(f"model {fp32.name}; {torch.get_num_threads()} threads; memory read {bandwidth / 1e9:.1f} GB/s; "
          f"long prompt {prompt_tokens} tokens")
    engines: dict = {}

    def record(name, result, nbytes):
        result["bytes_per_token"] = nbytes
        result["fraction_of_limit"] = result["decode_tok_s"] / (bandwidth / nbytes)
        engines[name] = result
        print(f"{name:22s} decode {result['decode_tok_s']:7.1f} tok/s  prefill {result['prefill_tok_s']:8.1f} tok/s"
              f"  ({100 * result['fraction_of_limit']:.0f}% of the bandwidth limit)")

    plain = AutoModelForCausalLM.from_pretrained(fp32.path).eval()  # what a plain HF script gets (fp32)
    record("hf_generate_fp32", hf_generate(plain, tok, prompt_tokens, args.new_tokens, args.repeats),
           bytes_per_token(plain))
    del plain
    record("torch_fp32", slmkit_engine(fp32, prompt_tokens, args.new_tokens, args.repeats), bytes_per_token(fp32.model))
    del fp32
    for dtype in ("bf16", "int8"):
        loaded = load(None, dtype=dtype, progress=False)
        record(f"torch_{dtype}", slmkit_engine(loaded, prompt_tokens, args.new_tokens, args.repeats),
               bytes_per_token(loaded.model))
        del loaded
    try:
        fast = open_model(None, "llamacpp", progress=False)
    except Exception as e:  # noqa: BLE001 - llama-cpp-python not installed: the torch rows still stand
        print(f"llama.cpp rows skipped: {e}")
        fast = None
    if fast is not None:
        gguf = fast.path  # what the engine runs for the embedded model (an f16 export), its peer runs the same file
        record("llamacpp_engine", slmkit_engine(fast, prompt_tokens, args.new_tokens, args.repeats),
               gguf.stat().st_size)
        del fast
        record("llama_cpp_bare", bare_llamacpp(gguf, tok, prompt_tokens, args.new_tokens, args.repeats),
               gguf.stat().st_size)

    hf = engines["hf_generate_fp32"]
    ratios = {f"{name}_decode_vs_hf_fp32": r["decode_tok_s"] / hf["decode_tok_s"] for name, r in engines.items()
              if name.startswith("torch_")}
    ratios.update({f"{name}_batch8_vs_hf_fp32": r["batch8_tok_s"] / hf["batch8_tok_s"] for name, r in engines.items()
                   if name.startswith("torch_")})
    if "llama_cpp_bare" in engines:
        bare = engines["llama_cpp_bare"]
        ratios["llamacpp_engine_decode_vs_bare"] = engines["llamacpp_engine"]["decode_tok_s"] / bare["decode_tok_s"]
        ratios["llamacpp_engine_prefill_vs_bare"] = engines["llamacpp_engine"]["prefill_tok_s"] / bare["prefill_tok_s"]
        ratios["llamacpp_engine_decode_vs_hf_fp32"] = engines["llamacpp_engine"]["decode_tok_s"] / hf["decode_tok_s"]
    results = {"model": "smollm2-135m", "new_tokens": args.new_tokens, "prompt_tokens": prompt_tokens,
               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "memory_read_GB_s": bandwidth / 1e9, "engines": engines, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for k, v in ratios.items():
        print(f"{k:40s} {v:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
