"""TinyGSM's generator: fine-tuned to write a program's body from its header and docstring (`gsm_train`),
sampled through the continuous-batching engine and run in the sandbox (`solve`), resumably.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR, FinetuneArgs


def program_prompt(question: str) -> str:
    """What the generator is given: the function header with the question as its docstring (TinyGSM's
    format); it writes the body."""
    return f'def solution():\n    """{question.strip()}"""\n'


STOP = ["\ndef ", "\nprint(", "\nif __name__", "\n\n\n", "\n```", "\n#"]


def program_body(program: str) -> str:
    """The body of `solution()` without its docstring, re-indented, as the generator should write it."""
    import ast
    import textwrap

    try:
        tree = ast.parse(program)
    except SyntaxError as e:
        raise SlmError(f"a training program does not parse: {e.msg} (line {e.lineno})") from e
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solution"), None)
    if fn is None:
        raise SlmError("a training program has no `def solution()`")
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) and isinstance(fn.body[0].value.value, str) else fn.body
    return textwrap.indent("\n".join(ast.unparse(stmt) for stmt in body), "    ") + "\n"


def training_rows(rows: list[dict]) -> list[dict]:
    return [{"prompt": program_prompt(r["question"]), "completion": program_body(r["program"])} for r in rows]


def gsm_train(
    model: str | None = None,
    data: Path = Path("gsm.jsonl"),
    lora: bool = True,
    run: str = "gsm",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the generator: given `def solution():` and the question as its docstring, write the body.

    Fine-tune the generator on `slm gsm data` output: given the header and docstring, write the body (loss
    on the body only; plain text, no chat template).

    Args:
        data: Data from `slm gsm data`.
    """
    from slmkit.methods.finetune import FinetuneArgs, finetune

    if not Path(data).is_file():
        raise SlmError(f"TinyGSM data not found: {data} (write it with `slm gsm data`)")
    rows = [row for _, row in read_jsonl(Path(data))]
    examples = write_jsonl(training_rows(rows), Path(runs_dir) / run / "programs.jsonl")
    return finetune(model, data=str(examples), task="chat", val_fraction=0.05, lora=lora, run=run,
                    runs_dir=runs_dir, resume=resume, train_args=train_args or FinetuneArgs(), progress=progress)


@dataclass
class Sample:
    program: str
    status: str  # the sandbox status
    value: object = None

    def answer(self) -> float | None:
        try:
            return float(self.value) if self.status == "ok" else None
        except (TypeError, ValueError):
            return None


def solve(loaded, questions: list[str], sandbox, *, samples: int = 4, temperature: float = 0.7,
          max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0, progress: bool = True,
          partial: Path | None = None) -> list[list[Sample]]:
    """`samples` programs per question (greedy when samples == 1 and temperature == 0), executed in the
    sandbox. Up to `batch_size` prompts are decoded together, continuously batched (a finished program's row
    takes the next prompt at once); sample i is seeded with `seed + i`. `partial`: a file each finished
    program is appended to as it completes; a rerun with the same model and settings samples only the programs
    it lacks, so an interrupted sampling run resumes."""
    from slmkit.batching import complete_many
    from slmkit.generate import SamplingParams
    from slmkit.progress import Progress

    prompts = [program_prompt(q) for q in questions for _ in range(samples)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, stop=STOP,
                             seed=seed + i) for i in range(len(prompts))]
    key = {"model": str(loaded.path or loaded.name), "temperature": temperature, "max_new_tokens": max_new_tokens,
           "seed": seed, "prompts": hashlib.sha256("\0".join(prompts).encode()).hexdigest()}
    texts = _sampled_before(partial, key) if partial else {}
    todo = [i for i in range(len(prompts)) if i not in texts]
    with Progress(disable=not progress) as bar, _appending(partial, key, texts) as log:
        job = bar.add_task(f"sampling {samples} program(s) for {len(questions)} problems", total=len(prompts),
                           completed=len(texts))

        def finished(j, completion):
            i = todo[j]
            texts[i] = prompts[i] + completion.text
            if log:
                log.write(json.dumps({"i": i, "text": texts[i]}) + "\n")
                log.flush()
            bar.advance(job)

        if todo:
            complete_many(loaded, [prompts[i] for i in todo], [params[i] for i in todo], max_batch=batch_size,
                          on_done=finished)
    programs = [texts[i] for i in range(len(prompts))]
    results = sandbox.map(programs)
    flat = [Sample(t, r.status, r.value) for t, r in zip(programs, results, strict=True)]
    return [flat[i * samples:(i + 1) * samples] for i in range(len(questions))]


def _sampled_before(partial: Path, key: dict) -> dict[int, str]:
    """The programs an interrupted `solve` with the same key left in `partial` (a cut-off last line ignored)."""
    if not partial.is_file():
        return {}
    lines = partial.read_text(encoding="utf-8").splitlines()
    texts = {}
    try:
        if not lines or json.loads(lines[0]).get("key") != key:
            return {}
        for line in lines[1:]:
            row = json.loads(line)
            texts[int(row["i"])] = row["text"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass  # the line being written when the run stopped
    return texts


@contextlib.contextmanager
def _appending(partial: Path | None, key: dict, texts: dict[int, str]):
    """`partial` rewritten with `key` and the programs kept so far (no cut-off line left), open for appending."""
    if partial is None:
        yield None
        return
    write_jsonl([{"key": key}] + [{"i": i, "text": t} for i, t in sorted(texts.items())], partial)
    with open(partial, "a", encoding="utf-8") as log:
        yield log


def majority(samples: list[Sample]) -> float | None:
    """The most frequent executed answer (ties: the one reached first)."""
    answers = [a for a in (s.answer() for s in samples) if a is not None]
    if not answers:
        return None
    return max(dict.fromkeys(answers), key=answers.count)


def report(r: dict, args: dict, out) -> None:
    """Print what `slm gsm train` reports."""
    out.print(f"val loss {r['val_loss_before']:.3f} -> {r['val_loss']:.3f}; model -> {Path(r['run_dir']) / 'model'}")


def gsm_solve(question: list[str], model: str | None = None, samples: int = 4, temperature: float = 0.7,
              unsandboxed: bool = False) -> list[list[Sample]]:
    """Sample programs for each problem, run them in the sandbox, and answer by majority vote.

    Args:
        question: Word problems (one or more).
        model: A generator (runs/NAME/model from `slm gsm train`; default: the embedded model).
        samples: Programs sampled per problem.
        temperature: Sampling temperature (0 = greedy, with --samples 1).
    """
    from slmkit.models import load
    from slmkit.sandbox import Sandbox

    loaded = load(model)
    with Sandbox(2, unsandboxed=unsandboxed) as sandbox:
        return solve(loaded, question, sandbox, samples=samples, temperature=temperature)


def report_solve(solved: list[list[Sample]], args: dict, out) -> None:
    for question, samples in zip(args["question"], solved, strict=True):
        out.rule(question[:100])
        for s in samples:
            out.print(s.program.rstrip(), markup=False, highlight=False)
            out.print(f"[dim]-> {s.status}: {s.value}[/]")
        out.print(f"[bold]majority answer: {majority(samples)}[/]")
