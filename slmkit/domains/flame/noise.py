"""FLAME's damage: the named corruptions of last-mile repair (`corrupt`) and the four pretraining objectives,
each asking for the whole original formula back.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from slmkit.domains.flame.formulas import FORMULA_PIECES
from slmkit.errors import SlmError

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
