"""Verify the vLLM engine on a CUDA machine (it cannot run on the CPU-only machines slmkit is developed on).

    pip install 'slmkit[gpu]' && python benchmarks/vllm_check.py [--model DIR] [--clients 16]

Checks, each printed as PASS/FAIL and written to benchmarks/results/vllm.json:
  1. open: `--engine vllm` loads the tokenizer without building the model in torch (no torch weights in memory);
  2. parity: greedy answers to eight questions through vLLM and through slmkit's torch engine, same text;
  3. streaming: `stream()` yields its first text well before the last (tokens arrive as vLLM makes them);
  4. serving: `--clients` concurrent streaming requests to slmkit's server all succeed and were decoded together
     (the engine's largest batch > 1), with aggregate tokens/s against one client.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
             "What is the chemical formula of water?", "What is the capital of Germany?",
             "What is the largest ocean on Earth?", "Who developed the theory of relativity?",
             "Which planet is the largest in our solar system?"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded model, dequantised)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm.json")
    args = ap.parse_args()

    import torch
    from openai import OpenAI

    from slmkit.engines import open_model
    from slmkit.generate import SamplingParams, generate, stream
    from slmkit.serve import Server

    checks = {}
    fast = open_model(args.model, "vllm")
    checks["open_without_torch_model"] = fast.model is None and fast.engine.name == "vllm"
    slow = open_model(args.model, "torch", dtype="fp32")
    greedy = SamplingParams(max_new_tokens=32)
    a = [c.text for c in generate(fast, QUESTIONS, greedy)]
    b = [c.text for c in generate(slow, QUESTIONS, greedy)]
    checks["parity_same_text"] = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    del slow
    t0, times = time.perf_counter(), []
    for _ in stream(fast, "Write a long story about a lighthouse.", SamplingParams(max_new_tokens=256,
                                                                                   ignore_eos=True)):
        times.append(time.perf_counter() - t0)
    checks["stream_first_vs_last_s"] = [round(times[0], 3), round(times[-1], 3)]
    server = Server(fast, port=0, max_batch=args.clients).start()
    client = OpenAI(base_url=server.url, api_key="-", max_retries=0)
    failures, tokens = [], []

    def one(i):
        try:
            out = client.completions.create(model=server.name, prompt=f"Story number {i}:", max_tokens=128,
                                            temperature=0.8, seed=i, extra_body={"ignore_eos": True})
            tokens.append(out.usage.completion_tokens)
        except Exception as e:  # noqa: BLE001 - counted
            failures.append(repr(e))

    for clients in (1, args.clients):
        tokens.clear()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        checks[f"serve_{clients}_clients_tok_s"] = round(sum(tokens) / (time.perf_counter() - t0), 1)
    checks["serve_failures"] = len(failures)
    checks["serve_max_batch_seen"] = server.engine.stats["max_batch_seen"]
    server.close()
    verdict = {"open": checks["open_without_torch_model"], "parity": checks["parity_same_text"] >= 0.75,
               "streaming": times[0] < 0.5 * times[-1],
               "serving": checks["serve_failures"] == 0 and checks["serve_max_batch_seen"] > 1}
    for name, ok in verdict.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    result = {"gpu": torch.cuda.get_device_name(0), "checks": checks, "verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
