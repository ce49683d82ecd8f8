"""TinyGSM's training data: procedural problems, teacher programs kept only when they return the known
answer in the sandbox, and users' problems (`gsm_data`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError
from slmkit.methods.tinygsm.problems import (
    HELD_OUT_LONG_STORIES,
    HELD_OUT_STORIES,
    HELD_OUT_TEMPLATES,
    LONG_STORY_TEMPLATES,
    gsm_symbolic,
    ngrams,
    overlap,
)
from slmkit.methods.tinygsm.problems import (
    procedural as procedural_problems,
)

TEACHER_PROMPT = ("Write a Python function named solution() that solves the math word problem below. Put the "
                  "question in the docstring, compute the answer step by step in well-named variables, and "
                  "return it as a number. Reply with the code only.\n\nProblem: {question}")


def extract_program(reply: str) -> str:
    """The Python code in a reply: a fenced block when there is one, else the text from `def solution`."""
    fenced = re.findall(r"```(?:python)?\n(.*?)```", reply, flags=re.DOTALL)
    code = fenced[0] if fenced else reply
    start = code.find("def solution")
    return code[start:] if start >= 0 else code


def accept_programs(sandbox, rows: list[dict], replies: list[str]) -> int:
    """Give each row the program in its reply when the program, run in the sandbox, returns the row's answer;
    return how many were accepted."""
    programs = [extract_program(t) for t in replies]
    accepted = 0
    for row, code, res in zip(rows, programs, sandbox.map(programs), strict=True):
        if res.ok and matches(res.value, row["answer"]):
            row["program"] = code
            accepted += 1
    return accepted


def read_user_problems(path: Path) -> list[dict]:
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row.get("question"), str) or "answer" not in row:
            raise SlmError(f"{where}: a problem needs \"question\" (string) and \"answer\" (a number)")
        try:
            answer = float(row["answer"])
        except (TypeError, ValueError) as e:
            raise SlmError(f"{where}: \"answer\" must be a number, got {row['answer']!r}") from e
        rows.append({"question": row["question"], "answer": answer, "program": row.get("program")})
    return rows


def matches(value, answer) -> bool:
    try:
        return abs(float(value) - float(answer)) < 1e-6
    except (TypeError, ValueError):
        return False


def gsm_data(
    out: Path,
    procedural: int = 2000,
    teacher: str | None = None,
    teacher_problems: int = 0,
    samples: int = 1,
    user: Path | None = None,
    test_size: int = 200,
    seed: int = 0,
    unsandboxed: bool = False,
    progress: bool = True,
) -> dict:
    """Write TinyGSM-style training data; programs are executed in the sandbox and must return their answer; problems
    overlapping the gsm_symbolic test set are dropped.

    Training data (JSONL: question, program, answer, source): `procedural` procedural problems with
    their constructed programs; with `teacher` (a local model or an endpoint), its programs for
    `teacher_problems` further procedural problems, kept when the sandboxed result matches; with `user`, a
    JSONL of {question, answer[, program]} (programs checked, missing ones asked of the teacher). Every
    kept program is executed once in the sandbox. Reports the 8-gram overlap with the first `test_size`
    gsm_symbolic test problems (must be 0) and drops any overlapping training problem.

    Args:
        out: Training data JSONL (question, program, answer, source).
        procedural: Procedural problems (programs follow from construction).
        teacher: A model (zoo name, directory, .gguf) or an endpoint http://host:port/v1#model that writes programs
            (default: none).
        teacher_problems: Further problems whose programs the teacher writes (kept when the program returns the
            answer).
        samples: Teacher attempts per problem (greedy, then sampled).
        user: Your problems: JSONL of question, answer[, program].
        test_size: gsm_symbolic test problems checked for overlap.
        seed: Seed of the procedural problems.
    """
    from slmkit.progress import Progress
    from slmkit.sandbox import Limits, Sandbox

    rows = [{"question": p.question, "program": p.program, "answer": p.answer, "source": f"procedural:{p.template}"}
            for p in procedural_problems(procedural, seed)]
    pending = []  # problems whose program must come from the teacher
    if teacher and teacher_problems:
        pending += [{"question": p.question, "answer": p.answer, "source": f"teacher:{p.template}"}
                    for p in procedural_problems(teacher_problems, seed + 1)]
    if user:
        for r in read_user_problems(Path(user)):
            if r["program"]:
                rows.append({**r, "source": "user"})
            elif teacher:
                pending.append({"question": r["question"], "answer": r["answer"], "source": "user+teacher"})
            else:
                raise SlmError(f"{user}: problems without a \"program\" need --teacher to write one")
    stats = {"procedural": procedural, "teacher_asked": len(pending), "teacher_kept": 0}
    with Sandbox(2, Limits(timeout=2.0), unsandboxed=unsandboxed) as sandbox:
        if pending:
            from slmkit.client import open_lm
            from slmkit.generate import SamplingParams

            lm = open_lm(teacher)
            with Progress(disable=not progress) as bar:
                job = bar.add_task(f"programs from {lm.name}", total=len(pending) * samples)
                for s in range(samples):
                    params = SamplingParams(max_new_tokens=320, temperature=0.0 if s == 0 else 0.7, top_p=0.95,
                                            seed=seed * 100 + s)
                    todo = [r for r in pending if "program" not in r]
                    replies = lm.generate([TEACHER_PROMPT.format(question=r["question"]) for r in todo], params)
                    accept_programs(sandbox, todo, replies)
                    bar.advance(job, len(pending))
            kept = [r for r in pending if "program" in r]
            stats["teacher_kept"] = len(kept)
            rows += kept
        results = sandbox.map([r["program"] for r in rows])
    bad = [(r, res) for r, res in zip(rows, results, strict=True) if not (res.ok and matches(res.value, r["answer"]))]
    if any(r["source"].startswith("procedural") for r, _ in bad):
        raise SlmError(f"a procedural program gave a wrong result: {bad[0][0]['source']} ({bad[0][1].error})")
    if bad:
        r, res = bad[0]
        raise SlmError(f"{user}: the program for {r['question'][:60]!r} does not return its answer "
                       f"({res.status}: {res.error or res.value})")
    test = [t["question"] for t in gsm_symbolic(test_size, seed=0)] if test_size else []
    test_grams = set().union(*(ngrams(q) for q in test))
    contaminated = {i for i, r in enumerate(rows) if ngrams(r["question"]) & test_grams}
    rows = [r for i, r in enumerate(rows) if i not in contaminated]
    random.Random(seed).shuffle(rows)
    write_jsonl(rows, out)
    return {"out": str(out), "examples": len(rows), **stats, "dropped_for_test_overlap": len(contaminated),
            "test_overlap_after": overlap([r["question"] for r in rows], test) if test else 0,
            "templates": len({r["source"] for r in rows if r["source"].startswith("procedural")})}


# --- the problems each stage reads ------------------------------------------------------------------------


TEST_SETS = {"gsm_symbolic": "reasoning-gym's GSM8K-style problems",
             "heldout-long-stories": "four-event stories (longer than any training problem) of held-out templates",
             "heldout-stories": "one- to three-event stories whose chain of events training never saw",
             "heldout-templates": "problems of the hand-written templates training never saw"}
_HELD = {"heldout-long-stories": HELD_OUT_LONG_STORIES, "heldout-stories": HELD_OUT_STORIES,
         "heldout-templates": HELD_OUT_TEMPLATES}


def test_problems(test: str, count: int) -> list[dict]:
    """The held-out problems of one of TEST_SETS."""
    if test == "gsm_symbolic":
        return gsm_symbolic(count, seed=0)
    if test not in _HELD:
        raise SlmError(f"unknown test set '{test}' ({', '.join(TEST_SETS)})")
    return [{"question": p.question, "answer": p.answer, "template": p.template}
            for p in procedural_problems(count, seed=999_983, templates=list(_HELD[test]))]


def training_problems(data: str, count: int) -> list[dict]:
    """The verifier's problems: the first `count` of a `slm gsm data` file, or `long-stories` (four-event
    stories of the templates the test set does not use)."""
    if data == "long-stories":
        held = set(HELD_OUT_LONG_STORIES)
        return [{"question": p.question, "answer": p.answer} for p in
                procedural_problems(count, seed=1, templates=[t for t in LONG_STORY_TEMPLATES if t not in held])]
    if not Path(data).is_file():
        raise SlmError(f"TinyGSM data not found: {data} (write it with `slm gsm data`, or use long-stories)")
    return [row for _, row in read_jsonl(Path(data))][:count]


def report(r: dict, args: dict, out) -> None:
    """Print what `slm gsm data` reports."""
    out.print(f"wrote {r['examples']} problems ({r['templates']} procedural templates; teacher kept "
              f"{r['teacher_kept']}/{r['teacher_asked']}); test overlap {r['test_overlap_after']} "
              f"(dropped {r['dropped_for_test_overlap']}) -> {r['out']}")
