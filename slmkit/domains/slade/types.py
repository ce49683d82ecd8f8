"""SLaDe's type inference after the model: declarations added for what gcc reports missing, until the
prediction compiles on its own.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from slmkit.domains.slade.asm import _gcc
from slmkit.domains.slade.cgen import HEADERS, RUN_FLAGS
from slmkit.domains.slade.harness import strip_includes


def compile_errors(source: str, gcc: str = "gcc") -> list[str]:
    """gcc's error lines for a standalone translation unit (empty: it compiles)."""
    with tempfile.TemporaryDirectory(prefix="slade-") as tmp:
        (Path(tmp) / "f.c").write_text(HEADERS + strip_includes(source))
        done = _gcc(gcc, ["-c", *RUN_FLAGS, "f.c", "-o", "f.o"], tmp)
    return [] if done.returncode == 0 else [ln for ln in done.stderr.splitlines() if "error:" in ln]


def infer_declarations(source: str, rounds: int = 6, gcc: str = "gcc") -> tuple[str, list[str], bool]:
    """Make a decompiled function compile on its own by declaring what gcc says is missing: an unknown type
    name becomes a typedef (a struct of `int` members when the code reads members through it, else `int`),
    an undeclared identifier an `extern int`, a call to an undeclared function an `int f()` prototype.
    Returns the completed source, the declarations added and whether it now compiles."""
    types: dict[str, bool] = {}  # unknown type name -> used as a struct
    names: dict[str, str] = {}  # identifier -> its declaration
    members = list(dict.fromkeys(re.findall(r"(?:->|[A-Za-z_\]\)]\.)\s*([A-Za-z_]\w*)", source)))
    added: list[str] = []
    for _ in range(rounds):
        completed = "\n".join(added + [source])
        errors = compile_errors(completed, gcc)
        if not errors:
            return completed, added, True
        before = (dict(types), dict(names))
        for e in errors:
            if m := re.search(r"unknown type name '(\w+)'", e):
                types.setdefault(m.group(1), False)
            elif m := re.search(r"implicit declaration of function '(\w+)'", e):
                names[m.group(1)] = f"int {m.group(1)}();"
            elif m := re.search(r"'(\w+)' undeclared", e):
                array = re.search(rf"\b{m.group(1)}\s*\[", source)
                names[m.group(1)] = f"extern int {m.group(1)}{'[]' if array else ''};"
            elif ("member" in e or "type argument of '->'" in e) and members:
                types.update(dict.fromkeys(types, True))
        if (types, names) == before:
            break
        added = [f"typedef struct {{ {' '.join(f'int {f};' for f in members)} }} {t};" if struct else
                 f"typedef int {t};" for t, struct in types.items()] + list(names.values())
    completed = "\n".join(added + [source])
    return completed, added, not compile_errors(completed, gcc)
