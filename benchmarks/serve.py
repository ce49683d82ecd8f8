"""Serving under load: `slm serve` as users start it (a separate process), streaming clients over loopback.

    python benchmarks/serve.py [--model NAME_OR_PATH] [--engine torch|llamacpp] [--clients 1 4 16 64]
                               [--new-tokens 64] [--requests 2] [--max-batch 16] [--repeat 3]
                               [--server-path CHECKOUT --out FILE]

For each concurrency level, that many client threads (the real `openai` client) each stream `--requests` chat
completions one after another (EOS ignored, so every request makes exactly `--new-tokens` tokens); the level runs
`--repeat` times (this machine's speed drifts by ~10% from minute to minute). Per level: aggregate tokens/s
(median and every run), time to first token (p50, p99 over all runs), failed requests with their first errors,
and the ratio to single-stream throughput; for the run: the server process's peak resident memory (VmHWM) and the
same after the load (VmRSS). `--server-path` runs `slm serve` from another checkout of slmkit (an earlier commit,
`git worktree add`), so an earlier engine is measured by the same client in the same session.
Goals: zero failures at every level; at 16 clients, llama.cpp above the torch engine and median time to first
token under 1 s; memory bounded at 64 clients (no more than at 16 plus the requests' KV).
Writes benchmarks/results/serve[-ENGINE].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI

TOPICS = ["lighthouses", "volcanoes", "bees", "the moon", "bread", "rivers", "chess", "owls", "glass", "trains",
          "maps", "salt", "clocks", "whales", "paper", "bridges"]


def run_level(client: OpenAI, name: str, clients: int, requests: int, new_tokens: int, repeat: int = 1) -> dict:
    runs = [run_once(client, name, clients, requests, new_tokens) for _ in range(repeat)]
    firsts = sorted(t for run in runs for t in run["ttfts"] if t is not None)
    failures = [e for run in runs for e in run["failures"]]
    rates = [round(run["tokens"] / run["seconds"], 1) for run in runs]
    return {"clients": clients, "requests": clients * requests, "tokens": runs[0]["tokens"], "repeats": repeat,
            "tokens_per_s": round(statistics.median(rates), 1), "tokens_per_s_runs": rates,
            "median_ttft_s": round(statistics.median(firsts), 3) if firsts else None,
            "p99_ttft_s": round(firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))], 3) if firsts else None,
            "failed": len(failures), "errors": failures[:3]}


def run_once(client: OpenAI, name: str, clients: int, requests: int, new_tokens: int) -> dict:
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
                    failures.append(repr(e)[:200])

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tokens": sum(tokens), "seconds": time.perf_counter() - start, "ttfts": ttfts, "failures": failures}


def memory_kib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each level (tokens/s: their median)")
    ap.add_argument("--server-path", type=Path, default=None, help="run slm serve from this slmkit checkout")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.server_path and not args.out:
        ap.error("--server-path needs --out (the result is not this checkout's engine)")
    suffix = "" if args.engine == "torch" else f"-{args.engine}"
    args.out = args.out or Path(__file__).parent / "results" / f"serve{suffix}.json"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "slmkit.cli", "serve", "--engine", args.engine, "--port", str(port),
               "--max-batch", str(args.max_batch), "--served-name", "bench"]
    env = {**os.environ, "COLUMNS": "300"}
    if args.server_path:
        env["PYTHONPATH"] = str(args.server_path.resolve())
    server = subprocess.Popen(command + (["--model", args.model] if args.model else []), stderr=subprocess.PIPE,
                              text=True, env=env, cwd=args.server_path or None)
    try:
        while "serving" not in (line := server.stderr.readline()):
            if not line:
                raise SystemExit(f"slm serve did not start: {server.stderr.read()}")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
        run_level(client, "bench", 1, 1, 8)  # warm-up
        levels = []
        for n in args.clients:
            level = run_level(client, "bench", n, args.requests, args.new_tokens, args.repeat)
            level["server_memory_kib"] = memory_kib(server.pid)
            levels.append(level)
            print(f"{n:3d} clients: {level['tokens_per_s']:7.1f} tok/s {level['tokens_per_s_runs']}, first token p50 "
                  f"{level['median_ttft_s']} s p99 {level['p99_ttft_s']} s, {level['failed']} failed, "
                  f"server peak RSS {level['server_memory_kib']['VmHWM'] / 1024:.0f} MiB")
        t0 = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        stop_s = round(time.perf_counter() - t0, 2)
    finally:
        server.kill()
    single = levels[0]["tokens_per_s"] if args.clients[0] == 1 else None
    for level in levels:
        level["vs_single_stream"] = round(level["tokens_per_s"] / single, 2) if single else None
    commit = subprocess.run(["git", "-C", str(args.server_path or Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"model": args.model or "smollm2-135m (embedded)", "engine": args.engine, "max_batch": args.max_batch,
              "server_commit": commit, "repeats": args.repeat,
              "new_tokens": args.new_tokens, "requests_per_client": args.requests, "sigterm_stop_s": stop_s,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "levels": levels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if single:
        print("throughput vs single stream: " + ", ".join(f"{lv['clients']} clients {lv['vs_single_stream']}x"
                                                          for lv in levels))
    print(f"SIGTERM stopped the server in {stop_s} s; wrote {args.out}")


if __name__ == "__main__":
    main()
