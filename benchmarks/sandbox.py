"""Sandbox throughput: short model-written programs executed per second on this machine, against two peers
measured in the same run.

    python benchmarks/sandbox.py [--programs 2000] [--workers 2]

Programs are TinyGSM-shaped (a `solution()` with a few arithmetic steps). Peers: bare `exec` in this
process (no isolation at all: the floor on cost) and one fresh `bwrap ... python -c` per program (the naive
way to isolate). Reports programs/s for each, the pool's overhead per program over bare exec, and the
speed-up of the pool over a sandbox per program (goal: >= 100 programs/s). Writes
benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from slmkit.sandbox import Limits, Sandbox, bwrap_command

PROGRAM = '''def solution():
    """A baker makes {n} loaves a day and sells them in bags of 4. How many full bags in a week?"""
    loaves_per_day = {n}
    loaves = loaves_per_day * 7
    bags = loaves // 4
    return bags
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--naive", type=int, default=40, help="Programs for the one-sandbox-per-program peer.")
    args = ap.parse_args()
    codes = [PROGRAM.format(n=n) for n in range(args.programs)]
    expected = [n * 7 // 4 for n in range(args.programs)]

    start = time.perf_counter()
    for code, want in zip(codes, expected, strict=True):
        ns: dict = {}
        exec(compile(code, "<program>", "exec"), ns)
        assert ns["solution"]() == want
    bare = args.programs / (time.perf_counter() - start)

    with Sandbox(args.workers, Limits(timeout=2.0)) as sandbox:
        sandbox.map(codes[:50])  # warm-up
        start = time.perf_counter()
        results = sandbox.map(codes)
        pool = args.programs / (time.perf_counter() - start)
    assert [r.value for r in results] == expected, "the sandbox returned wrong values"

    prefix = bwrap_command()
    start = time.perf_counter()
    for code in codes[:args.naive]:
        subprocess.run([*prefix, sys.executable, "-I", "-c", code + "\nprint(solution())"], check=True,
                       capture_output=True)
    naive = args.naive / (time.perf_counter() - start)

    result = {"programs": args.programs, "workers": args.workers, "programs_per_s": round(pool, 1),
              "bare_exec_per_s": round(bare, 1), "bwrap_per_program_per_s": round(naive, 1),
              "overhead_ms_per_program": round(1000 / pool - 1000 / bare, 3),
              "speedup_vs_bwrap_per_program": round(pool / naive, 1), "goal_programs_per_s": 100}
    out = Path(__file__).parent / "results" / "sandbox.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
