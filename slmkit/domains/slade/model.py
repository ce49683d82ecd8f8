"""SLaDe's model: training (`slade_train`), decoding candidates, choosing by recompiling, `decompile`, and the
evaluation by IO accuracy (`slade_eval`).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from slmkit.domains.slade.asm import compile_asm, normalise_asm, target_of
from slmkit.domains.slade.cgen import HEADERS
from slmkit.domains.slade.harness import build, strip_includes
from slmkit.domains.slade.types import compile_errors, infer_declarations
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.progress import Progress
from slmkit.train import RUNS_DIR

TRAINED = "runs/slade/train/model"  # where `slm slade train` leaves the model


def slade_train(data: Path = Path("data/slade"), model: str = "slade-nano", run: str = "slade",
                runs_dir: Path = RUNS_DIR, resume: bool = False, train_args: FinetuneArgs | None = None,
                progress: bool = True) -> dict:
    """Train an encoder-decoder to translate assembly into C.

    Train MODEL (a zoo spec, built fresh with DATA's tokenizer, or a checkpoint to continue from) to map
    DATA/tasks.jsonl's assembly to C. The model is RUNS_DIR/RUN/model.

    Args:
        data: Directory written by `slm slade data`.
        model: SLaDe zoo spec (slade-nano, slade-200m) or a checkpoint to continue from.
    """
    from slmkit.methods.finetune import finetune
    from slmkit.methods.pretrain import initialise

    data = Path(data)
    for name in ("tasks.jsonl", "tokenizer/tokenizer.json"):
        if not (data / name).is_file():
            raise SlmError(f"{data / name} not found: run `slm slade data --out {data}` first")
    args = (train_args or FinetuneArgs()).validate()
    init = initialise(model, data / "tokenizer", Path(runs_dir) / run / "init", args.seq_len, args.seed)
    return finetune(init, str(data / "tasks.jsonl"), "chat", val_fraction=0.02, lora=False, run=f"{run}/train",
                    runs_dir=runs_dir, resume=resume, train_args=args, progress=progress)


def decompile_asm(loaded, asms: list[str], batch_size: int = 8, max_new_tokens: int = 384, candidates: int = 1,
                  temperature: float = 0.8, seed: int = 0) -> list[list[str]]:
    """C for each normalised assembly text: the greedy decoding first, then `candidates` - 1 samples."""
    from slmkit.client import LocalLM
    from slmkit.generate import SamplingParams

    lm = LocalLM(loaded, batch_size)
    greedy = lm.generate(asms, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), chat=False)
    out = [[t.strip() + "\n"] for t in greedy]
    if candidates > 1:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        sampled = lm.generate([a for a in asms for _ in range(candidates - 1)], params, chat=False)
        for i, t in enumerate(sampled):
            out[i // (candidates - 1)].append(t.strip() + "\n")
    return out


def recompiled_similarity(source: str, function: str, asm: str, levels: list[str], arch: str = "x86_64") -> float:
    """How closely SOURCE reproduces the input assembly when gcc compiles it again: the best edit similarity of
    its normalised assembly at any of LEVELS to ASM (0 when it does not compile to FUNCTION)."""
    best = 0.0
    for level in levels:
        try:
            again = normalise_asm(compile_asm(HEADERS + strip_includes(source), level, arch), function, arch)
        except SlmError:
            continue
        best = max(best, edit_similarity(again, asm))
    return best


def foreign_globals(source: str, asm: str) -> list[str]:
    """The globals SOURCE declares `extern` that the assembly never names: a function that reads them is not the
    one compiled (a global is referenced by name at every level; a callee may be inlined, so prototypes are not
    judged)."""
    names = re.findall(r"^\s*extern\b[^;(]*?\b(\w+)\s*(?:\[[^\]]*\])?\s*;", source, flags=re.M)
    return [n for n in dict.fromkeys(names) if not re.search(rf"(?<![\w.]){re.escape(n)}\b", asm)]


def choose(candidates: list[str], function: str, asm: str, levels: list[str], arch: str = "x86_64",
           infer: bool = True) -> dict:
    """The candidate decompilation gcc agrees with most: each is named after the assembly's label, completed
    with the declarations it lacks and compiled again; the one whose assembly is nearest the input wins
    (the first - greedy - on ties), and one that reads a global the assembly never names ranks below every
    one that does not. Nothing is run: the compiler alone checks the model's guesses. `greedy` holds the first
    candidate's completed source, for comparison, and `compiling` every completed source that compiles."""
    unique, scored = list(dict.fromkeys(candidates)), []
    for c in unique:
        raw = restore_name(c, function)
        completed, added, compiles = infer_declarations(raw) if infer else (raw, [], not compile_errors(raw))
        compiles = compiles and defines(completed, function)
        foreign = foreign_globals(completed, asm) if compiles else []
        if not compiles:
            score = -2.0
        elif len(unique) == 1:  # nothing to compare with
            score = 0.0
        else:
            score = recompiled_similarity(completed, function, asm, levels, arch) - (1.0 if foreign else 0.0)
        scored.append({"index": candidates.index(c), "prediction": raw, "source": completed, "added": added,
                       "compiles": compiles, "foreign": foreign, "score": score})
    best = max(scored, key=lambda x: x["score"])  # max keeps the first of equals
    return best | {"greedy": scored[0]["source"], "compiling": [x["source"] for x in scored if x["compiles"]]}


def decompile(asm_file: Path, model: str = TRAINED, function: str | None = None, infer: bool = True,
              max_new_tokens: int = 384, arch: str = "x86_64", candidates: int = 8,
              level: str | None = None) -> str:
    """Decompile one function of an assembly file into C that compiles on its own: of `candidates` decodings,
    the one gcc compiles back nearest the input.

    Args:
        asm_file: Assembly from `gcc -S` (x86_64, or aarch64 for a model trained on it).
        model: A trained SLaDe model directory.
        function: Function to decompile (default: the first global one).
        infer: Add the declarations gcc finds missing.
        max_new_tokens: Longest C in tokens.
        arch: Architecture of the assembly: x86_64 or aarch64.
        candidates: Decodings (greedy, then samples); the one gcc compiles back nearest the input assembly is
            kept.
        level: Optimisation level the assembly was compiled at (O0, O3, ...), for comparing candidates; default:
            the nearer of O0 and O3.
    """
    from slmkit.models import load

    if candidates < 1:
        raise SlmError(f"--candidates must be >= 1 (got {candidates})")
    path = Path(asm_file)
    if not path.is_file():
        raise SlmError(f"{path} not found")
    asm = path.read_text()
    if function is None:
        globl = re.findall(r"^\s*\.glob(?:a)?l\s+(\w+)", asm, flags=re.M) or re.findall(r"^([A-Za-z_]\w*):", asm,
                                                                                    flags=re.M)
        if not globl:
            raise SlmError(f"{path}: no function label found")
        function = globl[0]
    normalised = normalise_asm(asm, function, arch)
    decoded = decompile_asm(load(model, dtype="fp32"), [normalised], 1, max_new_tokens, candidates)[0]
    levels = [level.lstrip("-")] if level else ["O0", "O3"]
    picked = choose(decoded, function, normalised, levels, arch, infer)
    return picked["source"] if infer else picked["prediction"]


def report_decompile(source: str, args: dict, out) -> None:
    out.print(source, highlight=False, markup=False)


def restore_name(source: str, function: str) -> str:
    """Give the first function defined in SOURCE the symbol name the assembly shows (the label is in the
    input; a misspelt name would only fail to link)."""
    m = re.search(r"^[A-Za-z_][\w \*]*?\b(\w+)\s*\([^;{]*\)\s*\{", source, flags=re.M)
    if m is None or m.group(1) == function:
        return source
    return source[:m.start(1)] + function + source[m.end(1):]


def defines(source: str, function: str) -> bool:
    """Whether C source holds a definition of FUNCTION (an empty prediction compiles, but is no decompilation)."""
    return re.search(rf"\b{re.escape(function)}\s*\([^;{{]*\)\s*\{{", source) is not None


def edit_similarity(a: str, b: str) -> float:
    """1 - normalised edit distance over C tokens (difflib's ratio)."""
    tokens = re.compile(r"\w+|[^\w\s]")
    return difflib.SequenceMatcher(None, tokens.findall(a), tokens.findall(b), autojunk=False).ratio()


def io_check(sandbox, harness_source: str, reference: str, prediction: str) -> dict:
    """Compile the prediction with the harness and compare its output with the original function's."""
    return io_checks(sandbox, harness_source, reference, [prediction])[0]


def io_checks(sandbox, harness_source: str, reference: str, predictions: list[str],
              until_pass: bool = False) -> list[dict]:
    """`io_check` for several predictions of one function (the original is built and run once); with
    `until_pass`, stop at the first that passes."""
    ref_bin, error = build(harness_source, reference)
    if ref_bin is None:
        raise SlmError(f"the original function does not build: {error}")
    expected = sandbox.run_binary(ref_bin)
    out = []
    for prediction in predictions:
        binary, error = build(harness_source, prediction)
        if binary is None:
            out.append({"builds": False, "io": False, "error": error})
        else:
            got = sandbox.run_binary(binary)
            out.append({"builds": True, "io": got.ok and expected.ok and got.stdout == expected.stdout,
                        "error": got.error if not got.ok else ""})
        if until_pass and out[-1]["io"]:
            break
    return out


def slade_eval(model: str = TRAINED, data: Path = Path("data/slade"), limit: int = 200,
               batch_size: int = 8, max_new_tokens: int = 384, candidates: int = 1, unsandboxed: bool = False,
               out: Path | None = None, progress: bool = True) -> dict:
    """IO accuracy, compile rate (with and without type inference) and edit similarity at -O0 and -O3; with --candidates
    N, also the greedy decoding's IO accuracy beside the chosen candidate's, and how often any of the N passes the tests
    (pass@N: the most that choosing among them could reach).

    Decompile held-out functions at each level and report IO accuracy (prediction + inferred declarations,
    compiled, run on the IO tests in the sandbox, output equal to the original's), compile rate with and
    without type inference, and edit similarity to the original source. With `candidates` > 1 the prediction
    is the candidate that compiles back nearest the input assembly (`choose`), and the greedy decoding's IO
    accuracy is reported beside it.

    Args:
        model: A trained SLaDe model directory.
        data: Directory written by `slm slade data`.
        limit: Held-out functions per optimisation level.
        batch_size: Functions decoded together.
        max_new_tokens: Longest C in tokens.
        candidates: Decodings per function (greedy, then samples); the one gcc compiles back nearest the input
            assembly is kept.
        unsandboxed: Run compiled predictions without bubblewrap (resource limits only).
        out: Where the results JSON goes (default: MODEL/slade_eval.json).
    """
    from concurrent.futures import ThreadPoolExecutor

    from slmkit.data.records import read_jsonl
    from slmkit.models import load
    from slmkit.sandbox import Limits, Sandbox

    if candidates < 1:
        raise SlmError(f"--candidates must be >= 1 (got {candidates})")
    path = Path(data) / "pairs.jsonl"
    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm slade data --out {data}` first")
    tests = [r for _, r in read_jsonl(path) if r.get("split") == "test"]
    loaded = load(model, dtype="fp32")
    result: dict = {"model": model, "candidates": candidates, "levels": {}}
    sandbox = Sandbox(2, Limits(timeout=2.0, memory_mb=256), unsandboxed=unsandboxed)
    with sandbox, Progress(disable=not progress) as bar, ThreadPoolExecutor(2) as pool:
        for group in dict.fromkeys(target_of(r) for r in tests):
            rows = [r for r in tests if target_of(r) == group][:limit]
            task = bar.add_task(f"{group}: decompiling", total=len(rows))
            decoded = []
            for i in range(0, len(rows), batch_size):
                decoded += decompile_asm(loaded, [r["asm"] for r in rows[i:i + batch_size]], batch_size,
                                         max_new_tokens, candidates)
                bar.advance(task, min(batch_size, len(rows) - i))
            checking = bar.add_task(f"{group}: compiling {candidates} candidate(s) each", total=len(rows))

            def pick(row: dict, cands: list[str], task=checking) -> dict:
                picked = choose(cands, row["function"], row["asm"], [row["level"]], row.get("arch", "x86_64"))
                bar.advance(task)
                return picked

            picks = list(pool.map(pick, rows, decoded))

            def check(row: dict, pick: dict) -> dict:
                """IO of the pick, of the greedy decoding, and whether any compiling candidate passes."""
                picked = io_check(sandbox, row["harness"], row["c"], pick["source"])
                greedy = picked if pick["index"] == 0 else io_check(sandbox, row["harness"], row["c"], pick["greedy"])
                others = [c for c in pick["compiling"] if c != pick["source"]]
                any_io = picked["io"] or any(c["io"] for c in io_checks(sandbox, row["harness"], row["c"], others,
                                                                         until_pass=True))
                return picked | {"io_greedy": greedy["io"], "io_any": any_io}

            checks = list(pool.map(check, rows, picks))
            stats = {"compiles_raw": 0, "compiles": 0, "io": 0, "io_greedy": 0, "io_any": 0, "edit_similarity": 0.0}
            examples = []
            for r, pick, check in zip(rows, picks, checks, strict=True):
                stats["compiles_raw"] += pick["compiles"] and not pick["added"]
                stats["compiles"] += pick["compiles"]
                for key in ("io", "io_greedy", "io_any"):
                    stats[key] += check[key]
                stats["edit_similarity"] += edit_similarity(pick["prediction"], r["c"])
                if len(examples) < 6:
                    examples.append({"asm": r["asm"], "original": r["c"], "prediction": pick["prediction"],
                                     "added": pick["added"], "foreign": pick["foreign"], "candidate": pick["index"],
                                     **{k: v for k, v in check.items() if k in ("builds", "io", "error")}})
            n = max(len(rows), 1)
            level = {"functions": len(rows), "io_accuracy": stats["io"] / n, "compile_rate": stats["compiles"] / n,
                     "io_per_function": [int(c["io"]) for c in checks],
                     "compile_rate_without_inference": stats["compiles_raw"] / n,
                     "edit_similarity": stats["edit_similarity"] / n}
            if candidates > 1:
                level["io_accuracy_greedy"] = stats["io_greedy"] / n
                level["io_accuracy_any"] = stats["io_any"] / n
            result["levels"][group] = level | {"examples": examples}
    out = Path(out) if out else Path(model) / "slade_eval.json"
    from slmkit.train import write_atomic

    write_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


def report_train(s: dict, args: dict, out) -> None:
    """Print what `slm slade train` reports."""
    out.print(f"done: validation loss {s['val_loss']:.4f}; model in {s['run_dir']}/model")


def report_eval(r: dict, args: dict, out) -> None:
    """Print what `slm slade eval` reports."""
    from rich.table import Table

    model = args["model"]
    candidates = args["candidates"]
    greedy = ["IO accuracy (greedy)", f"any of {candidates}"] if candidates > 1 else []
    table = Table("target", "functions", "IO accuracy", *greedy, "compiles", "compiles w/o inference",
                  "edit similarity", title=f"SLaDe on held-out functions ({candidates} candidate(s) each)")
    for level, m in r["levels"].items():
        table.add_row(level, str(m["functions"]), f"{m['io_accuracy']:.3f}",
                      *[f"{m[k]:.3f}" for k in ("io_accuracy_greedy", "io_accuracy_any") if greedy],
                      f"{m['compile_rate']:.3f}",
                      f"{m['compile_rate_without_inference']:.3f}", f"{m['edit_similarity']:.3f}")
    out.print(table)
    out.print(f"-> {args['out'] or Path(model) / 'slade_eval.json'}")
