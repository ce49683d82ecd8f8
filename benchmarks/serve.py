"""Serving throughput of `slm serve` under concurrent streaming clients, over loopback.

    python benchmarks/serve.py [--model NAME_OR_PATH] [--engine torch|llamacpp] [--clients 1 4 16] [--new-tokens 64]

Starts slmkit's OpenAI-compatible server in this process, then for each concurrency level runs that many
client threads with the real `openai` client; each client streams `--requests` chat completions one
after another (EOS ignored so every request makes exactly `--new-tokens` tokens). Reports aggregate
tokens/s, time to first token and failed requests per level, and the ratio to single-stream throughput
(goal for the batching torch engine: >= 4x at 16 clients, zero failures; the llama.cpp engine serves requests
one at a time, so its aggregate stays near its faster single stream). Writes benchmarks/results/serve[-ENGINE].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from openai import OpenAI

from slmkit.engines import open_model
from slmkit.serve import Server

TOPICS = ["lighthouses", "volcanoes", "bees", "the moon", "bread", "rivers", "chess", "owls", "glass", "trains",
          "maps", "salt", "clocks", "whales", "paper", "bridges"]


def run_level(client: OpenAI, name: str, clients: int, requests: int, new_tokens: int) -> dict:
    tokens, ttfts, failures = [0] * clients, [], []
    lock = threading.Lock()

    def one_client(c: int):
        for r in range(requests):
            topic = TOPICS[(c + r) % len(TOPICS)]
            start = time.perf_counter()
            try:
                stream = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": f"Write a short essay about {topic}."}],
                    max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                first = None
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        tokens[c] += chunk.usage.completion_tokens
                with lock:
                    ttfts.append(first)
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                with lock:
                    failures.append(repr(e))

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests, "tokens": sum(tokens), "seconds": round(elapsed, 2),
            "tokens_per_s": round(sum(tokens) / elapsed, 1),
            "median_ttft_s": round(statistics.median(t for t in ttfts if t is not None), 3) if ttfts else None,
            "failed": len(failures), "errors": failures[:3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    suffix = "" if args.engine == "torch" else f"-{args.engine}"
    args.out = args.out or Path(__file__).parent / "results" / f"serve{suffix}.json"

    loaded = open_model(args.model, args.engine, progress=False)
    server = Server(loaded, port=0, max_batch=max(args.clients)).start()
    client = OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=600)
    run_level(client, server.name, 1, 1, 8)  # warm-up
    levels = []
    for n in args.clients:
        level = run_level(client, server.name, n, args.requests, args.new_tokens)
        levels.append(level)
        print(f"{n:3d} clients: {level['tokens_per_s']:7.1f} tok/s, median time to first token "
              f"{level['median_ttft_s']} s, {level['failed']} failed")
    server.close()
    single = levels[0]["tokens_per_s"] if args.clients[0] == 1 else None
    for level in levels:
        level["vs_single_stream"] = round(level["tokens_per_s"] / single, 2) if single else None
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    dtype = str(loaded.model.dtype) if loaded.model is not None else loaded.path.name
    result = {"model": server.name, "engine": args.engine, "dtype": dtype, "new_tokens": args.new_tokens,
              "machine": machine, "levels": levels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if single:
        print("throughput vs single stream: " + ", ".join(f"{lv['clients']} clients {lv['vs_single_stream']}x"
                                                          for lv in levels))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
