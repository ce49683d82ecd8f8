"""FLAME's formulas: references, literals and expressions by type (`random_formula`), sketches, the checks
every formula passes (openpyxl's tokenizer, `formulas`' parser) and evaluation over a sheet.
"""

from __future__ import annotations

import random
from collections.abc import Callable

SHEETS = ["Sheet2", "Data", "Inputs", "Summary", "'Q1 Sales'", "'Raw Data'", "Lookup"]
NAMES = ["TaxRate", "Revenue", "Costs", "Prices", "Headcount", "Budget", "Discount", "Targets"]
WORDS = ["Yes", "No", "Paid", "Open", "Closed", "High", "Low", "N/A", "East", "West", "Total", "Pending", "OK"]


def _col(rng: random.Random) -> str:
    return rng.choice("ABCDEFGH") if rng.random() < 0.8 else rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + \
        rng.choice("ABCDEFGH")


def cell(rng: random.Random, sheet: bool = True) -> str:
    col, row = _col(rng), str(rng.choice([rng.randint(1, 20), rng.randint(1, 500)]))
    mode = rng.random()
    ref = f"${col}${row}" if mode < 0.15 else f"${col}{row}" if mode < 0.2 else f"{col}${row}" if mode < 0.25 \
        else col + row
    return (rng.choice(SHEETS) + "!" + ref) if sheet and rng.random() < 0.12 else ref


def cell_range(rng: random.Random, columns: int = 1) -> str:
    """A rectangular range (sometimes a whole column or a named range)."""
    if rng.random() < 0.1:
        return rng.choice(NAMES)
    col = rng.choice("ABCDEFG")
    last = chr(ord(col) + columns - 1)
    if rng.random() < 0.08:
        return f"{col}:{last}"
    top = rng.randint(1, 20)
    bottom = top + rng.randint(2, 200)
    absolute = rng.random() < 0.3
    d = "$" if absolute else ""
    ref = f"{d}{col}{d}{top}:{d}{last}{d}{bottom}"
    return (rng.choice(SHEETS) + "!" + ref) if rng.random() < 0.15 else ref


def number(rng: random.Random) -> str:
    r = rng.random()
    return str(rng.randint(0, 10)) if r < 0.4 else str(rng.choice([12, 24, 30, 100, 365, 1000])) if r < 0.6 else \
        f"{rng.uniform(0, 1):.2f}" if r < 0.85 else str(rng.randint(11, 5000))


def text(rng: random.Random) -> str:
    return '"' + rng.choice(WORDS + ["", " ", ", ", "-"]) + '"'


# --- expressions by type ---------------------------------------------------------------------------------
# Each generator returns a formula fragment of one kind: num (number), txt (text), bool (logical).


def num(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.3:
        return cell(rng) if rng.random() < 0.7 else number(rng) if rng.random() < 0.8 else rng.choice(NAMES)
    choice = rng.random()
    if choice < 0.2:
        op = rng.choice(["+", "-", "*", "/", "*", "+", "^"])
        left, right = num(rng, depth - 1), num(rng, depth - 1)
        expr = f"{left}{op}{right}" if op != "^" else f"{left}^{rng.randint(2, 3)}"
        return f"({expr})" if rng.random() < 0.3 else expr
    return rng.choice(NUM_FUNCS)(rng, depth - 1)


def txt(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.3:
        return cell(rng) if rng.random() < 0.6 else text(rng)
    if rng.random() < 0.15:
        return f"{txt(rng, depth - 1)}&{txt(rng, depth - 1)}"
    return rng.choice(TXT_FUNCS)(rng, depth - 1)


def cond(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if depth <= 0 or r < 0.6:
        op = rng.choice([">", "<", ">=", "<=", "=", "<>"])
        right = num(rng, 0) if rng.random() < 0.8 else text(rng)
        return f"{cell(rng)}{op}{right}"
    if r < 0.9:
        f = rng.choice(["AND", "OR"])
        return f"{f}({', '.join(cond(rng, depth - 1) for _ in range(rng.randint(2, 3)))})".replace(", ", ",")
    return f"NOT({cond(rng, depth - 1)})" if rng.random() < 0.5 else f"ISBLANK({cell(rng)})"


def criteria(rng: random.Random) -> str:
    r = rng.random()
    return f'">{number(rng)}"' if r < 0.3 else text(rng) if r < 0.6 else cell(rng, sheet=False) if r < 0.8 else \
        f'"<="&{cell(rng, sheet=False)}'


def _f(name: str, *args: str) -> str:
    return f"{name}({','.join(args)})"


NUM_FUNCS: list[Callable[[random.Random, int], str]] = [
    lambda r, d: _f(r.choice(["SUM", "AVERAGE", "MAX", "MIN", "COUNT", "COUNTA", "MEDIAN"]),
                    *[cell_range(r) for _ in range(r.choice([1, 1, 1, 2]))]),
    lambda r, d: _f("SUM", num(r, d), num(r, d)),
    lambda r, d: _f("ROUND", num(r, d), str(r.randint(0, 2))),
    lambda r, d: _f(r.choice(["ROUNDUP", "ROUNDDOWN"]), num(r, d), str(r.randint(0, 2))),
    lambda r, d: _f(r.choice(["ABS", "INT", "SQRT"]), num(r, d)),
    lambda r, d: _f("MOD", num(r, d), str(r.randint(2, 12))),
    lambda r, d: _f("POWER", num(r, d), str(r.randint(2, 3))),
    lambda r, d: _f(r.choice(["SUMIF", "AVERAGEIF"]), cell_range(r), criteria(r), *([cell_range(r)] if r.random() < 0.6
                                                                                   else [])),
    lambda r, d: _f("COUNTIF", cell_range(r), criteria(r)),
    lambda r, d: _f("SUMIFS", cell_range(r), cell_range(r), criteria(r), cell_range(r), criteria(r)),
    lambda r, d: _f("SUMPRODUCT", cell_range(r), cell_range(r)),
    lambda r, d: _f("IF", cond(r, d), num(r, d), num(r, d)),
    lambda r, d: _f("IFERROR", num(r, d), r.choice(["0", '""', "1"])),
    lambda r, d: _f("VLOOKUP", cell(r), cell_range(r, r.randint(2, 5)), str(r.randint(2, 4)),
                    r.choice(["FALSE", "FALSE", "TRUE", "0"])),
    lambda r, d: _f("HLOOKUP", cell(r), cell_range(r, 3), str(r.randint(2, 3)), "FALSE"),
    lambda r, d: _f("INDEX", cell_range(r), _f("MATCH", cell(r), cell_range(r), "0")),
    lambda r, d: _f("MATCH", cell(r), cell_range(r), r.choice(["0", "1"])),
    lambda r, d: _f("LEN", txt(r, d)),
    lambda r, d: _f("VALUE", txt(r, d)),
    lambda r, d: _f(r.choice(["YEAR", "MONTH", "DAY", "WEEKDAY"]), date(r, d)),
    lambda r, d: _f("DATEDIF", date(r, d), date(r, d), r.choice(['"d"', '"m"', '"y"'])),
    lambda r, d: _f("NETWORKDAYS", date(r, d), date(r, d)),
]

TXT_FUNCS: list[Callable[[random.Random, int], str]] = [
    lambda r, d: _f(r.choice(["UPPER", "LOWER", "TRIM", "PROPER"]), txt(r, d)),
    lambda r, d: _f(r.choice(["LEFT", "RIGHT"]), txt(r, d), str(r.randint(1, 5))),
    lambda r, d: _f("MID", txt(r, d), str(r.randint(1, 4)), str(r.randint(1, 6))),
    lambda r, d: _f("CONCATENATE", *[txt(r, d) for _ in range(r.randint(2, 3))]),
    lambda r, d: _f("TEXT", num(r, d), r.choice(['"0.00"', '"0%"', '"yyyy-mm-dd"', '"#,##0"', '"mmm"'])),
    lambda r, d: _f("SUBSTITUTE", txt(r, d), text(r), text(r)),
    lambda r, d: _f("IF", cond(r, d), txt(r, d), txt(r, d)),
    lambda r, d: _f("VLOOKUP", cell(r), cell_range(r, 3), str(r.randint(2, 3)), "FALSE"),
    lambda r, d: _f("TEXTJOIN", text(r), "TRUE", cell_range(r)),
]


def date(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if depth <= 0 or r < 0.4:
        return cell(rng)
    if r < 0.6:
        return _f("DATE", str(rng.randint(2015, 2026)), str(rng.randint(1, 12)), str(rng.randint(1, 28)))
    if r < 0.75:
        return "TODAY()"
    if r < 0.9:
        return _f("EDATE", cell(rng), str(rng.randint(-12, 12)))
    return f"{cell(rng)}+{rng.randint(1, 90)}"


def random_formula(rng: random.Random, max_depth: int = 3) -> str:
    """A formula whose outermost part is a function call (or, sometimes, arithmetic over calls)."""
    depth = rng.randint(1, max_depth)
    kind = rng.random()
    if kind < 0.12:
        return "=" + f"{rng.choice(NUM_FUNCS)(rng, depth - 1)}{rng.choice('+-*/')}{num(rng, depth - 1)}"
    funcs = NUM_FUNCS if kind < 0.75 else TXT_FUNCS
    return "=" + rng.choice(funcs)(rng, depth - 1)


# --- sketches, checks, evaluation ------------------------------------------------------------------------

REF = (r"(?:(?:'[^']+'|[A-Za-z_][A-Za-z0-9_.]*)!)?"  # optional sheet
       r"(?:\$?[A-Z]{1,3}\$?\d+(?::\$?[A-Z]{1,3}\$?\d+)?|\$?[A-Z]{1,3}:\$?[A-Z]{1,3})(?![A-Za-z0-9_(])")
# The pieces a user types: strings | function( | reference | number | name | two-character operator | any
# other single character (completion prefixes end between them).
FORMULA_PIECES = (r'"[^"]*"|[A-Z][A-Z0-9.]*\(|' + REF +
                  r"|\d+(?:\.\d+)?|[A-Za-z_][A-Za-z0-9_.]*|<>|<=|>=|[^\sA-Za-z0-9]")
# The tokenizer's pre-tokenisation: functions with their "(", sheet prefixes, booleans and words (named
# ranges, words in strings) stay whole; column letters and numbers are pieces of their own between "$", ":"
# and quotes, so every reference is spelt from frequent tokens (`$ B $ 13 : $ B $ 178`) the model can copy
# from the input. Whole references as pieces made each of them a rare token, which a nano model reproduced
# as a frequent look-alike; single digits made copying ambiguous (many equal tokens to align) and slower to
# learn (teacher-forced repair token accuracy 0.63 after 600 steps with whole numbers, 0.63 after 2,600 with
# digits).
FORMULA_SPLIT = (r"[A-Z][A-Z0-9.]*\(|'[^']+'!|[A-Za-z_][A-Za-z0-9_.]*!|TRUE|FALSE|[A-Za-z]*[a-z][A-Za-z_.]*"
                 r"|[A-Z]+|\d+|<>|<=|>=|[^\sA-Za-z0-9]")


def sketch(formula: str) -> str:
    """The formula's shape: references -> R, strings -> S, numbers -> N, named ranges -> R."""
    from openpyxl.formula import Tokenizer

    parts = []
    for t in Tokenizer(formula).items:
        if t.type == "OPERAND":
            parts.append({"RANGE": "R", "TEXT": "S", "NUMBER": "N", "LOGICAL": t.value}.get(t.subtype, "?"))
        else:
            parts.append(t.value)
    return "=" + "".join(parts)


def check_formula(formula: str) -> str | None:
    """None when openpyxl's tokenizer and the `formulas` parser both accept the formula and every function is
    one `formulas` knows (645 Excel functions), else why not."""
    import formulas
    from openpyxl.formula import Tokenizer

    if not formula.startswith("="):
        return "does not start with ="
    try:
        items = Tokenizer(formula).items
    except Exception as e:  # openpyxl raises TokenizerError (and ValueError) for malformed text
        return f"tokenizer: {e}"
    known = formulas.get_functions()
    for t in items:
        if t.type == "FUNC" and t.subtype == "OPEN" and t.value[:-1].upper() not in known:
            return f"unknown function {t.value[:-1]}"
    try:
        formulas.Parser().ast(formula)
    except Exception as e:  # formulas raises FormulaError subclasses
        return f"parser: {str(e).splitlines()[0]}"
    return None


def evaluate(formula: str, sheet: dict[str, object]):
    """The value of a formula over `sheet` (cell or range reference -> value; missing references are 0)."""
    import formulas
    import numpy as np

    func = formulas.Parser().ast(formula)[1].compile()
    values = []
    for name in func.inputs:
        value = sheet.get(name.upper(), 0)
        values.append(np.asarray(value, dtype=object) if isinstance(value, list) else value)
    out = func(*values)
    out = out.item() if hasattr(out, "item") and getattr(out, "size", 0) == 1 else out
    return out if isinstance(out, (int, float, str, bool)) else str(out)


def random_sheet(formula: str, rng: random.Random) -> dict[str, object]:
    """Random numbers for every reference a formula reads (ranges get arrays of their shape)."""
    import formulas
    from openpyxl.utils.cell import range_boundaries

    sheet: dict[str, object] = {}
    for name in formulas.Parser().ast(formula)[1].compile().inputs:
        ref = name.split("!")[-1].replace("$", "")
        try:
            low_col, low_row, high_col, high_row = range_boundaries(ref)
        except ValueError:  # a named range
            sheet[name] = rng.randint(1, 100)
            continue
        if ":" not in ref:
            sheet[name] = rng.randint(1, 100)
        else:
            rows, cols = min((high_row or 20) - (low_row or 1) + 1, 50), (high_col or 1) - (low_col or 1) + 1
            sheet[name] = [[rng.randint(1, 100) for _ in range(cols)] for _ in range(rows)]
    return sheet


def equivalent(candidate: str, reference: str, trials: int = 2, seed: int = 0) -> bool | None:
    """Whether CANDIDATE computes what REFERENCE computes on `trials` random sheets (None: the reference
    itself cannot be evaluated by `formulas`)."""
    import logging

    logging.getLogger("schedula").setLevel(logging.CRITICAL)  # it logs a traceback for each unknown function
    rng = random.Random(seed)
    for _ in range(trials):
        try:
            sheet = random_sheet(reference, rng)
            expected = evaluate(reference, sheet)
        except Exception:  # noqa: BLE001 - `formulas` does not evaluate every function it parses
            return None
        try:
            if evaluate(candidate, sheet) != expected:
                return False
        except Exception:  # noqa: BLE001 - a candidate that does not evaluate is not equivalent
            return False
    return True
