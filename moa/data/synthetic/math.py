"""Synthetic math word problems in the gsm8k main schema: question, answer.

A problem is one of fifteen templates about a person, with numbers drawn so that every step comes out whole. The
answer is the template's worked solution: one line per step with a GSM8K "<<expr=value>>" annotation, then
"#### N" with the last step's value. (Named after its task; under absolute imports it does not hide stdlib `math`.)
"""

from __future__ import annotations

import random

from moa.data.synthetic.common import DAYS, Person, Row, cap, person_of

_Step = tuple[str, tuple[object, ...], str]  # words before, (a, op, b, op, c ...), words after


def _evaluate(terms: tuple[object, ...]) -> int:
    """Left to right: every expression uses operators of one precedence, so this matches arithmetic."""
    value = int(terms[0])  # type: ignore[call-overload]
    for op, operand in zip(terms[1::2], terms[2::2]):
        b = int(operand)  # type: ignore[call-overload]
        if op == "/":
            assert value % b == 0, f"{value}/{b} is not whole"
            value //= b
        else:
            value = {"+": value + b, "-": value - b, "*": value * b}[op]  # type: ignore[index]
    return value


def _math_answer(steps: list[_Step]) -> str:
    lines, value = [], 0
    for before, terms, after in steps:
        expr = "".join(str(t) for t in terms)
        value = _evaluate(terms)
        lines.append(f"{before} {expr} = <<{expr}={value}>>{value}{' ' + after if after else ''}.")
    return "\n".join([*lines, f"#### {value}"])


_ITEMS = ("stickers", "pencils", "cookies", "marbles", "crayons", "cards", "balloons", "stamps")
_RELATIVES = ("brother", "sister", "cousin", "friend", "neighbor")


def _math_packs(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    item, packs, per = rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(4, 12)
    given = rng.randint(1, packs * per - 1)
    question = (
        f"{p.first} buys {packs} packs of {item}. Each pack has {per} {item}. {cap(p.he)} gives {given} "
        f"{item} to {p.his} {rng.choice(_RELATIVES)}. How many {item} does {p.first} have left?"
    )
    return question, [
        (f"{p.first} buys", (packs, "*", per), item),
        (f"{cap(p.he)} has", (packs * per, "-", given), f"{item} left"),
    ]


def _math_wages(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    rate, h1, h2 = rng.randint(8, 30), rng.randint(2, 9), rng.randint(2, 9)
    d1, d2 = rng.sample(DAYS[:5], 2)
    question = (
        f"{p.first} earns ${rate} an hour. {cap(p.he)} works {h1} hours on {d1} and {h2} hours on {d2}. "
        f"How much money does {p.he} earn on those two days?"
    )
    return question, [
        (f"{cap(p.he)} works", (h1, "+", h2), "hours"),
        (f"{cap(p.he)} earns", (h1 + h2, "*", rate), "dollars"),
    ]


def _math_shopping(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    things = rng.choice(("notebooks", "pens", "candles", "pairs of socks", "markers"))
    thing = rng.choice(("backpack", "lunch box", "water bottle", "calendar", "pencil case"))
    n, price, extra = rng.randint(2, 8), rng.randint(2, 15), rng.randint(3, 30)
    spent = n * price + extra
    money = spent + rng.randint(1, 60)
    question = (
        f"{p.first} has ${money}. {cap(p.he)} buys {n} {things} that cost ${price} each and a {thing} that "
        f"costs ${extra}. How much money does {p.he} have left?"
    )
    return question, [
        (f"The {things} cost", (n, "*", price), "dollars"),
        (f"{cap(p.he)} spends", (n * price, "+", extra), "dollars in total"),
        (f"{cap(p.he)} has", (money, "-", spent), "dollars left"),
    ]


def _math_bakery(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    pastries = rng.choice(("muffins", "rolls", "cupcakes", "bagels", "pies"))
    box, days = rng.randint(2, 12), rng.randint(2, 7)
    daily = box * rng.randint(2, 8)
    question = (
        f"{p.first} bakes {daily} {pastries} every day. After {days} days, {p.he} packs all of them into "
        f"boxes of {box}. How many boxes does {p.he} fill?"
    )
    return question, [
        (f"{cap(p.he)} bakes", (daily, "*", days), pastries),
        (f"{cap(p.he)} fills", (daily * days, "/", box), "boxes"),
    ]


def _math_fraction(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    word, part = rng.choice((("Half", 2), ("One third", 3), ("One quarter", 4), ("One fifth", 5)))
    group = rng.choice(("sing in the choir", "play soccer", "walk to school", "have a pet"))
    total = part * rng.randint(4, 12)
    question = (
        f"There are {total} students in {p.first}'s class. {word} of them {group}. "
        f"How many students in the class do not {group}?"
    )
    return question, [
        ("Of the students,", (total, "/", part), f"{group}"),
        ("So", (total, "-", total // part), f"students do not {group}"),
    ]


def _math_farm(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    cows, times = rng.randint(3, 20), rng.randint(2, 6)
    chickens = cows * times
    start = f"{p.first} has {cows} cows on {p.his} farm and {times} times as many chickens."
    count = [(f"{cap(p.he)} has", (cows, "*", times), "chickens")]
    if rng.random() < 0.5:
        return f"{start} How many animals are on the farm?", [*count, ("There are", (cows, "+", chickens), "animals")]
    return f"{start} How many legs do all the animals have together?", [
        *count,
        ("The cows have", (cows, "*", 4), "legs"),
        ("The chickens have", (chickens, "*", 2), "legs"),
        ("Together they have", (cows * 4, "+", chickens * 2), "legs"),
    ]


def _math_reading(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    per_day, days = rng.randint(5, 40), rng.randint(2, 9)
    read = per_day * days
    pages = read + rng.randint(5, 200)
    question = (
        f"{p.first} reads {per_day} pages of a {pages}-page book every day. How many pages are left after {days} days?"
    )
    return question, [
        (f"In {days} days {p.he} reads", (per_day, "*", days), "pages"),
        ("There are", (pages, "-", read), "pages left"),
    ]


def _math_travel(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    v1, t1, v2, t2 = rng.randint(20, 70), rng.randint(2, 5), rng.randint(20, 70), rng.randint(2, 5)
    question = (
        f"{p.first} drives at {v1} miles per hour for {t1} hours and then at {v2} miles per hour for {t2} "
        f"hours. How many miles does {p.he} drive in total?"
    )
    return question, [
        ("First", (v1, "*", t1), "miles"),
        ("Then", (v2, "*", t2), "miles"),
        ("In total", (v1 * t1, "+", v2 * t2), "miles"),
    ]


def _math_sharing(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    item, friends = rng.choice(_ITEMS), rng.randint(2, 8)
    total = friends * rng.randint(3, 15)
    have = rng.randint(1, total - 1)
    question = (
        f"{p.first} has {have} {item} and buys {total - have} more. {cap(p.he)} shares them equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    return question, [
        (f"{cap(p.he)} has", (have, "+", total - have), item),
        ("Each friend gets", (total, "/", friends), item),
    ]


def _math_sale(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    thing, price, pct = (
        rng.choice(("bike", "tent", "guitar", "coat", "lamp")),
        20 * rng.randint(2, 15),
        rng.choice((10, 20, 25, 50)),
    )
    discount = price * pct // 100
    question = f"A {thing} costs ${price}. {p.first} buys it during a sale with {pct}% off. How much does {p.he} pay?"
    return question, [
        ("The discount is", (price, "*", pct, "/", 100), "dollars"),
        (f"{cap(p.he)} pays", (price, "-", discount), "dollars"),
    ]


def _math_savings(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    weekly, weeks, saved = rng.randint(5, 25), rng.randint(2, 12), rng.randint(10, 80)
    price = weekly * weeks + saved
    thing = rng.choice(("game", "bicycle", "telescope", "skateboard", "camera"))
    question = (
        f"{p.first} wants to buy a {thing} that costs ${price}. {cap(p.he)} already has ${saved} and saves "
        f"${weekly} every week. How many weeks does {p.he} need to save?"
    )
    return question, [
        (f"{cap(p.he)} still needs", (price, "-", saved), "dollars"),
        ("That takes", (weekly * weeks, "/", weekly), "weeks"),
    ]


def _math_tickets(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    adult, child, na, nc = rng.randint(8, 25), rng.randint(3, 12), rng.randint(1, 4), rng.randint(1, 5)
    place = rng.choice(("zoo", "museum", "aquarium", "cinema", "water park"))
    question = (
        f"Tickets to the {place} cost ${adult} for adults and ${child} for children. {p.first} buys {na} adult "
        f"tickets and {nc} child tickets. How much does {p.he} pay?"
    )
    return question, [
        ("The adult tickets cost", (na, "*", adult), "dollars"),
        ("The child tickets cost", (nc, "*", child), "dollars"),
        (f"{cap(p.he)} pays", (na * adult, "+", nc * child), "dollars"),
    ]


def _math_cookies(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    ate, gave, bags = rng.randint(1, 6), rng.randint(2, 12), rng.randint(2, 6)
    rest = bags * rng.randint(2, 10)
    baked = ate + gave + rest
    question = (
        f"{p.first} baked {baked} cookies. {cap(p.he)} ate {ate} and gave {gave} to {p.his} neighbors. "
        f"{cap(p.he)} put the rest into {bags} bags with the same number in each. How many cookies are in each bag?"
    )
    return question, [
        (f"{cap(p.he)} ate or gave away", (ate, "+", gave), "cookies"),
        ("That leaves", (baked, "-", ate + gave), "cookies"),
        ("Each bag has", (rest, "/", bags), "cookies"),
    ]


def _math_chairs(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    rooms, rows, per = rng.randint(2, 9), rng.randint(3, 8), rng.randint(4, 10)
    question = (
        f"{p.first}'s school has {rooms} classrooms. Each classroom has {rows} rows of chairs with {per} "
        "chairs in each row. How many chairs are in the school?"
    )
    return question, [
        ("Each classroom has", (rows, "*", per), "chairs"),
        ("The school has", (rows * per, "*", rooms), "chairs"),
    ]


def _math_ages(rng: random.Random, p: Person) -> tuple[str, list[_Step]]:
    age, older, times = rng.randint(3, 10), rng.randint(1, 5), rng.randint(2, 4)
    question = (
        f"{p.first} is {age} years old. {cap(p.his)} cousin is {older} years older. {cap(p.his)} aunt is "
        f"{times} times as old as the cousin. How old is the aunt?"
    )
    return question, [
        ("The cousin is", (age, "+", older), "years old"),
        ("The aunt is", (age + older, "*", times), "years old"),
    ]


_MATH = (
    _math_packs, _math_wages, _math_shopping, _math_bakery, _math_fraction, _math_farm, _math_reading,
    _math_travel, _math_sharing, _math_sale, _math_savings, _math_tickets, _math_cookies, _math_chairs,
    _math_ages,
)  # fmt: skip


def make_row(rng: random.Random) -> Row:
    question, steps = rng.choice(_MATH)(rng, person_of(rng))
    return {"question": question, "answer": _math_answer(steps)}
