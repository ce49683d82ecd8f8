"""SLaDe's C generator: small functions in six shapes over a context of structs, globals and helpers
(`random_program`), with the levels and compilers they are built for.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

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
