"""TinyGSM (Liu et al., 2023, "TinyGSM: achieving >80% on GSM8k with small language models").

Grade-school math word problems paired with Python solutions: a function whose docstring holds the
question and whose body computes the answer step by step in named variables, then returns it. A small
generator model is fine-tuned on them; a verifier of the same size scores sampled solutions, and the best
of N is the answer. Every program runs in `slmkit.sandbox`.

This module holds the data side: a procedural generator of word problems whose solution programs follow
from their construction (many templates, varied wording, names, objects and quantities), teacher
generations kept only when their program's result matches the known answer, user JSONL, and the
held-out test set — reasoning-gym's GSM8K-style `gsm_symbolic` problems, kept out of training by an
overlap check. Templates in `HELD_OUT_TEMPLATES` never enter training data either: they test
generalisation to unseen problem shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.errors import SlmError
from slmkit.methods.finetune import SFTData, completion_example

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elif", "Femi", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Luis", "Mei",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
GOODS = [("apple", "apples"), ("notebook", "notebooks"), ("cupcake", "cupcakes"), ("pencil", "pencils"),
         ("marble", "marbles"), ("sticker", "stickers"), ("orange", "oranges"), ("cookie", "cookies"),
         ("toy car", "toy cars"), ("seashell", "seashells"), ("book", "books"), ("balloon", "balloons")]
SHOPS = [("bakery", "loaves of bread"), ("farm", "eggs"), ("factory", "bottles"), ("workshop", "chairs"),
         ("print shop", "posters"), ("garden", "tomatoes")]


@dataclass
class Problem:
    question: str
    steps: list[tuple[str, str]]  # (variable, Python expression over earlier variables); the last is returned
    template: str = ""

    @property
    def program(self) -> str:
        body = "\n".join(f"    {name} = {expr}" for name, expr in self.steps)
        return f'def solution():\n    """{self.question}"""\n{body}\n    return {self.steps[-1][0]}\n'

    @property
    def answer(self) -> int:
        env: dict = {}
        for name, expr in self.steps:
            env[name] = eval(expr, {}, env)  # our own generated arithmetic, not model output
        value = env[self.steps[-1][0]]
        if value != int(value):
            raise ValueError(f"{self.template}: non-integer answer {value}")
        return int(value)


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {}


def template(fn):
    TEMPLATES[fn.__name__] = fn
    return fn


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


@template
def change_from_purchase(rng):
    name, (one, many) = rng.choice(NAMES), rng.choice(GOODS)
    n, price = rng.randint(2, 9), rng.randint(1, 12)
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= n * price)
    q = _pick(rng, f"{name} buys {n} {many} for ${price} each and pays with a ${bill} bill. How much change, in "
                   f"dollars, does {name} get back?",
              f"Each {one} costs ${price}. {name} pays for {n} {many} with a ${bill} bill. How many dollars of "
              "change should the cashier give?")
    return Problem(q, [("count", str(n)), ("price_each", str(price)), ("cost", "count * price_each"),
                       ("paid", str(bill)), ("change", "paid - cost")])


@template
def share_equally(rng):
    name, (_, many) = rng.choice(NAMES), rng.choice(GOODS)
    k, each = rng.randint(2, 8), rng.randint(2, 15)
    q = _pick(rng, f"{name} has {k * each} {many} and shares them equally among {k} friends. How many {many} "
                   "does each friend get?",
              f"There are {k * each} {many} to split evenly between {k} children. How many does each child get?")
    return Problem(q, [("total", str(k * each)), ("people", str(k)), ("each", "total // people")])


@template
def production_over_days(rng):
    (shop, things), per_day, days = rng.choice(SHOPS), rng.randint(5, 60), rng.randint(2, 14)
    q = _pick(rng, f"A {shop} produces {per_day} {things} every day. How many {things} does it produce in {days} "
                   "days?",
              f"Every day a {shop} makes {per_day} {things}. How many {things} are made over {days} days?")
    return Problem(q, [("per_day", str(per_day)), ("days", str(days)), ("total", "per_day * days")])


@template
def remaining_after_giving(rng):
    name, a, b = rng.sample(NAMES, 3)
    (_, many) = rng.choice(GOODS)
    give_a, give_b, keep = rng.randint(1, 20), rng.randint(1, 20), rng.randint(0, 30)
    start = give_a + give_b + keep
    q = _pick(rng, f"{name} had {start} {many}. {name} gave {give_a} to {a} and {give_b} to {b}. How many {many} "
                   f"does {name} have left?",
              f"{name} started with {start} {many}, then handed {give_a} of them to {a} and {give_b} to {b}. How "
              "many are left?")
    return Problem(q, [("start", str(start)), ("to_first", str(give_a)), ("to_second", str(give_b)),
                       ("left", "start - to_first - to_second")])


@template
def weekly_savings(rng):
    name, weekly, weeks = rng.choice(NAMES), rng.randint(3, 40), rng.randint(2, 12)
    spent = rng.randint(1, weekly * weeks)
    q = _pick(rng, f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. How many "
                   "dollars does {name} have left?".replace("{name}", name),
              f"For {weeks} weeks, {name} puts ${weekly} a week into a jar. Then {name} takes out ${spent}. How "
              "much money is in the jar now?")
    return Problem(q, [("per_week", str(weekly)), ("weeks", str(weeks)), ("saved", "per_week * weeks"),
                       ("spent", str(spent)), ("left", "saved - spent")])


@template
def discount_price(rng):
    (one, _), pct = rng.choice(GOODS), rng.choice([10, 20, 25, 50, 75])
    price = rng.randint(1, 20) * (100 // pct if 100 % pct == 0 else 20)
    q = _pick(rng, f"A {one} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?",
              f"The price of a {one} is ${price}, and the store takes {pct}% off. How many dollars does it cost now?")
    return Problem(q, [("price", str(price)), ("percent_off", str(pct)), ("discount", "price * percent_off // 100"),
                       ("sale_price", "price - discount")])


@template
def ages(rng):
    a, b = rng.sample(NAMES, 2)
    age, times, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(1, 10)
    q = _pick(rng, f"{a} is {age} years old. {b} is {times} times as old as {a}. How old will {b} be in {years} "
                   "years?",
              f"{b}'s age is {times} times {a}'s age, and {a} is {age}. What will {b}'s age be {years} years from "
              "now?")
    return Problem(q, [("first_age", str(age)), ("factor", str(times)), ("second_age", "first_age * factor"),
                       ("years_later", str(years)), ("future_age", "second_age + years_later")])


@template
def full_boxes(rng):
    (_, many), per_box = rng.choice(GOODS), rng.randint(3, 12)
    total = per_box * rng.randint(2, 20) + rng.randint(0, per_box - 1)
    q = _pick(rng, f"There are {total} {many} packed into boxes of {per_box}. How many boxes can be filled "
                   "completely?",
              f"A shop packs {many} {per_box} to a box. With {total} {many}, how many full boxes does it get?")
    return Problem(q, [("total", str(total)), ("per_box", str(per_box)), ("full_boxes", "total // per_box")])


@template
def two_speeds(rng):
    s1, h1, s2, h2 = rng.randint(20, 90), rng.randint(1, 5), rng.randint(20, 90), rng.randint(1, 5)
    q = _pick(rng, f"A car drives at {s1} km/h for {h1} hours and then at {s2} km/h for {h2} hours. How many "
                   "kilometers does it travel in total?",
              f"A train goes {s1} km per hour for {h1} hours, then {s2} km per hour for another {h2} hours. What "
              "total distance in km does it cover?")
    return Problem(q, [("speed_1", str(s1)), ("hours_1", str(h1)), ("speed_2", str(s2)), ("hours_2", str(h2)),
                       ("distance", "speed_1 * hours_1 + speed_2 * hours_2")])


@template
def pages_left(rng):
    name, per_day, days = rng.choice(NAMES), rng.randint(5, 30), rng.randint(2, 9)
    pages = per_day * days + rng.randint(1, 200)
    q = _pick(rng, f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. How many pages "
                   "are left to read?",
              f"{name} reads {per_day} pages every day of a {pages}-page book. After {days} days, how many pages "
              "remain?")
    return Problem(q, [("pages", str(pages)), ("per_day", str(per_day)), ("days", str(days)),
                       ("read", "per_day * days"), ("left", "pages - read")])


@template
def more_than(rng):
    a, b = rng.sample(NAMES, 2)
    (_, many), has_b, extra = rng.choice(GOODS), rng.randint(2, 50), rng.randint(1, 30)
    q = _pick(rng, f"{b} has {has_b} {many}. {a} has {extra} more {many} than {b}. How many {many} do they have "
                   "together?",
              f"{a} owns {extra} more {many} than {b}, who owns {has_b}. What is the total number of {many} they "
              "own?")
    return Problem(q, [("second", str(has_b)), ("extra", str(extra)), ("first", "second + extra"),
                       ("together", "first + second")])


@template
def ratio_split(rng):
    p, q_, groups = rng.randint(1, 5), rng.randint(1, 5), rng.randint(2, 12)
    total = (p + q_) * groups
    q = _pick(rng, f"In a class of {total} students the ratio of boys to girls is {p}:{q_}. How many girls are "
                   "there?",
              f"A club has {total} members, with boys and girls in the ratio {p} to {q_}. How many of the members "
              "are girls?")
    return Problem(q, [("total", str(total)), ("boys_part", str(p)), ("girls_part", str(q_)),
                       ("group", "total // (boys_part + girls_part)"), ("girls", "group * girls_part")])


@template
def wage_with_bonus(rng):
    name, rate, hours, bonus = rng.choice(NAMES), rng.randint(8, 30), rng.randint(4, 40), rng.randint(5, 100)
    q = _pick(rng, f"{name} earns ${rate} an hour and works {hours} hours this week. {name} also gets a ${bonus} "
                   "bonus. How much does {name} earn this week in dollars?".replace("{name}", name),
              f"Paid ${rate} per hour, {name} works {hours} hours and receives a bonus of ${bonus}. What are "
              f"{name}'s total earnings in dollars?")
    return Problem(q, [("rate", str(rate)), ("hours", str(hours)), ("pay", "rate * hours"), ("bonus", str(bonus)),
                       ("total", "pay + bonus")])


@template
def fence_perimeter(rng):
    length, width, cost = rng.randint(3, 40), rng.randint(2, 30), rng.randint(2, 15)
    q = _pick(rng, f"A rectangular garden is {length} m long and {width} m wide. Fencing costs ${cost} per meter. "
                   "How much does it cost to fence the whole garden?",
              f"To put a fence around a {length} m by {width} m rectangular yard, fencing at ${cost} a meter is "
              "needed. What is the total cost in dollars?")
    return Problem(q, [("length", str(length)), ("width", str(width)), ("perimeter", "2 * (length + width)"),
                       ("cost_per_meter", str(cost)), ("total_cost", "perimeter * cost_per_meter")])


@template
def tickets_for_group(rng):
    adults, children, pa, pc = rng.randint(1, 6), rng.randint(1, 8), rng.randint(8, 30), rng.randint(3, 15)
    q = _pick(rng, f"Museum tickets cost ${pa} for adults and ${pc} for children. How much do {adults} adults and "
                   f"{children} children pay in total?",
              f"A family of {adults} adults and {children} children goes to the zoo. Adult tickets are ${pa} and "
              f"child tickets are ${pc}. What is the total cost?")
    return Problem(q, [("adults", str(adults)), ("children", str(children)), ("adult_price", str(pa)),
                       ("child_price", str(pc)), ("total", "adults * adult_price + children * child_price")])


HELD_OUT_TEMPLATES = ("fence_perimeter", "tickets_for_group", "ratio_split")  # never in training data


# --- stories: word problems composed from events --------------------------------------------------------
# A story starts with a quantity of something, applies one to three events to it (each a sentence and a few
# program lines) and ends with a question. Its template is the sequence of events and the question, e.g.
# "story:give+packs:sell"; 15% of the 1,197 such templates (chosen by hash) never enter training data, so a
# test on them asks for known operations in combinations the model has not seen.


@dataclass
class _State:
    rng: random.Random
    who: str
    one: str
    items: str
    value: int
    var: str
    steps: list
    used: set

    def fresh(self, name: str) -> str:
        out, k = name, 2
        while out in self.used:
            out, k = f"{name}_{k}", k + 1
        self.used.add(out)
        return out

    def let(self, name: str, expr: str, value: int) -> None:
        self.var = self.fresh(name)
        self.steps.append((self.var, expr))
        self.value = value

    def things(self, k: int) -> str:
        return f"{k} {self.one if k == 1 else self.items}"

    def friend(self) -> str:
        return self.rng.choice([n for n in NAMES if n != self.who])

    def const(self, name: str, number: int) -> str:
        var = self.fresh(name)
        self.steps.append((var, str(number)))
        return var


def _more(s):
    k, friend = s.rng.randint(2, 25), s.friend()
    got = s.const("received", k)
    s.let("total", f"{s.var} + {got}", s.value + k)
    return _pick(s.rng, f"{friend} gives {s.who} {k} more {s.items}.", f"Then {s.who} finds {k} more {s.items}.")


def _give(s):
    k, friend = s.rng.randint(1, s.value // 2), s.friend()  # a story never runs out: the value stays >= 2
    given = s.const("given", k)
    s.let("left", f"{s.var} - {given}", s.value - k)
    return _pick(s.rng, f"{s.who} gives {k} of the {s.items} to {friend}.", f"{s.who} hands {s.things(k)} to {friend}.")


def _add_groups(s, groups: tuple[str, int], each: tuple[str, int], added: str) -> None:
    """`groups` times `each` more: three program lines and the new total."""
    (g_name, g), (e_name, e) = groups, each
    g_var, e_var, added = s.const(g_name, g), s.const(e_name, e), s.fresh(added)
    s.steps.append((added, f"{g_var} * {e_var}"))
    s.let("total", f"{s.var} + {added}", s.value + g * e)


def _packs(s):
    p, k = s.rng.randint(2, 6), s.rng.randint(2, 12)
    _add_groups(s, ("packs", p), ("per_pack", k), "bought")
    return _pick(s.rng, f"{s.who} buys {p} packs with {k} {s.items} in each.",
                 f"Next, {s.who} gets {p} bags of {s.items}, {k} in every bag.")


def _times(s):
    k = s.rng.choice([2, 3])
    factor = s.const("factor", k)
    s.let("total", f"{s.var} * {factor}", s.value * k)
    word = {2: "doubles", 3: "triples"}[k]
    return _pick(s.rng, f"The number of {s.items} {s.who} has {word}.", f"{s.who}'s pile of {s.items} {word}.")


def _half(s):
    if s.value % 2:  # keep answers whole: one more first
        s.let("total", f"{s.var} + 1", s.value + 1)
        lead = f"{s.who} picks up one more. "
    else:
        lead = ""
    used = s.fresh("used")
    s.steps.append((used, f"{s.var} // 2"))
    s.let("left", f"{s.var} - {used}", s.value - s.value // 2)
    return lead + _pick(s.rng, f"{s.who} uses half of the {s.items}.", f"Half of the {s.items} get sold at a fair.")


def _daily(s):
    d, k = s.rng.randint(2, 7), s.rng.randint(1, 9)
    _add_groups(s, ("days", d), ("per_day", k), "added")
    return _pick(s.rng, f"For {d} days, {s.who} adds {s.things(k)} each day.",
                 f"Every day for {d} days, {s.who} collects {k} more {s.one if k == 1 else s.items}.")


def _lose(s):
    k = s.rng.randint(1, s.value // 2)
    lost = s.const("lost", k)
    s.let("left", f"{s.var} - {lost}", s.value - k)
    return _pick(s.rng, f"{k} of the {s.items} {'gets' if k == 1 else 'get'} lost.",
                 f"Sadly, {s.things(k)} {'breaks' if k == 1 else 'break'}.")


EVENTS = {"more": _more, "give": _give, "packs": _packs, "times": _times, "half": _half, "daily": _daily,
          "lose": _lose}


def _ask_count(s):
    return _pick(s.rng, f"How many {s.items} does {s.who} have now?", f"How many {s.items} are left in the end?")


def _ask_sell(s):
    p = s.rng.randint(1, 9)
    price = s.const("price", p)
    s.let("money", f"{s.var} * {price}", s.value * p)
    return f"{s.who} sells all of them for ${p} each. How many dollars does {s.who} make?"


def _ask_boxes(s):
    k = s.rng.randint(2, min(9, s.value))
    per_box = s.const("per_box", k)
    s.let("boxes", f"{s.var} // {per_box}", s.value // k)
    return f"{s.who} packs them into boxes of {k}. How many boxes can {s.who} fill completely?"


QUESTIONS = {"count": _ask_count, "sell": _ask_sell, "boxes": _ask_boxes}
STORY_TEMPLATES = [f"story:{'+'.join(chain)}:{q}" for n in (1, 2, 3) for chain in itertools.product(EVENTS, repeat=n)
                   for q in QUESTIONS]
HELD_OUT_STORIES = tuple(t for t in STORY_TEMPLATES if zlib.crc32(t.encode()) % 100 < 15)
# Four-event stories are longer than anything the generator is trained on. Like GSM8K's train/test split in
# TinyGSM, they are split by template: 85% are the verifier's training problems ("long-stories"), 15% the
# test ("heldout-long-stories").
LONG_STORY_TEMPLATES = [f"story:{'+'.join(chain)}:{q}" for chain in itertools.product(EVENTS, repeat=4)
                        for q in QUESTIONS]
HELD_OUT_LONG_STORIES = tuple(t for t in LONG_STORY_TEMPLATES if zlib.crc32(t.encode()) % 100 < 15)


def story(rng: random.Random, template: str) -> Problem:
    """One problem of a story template ("story:EVENT+EVENT:QUESTION")."""
    _, chain, question = template.split(":")
    (one, many), who = rng.choice(GOODS), rng.choice(NAMES)
    s = _State(rng, who, one, many, 0, "", [], set())
    events = chain.split("+")
    start = rng.randint(10, 40) if len(events) <= 3 else rng.randint(20, 60)  # never runs out: stays >= 2
    s.let("start", str(start), start)
    sentences = [_pick(rng, f"{who} has {start} {many}.", f"{who} starts with {start} {many}.")]
    sentences += [EVENTS[e](s) for e in events]
    sentences.append(QUESTIONS[question](s))
    return Problem(" ".join(sentences), s.steps, template)


def procedural(n: int, seed: int = 0, templates: list[str] | None = None) -> list[Problem]:
    """`n` problems from a seed. By default half come from the hand-written templates (cycled) and half from
    story templates (drawn at random), none of them held out; `templates` names the ones to use instead."""
    if templates:
        stories = [t for t in templates if t.startswith("story:")]
        names = [t for t in templates if not t.startswith("story:")]
    else:
        stories = [t for t in STORY_TEMPLATES if t not in HELD_OUT_STORIES]
        names = [t for t in TEMPLATES if t not in HELD_OUT_TEMPLATES]
    known = set(STORY_TEMPLATES) | set(LONG_STORY_TEMPLATES)
    unknown = [t for t in names if t not in TEMPLATES] + [t for t in stories if t not in known]
    if unknown:
        raise SlmError(f"unknown template '{unknown[0]}' (hand-written: {', '.join(TEMPLATES)}; or story:EVENTS:"
                       f"QUESTION with events {'/'.join(EVENTS)} and questions {'/'.join(QUESTIONS)})")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if stories and (not names or i % 2):
            out.append(story(rng, rng.choice(stories)))
            continue
        name = names[(i // (2 if stories else 1)) % len(names)]
        problem = TEMPLATES[name](rng)
        problem.template = name
        out.append(problem)
    return out


def gsm_symbolic(n: int, seed: int = 0) -> list[dict]:
    """reasoning-gym's GSM8K-style problems with integer answers: the held-out test set."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [{"question": re.sub(r"\s*Give the result as your final answer\.? Do not include units\.\s*$", "",
                                ds[i]["question"]),
             "answer": int(ds[i]["answer"])} for i in range(n)]


def normalise(question: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def overlap(train: list[str], test: list[str], n: int = 8) -> int:
    """How many test questions share a word 8-gram with some training question (the contamination check of
    the GPT-3 and TinyGSM papers, at 8 words)."""
    seen = set().union(*(ngrams(q, n) for q in train)) if train else set()
    return sum(bool(ngrams(q, n) & seen) for q in test)


# --- data: procedural, teacher and user problems ---------------------------------------------------------


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
    procedural_count: int = 2000,
    teacher: str | None = None,
    teacher_problems: int = 0,
    samples: int = 1,
    user: Path | None = None,
    test_size: int = 200,
    seed: int = 0,
    unsandboxed: bool = False,
    progress: bool = True,
) -> dict:
    """Training data (JSONL: question, program, answer, source): `procedural_count` procedural problems with
    their constructed programs; with `teacher` (a local model or an endpoint), its programs for
    `teacher_problems` further procedural problems, kept when the sandboxed result matches; with `user`, a
    JSONL of {question, answer[, program]} (programs checked, missing ones asked of the teacher). Every
    kept program is executed once in the sandbox. Reports the 8-gram overlap with the first `test_size`
    gsm_symbolic test problems (must be 0) and drops any overlapping training problem."""
    from slmkit.progress import Progress
    from slmkit.sandbox import Limits, Sandbox

    rows = [{"question": p.question, "program": p.program, "answer": p.answer, "source": f"procedural:{p.template}"}
            for p in procedural(procedural_count, seed)]
    pending = []  # problems whose program must come from the teacher
    if teacher and teacher_problems:
        pending += [{"question": p.question, "answer": p.answer, "source": f"teacher:{p.template}"}
                    for p in procedural(teacher_problems, seed + 1)]
    if user:
        for r in read_user_problems(Path(user)):
            if r["program"]:
                rows.append({**r, "source": "user"})
            elif teacher:
                pending.append({"question": r["question"], "answer": r["answer"], "source": "user+teacher"})
            else:
                raise SlmError(f"{user}: problems without a \"program\" need --teacher to write one")
    stats = {"procedural": procedural_count, "teacher_asked": len(pending), "teacher_kept": 0}
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


# --- the generator: fine-tuning and sampling -------------------------------------------------------------


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
    runs_dir: Path = Path("runs"),
    resume: bool = False,
    train_args=None,
    progress: bool = True,
) -> dict:
    """Fine-tune the generator on `slm gsm data` output: given the header and docstring, write the body (loss
    on the body only; plain text, no chat template)."""
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


def solve(loaded, questions: list[str], sandbox, *, samples: int = 1, temperature: float = 0.7,
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


# --- the verifier ----------------------------------------------------------------------------------------


class VerifierData(SFTData):
    """(program prompt + sampled body, correct?) examples, batched like SFTData; the value head is trained on
    the body's tokens."""

    def __init__(self, tokenizer, rows: list[dict], seq_len: int):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_decoder = False
        self.examples = []
        for r in rows:
            ids, labels = completion_example(tokenizer, r["prompt"], r["completion"])
            self.examples.append((ids[:seq_len], labels[:seq_len], bool(r["correct"])))

    def collate(self, items):
        import torch

        batch = super().collate([(ids, labels) for ids, labels, _ in items])
        batch["correct"] = torch.tensor([correct for *_, correct in items], dtype=torch.float32)
        return batch


def verifier_objective(model, batch, generator):
    """Binary cross-entropy of the value head against the solution's correctness at every solution token."""
    import torch

    values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]
    scored = batch["labels"] != -100
    target = batch["correct"][:, None].expand_as(values)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(values[scored].float(), target[scored])
    return loss, int(scored.sum())


def verifier_from(source: str):
    """A causal LM checkpoint as a token-level value model: the LM's backbone with a one-output head (a standard
    `...ForTokenClassification` directory when saved)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from slmkit.models import load

    base = load(source, dtype="fp32", progress=False)
    if base.task != "causal-lm" or base.path is None or base.tokenizer is None:
        raise SlmError(f"{source}: the verifier starts from a causal LM checkpoint with a tokenizer")
    config = AutoConfig.from_pretrained(base.path, num_labels=1)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(base.path, config=config)
    if base.tokenizer.pad_token_id is None:
        base.tokenizer.pad_token = base.tokenizer.eos_token
    model.config.pad_token_id = base.tokenizer.pad_token_id
    return model, base.tokenizer


def verifier_scores(model, tokenizer, programs: list[str], batch_size: int = 16, progress: bool = False) -> list[float]:
    """P(correct) of each full program: the value head at its last token."""
    import torch

    from slmkit.progress import Progress

    tokenizer.padding_side = "right"
    scores = []
    model.eval()
    with torch.inference_mode(), Progress(disable=not progress) as bar:
        job = bar.add_task(f"scoring {len(programs)} programs with the verifier", total=len(programs))
        for start in range(0, len(programs), batch_size):
            enc = tokenizer(programs[start:start + batch_size], return_tensors="pt", padding=True)
            values = model(**enc).logits[..., 0].float()
            last = enc.attention_mask.sum(1) - 1
            scores += torch.sigmoid(values[torch.arange(len(last)), last]).tolist()
            bar.advance(job, len(last))
    return scores


def ranking_auc(scores: list[float], labels: list[bool]) -> float | None:
    """The chance that a right solution scores above a wrong one (ties count half): how well a verifier ranks,
    which is what best-of-N needs."""
    right = [s for s, ok in zip(scores, labels, strict=True) if ok]
    wrong = [s for s, ok in zip(scores, labels, strict=True) if not ok]
    if not right or not wrong:
        return None
    return sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))


def sample_labelled(loaded, rows: list[dict], sandbox, *, samples: int, temperature: float = 0.7,
                    max_new_tokens: int = 256, seed: int = 0, progress: bool = True,
                    partial: Path | None = None) -> list[dict]:
    """The generator's own solutions to training problems, each labelled by executing it against the answer."""
    solved = solve(loaded, [r["question"] for r in rows], sandbox, samples=samples, temperature=temperature,
                   max_new_tokens=max_new_tokens, seed=seed, progress=progress, partial=partial)
    out = []
    for r, sols in zip(rows, solved, strict=True):
        prompt = program_prompt(r["question"])
        out += [{"prompt": prompt, "completion": s.program[len(prompt):], "correct": matches(s.answer(), r["answer"]),
                 "status": s.status} for s in sols]
    return out


def verify_train(
    generator: str,
    data: str = "gsm.jsonl",
    base: str | None = None,
    problems: int = 200,
    samples: int = 8,
    temperature: float = 0.7,
    lora: bool = False,
    layers: int | None = None,
    train_layers: int | None = None,
    run: str = "gsm-verifier",
    runs_dir: Path = Path("runs"),
    resume: bool = False,
    seed: int = 0,
    unsandboxed: bool = False,
    train_args=None,
    progress: bool = True,
) -> dict:
    """Train a verifier: the `generator` samples `samples` solutions to `problems` training problems (of a
    `slm gsm data` file, or the `long-stories` split), each is labelled by execution, and a value model
    initialised from `base` (default: the generator) learns to predict correctness at every solution token.
    `layers` keeps only the base's first layers (a cheaper verifier from an LM's lower half); `train_layers`
    fine-tunes only the top layers, the final norm and the head (the rest frozen, so no backward pass runs
    through them). The samples are kept in the run directory and reused."""
    from slmkit.methods.distill import keep_layers, layers_of
    from slmkit.methods.finetune import FinetuneArgs, add_lora, split_rows
    from slmkit.models import load
    from slmkit.sandbox import Sandbox
    from slmkit.train import evaluate, train

    args = (train_args or FinetuneArgs()).validate()
    run_dir = Path(runs_dir) / run
    cache = run_dir / "samples.jsonl"
    if cache.is_file():
        labelled = [row for _, row in read_jsonl(cache)]
    else:
        rows = training_problems(str(data), problems)
        with Sandbox(2, unsandboxed=unsandboxed) as sandbox:
            labelled = sample_labelled(load(generator, dtype="auto", progress=progress), rows, sandbox,
                                       samples=samples, temperature=temperature, seed=seed, progress=progress,
                                       partial=run_dir / "samples.partial.jsonl")
        write_jsonl(labelled, cache)
        (run_dir / "samples.partial.jsonl").unlink(missing_ok=True)
    positives = sum(r["correct"] for r in labelled)
    if positives == 0 or positives == len(labelled):
        raise SlmError(f"all {len(labelled)} sampled solutions are {'right' if positives else 'wrong'}: a verifier "
                       "needs both; sample more problems or use a stronger/weaker generator")
    import torch

    torch.manual_seed(args.seed)  # the new value head's initialisation
    net, tok = verifier_from(base or generator)
    if layers:
        keep_layers(net, list(range(layers)))
    if train_layers is not None:
        blocks = layers_of(net)
        if not 0 < train_layers <= len(blocks):
            raise SlmError(f"train_layers must be in 1..{len(blocks)} (the verifier has {len(blocks)} layers)")
        for module in [net.get_input_embeddings(), *blocks[:len(blocks) - train_layers]]:
            module.requires_grad_(False)
    if lora:
        net = add_lora(net, 16, 32, 0.05, "TOKEN_CLS")
    # validation on problems the verifier never trains on (a problem's samples stay in one split)
    grouped = [{**r, "group": r["prompt"]} for r in labelled]
    train_rows, val_rows, _ = split_rows(grouped, max(1, round(0.1 * len(grouped))), 0)
    train_set, val_set = VerifierData(tok, train_rows, args.seq_len), VerifierData(tok, val_rows, args.seq_len)
    before = evaluate(net, verifier_objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    config = {"workflow": "verify_train", "generator": generator, "base": base or generator, "layers": layers,
              "train_layers": train_layers, "trainable_parameters": trainable, "samples": len(labelled),
              "correct_fraction": positives / len(labelled)}
    summary = train(net, tok, train_set, val_set, verifier_objective, args, run_dir, resume=resume, config=config,
                    progress=progress)
    scores = verifier_scores(net, tok, [r["prompt"] + r["completion"] for r in val_rows])
    auc = ranking_auc(scores, [r["correct"] for r in val_rows])
    return {**summary, "trainable_parameters": trainable, "val_loss_before": before, "val_auc": auc,
            "samples": len(labelled), "correct_fraction": positives / len(labelled),
            "model_dir": str(run_dir / "model")}


# --- evaluation: pass@1, majority vote, verifier best-of-N ----------------------------------------------


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
            for p in procedural(count, seed=999_983, templates=list(_HELD[test]))]


def training_problems(data: str, count: int) -> list[dict]:
    """The verifier's problems: the first `count` of a `slm gsm data` file, or `long-stories` (four-event
    stories of the templates the test set does not use)."""
    if data == "long-stories":
        held = set(HELD_OUT_LONG_STORIES)
        return [{"question": p.question, "answer": p.answer} for p in
                procedural(count, seed=1, templates=[t for t in LONG_STORY_TEMPLATES if t not in held])]
    if not Path(data).is_file():
        raise SlmError(f"TinyGSM data not found: {data} (write it with `slm gsm data`, or use long-stories)")
    return [row for _, row in read_jsonl(Path(data))][:count]


def best_of_n(problems: list[dict], solved: list[list[Sample]], scores: list[list[float]] | None,
              ns: list[int]) -> dict:
    """pass@1 (the mean correctness of single samples), and per N: majority vote over the first N samples'
    executed answers, and the verifier's top-scored sample among them."""
    correct = [[matches(s.answer(), p["answer"]) for s in sols] for p, sols in zip(problems, solved, strict=True)]
    result = {"problems": len(problems), "pass@1": sum(map(sum, correct)) / sum(map(len, correct)),
              "majority": {}, "verifier": {}}
    for n in ns:
        result["majority"][n] = sum(matches(majority(sols[:n]), p["answer"])
                                    for p, sols in zip(problems, solved, strict=True)) / len(problems)
        if scores is not None:
            picks = [max(range(min(n, len(sc))), key=sc.__getitem__) for sc in scores]
            result["verifier"][n] = sum(c[i] for c, i in zip(correct, picks, strict=True)) / len(problems)
    return result


def plot_best_of_n(result: dict, out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted(result["majority"])
    ax.axhline(result["pass@1"], color="gray", linestyle="--", label="pass@1")
    ax.plot(ns, [result["majority"][n] for n in ns], "o-", label="majority vote")
    if result["verifier"]:
        ax.plot(ns, [result["verifier"][n] for n in ns], "s-", label="verifier best-of-N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def gsm_eval(
    generator: str,
    verifier: str | None = None,
    test: str = "gsm_symbolic",
    problems: int = 100,
    ns: list[int] | None = None,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    run: str = "gsm-eval",
    runs_dir: Path = Path("runs"),
    seed: int = 0,
    unsandboxed: bool = False,
    progress: bool = True,
) -> dict:
    """Sample max(ns) programs per test problem, execute them, and report pass@1, majority vote and (with a
    verifier) verifier best-of-N for each N, with a plot. Samples are kept in the run directory: a rerun with
    another verifier reuses them."""
    from slmkit.models import load
    from slmkit.sandbox import Sandbox

    ns = sorted(ns or [1, 4, 16, 48])
    run_dir = Path(runs_dir) / run
    run_dir.mkdir(parents=True, exist_ok=True)
    items = test_problems(test, problems)
    key = {"generator": generator, "test": test, "problems": problems, "samples": ns[-1], "temperature": temperature,
           "seed": seed}
    cache = run_dir / "samples.jsonl"
    rows = [row for _, row in read_jsonl(cache)] if cache.is_file() else []
    if rows and rows[0].get("key") == key:
        solved = [[Sample(**s) for s in row["samples"]] for row in rows]
    else:
        with Sandbox(2, unsandboxed=unsandboxed) as sandbox:
            solved = solve(load(generator, dtype="auto", progress=progress), [p["question"] for p in items], sandbox,
                           samples=ns[-1], temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                           progress=progress, partial=run_dir / "samples.partial.jsonl")
        write_jsonl([{"key": key, **p, "samples": [s.__dict__ for s in sols]} for p, sols in zip(items, solved,
                                                                                               strict=True)], cache)
        (run_dir / "samples.partial.jsonl").unlink(missing_ok=True)
    scores = None
    if verifier:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        model = AutoModelForTokenClassification.from_pretrained(verifier)
        tok = AutoTokenizer.from_pretrained(verifier)
        flat = verifier_scores(model, tok, [s.program for sols in solved for s in sols], progress=progress)
        scores = [flat[i * ns[-1]:(i + 1) * ns[-1]] for i in range(len(solved))]
    result = {**key, "verifier_model": verifier, **best_of_n(items, solved, scores, ns)}
    (run_dir / "gsm_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_best_of_n(result, run_dir / "best_of_n.png", f"{test}: {len(items)} problems")
    return result
