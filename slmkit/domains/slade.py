"""SLaDe: a small encoder-decoder that decompiles optimised assembly back to C (Armengol-Estapé et al.).

The model reads the normalised x86-64 assembly of one function (gcc -O0 or -O3) and writes C: the
declarations the function needs (struct typedefs, `extern` globals, callee prototypes: *type inference*,
since none of them is visible in the function's own assembly except through offsets, symbols and calls)
followed by the function. What counts is **IO accuracy** (ExeBench style): the prediction is compiled with
gcc, linked with a harness that calls it on test inputs, run in `slmkit.sandbox`, and its output compared
with the original function's.

Everything is built offline and deterministically from a seed:

- `random_program`: a small C program: optional context (a struct, a global table or scalar, a helper
  function) and one target function (scalar arithmetic, array loops, struct fields, digit loops, in-place
  array updates) whose parameters the IO harness knows how to feed.
- `compile_asm` + `normalise_asm`: gcc -S at each level, the target function's instructions cut out,
  directives dropped, local labels renumbered, referenced constants (`.LC0`) appended, and each
  multiply-by-reciprocal ("magic number") that gcc emits for a division by a constant marked with its
  divisor (`# div 9`), the idiom a decompiler recognises so the model can copy `9` instead of learning
  954437177 -> 9.
- `harness`: a `main` that runs the function on fixed inputs and prints its result and every array/struct
  it can touch.
- `infer_declarations`: after the model, a compiler-driven type inference (as PsycheC does for SLaDe): the
  prediction is compiled and, for each unknown type, undeclared identifier, unknown struct member or
  implicitly declared function gcc reports, a declaration is added, until it compiles.
- `slade_data` / `slade_train` / `decompile` / `slade_eval`: the corpus with its own asm+C BPE, training
  of the zoo's `slade-nano` from scratch, and the evaluation (IO accuracy, compile rate with and without
  type inference, edit similarity; per optimisation level).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.progress import Progress

LEVELS = ("O0", "O3")
# architecture -> (gcc, assembly comment marker, Debian package of the compiler)
ARCHES = {"x86_64": ("gcc", "#", "gcc"), "aarch64": ("aarch64-linux-gnu-gcc", "//", "gcc-aarch64-linux-gnu")}
ASM_FLAGS = ["-S", "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fcf-protection=none", "-w"]
# IO runs: wrapping arithmetic, so equal C gives equal output; C99 rules on undeclared functions (as gcc 14)
RUN_FLAGS = ["-O0", "-fwrapv", "-Werror=implicit-function-declaration", "-Werror=implicit-int"]
HEADERS = "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
ARRAY = 8  # every array argument has this many elements

# --- the C generator -------------------------------------------------------------------------------------

FIELDS = ["x", "y", "z", "w", "id", "qty", "price", "count", "lo", "hi", "key", "val"]
STRUCTS = ["point", "pair", "item", "cell", "rec", "entry", "node_t", "span"]
GLOBALS = ["table", "weights", "lut", "coeffs", "bias", "steps"]
HELPERS = {
    "clamp": ("int clamp(int v, int lo, int hi)", "{ return v < lo ? lo : v > hi ? hi : v; }", 3),
    "max2": ("int max2(int a, int b)", "{ return a > b ? a : b; }", 2),
    "min2": ("int min2(int a, int b)", "{ return a < b ? a : b; }", 2),
    "absval": ("int absval(int v)", "{ return v < 0 ? -v : v; }", 1),
    "sq": ("int sq(int v)", "{ return v * v; }", 1),
    "sign": ("int sign(int v)", "{ return (v > 0) - (v < 0); }", 1),
}
VERBS = ["sum", "count", "scale", "mix", "fold", "score", "pick", "step", "calc", "norm", "acc", "blend", "shift",
         "tally", "reduce", "walk", "update", "apply"]
NOUNS = ["vals", "items", "data", "pts", "cells", "pair", "range", "table", "digits", "bits", "arr", "list", "sum",
         "diff", "max", "min", "odd", "even", "pos", "neg"]


@dataclass
class Context:
    struct: tuple[str, list[tuple[str, str]]] | None = None  # typedef name, [(type, field)]
    global_array: str | None = None
    global_values: list[int] = field(default_factory=list)
    global_scalar: tuple[str, int] | None = None
    helper: str | None = None

    def definitions(self) -> str:
        """What the original file defines (the harness and the assembly's compilation unit get it)."""
        out = self._struct()
        if self.global_array:
            out += f"int {self.global_array}[{ARRAY}] = {{{', '.join(map(str, self.global_values))}}};\n"
        if self.global_scalar:
            out += f"int {self.global_scalar[0]} = {self.global_scalar[1]};\n"
        if self.helper:
            out += f"{HELPERS[self.helper][0]} {HELPERS[self.helper][1]}\n"
        return out

    def declarations(self, function: str) -> str:
        """What FUNCTION (its C text) must declare to compile on its own: the model's target starts with it."""
        used = set(re.findall(r"\w+", function))
        out = self._struct() if self.struct and self.struct[0] in used else ""
        if self.global_array in used:
            out += f"extern int {self.global_array}[{ARRAY}];\n"
        if self.global_scalar and self.global_scalar[0] in used:
            out += f"extern int {self.global_scalar[0]};\n"
        if self.helper in used:
            out += f"{HELPERS[self.helper][0]};\n"
        return out

    def _struct(self) -> str:
        if not self.struct:
            return ""
        name, fields_ = self.struct
        return f"typedef struct {{ {' '.join(f'{t} {f};' for t, f in fields_)} }} {name};\n"


@dataclass
class Param:
    kind: str  # scalar | length | array | struct | structs
    ctype: str
    name: str


@dataclass
class Program:
    context: Context
    name: str
    ret: str
    params: list[Param]
    body: str

    @property
    def signature(self) -> str:
        return f"{self.ret} {self.name}({', '.join(_declare(p) for p in self.params)})"

    @property
    def function(self) -> str:
        return f"{self.signature}\n{{\n{self.body}}}\n"

    @property
    def target(self) -> str:
        """The model's target: declarations, then the function."""
        return self.context.declarations(self.function) + self.function

    @property
    def source(self) -> str:
        """The original compilation unit."""
        return self.context.definitions() + self.function


def _declare(p: Param) -> str:
    return f"{p.ctype} *{p.name}" if p.kind in ("array", "struct", "structs") else f"{p.ctype} {p.name}"


class _Gen:
    """Expressions and statements over the variables in scope."""

    def __init__(self, rng: random.Random, ctx: Context, ctype: str):
        self.rng, self.ctx, self.ctype = rng, ctx, ctype

    def const(self) -> str:
        r = self.rng.random()
        return str(self.rng.randint(1, 9) if r < 0.6 else self.rng.randint(10, 100) if r < 0.9 else
                   self.rng.choice([255, 1000, 1024, 4096, 65535]))

    def expr(self, names: list[str], depth: int = 2) -> str:
        """An expression over `names`: the left operand is always a variable or a subexpression, so no
        part is constant-only; compound operands are parenthesised."""
        rng = self.rng
        if depth <= 0 or rng.random() < 0.25:
            return rng.choice(names)
        a = _paren(self.expr(names, depth - 1))
        b = _paren(self.expr(names, depth - 1) if rng.random() < 0.6 else self.const())
        if b == a:
            b = self.const()
        choice = rng.random()
        if choice < 0.45:
            return f"{a} {rng.choice(['+', '-', '*', '+', '-', '&', '|', '^'])} {b}"
        if choice < 0.6:
            return f"{a} {rng.choice(['<<', '>>'])} {rng.randint(1, 4)}"
        if choice < 0.7:
            return f"{a} {rng.choice(['/', '%'])} {rng.randint(2, 10)}"
        if choice < 0.8:
            return f"{a} {rng.choice(['<', '>', '<=', '>=', '==', '!='])} {b} ? {a} : {b}"
        if choice < 0.88 and self.ctx.helper:
            argc = HELPERS[self.ctx.helper][2]
            args = [a.strip("()") if a.startswith("(") and a.count("(") == 1 else a]
            args += [rng.choice(names) if rng.random() < 0.5 else self.const() for _ in range(argc - 1)]
            return f"{self.ctx.helper}({', '.join(args)})"
        if choice < 0.94 and self.ctx.global_array:
            return f"{self.ctx.global_array}[{a} & {ARRAY - 1}]"
        if self.ctx.global_scalar:
            return f"{a} * {self.ctx.global_scalar[0]}"
        return f"-{a}"

    def cond(self, names: list[str]) -> str:
        rng = self.rng
        x = rng.choice(names)
        y = rng.choice([n for n in names if n != x] or [self.const()])
        c = rng.choice([f"{x} > {self.const()}", f"{x} < {rng.randint(-5, 20)}", f"{x} % 2 == 0", f"({x} & 1)",
                        f"{x} != {y}", f"{x} >= {y}"])
        if rng.random() < 0.2:
            c += f" {rng.choice(['&&', '||'])} {rng.choice(names)} > 0"
        return c


def _paren(e: str) -> str:
    return f"({e})" if " " in e or e.startswith("-") else e


def _name(rng: random.Random) -> str:
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    return name + str(rng.randint(1, 9)) if rng.random() < 0.3 else name


def _use(rng: random.Random, g: _Gen, var: str, names: list[str]) -> str:
    """A return expression that uses `var` (no dead stores for -O3 to delete)."""
    other = _paren(g.expr(names, 1))
    if rng.random() < 0.5 or other == var:
        return var
    return f"{var} {rng.choice(['+', '-', '*', '^'])} {other}"


def random_program(rng: random.Random, name: str) -> Program:
    """One small C function of a random shape, with the context it uses."""
    ctx = Context()
    if rng.random() < 0.35:
        fields_ = rng.sample(FIELDS, rng.randint(2, 3))
        ctx.struct = (rng.choice(STRUCTS), [(rng.choice(["int", "int", "long"]), f) for f in fields_])
    if rng.random() < 0.2:
        ctx.global_array = rng.choice(GLOBALS)
        ctx.global_values = [rng.randint(-9, 20) for _ in range(ARRAY)]
    if rng.random() < 0.1:
        ctx.global_scalar = (rng.choice(["scale", "offset", "factor", "limit"]), rng.randint(2, 9))
    if rng.random() < 0.25:
        ctx.helper = rng.choice(sorted(HELPERS))
    ctype = rng.choice(["int", "int", "int", "long", "unsigned"])
    g = _Gen(rng, ctx, ctype)
    shapes = ["scalar", "loop", "loop", "map", "digits"] + (["struct", "structs"] if ctx.struct else [])
    shape = rng.choice(shapes)
    body, params, ret = "", [], ctype
    if shape == "scalar":
        names = rng.sample(["a", "b", "c", "x", "y", "n", "k", "v"], rng.randint(1, 3))
        params = [Param("scalar", ctype, n) for n in names]
        local = rng.choice(["t", "r", "m", "s"])
        body = f"    {ctype} {local} = {g.expr(names)};\n"
        names = names + [local]
        if rng.random() < 0.6:
            body += f"    if ({g.cond(names)})\n        {local} = {g.expr(names)};\n"
            if rng.random() < 0.5:
                body += f"    else\n        {local} = {g.expr(names)};\n"
        body += f"    return {_use(rng, g, local, names)};\n"
    elif shape in ("loop", "map"):
        arr, n, i = rng.choice(["a", "arr", "v", "xs", "data"]), rng.choice(["n", "len", "count"]), "i"
        params = [Param("array", ctype, arr), Param("length", "int", n)]
        extra = []
        if rng.random() < 0.5:
            extra = [rng.choice(["k", "m", "t"])]
            params.append(Param("scalar", ctype, extra[0]))
        acc = rng.choice(["s", "acc", "total", "res", "c"])
        elem = [f"{arr}[{i}]"] + extra
        body = f"    {ctype} {acc} = {rng.choice(['0', '0', '1', extra[0] if extra else '0'])};\n"
        body += f"    for (int {i} = 0; {i} < {n}; {i}++) {{\n"
        if shape == "map":
            body += f"        {arr}[{i}] = {g.expr(elem + [i])};\n"
            elem = [f"{arr}[{i}]"]
        if rng.random() < 0.5:
            op = rng.choice(["+=", "-=", "^="])
            body += f"        if ({g.cond(elem)})\n            {acc} {op} {g.expr(elem + [acc], 1)};\n"
        else:
            body += f"        {acc} {rng.choice(['+=', '+=', '-=', '^=', '|='])} {g.expr(elem, 2)};\n"
        body += f"    }}\n    return {_use(rng, g, acc, [acc] + extra)};\n"
    elif shape == "digits":
        x = rng.choice(["x", "n", "v"])
        params = [Param("scalar", "unsigned", x)]
        ret, base = "int", rng.choice([2, 10, 10, 16])
        acc = rng.choice(["s", "c", "r"])
        step = rng.choice([f"{x} % {base}", "1", f"({x} % {base}) * ({x} % {base})", f"({x} % {base} > {base // 2})"])
        body = (f"    int {acc} = 0;\n    while ({x} != 0) {{\n        {acc} += {step};\n"
                f"        {x} /= {base};\n    }}\n    return {acc};\n")
    elif shape == "struct":
        sname, fields_ = ctx.struct
        p = rng.choice(["p", "s", "r", "it"])
        params = [Param("struct", sname, p)]
        if rng.random() < 0.5:
            params.append(Param("scalar", "int", "k"))
        names = [f"{p}->{f}" for _, f in fields_] + [q.name for q in params[1:]]
        ret = rng.choice(["int", "long"])
        if rng.random() < 0.5:
            f0 = rng.choice(fields_)[1]
            body += f"    {p}->{f0} = {g.expr(names)};\n"
        body += f"    return {g.expr(names)};\n"
    else:  # an array of structs
        sname, fields_ = ctx.struct
        s, n = rng.choice(["s", "items", "pts"]), "n"
        params = [Param("structs", sname, s), Param("length", "int", n)]
        names = [f"{s}[i].{f}" for _, f in fields_]
        ret = rng.choice(["int", "long"])
        acc = rng.choice(["best", "total", "c"])
        body = f"    {ret} {acc} = 0;\n    for (int i = 0; i < {n}; i++) {{\n"
        if rng.random() < 0.4:
            body += f"        {rng.choice(names)} = {g.expr(names, 1)};\n"
        if rng.random() < 0.5:
            body += f"        if ({g.cond(names)})\n            {acc} += {g.expr(names, 1)};\n"
        else:
            body += f"        {acc} += {g.expr(names, 2)};\n"
        body += f"    }}\n    return {acc};\n"
    return Program(ctx, name, ret, params, body)


# --- assembly ------------------------------------------------------------------------------------------


def _gcc(gcc: str, args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run gcc (C locale, so diagnostics quote with ASCII '...'); a timeout is a failed run."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run([gcc, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 1, "", "error: gcc timed out")


def compile_asm(source: str, level: str, arch: str = "x86_64") -> str:
    """gcc -S at LEVEL (O0, O3, ...) for ARCH (x86_64, or aarch64 with Debian's cross compiler) of a C
    compilation unit; the assembly text."""
    if arch not in ARCHES:
        raise SlmError(f"unknown architecture '{arch}' (one of {', '.join(ARCHES)})")
    gcc, _, package = ARCHES[arch]
    if shutil.which(gcc) is None:
        raise SlmError(f"{gcc} is not installed: `apt-get install {package}`")
    with tempfile.TemporaryDirectory(prefix="slade-") as tmp:
        (Path(tmp) / "f.c").write_text(source)
        done = _gcc(gcc, [f"-{level}", *ASM_FLAGS, "f.c", "-o", "f.s"], tmp)
        if done.returncode:
            raise SlmError(f"{gcc} -{level} failed: {_first_error(done.stderr)}")
        return (Path(tmp) / "f.s").read_text()


def normalise_asm(asm: str, function: str, arch: str = "x86_64") -> str:
    """The instructions of FUNCTION in gcc's assembly: directives and comments dropped, one space between
    mnemonic and operands, local labels that are jumped to or read renumbered in order of appearance (others
    dropped), and the local constants it references (`.LC0: .long ...`) appended."""
    comment = ARCHES[arch][1]
    lines = [ln.split(comment, 1)[0].rstrip() for ln in asm.splitlines()]
    try:
        start = lines.index(f"{function}:")
    except ValueError:
        raise SlmError(f"function '{function}' not found in the assembly") from None
    body = []
    for ln in lines[start + 1:]:
        s = ln.strip()
        if s.startswith(".size") or (s.endswith(":") and not s.startswith(".L")):  # the next function
            break
        if s and (not s.startswith(".") or re.fullmatch(r"\.L\w+:", s)):
            body.append(re.sub(r"\s+", " ", s.replace("\t", " ")))
    used = set(re.findall(r"\.L\w+", "\n".join(b for b in body if not b.endswith(":"))))
    body = [b for b in body if not b.endswith(":") or b[:-1] in used]
    constants = []  # .LCn blocks the function reads
    for label in dict.fromkeys(re.findall(r"\.LC\d+", "\n".join(body))):
        if f"{label}:" in lines:
            i = lines.index(f"{label}:") + 1
            block = [label + ":"]
            while i < len(lines) and re.match(r"\s+\.(long|quad|value|byte|word|hword|xword|string|ascii|float|"
                                               r"double)\b", lines[i]):
                block.append(re.sub(r"\s+", " ", lines[i].strip()))
                i += 1
            constants += block
    text = "\n".join([f"{function}:", *body, *constants])
    labels = dict.fromkeys(re.findall(r"\.L\w+", text))
    text = re.sub(r"\.L\w+", lambda m: f".L{list(labels).index(m.group())}", text)
    return "\n".join(_mark_division(line, comment) for line in text.split("\n")) + "\n"


def divisor_of(value: int) -> int | None:
    """D when VALUE is the reciprocal gcc multiplies by to divide by a constant: 2^e/D rounded up, stored as
    is, as a signed immediate, or less 2^bits (the 33-bit magic numbers of unsigned division), for 32- or
    64-bit division (not 16-bit: its magic numbers are too short to tell from other constants); otherwise
    None. The number fixes D only up to a power of two (2^33/6 rounds up to 2^32/3's 1431655766; the shifts
    that follow tell them apart), so D is the odd divisor, 3..4095. (On aarch64 the number is built in 16-bit
    halves, `mov` + `movk`, and is not marked.)"""
    for bits in (32, 64):
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            continue
        unsigned = value % (1 << bits)
        if unsigned < 1 << (bits - 12):
            continue
        for magic in (unsigned, unsigned + (1 << bits)):
            for exponent in range(bits - 12, bits + 12):
                power = 1 << exponent
                d = (power + magic // 2) // magic
                if 0 <= magic * d - power < 2 * d and d % 2:  # 2^e/d rounded up (by less than 2)
                    return d if 3 <= d < 4096 else None
    return None


def _mark_division(line: str, comment: str) -> str:
    """LINE with `COMMENT div D` appended when one of its constants is gcc's magic number for dividing by D."""
    for number in re.findall(r"(?<![\w.])-?\d{6,}", line):
        d = divisor_of(int(number))
        if d:
            return f"{line} {comment} div {d}"
    return line


def asm_of(program: Program, level: str, arch: str = "x86_64") -> str:
    return normalise_asm(compile_asm(HEADERS + program.source, level, arch), program.name, arch)


def target_of(row: dict) -> str:
    """The evaluation group of a corpus row: architecture and optimisation level, e.g. `x86_64 -O3`."""
    return f"{row.get('arch', 'x86_64')} -{row['level']}"


# --- the IO harness ------------------------------------------------------------------------------------


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


def _first_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if "error" in ln]
    return (errors or stderr.splitlines() or ["unknown error"])[0].strip()[:300]


# --- type inference --------------------------------------------------------------------------------------


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


# --- corpus ----------------------------------------------------------------------------------------------

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
    """Write the SLaDe corpus to OUT: pairs.jsonl (normalised assembly at -O0 and -O3 -> C with declarations;
    held-out functions carry their IO harness), tasks.jsonl (prompt/completion training pairs within
    `max_tokens`) and tokenizer/ (a BPE over assembly and C). `arches`: x86_64 (default) and/or aarch64
    (Debian's cross gcc). `c_files`: the user's C files, each holding one function after its declarations,
    added to the training pairs. `number_pieces`: constants are pieces of their own in the tokenizer
    (`SLADE_SPLIT_NUMBERS`), not parts of whole-line tokens."""
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


# --- training, decompiling, evaluation -------------------------------------------------------------------


def slade_train(data: Path = Path("data/slade"), model: str = "slade-nano", run: str = "slade",
                runs_dir: Path = Path("runs"), resume: bool = False, train_args: FinetuneArgs | None = None,
                progress: bool = True) -> dict:
    """Train MODEL (a zoo spec, built fresh with DATA's tokenizer, or a checkpoint to continue from) to map
    DATA/tasks.jsonl's assembly to C. The model is RUNS_DIR/RUN/model."""
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


def decompile(model: str, asm_file: Path, function: str | None = None, infer: bool = True,
              max_new_tokens: int = 384, arch: str = "x86_64", candidates: int = 8,
              level: str | None = None) -> str:
    """Decompile FUNCTION (default: the first global function) of a gcc assembly file (`gcc -S`; x86_64, or
    aarch64 for a model trained on it): of `candidates` decodings, the one that compiles back nearest the input
    (at LEVEL, e.g. O3; by default the nearer of -O0 and -O3)."""
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


def slade_eval(model: str, data: Path = Path("data/slade"), limit: int = 200, batch_size: int = 8,
               max_new_tokens: int = 384, candidates: int = 1, unsandboxed: bool = False, out: Path | None = None,
               progress: bool = True) -> dict:
    """Decompile held-out functions at each level and report IO accuracy (prediction + inferred declarations,
    compiled, run on the IO tests in the sandbox, output equal to the original's), compile rate with and
    without type inference, and edit similarity to the original source. With `candidates` > 1 the prediction
    is the candidate that compiles back nearest the input assembly (`choose`), and the greedy decoding's IO
    accuracy is reported beside it."""
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
                     "compile_rate_without_inference": stats["compiles_raw"] / n,
                     "edit_similarity": stats["edit_similarity"] / n}
            if candidates > 1:
                level["io_accuracy_greedy"] = stats["io_greedy"] / n
                level["io_accuracy_any"] = stats["io_any"] / n
            result["levels"][group] = level | {"examples": examples}
    if out:
        from slmkit.train import write_atomic

        write_atomic(Path(out), json.dumps(result, indent=2) + "\n")
    return result
