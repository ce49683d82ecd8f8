"""FLAME (Joshi et al., 2024: "FLAME: A small language model for spreadsheet formulas"): data.

A small T5-style model for Excel formulas. This module makes its data, offline and deterministically from a
seed:
- `random_formula`: a generator of realistic formulas - functions across math, logic, lookup, text and date
  (nested), cell references (relative, absolute, mixed), ranges, sheet references (quoted when needed),
  named ranges, number / string / boolean literals, arithmetic, comparison and concatenation operators;
- `sketch`: a formula with its references and literals abstracted away; the corpus keeps one formula per
  sketch (FLAME deduplicates by sketch so frequent shapes do not swamp the rare ones);
- `check_formula`: every formula must tokenise with openpyxl's formula tokenizer and parse with the
  `formulas` library; `evaluate` computes a formula over a small sheet of values (for "evaluates the same"
  metrics);
- `corrupt`: last-mile repair pairs - missing / extra parentheses, wrong argument separators, misspelled
  function names, swapped arguments, missing quotes - each kind named, so metrics can be reported per kind;
- `FORMULA_SPLIT`: formula-aware pre-tokenisation for a byte-level BPE (`slmkit.data.tokenizers.train_bpe`):
  functions with their "(", sheet prefixes and words whole, column letters and numbers as pieces of their
  own, so the model can copy references from frequent tokens.

and trains and uses it:
- `PRETRAIN_OBJECTIVES`: FLAME's four pretraining objectives, one sampled per example (weighted), each asking
  for the *whole* original formula back - tail masking and random noise (generic), language-aware span
  masking (whole pieces) and user-inspired noise (the corruptions above); so pretraining already teaches the
  copying that repair needs;
- `flame_train`: the zoo's FLAME spec (T5-style; `flame-nano` here, `flame-60m` real size) pretrained on
  those pairs, then fine-tuned on two tasks with task prefixes - `repair: BROKEN` -> formula and
  `complete: PREFIX` -> formula;
- `flame_eval`: exact match after normalisation on held-out repair pairs, per corruption kind, against
  the copy-the-input baseline; the parse rate of the outputs; exact match of completions;
- `retrieval_objective`: the tuning loss plus an in-batch contrastive term that pulls each example's
  encoded input (a broken formula, a prefix) towards its encoded target formula, so the encoder's pooled
  states become a search embedding;
- `repair`, `complete`, `search` (retrieval: cosine similarity of mean-pooled encoder states).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs

# --- references and literals -----------------------------------------------------------------------------

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


# --- corruptions for last-mile repair --------------------------------------------------------------------

MISSPELL = {"SUM": ["SUMM", "SUN"], "AVERAGE": ["AVERGE", "AVRAGE"], "VLOOKUP": ["VLOKUP", "VLOOKPU"],
            "COUNTIF": ["COUNTIFF", "CONTIF"], "CONCATENATE": ["CONCATENTE", "CONCATINATE"], "IFERROR": ["IFEROR"],
            "INDEX": ["INDX"], "MATCH": ["MACTH"], "ROUND": ["ROUDN", "ROND"], "SUMIF": ["SUMFI", "SUMIIF"]}


def _misspell(formula: str, rng: random.Random) -> str | None:
    names = [m for m in re.finditer(r"([A-Z][A-Z0-9.]*)\(", formula)]
    if not names:
        return None
    m = rng.choice(names)
    name = m.group(1)
    wrong = rng.choice(MISSPELL[name]) if name in MISSPELL else None
    if wrong is None and len(name) > 2:  # drop, double or swap a letter
        i = rng.randrange(1, len(name) - 1)
        wrong = rng.choice([name[:i] + name[i + 1:], name[:i] + name[i] + name[i:],
                            name[:i - 1] + name[i] + name[i - 1] + name[i + 1:]])
    import formulas

    if wrong is None or wrong.upper() in formulas.get_functions():  # LEN -> LN is another function, not a typo
        return None
    return formula[:m.start(1)] + wrong + formula[m.end(1):]


def _top_level_args(formula: str) -> list[tuple[int, int, int]]:
    """(call start, argument starts..., end) spans of function calls with 2+ arguments, outside strings."""
    calls, stack, in_string = [], [], False
    for i, ch in enumerate(formula):
        if ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch == "(":
            stack.append([i])
        elif ch == "," and stack:
            stack[-1].append(i)
        elif ch == ")" and stack:
            call = stack.pop() + [i]
            if len(call) >= 3:
                calls.append(call)
    return calls


def _swap_args(formula: str, rng: random.Random) -> str | None:
    calls = _top_level_args(formula)
    if not calls:
        return None
    call = rng.choice(calls)
    k = rng.randrange(len(call) - 2)
    a, b, c = call[k], call[k + 1], call[k + 2]
    first, second = formula[a + 1:b], formula[b + 1:c]
    if first == second:
        return None
    return formula[:a + 1] + second + "," + first + formula[c:]


def _outside_strings(formula: str, chars: str) -> list[int]:
    out, in_string = [], False
    for i, ch in enumerate(formula):
        if ch == '"':
            in_string = not in_string
        elif not in_string and ch in chars:
            out.append(i)
    return out


def _drop_paren(formula: str, rng: random.Random) -> str | None:
    spots = _outside_strings(formula, ")")
    if not spots:
        return None
    i = rng.choice(spots[-1:] * 2 + spots)  # most often the last one, as people do
    return formula[:i] + formula[i + 1:]


def _extra_paren(formula: str, rng: random.Random) -> str | None:
    spots = _outside_strings(formula, ")")
    if not spots:
        return None
    i = rng.choice(spots)
    return formula[:i] + ")" + formula[i:]


def _separator(formula: str, rng: random.Random) -> str | None:
    spots = _outside_strings(formula, ",")
    if not spots:
        return None
    i = rng.choice(spots)
    return formula[:i] + rng.choice([";", ";", " ", "."]) + formula[i + 1:]


def _quote(formula: str, rng: random.Random) -> str | None:
    strings = [m for m in re.finditer(r'"[^"]+"', formula)]
    if not strings:
        return None
    m = rng.choice(strings)
    if rng.random() < 0.5:  # drop both quotes, or only one
        return formula[:m.start()] + m.group()[1:-1] + formula[m.end():]
    return formula[:m.end() - 1] + formula[m.end():]


CORRUPTIONS: dict[str, Callable[[str, random.Random], str | None]] = {
    "missing-paren": _drop_paren, "extra-paren": _extra_paren, "separator": _separator,
    "misspelled-function": _misspell, "swapped-arguments": _swap_args, "missing-quote": _quote}


def corrupt(formula: str, rng: random.Random, kind: str | None = None) -> tuple[str, str] | None:
    """(kind, broken formula), or None when the formula offers nothing for that kind."""
    kinds = [kind] if kind else rng.sample(list(CORRUPTIONS), len(CORRUPTIONS))
    for k in kinds:
        if k not in CORRUPTIONS:
            raise SlmError(f"unknown corruption '{k}' (one of: {', '.join(CORRUPTIONS)})")
        broken = CORRUPTIONS[k](formula, rng)
        if broken is not None and broken != formula:
            return k, broken
    return None


# --- FLAME's pretraining objectives: from a damaged formula, write the whole original -------------------

REPAIR, COMPLETE = "repair: ", "complete: "  # the fine-tuning tasks' prompts
TASK_PROMPTS = (REPAIR, COMPLETE)
MASK = "<mask>"  # the formula tokenizer's mask token (slmkit.data.tokenizers.SPECIAL)


def _pieces(formula: str) -> list[str] | None:
    pieces = re.findall(FORMULA_PIECES, formula)
    return pieces if "".join(pieces) == formula and len(pieces) > 2 else None


def tail_mask(formula: str, rng: random.Random) -> str | None:
    """The first 20-90% of the formula's pieces, then the mask (generic: tail masking)."""
    pieces = _pieces(formula)
    if pieces is None:
        return None
    return "".join(pieces[:max(1, min(len(pieces) - 1, round(len(pieces) * rng.uniform(0.2, 0.9))))]) + MASK


def random_noise(formula: str, rng: random.Random, rate: float = 0.15) -> str | None:
    """Each piece (but the leading "=") deleted, doubled or swapped for another piece of the formula with
    probability `rate`, at least one (generic: random noise)."""
    pieces = _pieces(formula)
    if pieces is None:
        return None
    edited = {i for i in range(1, len(pieces)) if rng.random() < rate} or {rng.randrange(1, len(pieces))}
    out = pieces[:1]
    for i, piece in enumerate(pieces[1:], 1):
        edit = rng.choice(("delete", "double", "swap")) if i in edited else "keep"
        if edit == "double":
            out += [piece, piece]
        elif edit == "swap":
            out.append(rng.choice(pieces))
        elif edit == "keep":
            out.append(piece)
    noisy = "".join(out)
    if noisy == formula:  # the edits undid themselves (a piece swapped for its equal): drop one piece instead
        i = rng.randrange(1, len(pieces))
        noisy = "".join(pieces[:i] + pieces[i + 1:])
    return noisy


def span_mask(formula: str, rng: random.Random) -> str | None:
    """One to three spans of one to three whole pieces (a function name, a reference, a literal, an operator -
    never part of one) each replaced by the mask (language-aware masked spans)."""
    pieces = _pieces(formula)
    if pieces is None:
        return None
    masked = set()
    for _ in range(rng.randint(1, 3)):
        start = rng.randrange(1, len(pieces))
        masked.update(range(start, min(len(pieces), start + rng.randint(1, 3))))
    out = [MASK if i in masked else p for i, p in enumerate(pieces) if i not in masked or i - 1 not in masked]
    return "".join(out)  # (a run of masked pieces is one mask)


def user_noise(formula: str, rng: random.Random) -> str | None:
    """A mistake users make (`CORRUPTIONS`: parentheses, separators, misspellings, argument order, quotes)."""
    broken = corrupt(formula, rng)
    return broken[1] if broken else None


# FLAME samples one objective per example, weighted; each target is the complete original formula.
PRETRAIN_VARIANTS = 3  # damaged copies of each training formula in pretrain.jsonl
PRETRAIN_OBJECTIVES: dict[str, tuple[Callable[[str, random.Random], str | None], float]] = {
    "tail-mask": (tail_mask, 0.2), "random-noise": (random_noise, 0.2), "span-mask": (span_mask, 0.35),
    "user-noise": (user_noise, 0.25)}


def pretrain_pair(formula: str, rng: random.Random) -> dict | None:
    """{"prompt": damaged formula, "completion": formula, "objective": name} for one weighted objective."""
    names = list(PRETRAIN_OBJECTIVES)
    name = rng.choices(names, [PRETRAIN_OBJECTIVES[n][1] for n in names])[0]
    noisy = PRETRAIN_OBJECTIVES[name][0](formula, rng)
    return None if noisy is None else {"prompt": noisy, "completion": formula, "objective": name}


# --- the corpus ------------------------------------------------------------------------------------------


def formula_corpus(count: int, seed: int = 0, max_depth: int = 3, progress: bool = False) -> list[str]:
    """`count` distinct-sketch formulas that tokenise and parse, deterministic from `seed`."""
    from slmkit.progress import Progress

    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("formulas", total=count)
        while len(out) < count:
            tries += 1
            if tries > 50 * count + 1000:
                raise SlmError(f"only {len(out)} distinct formula sketches after {tries} tries; ask for fewer")
            f = random_formula(rng, max_depth)
            if len(f) > 200 or check_formula(f) is not None:
                continue
            key = sketch(f)
            if key in seen:
                continue
            seen.add(key)
            out.append(f)
            bar.advance(task)
    return out


def flame_data(out: Path, count: int = 20000, seed: int = 0, test_fraction: float = 0.05, vocab_size: int = 4096,
               progress: bool = True) -> dict:
    """Write the FLAME corpus: formulas.jsonl (train/test; every formula has its own sketch, so test shapes are
    unseen in training), repair.jsonl (broken -> fixed, with the corruption kind), pretrain.jsonl (damaged ->
    whole formula, `PRETRAIN_VARIANTS` per training formula, one objective each), tasks.jsonl (the repair and
    completion fine-tuning pairs) and tokenizer/ (a byte-level BPE over the training formulas with
    formula-aware pre-tokenisation; FLAME uses ~16K at real size), all deterministic from `seed`."""
    from slmkit.data.tokenizers import train_bpe
    from slmkit.train import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formulas_ = formula_corpus(count, seed, progress=progress)
    rng = random.Random(seed + 1)
    rows, repairs = [], []
    for f in formulas_:
        split = "test" if rng.random() < test_fraction else "train"
        rows.append({"formula": f, "sketch": sketch(f), "split": split})
        kinds_done = set()
        for _ in range(2):  # two corruptions of different kinds when the formula allows
            broken = corrupt(f, rng)
            if broken and broken[0] not in kinds_done:
                kinds_done.add(broken[0])
                repairs.append({"broken": broken[1], "fixed": f, "kind": broken[0], "split": split})
    tasks = [{"prompt": REPAIR + r["broken"], "completion": r["fixed"]} for r in repairs if r["split"] == "train"]
    tasks += [{"prompt": COMPLETE + completion_prefix(r["formula"], rng), "completion": r["formula"]}
              for r in rows if r["split"] == "train"]
    rng.shuffle(tasks)
    pretrain = [pair for r in rows if r["split"] == "train" for _ in range(PRETRAIN_VARIANTS)
                if (pair := pretrain_pair(r["formula"], rng))]
    for name, data in (("formulas.jsonl", rows), ("repair.jsonl", repairs), ("pretrain.jsonl", pretrain),
                       ("tasks.jsonl", tasks)):
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in data))
    train_bpe([r["formula"] for r in rows if r["split"] == "train"], vocab_size, out / "tokenizer", FORMULA_SPLIT)
    kinds = {k: sum(r["kind"] == k for r in repairs) for k in CORRUPTIONS}
    return {"formulas": len(rows), "test": sum(r["split"] == "test" for r in rows), "repairs": len(repairs),
            "kinds": kinds, "out": str(out)}


# --- training, evaluation, use ---------------------------------------------------------------------------


def completion_prefix(formula: str, rng: random.Random) -> str:
    """The first 30-70% of a formula's pieces (what a user has typed so far)."""
    pieces = re.findall(FORMULA_PIECES, formula)
    return "".join(pieces[:max(2, round(len(pieces) * rng.uniform(0.3, 0.7)))])


def normalise(formula: str) -> str:
    """Whitespace dropped and letters upper-cased outside string literals (Excel ignores both)."""
    parts = re.split(r'("[^"]*")', formula.strip())
    return "".join(p if p.startswith('"') else re.sub(r"\s+", "", p).upper() for p in parts)


def _read(path: Path, split: str | None = None) -> list[dict]:
    from slmkit.data.records import read_jsonl

    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm flame data --out {path.parent}` first")
    return [row for _, row in read_jsonl(path) if split is None or row.get("split") == split]


def pooled(states, mask):
    """Mean of the encoder states over real tokens, L2-normalised: FLAME's formula embedding."""
    import torch

    mask = mask[..., None].to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def retrieval_objective(weight: float, prompts: list[list[int]] = (), temperature: float = 0.05):
    """The seq2seq loss plus `weight` x an in-batch contrastive loss (InfoNCE): each input's embedding must be
    nearer its own target formula's than the batch's other targets (a target that appears twice is not a
    negative for itself). The input is embedded as `search` embeds a query - without its task prompt (token
    ids in `prompts`, e.g. those of "repair: "). Held-out loss is the seq2seq loss alone, comparable with a
    run without the term."""
    import torch

    def objective(model, batch, generator):
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        keep = labels != -100
        if not model.training or not weight or len(labels) < 2:
            return out.loss, int(keep.sum())
        pad, encoder = model.config.pad_token_id or 0, model.get_encoder()
        queries = torch.full_like(batch["input_ids"], pad)
        for row, (ids, n) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1).tolist(),
                                           strict=True)):
            cut = max([len(p) for p in prompts if ids[:len(p)] == p and len(p) < n] or [0])
            queries[row, :n - cut] = torch.tensor(ids[cut:n])
        q_mask = queries != pad
        q = pooled(encoder(input_ids=queries, attention_mask=q_mask.long()).last_hidden_state, q_mask)
        d = pooled(encoder(input_ids=labels.masked_fill(~keep, pad), attention_mask=keep.long()).last_hidden_state,
                   keep)
        same = (labels[:, None, :] == labels[None, :, :]).all(-1) & ~torch.eye(len(labels), dtype=torch.bool,
                                                                                device=labels.device)
        sims = (q @ d.T / temperature).masked_fill(same, float("-inf"))
        contrast = torch.nn.functional.cross_entropy(sims, torch.arange(len(labels), device=labels.device))
        return out.loss + weight * contrast, int(keep.sum())

    return objective


def flame_train(
    data: Path = Path("data/flame"),
    model: str = "flame-nano",
    pretrain_steps: int = 600,
    run: str = "flame",
    runs_dir: Path = Path("runs"),
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    retrieval_weight: float = 0.0,
    progress: bool = True,
) -> dict:
    """Pretrain `model` (a zoo spec, built with DATA's formula tokenizer, or a checkpoint) on DATA/pretrain.jsonl
    - FLAME's objectives, each asking for the whole formula back from a damaged one (`pretrain_steps`; 0
    skips) - then fine-tune it on DATA/tasks.jsonl (repair and completion; with `retrieval_weight` > 0, plus
    the contrastive retrieval term). Returns both stages' summaries; the model is RUNS_DIR/RUN/tune/model."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from slmkit.methods.finetune import finetune
    from slmkit.methods.pretrain import initialise

    data = Path(data)
    for name in ("pretrain.jsonl", "tasks.jsonl", "tokenizer/tokenizer.json"):
        if not (data / name).is_file():
            raise SlmError(f"{data / name} not found: run `slm flame data --out {data}` first")
    with (data / "pretrain.jsonl").open() as f:
        if '"prompt"' not in f.readline():
            raise SlmError(f"{data / 'pretrain.jsonl'} holds plain formulas from an older `slm flame data`; run "
                           f"`slm flame data --out {data}` again for FLAME's damaged -> whole-formula pairs")
    args = (train_args or FinetuneArgs()).validate()
    summary = {}
    base = initialise(model, data / "tokenizer", Path(runs_dir) / run / "init", args.seq_len, args.seed)
    if pretrain_steps:
        done = Path(runs_dir) / run / "pretrain" / "model"
        if not done.is_dir():
            summary["pretrain"] = finetune(base, str(data / "pretrain.jsonl"), "chat", val_fraction=0.02,
                                           lora=False, run=f"{run}/pretrain", runs_dir=runs_dir, resume=resume,
                                           train_args=replace(args, steps=pretrain_steps), progress=progress)
        base = str(done)
    objective = None  # fine-tuning's own seq2seq loss
    if retrieval_weight:
        tok = AutoTokenizer.from_pretrained(data / "tokenizer")
        objective = retrieval_objective(retrieval_weight,
                                        [tok(p, add_special_tokens=False).input_ids for p in TASK_PROMPTS])
    summary["tune"] = finetune(base, str(data / "tasks.jsonl"), "chat", val_fraction=0.02, lora=False,
                               run=f"{run}/tune", runs_dir=runs_dir, resume=resume, train_args=args,
                               progress=progress, objective=objective)
    return summary


def _generate(loaded, prompts: list[str], batch_size: int, max_new_tokens: int = 160) -> list[str]:
    from slmkit.client import LocalLM
    from slmkit.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [t.strip() for t in LocalLM(loaded, batch_size).generate(prompts, params, chat=False)]


def repair(model: str, formulas_: list[str], batch_size: int = 16) -> list[str]:
    from slmkit.models import load

    return _generate(load(model, dtype="fp32"), [REPAIR + f for f in formulas_], batch_size)


def complete(model: str, prefixes: list[str], batch_size: int = 16) -> list[str]:
    from slmkit.models import load

    return _generate(load(model, dtype="fp32"), [COMPLETE + p for p in prefixes], batch_size)


def embed(loaded, texts: list[str], batch_size: int = 64):
    """`pooled` encoder states of a FLAME model for each text."""
    import torch

    tok, net = loaded.tokenizer, loaded.model
    rows = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            states = net.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows.append(pooled(states.last_hidden_state, batch["attention_mask"]))
    return torch.cat(rows)


def nearest(loaded, queries: list[str], collection: list[str], top: int):
    """(cosine similarities, indices) of the `top` formulas of `collection` closest to each query, best first."""
    return (embed(loaded, queries) @ embed(loaded, collection).T).topk(min(top, len(collection)))


def search(model: str, query: str, data: Path = Path("data/flame"), top: int = 5) -> list[tuple[float, str]]:
    """The formulas of DATA's collection closest to `query` (a partial formula or words)."""
    from slmkit.models import load

    collection = [r["formula"] for r in _read(Path(data) / "formulas.jsonl")]
    scores, best = nearest(load(model, dtype="fp32"), [query], collection, top)
    return [(float(v), collection[i]) for v, i in zip(scores[0].tolist(), best[0].tolist(), strict=True)]


def _equivalence(tests: list[dict], fixed: list[str]) -> dict:
    """Evaluation-equivalence on random sheets, over the pairs whose reference `formulas` can evaluate."""
    model = copy = count = 0
    for t, y in zip(tests, fixed, strict=True):
        verdict = equivalent(y, t["fixed"])
        if verdict is None:
            continue
        count += 1
        model += verdict
        copy += bool(equivalent(t["broken"], t["fixed"]))
    return {"equivalence_pairs": count, "equivalence": model / max(count, 1), "copy_equivalence": copy / max(count, 1)}


def token_accuracy(loaded, pairs: list[tuple[str, str]], batch_size: int = 32) -> float:
    """Teacher-forced accuracy: the share of target tokens the model predicts given the right prefix. It moves
    long before exact match does (an exact repair needs nearly every token), so it tracks early training."""
    import torch

    from slmkit.methods.finetune import seq2seq_batch, seq2seq_examples

    right = total = 0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            examples = [seq2seq_examples(loaded.tokenizer, p)[0] for p in pairs[start:start + batch_size]]
            batch = seq2seq_batch(examples, loaded.tokenizer.pad_token_id)
            predicted = loaded.model(**batch).logits.argmax(-1)
            scored = batch["labels"] != -100
            right += int(((predicted == batch["labels"]) & scored).sum())
            total += int(scored.sum())
    return right / max(total, 1)


def flame_eval(model: str, data: Path = Path("data/flame"), limit: int = 300, batch_size: int = 16,
               out: Path | None = None) -> dict:
    """Held-out last-mile repair (exact match after normalisation, per corruption kind, against copying the
    input; teacher-forced token accuracy), the parse rate of repaired formulas, evaluation-equivalence on
    random sheets, and completion exact match on held-out formulas; retrieval recall: how often `search` with a
    held-out formula's prefix puts that formula first / in the top 5 of the whole collection."""
    from slmkit.models import load

    data = Path(data)
    tests = _read(data / "repair.jsonl", "test")[:limit]
    formulas = _read(data / "formulas.jsonl")
    held_out = [r for r in formulas if r.get("split") == "test"][:limit]
    if not tests:
        raise SlmError(f"{data}/repair.jsonl has no test pairs")
    loaded = load(model, dtype="fp32")
    prompts = [REPAIR + t["broken"] for t in tests]
    fixed = _generate(loaded, prompts, batch_size)
    rng = random.Random(0)
    prefixes = [completion_prefix(r["formula"], rng) for r in held_out]
    completed = _generate(loaded, [COMPLETE + p for p in prefixes], batch_size)
    collection = [r["formula"] for r in formulas]
    top = nearest(loaded, prefixes, collection, 5).indices.tolist()
    where = {f: i for i, f in enumerate(collection)}
    found = [row.index(where[r["formula"]]) if where[r["formula"]] in row else None
             for r, row in zip(held_out, top, strict=True)]
    per_kind: dict = {}
    for t, y in zip(tests, fixed, strict=True):
        k = per_kind.setdefault(t["kind"], {"count": 0, "model": 0, "copy": 0})
        k["count"] += 1
        k["model"] += normalise(y) == normalise(t["fixed"])
        k["copy"] += normalise(t["broken"]) == normalise(t["fixed"])
    for k in per_kind.values():
        k["model"], k["copy"] = k["model"] / k["count"], k["copy"] / k["count"]
    n = len(tests)
    tokens = token_accuracy(loaded, [(p, t["fixed"]) for p, t in zip(prompts, tests, strict=True)], batch_size)
    result = {"model": model, "repairs": n, "repair_token_accuracy": tokens,
              "repair_exact": sum(normalise(y) == normalise(t["fixed"]) for t, y in zip(tests, fixed, strict=True)) / n,
              "copy_exact": sum(normalise(t["broken"]) == normalise(t["fixed"]) for t in tests) / n,
              "parse_rate": sum(check_formula(y) is None for y in fixed) / n,
              "broken_parse_rate": sum(check_formula(t["broken"]) is None for t in tests) / n,
              "per_kind": per_kind, **_equivalence(tests, fixed), "completions": len(held_out),
              "completion_exact": sum(normalise(y) == normalise(r["formula"])
                                      for r, y in zip(held_out, completed, strict=True)) / max(len(held_out), 1),
              "collection": len(collection), "retrieval_at_1": found.count(0) / max(len(found), 1),
              "retrieval_at_5": sum(k is not None for k in found) / max(len(found), 1),
              "examples": [{"broken": t["broken"], "model": y, "fixed": t["fixed"]} for t, y in
                           list(zip(tests, fixed, strict=True))[:10]]}
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
