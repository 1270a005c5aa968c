"""GSM8K-style arithmetic word problems, generated deterministically from a seed.

Each problem is a dict with GSM8K's ``question`` and ``answer`` columns (worked reasoning with
GSM8K's ``<<a*b=c>>`` calculator annotations, then a final ``#### N`` line), plus ``final`` (the
integer answer) and ``expression`` (one arithmetic expression over the question's numbers whose
value is ``final``, checkable with ``evaluate_expression`` instead of ``eval``).

Every template picks its numbers so that all intermediate results are positive integers and
divisions are exact, so answers never depend on rounding.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction
from typing import Callable

from pmss_dist.eval.scoring import canonical_number

# (name, subject pronoun, possessive pronoun)
_PEOPLE = [("Tom", "he", "his"), ("Maria", "she", "her"), ("Liam", "he", "his"),
           ("Aisha", "she", "her"), ("Kenji", "he", "his"), ("Sofia", "she", "her"),
           ("Omar", "he", "his"), ("Elena", "she", "her"), ("Noah", "he", "his"),
           ("Priya", "she", "her"), ("Lucas", "he", "his"), ("Grace", "she", "her"),
           ("Mateo", "he", "his"), ("Chloe", "she", "her"), ("Ivan", "he", "his"),
           ("Zara", "she", "her")]
_FRIENDS = ["Anna", "Ben", "Carlos", "Dana", "Eli", "Fatima", "George", "Hana"]
_FRUITS = ["apples", "oranges", "pears", "lemons", "peaches", "plums"]
_SHOP_ITEMS = [("notebooks", "pens"), ("cupcakes", "muffins"), ("shirts", "socks"),
               ("books", "bookmarks"), ("toy cars", "stickers"), ("mugs", "spoons")]
_BAKED = ["cookies", "brownies", "muffins", "rolls"]
_VEHICLES = [("cyclist", "km"), ("train", "km"), ("runner", "km"), ("car", "miles")]
_MACHINE_ITEMS = ["bottles", "boxes", "cans", "labels", "bolts"]


class BadStep(ValueError):
    """A step whose result is negative or a division that is not exact."""


class _Work:
    """Accumulates worked lines; every step is computed here so text and value cannot differ.

    ``fault=(step, delta)`` makes calculation number ``step`` (from 0) come out ``delta`` off, and
    every later step compute on that wrong value: one calculation wrong, the rest right."""

    def __init__(self, fault: tuple[int, int] | None = None) -> None:
        self.lines: list[str] = []
        self.fault = fault

    def calc(self, a: int, op: str, b: int, sentence: str) -> int:
        if op == "/" and (b == 0 or a % b):
            raise BadStep(f"inexact division {a}/{b}")
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        if self.fault is not None and self.fault[0] == len(self.lines):
            value += self.fault[1]
        if value < 0:
            raise BadStep(f"negative step {a}{op}{b}")
        self.lines.append(sentence.format(f"{a} {op} {b} = <<{a}{op}{b}={value}>>{value}"))
        return value

    def answer(self, final: int) -> str:
        return "\n".join(self.lines + [f"#### {final}"])


Template = Callable[[random.Random, _Work], tuple[str, str, int]]  # -> question, expression, final


def _fruit_trade(rng: random.Random, w: _Work):
    name, he, _ = rng.choice(_PEOPLE)
    fruit, friend = rng.choice(_FRUITS), rng.choice(_FRIENDS)
    start, bags, per_bag = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
    given = rng.randint(1, start + bags * per_bag - 1)
    q = (f"{name} has {start} {fruit}. {he.capitalize()} buys {bags} bags with {per_bag} {fruit} "
         f"each, then gives {given} to {friend}. How many {fruit} does {name} have now?")
    bought = w.calc(bags, "*", per_bag, f"{name} buys {{}} {fruit}.")
    total = w.calc(start, "+", bought, f"Then {he} has {{}} {fruit}.")
    final = w.calc(total, "-", given, f"After giving some to {friend}, {he} has {{}} {fruit}.")
    return q, f"{start} + {bags} * {per_bag} - {given}", final


def _shopping_change(rng: random.Random, w: _Work):
    name, he, _ = rng.choice(_PEOPLE)
    first, second = rng.choice(_SHOP_ITEMS)
    a, p, b, r = rng.randint(2, 8), rng.randint(2, 15), rng.randint(2, 10), rng.randint(1, 6)
    cost = a * p + b * r
    bill = next(x for x in (20, 50, 100, 200, 500) if x > cost)
    q = (f"{name} buys {a} {first} for ${p} each and {b} {second} for ${r} each. {he.capitalize()} "
         f"pays with a ${bill} bill. How much change, in dollars, does {he} get back?")
    c1 = w.calc(a, "*", p, f"The {first} cost ${{}}.")
    c2 = w.calc(b, "*", r, f"The {second} cost ${{}}.")
    total = w.calc(c1, "+", c2, f"Altogether {he} spends ${{}}.")
    final = w.calc(bill, "-", total, "The change is ${}.")
    return q, f"{bill} - ({a} * {p} + {b} * {r})", final


def _ages(rng: random.Random, w: _Work):
    name, he, his = rng.choice(_PEOPLE)
    age, diff, times, years = rng.randint(3, 15), rng.randint(1, 8), rng.randint(2, 4), rng.randint(2, 20)
    q = (f"{name} is {age} years old. {his.capitalize()} cousin is {diff} years older than {name}, "
         f"and {his} aunt is {times} times as old as the cousin. How old will the aunt be in "
         f"{years} years?")
    cousin = w.calc(age, "+", diff, "The cousin is {} years old.")
    aunt = w.calc(cousin, "*", times, "The aunt is {} years old.")
    final = w.calc(aunt, "+", years, f"In {years} years the aunt will be {{}} years old.")
    return q, f"({age} + {diff}) * {times} + {years}", final


def _distance(rng: random.Random, w: _Work):
    vehicle, unit = rng.choice(_VEHICLES)
    s1, h1, s2, h2 = rng.randint(5, 60), rng.randint(2, 6), rng.randint(5, 60), rng.randint(2, 6)
    q = (f"A {vehicle} travels at {s1} {unit} per hour for {h1} hours, then at {s2} {unit} per "
         f"hour for {h2} hours. How many {unit} does the {vehicle} travel in total?")
    d1 = w.calc(s1, "*", h1, f"In the first part it travels {{}} {unit}.")
    d2 = w.calc(s2, "*", h2, f"In the second part it travels {{}} {unit}.")
    final = w.calc(d1, "+", d2, f"In total it travels {{}} {unit}.")
    return q, f"{s1} * {h1} + {s2} * {h2}", final


def _sharing(rng: random.Random, w: _Work):
    name, he, _ = rng.choice(_PEOPLE)
    item = rng.choice(_BAKED)
    trays, per_tray, friends = rng.randint(2, 8), rng.randint(6, 24), rng.randint(2, 9)
    total = trays * per_tray
    # Choose the share first so the division is exact and at least one item is kept.
    share = rng.randint(1, (total - 1) // friends)
    kept = total - friends * share
    q = (f"{name} bakes {trays} trays of {per_tray} {item}. {he.capitalize()} keeps {kept} "
         f"{item} and shares the rest equally among {friends} friends. How many {item} does each "
         f"friend get?")
    made = w.calc(trays, "*", per_tray, f"{name} bakes {{}} {item}.")
    rest = w.calc(made, "-", kept, f"{he.capitalize()} shares {{}} {item}.")
    final = w.calc(rest, "/", friends, f"Each friend gets {{}} {item}.")
    return q, f"({trays} * {per_tray} - {kept}) / {friends}", final


def _machine_rate(rng: random.Random, w: _Work):
    item = rng.choice(_MACHINE_ITEMS)
    rate, hours, pause = rng.randint(2, 30), rng.randint(2, 5), rng.randint(5, 50)
    q = (f"A machine makes {rate} {item} per minute. It runs for {hours} hours but stops for "
         f"{pause} minutes in between. How many {item} does it make?")
    minutes = w.calc(hours, "*", 60, f"{hours} hours is {{}} minutes.")
    working = w.calc(minutes, "-", pause, "It works for {} minutes.")
    final = w.calc(working, "*", rate, f"It makes {{}} {item}.")
    return q, f"{rate} * ({hours} * 60 - {pause})", final


def _savings(rng: random.Random, w: _Work):
    name, he, his = rng.choice(_PEOPLE)
    weekly, weeks, parts = rng.randint(3, 40), rng.randint(2, 12), rng.choice([2, 3, 4, 5])
    weeks += -weeks % parts if weekly * weeks % parts else 0  # make the fraction exact
    gift = rng.randint(5, 60)
    fraction = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[parts]
    q = (f"{name} saves ${weekly} every week for {weeks} weeks. Then {he} spends {fraction} of "
         f"{his} savings on a gift and receives ${gift} from {his} grandmother. How many dollars "
         f"does {name} have now?")
    saved = w.calc(weekly, "*", weeks, f"{name} saves ${{}}.")
    spent = w.calc(saved, "/", parts, f"{he.capitalize()} spends ${{}}.")
    left = w.calc(saved, "-", spent, f"{he.capitalize()} has ${{}} left.")
    final = w.calc(left, "+", gift, f"With the present {he} has ${{}}.")
    return q, f"{weekly} * {weeks} - {weekly} * {weeks} / {parts} + {gift}", final


def _crates(rng: random.Random, w: _Work):
    item = rng.choice(_FRUITS)
    per_crate, per_box = rng.randint(2, 6), rng.randint(4, 30)
    boxes = per_crate * rng.randint(2, 12)  # whole crates only
    price = rng.randint(10, 60)
    transport = rng.randint(5, boxes // per_crate * price - 1)
    # per_box is a distractor, as in many GSM8K questions.
    q = (f"A farm fills {boxes} boxes with {per_box} {item} each and packs the boxes into crates "
         f"of {per_crate} boxes. Each crate sells for ${price}, and transport costs ${transport} "
         f"in total. How many dollars does the farm earn after paying for transport?")
    crates = w.calc(boxes, "/", per_crate, "The farm fills {} crates.")
    sales = w.calc(crates, "*", price, "The crates sell for ${}.")
    final = w.calc(sales, "-", transport, "After transport the farm earns ${}.")
    return q, f"{boxes} / {per_crate} * {price} - {transport}", final


def _reading(rng: random.Random, w: _Work):
    name, he, _ = rng.choice(_PEOPLE)
    per_day, days, done = rng.randint(5, 40), rng.randint(2, 15), rng.randint(10, 150)
    total = done + per_day * days
    q = (f"A book has {total} pages. {name} has already read {done} pages and reads {per_day} "
         f"pages every day. How many more days does {he} need to finish the book?")
    left = w.calc(total, "-", done, "There are {} pages left.")
    final = w.calc(left, "/", per_day, f"{he.capitalize()} needs {{}} more days.")
    return q, f"({total} - {done}) / {per_day}", final


TEMPLATES: dict[str, Template] = {
    "fruit_trade": _fruit_trade, "shopping_change": _shopping_change, "ages": _ages,
    "distance": _distance, "sharing": _sharing, "machine_rate": _machine_rate,
    "savings": _savings, "crates": _crates, "reading": _reading,
}


# ---------------------------------------------------------------------------------------------
# Safe evaluation and answer parsing
# ---------------------------------------------------------------------------------------------

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an expression over integers, + - * / and parentheses. Anything else (names,
    calls, powers, floats) is rejected, so untrusted text can never run code."""
    if len(expression) > 500:
        raise ValueError("expression too long")

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"disallowed syntax in expression: {ast.dump(node)[:60]}")

    return walk(ast.parse(expression, mode="eval"))


_CALCULATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def check_calculations(text: str) -> tuple[int, int]:
    """(correct, total) over the ``<<expression=value>>`` annotations in a worked answer: a finer
    measure of a model's arithmetic than the final answer alone. A malformed one counts as wrong."""
    correct = total = 0
    for expression, value in _CALCULATION.findall(text):
        total += 1
        if not value.strip():
            continue
        try:
            correct += evaluate_expression(expression) == Fraction(canonical_number(value.strip()))
        except (ValueError, SyntaxError, ZeroDivisionError):
            pass
    return correct, total


# ---------------------------------------------------------------------------------------------
# Problems and datasets
# ---------------------------------------------------------------------------------------------

def make_problem(rng: random.Random, fault_rng: random.Random | None = None) -> dict:
    """One problem from a random template: question, worked answer, final int, expression; with
    ``fault_rng`` also ``wrong_answer``, the same solution with one calculation wrong (drawn from
    ``fault_rng``) carried through to a wrong final answer. ``rng`` advances the same either way."""
    template = rng.choice(list(TEMPLATES.values()))
    state = rng.getstate()
    work = _Work()
    question, expression, final = template(rng, work)
    # Guard against template bugs: the expression must say what the worked steps computed.
    assert evaluate_expression(expression) == final, (expression, final)
    problem = {"question": question, "answer": work.answer(final), "final": final, "expression": expression}
    if fault_rng is not None:
        problem["wrong_answer"] = _wrong_answer(template, state, len(work.lines), final, fault_rng)
    return problem


def _wrong_answer(template: Template, state: tuple, steps: int, final: int, fault_rng: random.Random) -> str:
    """Replays ``template`` from the random ``state`` it drew its problem from (the same question)
    with one step off by 1 to 10; a fault a later step cannot take (a negative result, an inexact
    division) is drawn again. The last step can always be made wrong."""
    for _ in range(20):
        step, delta = fault_rng.randrange(steps), fault_rng.choice([d for d in range(-10, 11) if d])
        replay, work = random.Random(), _Work(fault=(step, delta))
        replay.setstate(state)
        try:
            wrong = template(replay, work)[2]
        except BadStep:
            continue
        if wrong != final:
            return work.answer(wrong)
    work = _Work(fault=(steps - 1, abs(delta)))
    replay.setstate(state)
    return work.answer(template(replay, work)[2])


def _unique_problems(rng: random.Random, n: int, exclude: set[str] = frozenset(),
                     fault_rng: random.Random | None = None) -> list[dict]:
    seen, out = set(exclude), []
    for _ in range(100 * n + 1000):  # bounded: a tiny template space must not hang the caller
        if len(out) == n:
            break
        problem = make_problem(rng, fault_rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            out.append(problem)
    if len(out) < n:
        raise ValueError(f"could only generate {len(out)} distinct problems, {n} requested")
    return out


def make_split(n: int, seed: int) -> list[dict]:
    """``n`` distinct problems, a pure function of ``seed``."""
    return _unique_problems(random.Random(seed), n)


def _test_stream(seed: int) -> random.Random:
    """The test problems' own stream: the test set depends only on the seed and its size."""
    return random.Random(f"word-problems/test/{seed}")


def make_dataset(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test), disjoint by question text. The test set is drawn first from its own seeded
    stream, so it depends only on ``seed`` and ``n_test`` (and a larger ``n_test`` extends it)."""
    test = _unique_problems(_test_stream(seed), n_test)
    train = _unique_problems(random.Random(f"word-problems/train/{seed}"), n_train,
                             exclude={p["question"] for p in test})
    return train, test


def make_pairs(n_train: int, n_test: int, n_test_problems: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Preference pairs (problems with ``wrong_answer``): ``n_test`` held out, the first test
    problems of ``make_dataset`` with ``seed``; ``n_train`` from a stream of their own that shares no
    question with any of the ``n_test_problems`` test problems. A pure function of its arguments."""
    held_out = _unique_problems(_test_stream(seed), n_test,
                                fault_rng=random.Random(f"word-problems/faults/test/{seed}"))
    test_questions = {p["question"] for p in make_dataset(0, n_test_problems, seed)[1]}
    train = _unique_problems(random.Random(f"word-problems/pairs/{seed}"), n_train, exclude=test_questions,
                             fault_rng=random.Random(f"word-problems/faults/train/{seed}"))
    return train, held_out
