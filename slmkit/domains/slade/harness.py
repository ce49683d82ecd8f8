"""SLaDe's IO harness: a `main` that runs a function on fixed inputs and prints everything it can touch, built
beside a prediction with gcc.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from slmkit.domains.slade.asm import _first_error, _gcc
from slmkit.domains.slade.cgen import ARRAY, HEADERS, RUN_FLAGS, Program


def harness(program: Program, cases: int = 5, seed: int = 0) -> str:
    """A C `main` that calls the function on `cases` fixed inputs and prints the result and every array or
    struct argument afterwards (one line per case). Linked with a translation unit defining the function."""
    rng = random.Random(seed)
    ctx = program.context
    lines = [HEADERS + ctx.definitions() + f"{program.signature};", "int main(void)", "{"]
    for case in range(cases):
        lines.append("    {")
        args, shows = [], []
        for p in program.params:
            if p.kind == "scalar":
                low = 0 if p.ctype == "unsigned" else -20
                args.append(str(rng.randint(low, 40) if rng.random() < 0.8 else rng.randint(low, 5000)))
            elif p.kind == "length":
                args.append(str(rng.randint(0, ARRAY)) if case else str(ARRAY))
            elif p.kind == "array":
                values = ", ".join(str(rng.randint(-30, 30)) for _ in range(ARRAY))
                lines.append(f"        {p.ctype} {p.name}[{ARRAY}] = {{{values}}};")
                args.append(p.name)
                shows.append((f"{p.name}[j]", ARRAY))
            else:
                count = 1 if p.kind == "struct" else ARRAY
                fields_ = ctx.struct[1]
                init = ", ".join("{" + ", ".join(str(rng.randint(-20, 30)) for _ in fields_) + "}"
                                 for _ in range(count))
                lines.append(f"        {p.ctype} {p.name}[{count}] = {{{init}}};")
                args.append(p.name)
                shows += [(f"{p.name}[j].{f}", count) for _, f in fields_]
        call = f"{program.name}({', '.join(args)})"
        lines.append(f'        printf("%ld", (long){call});')
        for expr, count in shows:
            lines.append(f'        for (int j = 0; j < {count}; j++) printf(" %ld", (long){expr});')
        lines.append('        printf("\\n");')
        lines.append("    }")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def build(harness_source: str, function_source: str, gcc: str = "gcc") -> tuple[bytes | None, str]:
    """Compile the harness and the function (two translation units) into an executable: (bytes, "") or
    (None, gcc's first error)."""
    with tempfile.TemporaryDirectory(prefix="slade-") as tmp:
        (Path(tmp) / "main.c").write_text(harness_source)
        (Path(tmp) / "f.c").write_text(HEADERS + strip_includes(function_source))
        done = _gcc(gcc, [*RUN_FLAGS, "main.c", "f.c", "-o", "prog"], tmp)
        if done.returncode:
            return None, _first_error(done.stderr)
        return (Path(tmp) / "prog").read_bytes(), ""


def strip_includes(source: str) -> str:
    """Model output may not pull in files: `#include` lines are replaced by the standard headers."""
    return "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith("#")) + "\n"


