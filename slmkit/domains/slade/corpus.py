"""SLaDe's corpus: (assembly, C) pairs at each level with their harnesses, its asm+C BPE, users' C files
(`slade_data`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slmkit.domains.slade.asm import asm_of, compile_asm, normalise_asm, target_of
from slmkit.domains.slade.cgen import ARCHES, LEVELS, _name, random_program
from slmkit.domains.slade.harness import build, harness, strip_includes
from slmkit.errors import SlmError
from slmkit.progress import Progress

# Assembly and C lines are the pre-tokenisation unit: merges learn whole instructions and statements. (Digits
# split out of the lines, so constants could be copied, measured worse: after 1,500 steps the model collapsed
# to one template - IO accuracy 0/200, 1% compiling without inference; lines: 2/200 and 46% after 2,000.)
SLADE_SPLIT = r"[^\n]+\n?|\n"
# With `number_pieces`, a constant is a piece of its own between the rest of its line - an immediate (`$37`)
# and a C literal alike, so it can be copied - while stack and field offsets (`-20(%rbp)`), register names,
# labels and scale factors (`(%rax,%rdx,4)`) stay inside their line (40% more pieces than whole lines over the
# C, -O0 and -O3 text of 40 generated functions).
_NUMBER = r"(?<![\w.,])\d++(?![\w(])"
SLADE_SPLIT_NUMBERS = rf"{_NUMBER}|(?:(?!{_NUMBER})[^\n])+\n?|\n"


def _example(args) -> list[dict] | None:
    program, arches, split, seed = args
    rows = []
    try:
        for arch in arches:
            for level in LEVELS:
                rows.append({"asm": asm_of(program, level, arch), "c": program.target, "arch": arch,
                             "level": level, "function": program.name, "split": split})
    except SlmError:
        return None
    if split == "test":  # held-out functions carry the IO harness they are scored with
        main = harness(program, seed=seed)
        if build(main, program.target)[0] is None:
            return None
        for r in rows:
            r["harness"] = main
    return rows


def slade_data(out: Path, count: int = 6000, seed: int = 0, test_fraction: float = 0.05, vocab_size: int = 4096,
               max_tokens: int = 384, arches: list[str] | None = None, c_files: list[Path] | None = None,
               number_pieces: bool = False, progress: bool = True) -> dict:
    """Generate C functions, compile them with gcc at -O0 and -O3, pair normalised assembly with C (plus the
    declarations each function needs), write IO harnesses for held-out functions and train the tokenizer.

    Write the SLaDe corpus to OUT: pairs.jsonl (normalised assembly at -O0 and -O3 -> C with declarations;
    held-out functions carry their IO harness), tasks.jsonl (prompt/completion training pairs within
    `max_tokens`) and tokenizer/ (a BPE over assembly and C). `arches`: x86_64 (default) and/or aarch64
    (Debian's cross gcc). `c_files`: the user's C files, each holding one function after its declarations,
    added to the training pairs. `number_pieces`: constants are pieces of their own in the tokenizer
    (`SLADE_SPLIT_NUMBERS`), not parts of whole-line tokens.

    Args:
        out: Output directory.
        count: Generated C functions (each compiled at -O0 and -O3).
        seed: Seed: the same seed writes the same corpus.
        test_fraction: Fraction of functions held out (with IO tests).
        vocab_size: BPE vocabulary over assembly and C.
        max_tokens: Longest assembly / C side of a training pair, in tokens.
        arches: x86_64 (default) and/or aarch64 (needs Debian's gcc-aarch64-linux-gnu); repeatable.
        c_files: Your own C file (declarations, then one function) to add to training; repeatable.
        number_pieces: Constants as tokenizer pieces of their own (copyable from assembly to C) instead of parts of
            whole-line tokens.
    """
    from slmkit.data.tokenizers import train_bpe
    from slmkit.train import write_atomic

    arches = list(arches or ["x86_64"])
    for arch in arches:
        if arch not in ARCHES:
            raise SlmError(f"unknown architecture '{arch}' (one of {', '.join(ARCHES)})")
        if shutil.which(ARCHES[arch][0]) is None:
            raise SlmError(f"{ARCHES[arch][0]} is not installed: `apt-get install {ARCHES[arch][2]}`")
    if shutil.which("gcc") is None:
        raise SlmError("gcc is not installed: `apt-get install gcc`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    programs, seen = [], set()
    for _ in range(count * 20):
        if len(programs) == count:
            break
        p = random_program(rng, _name(rng))
        key = re.sub(r"\w+\(", "(", p.function)  # de-duplicate by body, whatever the name
        if key in seen:
            continue
        seen.add(key)
        programs.append((p, arches, "test" if rng.random() < test_fraction else "train", rng.randint(0, 1 << 30)))
    if len(programs) < count:
        raise SlmError(f"the generator found only {len(programs)} distinct functions (asked for {count})")
    rows = []
    with ThreadPoolExecutor(2) as pool, Progress(disable=not progress) as bar:
        task = bar.add_task("compiling with gcc", total=len(programs))
        for result in pool.map(_example, programs):
            rows += result or []
            bar.advance(task)
    for path in c_files or []:
        rows += user_pairs(Path(path), arches)
    train_bpe([t for r in rows if r["split"] == "train" for t in (r["asm"], r["c"])], vocab_size,
              out / "tokenizer", SLADE_SPLIT_NUMBERS if number_pieces else SLADE_SPLIT)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    for r in rows:
        r["asm_tokens"], r["c_tokens"] = len(tok(r["asm"]).input_ids), len(tok(r["c"]).input_ids)
    tasks = [{"prompt": r["asm"], "completion": r["c"]} for r in rows if r["split"] == "train"
             and r["asm_tokens"] <= max_tokens and r["c_tokens"] <= max_tokens]
    random.Random(seed + 1).shuffle(tasks)
    write_atomic(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "tasks.jsonl", "".join(json.dumps(r) + "\n" for r in tasks))
    summary = {"functions": len(programs), "pairs": len(rows), "train_pairs": len(tasks), "out": str(out),
               "test": _count(r for r in rows if r["split"] == "test"),
               "dropped_long": _count(r for r in rows if r["split"] == "train"
                                      and max(r["asm_tokens"], r["c_tokens"]) > max_tokens)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _count(rows) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[target_of(r)] = counts.get(target_of(r), 0) + 1
    return counts


def user_pairs(path: Path, arches: list[str] | None = None) -> list[dict]:
    """Training pairs from a user's C file: its last function is the target, everything before it the
    declarations; compiled at each level for each architecture."""
    if not path.is_file():
        raise SlmError(f"{path} not found")
    source = path.read_text()
    names = re.findall(r"^[\w \*]+?\b(\w+)\s*\([^;{]*\)\s*\{", source, flags=re.M)
    if not names:
        raise SlmError(f"{path}: no function definition found")
    return [{"asm": normalise_asm(compile_asm(source, level, arch), names[-1], arch),
             "c": strip_includes(source).strip() + "\n", "arch": arch, "level": level, "function": names[-1],
             "split": "train"} for arch in arches or ["x86_64"] for level in LEVELS]


def report(r: dict, args: dict, out) -> None:
    """Print what `slm slade data` reports."""
    max_tokens = args["max_tokens"]
    out.print(f"{r['functions']} functions, {r['train_pairs']} training pairs (longer than {max_tokens} tokens "
              f"dropped: {r['dropped_long']}), held out: {r['test']} -> {r['out']}")
