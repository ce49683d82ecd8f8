"""TinyGSM's problems: hand-written templates and stories composed from events, each with the solution
program that follows from its construction; held-out templates; reasoning-gym's GSM8K-style test problems
and the n-gram overlap check that keeps them out of training.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from slmkit.errors import SlmError

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
