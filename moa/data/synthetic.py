"""Synthetic data: an offline stand-in for moa's six task datasets.

What this is: seeded generators (stdlib `random` only, no network) that write rows in the same schema as
each real dataset (cnn_dailymail 3.0.0, wmt14 de-en, squad v1.1, glue/sst2, OpenOrca, gsm8k main), so
the whole pipeline -- data preparation, LoRA training, routing, merging, evaluation -- runs without a
dataset hub. Every target is derivable from its input by fixed rules, vocabularies are small and
outputs short, so a ~135M-parameter model's LoRA can learn each task in a few hundred steps.

What this is not: a benchmark. Scores on these rows show that the pipeline works and that adapters
learned task-shaped mappings; they say nothing about, and are not comparable to, results on the real
datasets.

Guarantees: the same (task, n, seed, split) gives identical rows; rows within a split have distinct
inputs; and each input belongs to exactly one split (a hash of it picks the split), so train,
validation and test never share an input whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import NamedTuple

from moa.data import lexicon as lex
from moa.errors import MoaError

TASKS = ("summarization", "translation", "qa", "sentiment", "dialogue", "math")
SPLITS = ("train", "validation", "test")
SCHEMAS: dict[str, tuple[str, ...]] = {
    "summarization": ("article", "highlights", "id"),
    "translation": ("translation",),
    "qa": ("id", "title", "context", "question", "answers"),
    "sentiment": ("sentence", "label", "idx"),
    "dialogue": ("id", "system_prompt", "question", "response"),
    "math": ("question", "answer"),
}

Row = dict[str, object]

# Share of the input space owned by each split: hash(input) % 4 picks the split. The shares set how many
# candidates a split rejects (not how many rows it gets), so smaller held-out shares would only make
# validation and test rows slower to generate.
_SPLIT_BUCKETS = {"train": range(2), "validation": range(2, 3), "test": range(3, 4)}


def generate(task: str, n: int, seed: int, split: str) -> list[Row]:
    """`n` distinct rows of `task` in its real dataset's schema, deterministic in (task, n, seed, split)."""
    if task not in _GENERATORS:
        raise MoaError(f"unknown synthetic task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in _SPLIT_BUCKETS:
        raise MoaError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if n < 0:
        raise MoaError(f"cannot generate a negative number of rows ({n})")
    make, key = _GENERATORS[task]
    rng = random.Random(f"moa.synthetic:{task}:{split}:{seed}")
    rows: list[Row] = []
    seen: set[str] = set()
    budget = 100 * n + 1000  # far above what any split needs; stops a loop if a space ran dry
    while len(rows) < n and budget:
        budget -= 1
        row = make(rng)
        text = key(row)
        if text not in seen and _split_of(task, text) == split:
            seen.add(text)
            rows.append(row)
    if len(rows) < n:
        raise MoaError(f"synthetic {task}: only {len(rows)} distinct {split} rows could be generated, asked for {n}")
    if task == "sentiment":  # GLUE's idx is the row's position in its split
        rows = [{**row, "idx": i} for i, row in enumerate(rows)]
    return rows


def _split_of(task: str, text: str) -> str:
    bucket = zlib.crc32(f"{task}\0{text}".encode()) % 4
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# --------------------------------------------------------------------------------------------------
# Translation: English clauses rendered into English and German from one structure.


@dataclass(frozen=True)
class NP:
    """A noun phrase. det: def | indef | poss:<pronoun> | num:<two..five>; an indefinite plural or mass
    noun has no article ("dogs", "milk")."""

    noun: str
    det: str = "def"
    adj: str | None = None
    plural: bool = False


@dataclass(frozen=True)
class Pro:
    key: str  # a key of lexicon.PRONOUNS: I, you, he, she, we, they


Nominal = NP | Pro


@dataclass(frozen=True)
class PP:
    frame: str  # a key of lexicon.FRAMES
    np: NP


@dataclass(frozen=True)
class Clause:
    """One English sentence's structure. verb: a lexicon verb key or "be"; objects: (indirect, direct)
    for ditransitive verbs; front: a fronted time adverbial; matrix: "I think" etc. before "that"."""

    subject: Nominal
    verb: str
    objects: tuple[Nominal, ...] = ()
    pp: PP | None = None
    adj: str | None = None  # predicate adjective of "be"
    modal: str | None = None
    negated: bool = False
    question: bool = False
    front: str | None = None
    matrix: str | None = None


_ALL_VERBS = {**lex.VERBS, **lex.DITRANSITIVE, **lex.INTRANSITIVE}


def render_translation(clause: Clause) -> tuple[str, str]:
    """The (English, German) sentence pair for a clause."""
    return _en_clause(clause), _de_clause(clause)


def _person(x: Nominal) -> str:
    if isinstance(x, Pro):
        return lex.PRONOUNS[x.key].person
    return "3pl" if x.plural else "3sg"


def _mass(np: NP) -> bool:
    return lex.NOUNS[np.noun].en_pl is None


def _sentence(words: list[str], end: str) -> str:
    return _cap(" ".join(words)) + end


def _en_np(x: Nominal, obj: bool = False) -> str:
    if isinstance(x, Pro):
        pronoun = lex.PRONOUNS[x.key]
        return pronoun.en_obj if obj else pronoun.en
    noun = lex.NOUNS[x.noun]
    words = [lex.ADJECTIVES[x.adj].en] if x.adj else []
    words.append(noun.en_pl if x.plural else noun.en)
    if x.det == "def":
        return " ".join(["the", *words])
    if x.det.startswith("poss:"):
        return " ".join([lex.PRONOUNS[x.det[5:]].en_poss, *words])
    if x.det.startswith("num:"):
        return " ".join([x.det[4:], *words])
    return " ".join(words) if x.plural or _mass(x) else _a(" ".join(words))


def _en_verb_group(c: Clause, person: str) -> tuple[str | None, list[str]]:
    """(the auxiliary that moves before the subject in questions, the verb words after the subject)."""
    third = person == "3sg"
    neg = ["not"] if c.negated else []
    if c.verb == "be":
        return {"1sg": "am", "3sg": "is"}.get(person, "are"), neg
    base = _ALL_VERBS[c.verb].en
    do = "does" if third else "do"
    if c.modal in ("can", "must"):
        return ("cannot" if c.negated else c.modal), [base]
    if c.modal == "want":
        if c.negated or c.question:
            return do, [*neg, "want", "to", base]
        return None, ["wants" if third else "want", "to", base]
    if c.negated or c.question:
        return do, [*neg, base]
    return None, [_ALL_VERBS[c.verb].en_3sg if third else base]


def _en_clause(c: Clause) -> str:
    subject = _en_np(c.subject)
    aux, verbs = _en_verb_group(c, _person(c.subject))
    rest = [_en_np(o, obj=True) for o in c.objects]
    if c.adj:
        rest.append(lex.ADJECTIVES[c.adj].en)
    if c.pp:
        rest.append(f"{lex.FRAMES[c.pp.frame].en} {_en_np(c.pp.np, obj=True)}")
    if c.question:
        return _sentence([aux or "", subject, *verbs, *rest], "?")
    words = [subject, *([aux] if aux else []), *verbs, *rest]
    if c.matrix:
        words = [c.matrix, "that", *words]
    elif c.front:
        words = [c.front, *words]
    return _sentence(words, ".")


def _de_nominal(x: Nominal, case: str, negate: bool = False) -> str:
    if isinstance(x, Pro):
        pronoun = lex.PRONOUNS[x.key]
        return {"nom": pronoun.de, "acc": pronoun.de_acc, "dat": pronoun.de_dat}[case]
    noun = lex.NOUNS[x.noun]
    slot = "pl" if x.plural else noun.gender
    det, endings = _de_det(x, case, slot, negate)
    words = [det] if det else []
    if x.adj:
        words.append(lex.ADJECTIVES[x.adj].stem + endings[case][slot])
    words.append(_de_noun(noun, case, x.plural))
    return " ".join(words)


def _de_det(np: NP, case: str, slot: str, negate: bool) -> tuple[str, dict[str, dict[str, str]]]:
    """The determiner and the adjective-ending table it selects (weak, mixed or strong)."""
    if np.det == "def":
        return lex.DEF[case][slot], lex.WEAK
    if np.det.startswith("poss:"):
        return lex.PRONOUNS[np.det[5:]].de_poss + lex.EIN[case][slot], lex.MIXED
    if np.det.startswith("num:"):
        return lex.NUMBERS[np.det[4:]], lex.STRONG
    if negate:  # "not a dog" / "not dogs" / "not milk" -> "keinen Hund" / "keine Hunde" / "keine Milch"
        return "kein" + lex.EIN[case][slot], lex.MIXED
    if slot == "pl" or _mass(np):
        return "", lex.STRONG
    return "ein" + lex.EIN[case][slot], lex.MIXED


def _de_noun(noun: lex.Noun, case: str, plural: bool) -> str:
    if plural:  # the dative plural adds -n unless the plural ends in -n or -s: "den Kindern", "den Autos"
        assert noun.de_pl is not None
        return noun.de_pl + "n" if case == "dat" and noun.de_pl[-1] not in "ns" else noun.de_pl
    return noun.de_obl if noun.de_obl and case != "nom" else noun.de


def _de_pp(pp: PP) -> str:
    frame = lex.FRAMES[pp.frame]
    np = _de_nominal(pp.np, frame.case)
    article, _, rest = np.partition(" ")
    fused = lex.CONTRACTIONS.get((frame.de, article)) if pp.np.det == "def" and not pp.np.plural else None
    return f"{fused} {rest}" if fused else f"{frame.de} {np}"


def _de_verbs(c: Clause, person: str) -> tuple[str, list[str]]:
    """(the finite verb, the infinitive that closes the clause after a modal)."""
    if c.verb == "be":
        return lex.SEIN[person], []
    verb = _ALL_VERBS[c.verb]
    if c.modal:
        _, _, infinitive, *singular = lex.MODALS[c.modal]
        return _conjugate(infinitive, singular, person), [verb.de]
    return _conjugate(verb.de, [verb.de_1sg, verb.de_2sg, verb.de_3sg], person), []


def _conjugate(infinitive: str, singular: list[str], person: str) -> str:
    return dict(zip(("1sg", "2sg", "3sg"), singular)).get(person, infinitive)


def _de_middle(c: Clause) -> list[str]:
    """Objects, negation and prepositional phrase, in German middle-field order."""
    nicht = ["nicht"] if c.negated else []
    if c.verb == "be":
        return [*nicht, lex.ADJECTIVES[c.adj].de if c.adj else _de_pp(c.pp)]  # type: ignore[arg-type]
    cases = ("dat", "acc") if len(c.objects) == 2 else (_ALL_VERBS[c.verb].case,)
    last = len(c.objects) - 1
    # An indefinite object is negated with "kein", anything else with "nicht" after the objects.
    kein = c.negated and last >= 0 and isinstance(c.objects[last], NP) and c.objects[last].det == "indef"
    words = [_de_nominal(o, case, kein and i == last) for i, (o, case) in enumerate(zip(c.objects, cases))]
    if c.negated and not kein:
        words.append("nicht")
    if c.pp:
        words.append(_de_pp(c.pp))
    return words


def _de_clause(c: Clause) -> str:
    subject = _de_nominal(c.subject, "nom")
    finite, infinitive = _de_verbs(c, _person(c.subject))
    middle = _de_middle(c)
    if c.matrix:  # subordinate clause: the finite verb goes last
        return _sentence([lex.MATRIX[c.matrix] + ",", "dass", subject, *middle, *infinitive, finite], ".")
    if c.question:  # yes/no question: verb first
        return _sentence([finite, subject, *middle, *infinitive], "?")
    # verb second: after the subject, or after a fronted adverbial with the subject following the verb
    head = [lex.TIME_ADVERBS[c.front], finite, subject] if c.front else [subject, finite]
    return _sentence([*head, *middle, *infinitive], ".")


# Sampling clauses.

_DET_WEIGHTS = {"def": 5, "indef": 3, "poss": 2, "num": 1}
_ANY_DET = tuple(_DET_WEIGHTS)
_DEFINITE = ("def", "poss")  # subjects of "be" and indirect objects: "A dog is small" reads as generic
_PLURAL_NOUNS = frozenset("PATFVL")
_PEOPLE_AND_ANIMALS = frozenset("PA")


@cache
def _nouns_with(tags: frozenset[str]) -> tuple[str, ...]:
    return tuple(key for key, noun in lex.NOUNS.items() if noun.tags & tags)


@cache
def _adjectives_for(noun: str) -> tuple[str, ...]:
    tags = lex.NOUNS[noun].tags
    return tuple(key for key, adj in lex.ADJECTIVES.items() if adj.tags & tags)


def _sample_np(
    rng: random.Random,
    tags: frozenset[str],
    dets: tuple[str, ...] = _ANY_DET,
    plural_for: frozenset[str] = _PLURAL_NOUNS,
) -> NP:
    noun = rng.choice(_nouns_with(tags))
    entry = lex.NOUNS[noun]
    plural = entry.en_pl is not None and bool(entry.tags & plural_for) and rng.random() < 0.3
    owned = entry.en_pl is not None and "nopos" not in entry.tags  # no "my milk", no "her man"
    options = [d for d in dets if (d != "num" or plural) and (d != "poss" or owned)]
    det = rng.choices(options, weights=[_DET_WEIGHTS[d] for d in options])[0]
    if det == "poss":
        det = "poss:" + rng.choice(tuple(lex.PRONOUNS))
    elif det == "num":
        det = "num:" + rng.choice(tuple(lex.NUMBERS))
    adjectives = _adjectives_for(noun)
    adj = rng.choice(adjectives) if adjectives and rng.random() < 0.45 else None
    return NP(noun, det, adj, plural)


def _sample_nominal(
    rng: random.Random, tags: frozenset[str], pronoun_p: float, dets: tuple[str, ...] = _ANY_DET
) -> Nominal:
    """A pronoun (with probability `pronoun_p`, where people are allowed) or a noun phrase."""
    if "P" in tags and rng.random() < pronoun_p:
        return Pro(rng.choice(tuple(lex.PRONOUNS)))
    return _sample_np(rng, tags, dets)


def _clause_transitive(rng: random.Random) -> Clause:
    key = rng.choice(tuple(lex.VERBS))
    verb = lex.VERBS[key]
    subject = _sample_nominal(rng, verb.subjects, 0.3)
    return Clause(subject, key, (_sample_nominal(rng, verb.objects, 0.15),))


def _clause_ditransitive(rng: random.Random) -> Clause:
    key = rng.choice(tuple(lex.DITRANSITIVE))
    verb = lex.DITRANSITIVE[key]
    subject = _sample_nominal(rng, verb.subjects, 0.3)
    # a definite indirect object leaves "kein"/"nicht" to the direct object alone
    indirect = _sample_nominal(rng, frozenset("P"), 0.25, _DEFINITE)
    return Clause(subject, key, (indirect, _sample_np(rng, verb.objects)))


def _clause_intransitive(rng: random.Random) -> Clause:
    key = rng.choice(tuple(lex.INTRANSITIVE))
    verb = lex.INTRANSITIVE[key]
    subject = _sample_nominal(rng, verb.subjects, 0.3)
    if not verb.objects or rng.random() < 0.1:
        return Clause(subject, key)
    frame = rng.choice(sorted(verb.objects))
    np = _sample_np(rng, lex.FRAMES[frame].tags, plural_for=_PEOPLE_AND_ANIMALS)
    return Clause(subject, key, pp=PP(frame, np))


def _clause_be_adjective(rng: random.Random) -> Clause:
    subject = _sample_nominal(rng, frozenset("PATFDVL"), 0.25, _DEFINITE)
    noun = "man" if isinstance(subject, Pro) else subject.noun  # pronouns take person adjectives
    return Clause(subject, "be", adj=rng.choice(_adjectives_for(noun)))


def _clause_be_location(rng: random.Random) -> Clause:
    subject = _sample_nominal(rng, frozenset("PATV"), 0.25, _DEFINITE)
    frame = rng.choice(lex.LOCATION_FRAMES)
    np = _sample_np(rng, lex.FRAMES[frame].tags, plural_for=_PEOPLE_AND_ANIMALS)
    return Clause(subject, "be", pp=PP(frame, np))


_CLAUSE_KINDS: tuple[tuple[Callable[[random.Random], Clause], int], ...] = (
    (_clause_transitive, 36),
    (_clause_ditransitive, 8),
    (_clause_intransitive, 30),
    (_clause_be_adjective, 14),
    (_clause_be_location, 12),
)


def _decorate(rng: random.Random, c: Clause) -> Clause:
    """Add a modal, negation and a sentence type (plain, fronted adverbial, "that" clause, question)."""
    modal = rng.choice(tuple(lex.MODALS)) if c.verb != "be" and rng.random() < 0.2 else None
    last = c.objects[-1] if c.objects else None
    counted = isinstance(last, NP) and last.det.startswith("num:")  # "nicht zwei Hunde" reads oddly
    negated = rng.random() < 0.2 and modal != "must" and not counted  # "must not" is "darf nicht"
    mood = rng.choices(("plain", "front", "matrix", "question"), weights=(45, 20, 17, 18))[0]
    return replace(
        c,
        modal=modal,
        negated=negated and mood != "question",
        question=mood == "question",
        front=rng.choice(tuple(lex.TIME_ADVERBS)) if mood == "front" else None,
        matrix=rng.choice(tuple(lex.MATRIX)) if mood == "matrix" else None,
    )


def _nominals(c: Clause) -> list[Nominal]:
    return [c.subject, *c.objects, *([c.pp.np] if c.pp else [])]


def _sensible(c: Clause) -> bool:
    """No two mentions of the same noun or pronoun ("the dog sees the dog", "I see me"), no "the good tea is
    good"."""
    keys = [x.key if isinstance(x, Pro) else x.noun for x in _nominals(c)]
    tautology = c.adj is not None and isinstance(c.subject, NP) and c.subject.adj == c.adj
    return len(set(keys)) == len(keys) and not tautology


def _sample_clause(rng: random.Random) -> Clause:
    makers, weights = zip(*_CLAUSE_KINDS)
    while True:
        clause = _decorate(rng, rng.choices(makers, weights=weights)[0](rng))
        if _sensible(clause) and 5 <= len(_en_clause(clause).split()) <= 15:
            return clause


def _translation(rng: random.Random) -> Row:
    en, de = render_translation(_sample_clause(rng))
    return {"translation": {"en": en, "de": de}}


# --------------------------------------------------------------------------------------------------
# Shared English vocabulary for the other tasks.

_FEMALE = (
    "Anna", "Laura", "Maria", "Sarah", "Emma", "Julia", "Grace", "Olivia", "Chloe", "Hannah", "Nora", "Clara",
    "Alice", "Ruth", "Helen", "Diana", "Fiona", "Irene", "Lucy", "Paula", "Rosa", "Sofia", "Vera", "Wendy",
)  # fmt: skip
_MALE = (
    "David", "James", "Peter", "Thomas", "Daniel", "Henry", "Samuel", "Oscar", "Lucas", "Martin", "Victor", "Simon",
    "Adam", "Brian", "Carl", "Edward", "Frank", "George", "Ivan", "Jack", "Leo", "Noah", "Oliver", "Paul",
)  # fmt: skip
_LAST = (
    "Chen", "Miller", "Garcia", "Novak", "Okafor", "Patel", "Rossi", "Schmidt", "Tanaka", "Walker", "Becker",
    "Costa", "Dubois", "Evans", "Fischer", "Green", "Hughes", "Ivanova", "Jensen", "Kowalski", "Larsen", "Moreau",
    "Nakamura", "Olsen", "Park", "Quinn", "Reyes", "Silva", "Turner", "Vargas", "Weber", "Young", "Adams", "Baker",
    "Clarke", "Dixon", "Ellis", "Foster", "Gray", "Hayes",
)  # fmt: skip
_CITIES = (
    "Millbrook", "Riverton", "Oakdale", "Ashford", "Fairview", "Greenfield", "Harborview", "Lakeside", "Northport",
    "Pinecrest", "Redwood", "Silverton", "Stonebridge", "Westfield", "Brookhaven", "Clearwater", "Eastwood",
    "Glenwood", "Kingsbury", "Longmeadow", "Marston", "Newbury", "Oldcastle", "Rockport", "Springvale", "Thornbury",
    "Upton", "Valemont", "Whitby", "Yarrow",
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip


class _Person(NamedTuple):
    first: str
    last: str
    he: str
    his: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _person_of(rng: random.Random) -> _Person:
    if rng.random() < 0.5:
        return _Person(rng.choice(_FEMALE), rng.choice(_LAST), "she", "her")
    return _Person(rng.choice(_MALE), rng.choice(_LAST), "he", "his")


# --------------------------------------------------------------------------------------------------
# Summarization: a news story whose highlights restate the lead, the key figure and (if quoted) the quote.


class _Story(NamedTuple):
    lead: str
    key: str
    quote: str
    extras: tuple[str, ...]
    highlights: tuple[str, str, str]  # from the lead, the key sentence and the quote


def _story_opening(rng: random.Random, city: str, day: str) -> _Story:
    who, role = _person_of(rng), rng.choice(("Mayor", "Governor"))
    facility = rng.choice(("library", "hospital", "bridge", "school", "museum", "sports center", "swimming pool"))
    cost, years, users = rng.randint(5, 90), rng.randint(2, 6), rng.randrange(500, 20000, 100)
    return _Story(
        f"{role} {who.name} opened a new {facility} in {city} on {day}.",
        f"The {facility} cost ${cost} million and took {years} years to build.",
        f'"This {facility} belongs to everyone in {city}," {who.last} told reporters.',
        (
            f"Officials expect about {users:,} people to use it every month.",
            "Construction began after a long debate in the city council.",
            f"The old {facility} had been closed for {rng.randint(3, 15)} years.",
        ),
        (
            f"{role} {who.name} opens new {facility} in {city}.",
            f"The {facility} cost ${cost} million and took {years} years to build.",
            f"{who.last} says the {facility} belongs to everyone in {city}.",
        ),
    )


def _story_profit(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    company = rng.choice(("North", "Blue", "Bright", "Stone", "Silver", "Green")) + rng.choice(
        ("field", "wave", "peak", "line", "gate")
    )
    industry = rng.choice(("software", "food", "shipping", "furniture", "clothing", "toy"))
    quarter, profit, pct = rng.choice(("first", "second", "third", "fourth")), rng.randint(2, 400), rng.randint(2, 40)
    return _Story(
        f"{company}, a {industry} company based in {city}, reported a profit of ${profit} million "
        f"for the {quarter} quarter on {day}.",
        f"Sales rose {pct} percent compared with the same period last year.",
        f'"Our customers stayed with us through a hard year," said chief executive {who.name}.',
        (
            f"The company now employs {rng.randrange(200, 9000, 50):,} people in {rng.randint(2, 30)} countries.",
            f"Its shares rose {rng.randint(1, 9)} percent in early trading.",
            "Analysts had expected weaker results.",
        ),
        (
            f"{company} reports a profit of ${profit} million for the {quarter} quarter.",
            f"Sales rose {pct} percent from a year earlier.",
            f"Chief executive {who.name} thanks customers for staying.",
        ),
    )


def _story_storm(rng: random.Random, city: str, day: str) -> _Story:
    who, storm = _person_of(rng), rng.choice(("storm", "thunderstorm", "snowstorm", "hailstorm"))
    homes, power, speed = rng.randint(20, 900), rng.randrange(1000, 60000, 100), rng.randint(50, 110)
    return _Story(
        f"A powerful {storm} hit {city} on {day}, damaging {homes} homes and leaving {power:,} residents "
        "without power.",
        f"Winds reached {speed} miles per hour, according to the weather service.",
        f'"We will rebuild every street," Mayor {who.name} said.',
        (
            f"{rng.randint(2, 40)} people were treated for minor injuries.",
            f"Schools in the area will stay closed until {rng.choice(_DAYS)}.",
            "Crews worked through the night to restore electricity.",
        ),
        (
            f"{_cap(storm)} damages {homes} homes in {city}.",
            f"{power:,} residents lost power as winds reached {speed} miles per hour.",
            f"Mayor {who.name} promises to rebuild every street.",
        ),
    )


def _story_match(rng: random.Random, city: str, day: str) -> _Story:
    who, coach = _person_of(rng), _person_of(rng)
    team, rival = rng.sample(("Lions", "Eagles", "Rovers", "Wolves", "Falcons", "Tigers", "Sharks", "Bears"), 2)
    other = rng.choice([c for c in _CITIES if c != city])
    won = rng.randint(2, 6)
    lost, goals = rng.randint(0, won - 1), rng.randint(2, won)
    rank = rng.choice(("first", "second", "third", "fourth", "fifth"))
    return _Story(
        f"The {city} {team} beat the {other} {rival} {won}-{lost} on {day}.",
        f"{who.name} scored {goals} goals for the {team}.",
        f'"The whole team played with heart," coach {coach.name} said.',
        (
            f"The win moves the {team} to {rank} place in the league.",
            f"About {rng.randrange(2000, 40000, 500):,} fans watched the game.",
            f"The {rival} have now lost {rng.randint(2, 6)} games in a row.",
        ),
        (
            f"{city} {team} beat {other} {rival} {won}-{lost}.",
            f"{who.name} scores {goals} goals.",
            f"Coach {coach.name} praises the team's heart.",
        ),
    )


def _story_species(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    animal = rng.choice(("frog", "beetle", "lizard", "spider", "butterfly", "bat", "snail"))
    region = rng.choice(("northern forests", "southern mountains", "eastern wetlands", "coastal caves"))
    size, team = rng.randint(1, 30), rng.randint(3, 25)
    habitat = rng.choice(("fast rivers", "old trees", "dark caves", "tall grass"))
    return _Story(
        f"Scientists at the University of {city} have discovered a new species of {animal} in the {region}.",
        f"The {animal} is about {size} centimeters long and lives only near {habitat}.",
        f'"Finding a new {animal} like this is very rare," said {who.name}, who led the team.',
        (
            f"The team of {team} researchers spent {rng.randint(2, 24)} months in the field.",
            f"The findings were published in a science journal on {day}.",
            "The area is now being considered for protection.",
        ),
        (
            f"A new species of {animal} is found in the {region}.",
            f"The {animal} is about {size} centimeters long.",
            f"{who.name} says finding a new {animal} is very rare.",
        ),
    )


def _story_arrests(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    crime = rng.choice(("car thefts", "break-ins", "shop robberies", "bicycle thefts"))
    area = rng.choice(("harbor", "old town", "market", "university", "station"))
    arrested, amount = rng.randint(2, 12), rng.randrange(5000, 500000, 500)
    return _Story(
        f"Police in {city} arrested {arrested} people on {day} after a series of {crime} in the {area} area.",
        f"Officers recovered goods worth ${amount:,} during the search.",
        f'"Our neighborhoods are safer tonight," police chief {who.name} said.',
        (
            f"The suspects are between {rng.randint(18, 25)} and {rng.randint(30, 55)} years old.",
            "They will appear in court next week.",
            f"Residents had reported {rng.randint(10, 80)} incidents since {rng.choice(_MONTHS)}.",
        ),
        (
            f"Police arrest {arrested} people after {crime} in {city}.",
            f"Officers recover goods worth ${amount:,}.",
            f"Police chief {who.name} says neighborhoods are safer.",
        ),
    )


def _story_council(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    policy = rng.choice(
        (
            f"build {rng.randrange(100, 2000, 50):,} new homes",
            f"plant {rng.randrange(500, 10000, 500):,} trees",
            f"open {rng.randint(2, 9)} new bus lines",
            f"hire {rng.randint(20, 300)} new teachers",
            "ban cars from the city center",
        )
    )
    yes = rng.randint(6, 12)
    no, cost, years = rng.randint(0, yes - 1), rng.randint(2, 120), rng.randint(2, 10)
    return _Story(
        f"The {city} city council voted {yes}-{no} on {day} to {policy}.",
        f"The plan will cost ${cost} million over {years} years.",
        f'"This is a good day for our city," council member {who.name} said.',
        (
            "Work is expected to start next spring.",
            f"A public meeting on the plan drew more than {rng.randint(100, 900)} residents.",
            "Some business owners had opposed the idea.",
        ),
        (
            f"{city} council votes to {policy}.",
            f"The plan will cost ${cost} million over {years} years.",
            f"Council member {who.name} calls it a good day for the city.",
        ),
    )


def _story_award(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    job = rng.choice(("teacher", "nurse", "baker", "painter", "engineer", "farmer", "writer", "chef"))
    award = rng.choice(("Golden Pen award", "National Service prize", "Young Talent award", "Community Hero award"))
    age, rivals, prize = rng.randint(19, 80), rng.randint(5, 300), rng.randrange(1000, 50000, 500)
    return _Story(
        f"{who.name}, a {age}-year-old {job} from {city}, won the {award} on {day}.",
        f"{_cap(who.he)} beat {rivals} other candidates and will receive ${prize:,}.",
        f'"I never expected to win," {who.last} said after the ceremony.',
        (
            f"The award has been given every year since {rng.randint(1950, 2005)}.",
            f"Friends and family traveled from {rng.choice(_CITIES)} to attend.",
            "The ceremony was shown live on local television.",
        ),
        (
            f"{who.name}, {age}, wins the {award}.",
            f"{who.last} beat {rivals} other candidates and will receive ${prize:,}.",
            f"{who.last} says {who.he} never expected to win.",
        ),
    )


def _story_fire(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    building = rng.choice(("apartment building", "hotel", "factory", "office building", "warehouse"))
    rescued, floor, hours = rng.randint(3, 60), rng.choice(("second", "third", "fourth", "fifth")), rng.randint(2, 9)
    return _Story(
        f"Firefighters rescued {rescued} people from a burning {building} in {city} on {day}.",
        f"The fire started on the {floor} floor and took {hours} hours to put out.",
        f'"Everyone worked together to get people out," fire chief {who.name} said.',
        (
            f"{rng.randint(10, 80)} firefighters were at the scene.",
            "The cause of the fire is not yet known.",
            "Nearby streets were closed for most of the day.",
        ),
        (
            f"Firefighters rescue {rescued} people from a burning {building} in {city}.",
            f"The fire started on the {floor} floor and burned for {hours} hours.",
            f"Fire chief {who.name} praises the teamwork.",
        ),
    )


def _story_marathon(rng: random.Random, city: str, day: str) -> _Story:
    who = _person_of(rng)
    cause = rng.choice(("the local hospital", "animal shelters", "the city library", "children's charities"))
    runners, amount = rng.randrange(500, 20000, 100), rng.randrange(10000, 900000, 1000)
    hours, minutes = rng.randint(2, 3), rng.randint(1, 59)
    return _Story(
        f"More than {runners:,} runners took part in the {city} marathon on {day}, raising ${amount:,} for {cause}.",
        f"{who.name} won the race in {hours} hours and {minutes} minutes.",
        f'"The crowd carried me to the finish," {who.last} said.',
        (
            f"The race has been held every year since {rng.randint(1970, 2010)}.",
            f"Volunteers handed out {rng.randrange(5000, 50000, 1000):,} bottles of water.",
            "Several streets in the center were closed until the evening.",
        ),
        (
            f"{runners:,} runners raise ${amount:,} for {cause} in {city}.",
            f"{who.name} wins the marathon in {hours} hours and {minutes} minutes.",
            f"{who.last} says the crowd carried {'her' if who.he == 'she' else 'him'} to the finish.",
        ),
    )


_STORIES = (
    _story_opening,
    _story_profit,
    _story_storm,
    _story_match,
    _story_species,
    _story_arrests,
    _story_council,
    _story_award,
    _story_fire,
    _story_marathon,
)


def _fillers(rng: random.Random, city: str, day: str) -> list[str]:
    """Background sentences that a summary should leave out, in random order."""
    local = _person_of(rng)
    feeling = rng.choice(("surprised", "pleased", "worried", "not surprised"))
    sentences = [
        f"{city} has a population of about {rng.randrange(8000, 400000, 100):,} people.",
        f"The news was first reported by the {city} {rng.choice(('Herald', 'Times', 'Gazette', 'Courier'))}.",
        "Local officials are expected to give more details later this week.",
        f"{local.name}, who has lived in {city} for {rng.randint(2, 40)} years, was {feeling} by the news.",
        "Many residents shared photos on social media.",
        f"{city} is about {rng.randint(20, 400)} kilometers from the capital.",
        f"A full report will be published on {rng.choice([d for d in _DAYS if d != day])}.",
        "The weather in the region has been unusually mild this month.",
    ]
    rng.shuffle(sentences)
    return sentences


def _summarization(rng: random.Random) -> Row:
    city, day = rng.choice(_CITIES), rng.choice(_DAYS)
    story = rng.choice(_STORIES)(rng, city, day)
    quoted = rng.random() < 0.6
    body = [story.key, *rng.sample(story.extras, rng.randint(1, 3)), *([story.quote] if quoted else [])]
    rng.shuffle(body)
    sentences = [story.lead, *body]
    fillers = _fillers(rng, city, day)
    target_words = rng.randint(80, 120)  # 6-10 sentences of varied length, short enough for a small model
    while fillers and len(sentences) < 10 and len(" ".join(sentences).split()) < target_words:
        sentences.insert(rng.randint(1, len(sentences)), fillers.pop())
    article = " ".join(sentences)
    return {"article": article, "highlights": "\n".join(story.highlights[: 3 if quoted else 2]), "id": _sha1(article)}


# --------------------------------------------------------------------------------------------------
# QA: a paragraph of facts about one entity; the question asks for one fact, answered by its span.


class _Fact(NamedTuple):
    template: str  # "{slot}" fields are filled from the entity's values
    questions: dict[str, tuple[str, ...]]  # answer slot -> question templates


_SLOT = re.compile(r"\{(\w+)\}")


def _render(template: str, values: dict[str, str]) -> tuple[str, dict[str, int]]:
    """Fill a template and return where each slot's value starts in the result."""
    parts: list[str] = []
    starts: dict[str, int] = {}
    pos = length = 0
    for match in _SLOT.finditer(template):
        literal, value = template[pos : match.start()], values[match.group(1)]
        starts.setdefault(match.group(1), length + len(literal))
        parts += [literal, value]
        length += len(literal) + len(value)
        pos = match.end()
    parts.append(template[pos:])
    return "".join(parts), starts


_PERSON_FACTS = (
    _Fact(
        "{name} was born in {birth_city} in {birth_year}.",
        {
            "birth_city": ("Where was {name} born?", "In which town was {name} born?"),
            "birth_year": ("When was {name} born?", "In what year was {name} born?"),
        },
    ),
    _Fact(
        "{He} studied {subject} at the University of {uni_city}.",
        {
            "subject": ("What did {name} study?", "Which subject did {name} study at university?"),
            "uni_city": ("Where did {name} study {subject}?", "In which city did {name} go to university?"),
        },
    ),
    _Fact(
        "After graduating, {he} worked as a {job} in {work_city} for {work_years}.",
        {
            "job": ("What did {name} work as after graduating?", "What job did {name} have in {work_city}?"),
            "work_city": ("Where did {name} work as a {job}?",),
            "work_years": (
                "How long did {name} work in {work_city}?",
                "For how many years did {name} work as a {job}?",
            ),
        },
    ),
    _Fact(
        "In {found_year}, {name} founded {company}, a company that makes {product}.",
        {
            "company": ("What company did {name} found?", "Which company was founded by {name}?"),
            "found_year": ("When did {name} found {company}?", "In which year was {company} founded?"),
            "product": ("What does {company} make?", "What products does {company} make?"),
        },
    ),
    _Fact(
        "{He} is married to {spouse} and has {kids} children.",
        {
            "spouse": ("Who is {name} married to?", "Who is {name}'s spouse?"),
            "kids": ("How many children does {name} have?",),
        },
    ),
    _Fact(
        "In {his} free time, {name} enjoys {hobby}.",
        {"hobby": ("What does {name} enjoy in {his} free time?", "What is {name}'s favorite hobby?")},
    ),
)

_TOWN_FACTS = (
    _Fact(
        "{town} is a small town in the {region} part of {country}.",
        {
            "region": ("In which part of {country} is {town}?",),
            "country": ("In which country is {town}?", "Which country is {town} in?"),
        },
    ),
    _Fact(
        "{town} has a population of about {population} people.",
        {"population": ("What is the population of {town}?", "How many people live in {town}?")},
    ),
    _Fact(
        "The town is known for its {landmark}, which was built in {landmark_year}.",
        {
            "landmark": ("What is {town} known for?", "What landmark is {town} famous for?"),
            "landmark_year": ("When was the {landmark} in {town} built?",),
        },
    ),
    _Fact(
        "The {river} flows through the center of the town.",
        {"river": ("Which river flows through {town}?", "What river runs through the center of {town}?")},
    ),
    _Fact(
        "Every {month}, {town} holds a {festival} festival that attracts around {visitors} visitors.",
        {
            "month": (
                "When does {town} hold its {festival} festival?",
                "In which month is the {festival} festival held?",
            ),
            "festival": ("What festival does {town} hold every {month}?",),
            "visitors": ("How many visitors does the {festival} festival attract?",),
        },
    ),
    _Fact(
        "The largest employer in the town is {employer}, a {industry} company.",
        {
            "employer": ("What is the largest employer in {town}?", "Which company employs the most people in {town}?"),
            "industry": ("What kind of company is {employer}?",),
        },
    ),
)

_SPECIES_FACTS = (
    _Fact(
        "The {species} is a small {klass} that lives in the {habitat} of {place}.",
        {
            "klass": ("What kind of animal is the {species}?",),
            "habitat": ("Where does the {species} live?", "In what kind of habitat is the {species} found?"),
            "place": ("In which part of the world is the {species} found?",),
        },
    ),
    _Fact(
        "An adult {species} grows to about {size} long and weighs up to {weight}.",
        {
            "size": ("How long is an adult {species}?", "What length can an adult {species} reach?"),
            "weight": ("How much can an adult {species} weigh?",),
        },
    ),
    _Fact(
        "The {species} feeds mainly on {food}.",
        {"food": ("What does the {species} eat?", "What is the main food of the {species}?")},
    ),
    _Fact(
        "The {species} was first described in {year} by {scientist}.",
        {
            "year": ("When was the {species} first described?",),
            "scientist": ("Who first described the {species}?",),
        },
    ),
    _Fact("The {species} can live for up to {lifespan}.", {"lifespan": ("How long can the {species} live?",)}),
    _Fact(
        "The main predators of the {species} are {predator}.",
        {"predator": ("What are the main predators of the {species}?",)},
    ),
)

_COMPANY_FACTS = (
    _Fact(
        "{company} is a {industry} company founded in {year} by {founder}.",
        {
            "industry": ("What kind of company is {company}?",),
            "year": ("When was {company} founded?", "In what year was {company} founded?"),
            "founder": ("Who founded {company}?", "Who was the founder of {company}?"),
        },
    ),
    _Fact(
        "The headquarters of {company} are in {city}.",
        {"city": ("Where is {company} based?", "In which city are the headquarters of {company}?")},
    ),
    _Fact(
        "{company} employs about {employees} people.",
        {"employees": ("How many people does {company} employ?", "How many employees does {company} have?")},
    ),
    _Fact("{company} is best known for {product}.", {"product": ("What is {company} best known for?",)}),
    _Fact(
        "In {abroad_year}, {company} opened its first office abroad, in {abroad_city}.",
        {
            "abroad_year": ("When did {company} open its first office abroad?",),
            "abroad_city": ("Where did {company} open its first office abroad?",),
        },
    ),
    _Fact(
        "The current chief executive of {company} is {ceo}.",
        {"ceo": ("Who is the chief executive of {company}?", "Who leads {company} today?")},
    ),
)

_PRODUCTS = {
    "software": ("accounting software", "a popular chat app", "video editing tools"),
    "food": ("frozen pizzas", "breakfast cereals", "fruit juices"),
    "furniture": ("wooden chairs", "office desks", "kitchen cabinets"),
    "toy": ("building blocks", "board games", "wooden trains"),
    "clothing": ("rain jackets", "running shoes", "winter hats"),
    "tool": ("garden tools", "power drills", "hammers"),
}


def _company_name(rng: random.Random) -> str:
    return rng.choice(("Nova", "Apex", "Summit", "Harbor", "Maple", "Orbit", "Cobalt", "Lumen")) + rng.choice(
        (" Group", " Works", " Industries", " Company", " Holdings", " Brothers")
    )


def _person_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    who, spouse = _person_of(rng), _person_of(rng)
    birth = rng.randint(1940, 1990)
    industry = rng.choice(tuple(_PRODUCTS))
    values = {
        "name": who.name, "He": _cap(who.he), "he": who.he, "his": who.his,
        "birth_city": rng.choice(_CITIES), "birth_year": str(birth),
        "subject": rng.choice(("chemistry", "history", "economics", "music", "biology", "law", "architecture")),
        "uni_city": rng.choice(_CITIES), "work_city": rng.choice(_CITIES),
        "job": rng.choice(("teacher", "nurse", "journalist", "lawyer", "pilot", "chemist", "designer", "librarian")),
        "work_years": f"{rng.randint(2, 12)} years", "found_year": str(birth + rng.randint(25, 30)),
        "company": _company_name(rng), "product": rng.choice(_PRODUCTS[industry]),
        "spouse": spouse.name, "kids": rng.choice(("two", "three", "four", "five")),
        "hobby": rng.choice(("hiking", "playing chess", "growing tomatoes", "sailing", "bird watching")),
    }  # fmt: skip
    return who.name.replace(" ", "_"), values, _PERSON_FACTS


def _town_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    town = rng.choice(_CITIES)
    values = {
        "town": town, "region": rng.choice(("northern", "southern", "eastern", "western", "central")),
        "country": rng.choice(("Norway", "Canada", "Scotland", "Chile", "New Zealand", "Austria", "Ireland")),
        "population": f"{rng.randrange(2000, 60000, 100):,}",
        "landmark": rng.choice(("old stone bridge", "clock tower", "castle", "lighthouse", "windmill", "market hall")),
        "landmark_year": str(rng.randint(1200, 1900)),
        "river": rng.choice(("Aller", "Tamar", "Wend", "Colne", "Esk", "Lune")) + " River",
        "month": rng.choice(_MONTHS),
        "festival": rng.choice(("cheese", "lantern", "harvest", "music", "kite", "flower", "jazz", "pumpkin")),
        "visitors": f"{rng.randrange(1000, 90000, 500):,}", "employer": _company_name(rng),
        "industry": rng.choice(tuple(_PRODUCTS)),
    }  # fmt: skip
    return town, values, _TOWN_FACTS


_ANIMAL_CLASSES = {
    "frog": "amphibian", "toad": "amphibian", "lizard": "reptile", "gecko": "reptile", "snake": "reptile",
    "beetle": "insect", "moth": "insect", "finch": "bird", "owl": "bird", "bat": "mammal", "shrew": "mammal",
}  # fmt: skip
# class -> (length range in centimeters, weight range in grams), roughly true to life
_ANIMAL_SIZES = {
    "amphibian": ((2, 20), (5, 300)), "reptile": ((5, 90), (10, 900)), "insect": ((1, 8), (1, 30)),
    "bird": ((8, 40), (10, 900)), "mammal": ((4, 30), (5, 600)),
}  # fmt: skip


def _species_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    animal = rng.choice(tuple(_ANIMAL_CLASSES))
    color = rng.choice(("golden", "silver", "red", "blue", "spotted", "striped"))
    species = f"{color}-{rng.choice(('tailed', 'eyed', 'backed', 'throated'))} {animal}"
    klass = _ANIMAL_CLASSES[animal]
    (short, long), (light, heavy) = _ANIMAL_SIZES[klass]
    values = {
        "species": species, "klass": klass,
        "habitat": rng.choice(("rainforests", "mountain streams", "dry grasslands", "mangrove swamps")),
        "place": rng.choice(("South America", "Southeast Asia", "Central Africa", "northern Australia", "Madagascar")),
        "size": f"{rng.randint(short, long)} centimeters", "weight": f"{rng.randint(light, heavy)} grams",
        "food": rng.choice(("small insects", "seeds", "ripe fruit", "worms", "spiders", "leaves")),
        "year": str(rng.randint(1850, 2015)), "scientist": _person_of(rng).name,
        "lifespan": f"{rng.randint(2, 25)} years",
        "predator": rng.choice(("snakes", "owls", "hawks", "foxes", "monitor lizards", "wild cats")),
    }  # fmt: skip
    return _cap(species).replace(" ", "_"), values, _SPECIES_FACTS


def _company_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    company, industry = _company_name(rng), rng.choice(tuple(_PRODUCTS))
    year = rng.randint(1900, 2010)
    values = {
        "company": company, "industry": industry, "year": str(year), "founder": _person_of(rng).name,
        "city": rng.choice(_CITIES), "employees": f"{rng.randrange(50, 90000, 50):,}",
        "product": rng.choice(_PRODUCTS[industry]), "abroad_year": str(rng.randint(year + 3, 2022)),
        "abroad_city": rng.choice(("Tokyo", "Berlin", "Toronto", "Madrid", "Oslo", "Dublin", "Lima", "Cairo")),
        "ceo": _person_of(rng).name,
    }  # fmt: skip
    return company.replace(" ", "_"), values, _COMPANY_FACTS


_ENTITIES = (_person_entity, _town_entity, _species_entity, _company_entity)


def _qa(rng: random.Random) -> Row:
    title, values, facts = rng.choice(_ENTITIES)(rng)
    chosen = [facts[0], *rng.sample(facts[1:], rng.randint(3, len(facts) - 1))]  # the introduction stays first
    sentences: list[str] = []
    answer_at: dict[str, int] = {}
    offset = 0
    for fact in chosen:
        text, starts = _render(fact.template, values)
        answer_at.update({slot: offset + starts[slot] for slot in fact.questions})
        sentences.append(text)
        offset += len(text) + 1
    fact = rng.choice(chosen)
    slot = rng.choice(tuple(fact.questions))
    context, question = " ".join(sentences), _render(rng.choice(fact.questions[slot]), values)[0]
    return {
        "id": _sha1(context + question)[:24],
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": [values[slot]], "answer_start": [answer_at[slot]]},
    }


# --------------------------------------------------------------------------------------------------
# Sentiment: review sentences whose polarity follows from adjectives, negation and contrast.

_POSITIVE = (
    "brilliant", "charming", "moving", "delightful", "clever", "gripping", "beautiful", "funny", "warm",
    "thoughtful", "powerful", "fresh", "engaging", "wonderful", "smart", "touching", "stunning", "memorable",
    "inventive", "enjoyable", "entertaining", "sharp", "heartfelt", "satisfying", "lovely",
)  # fmt: skip
_NEGATIVE = (
    "dull", "boring", "clumsy", "tedious", "predictable", "shallow", "messy", "lifeless", "awkward", "forgettable",
    "bland", "confusing", "flat", "weak", "pointless", "tiresome", "silly", "lazy", "painful", "stale", "hollow",
    "uneven", "sloppy", "dreary", "bad",
)  # fmt: skip
_ASPECTS = (
    "the acting", "the plot", "the script", "the soundtrack", "the dialogue", "the ending", "the direction",
    "the pacing", "the story", "the humor", "the music", "the final act", "the screenplay", "the camera work",
    "the characters", "the performances", "the visual effects", "the jokes", "this film", "the movie",
)  # fmt: skip
_PLURAL_ASPECTS = frozenset(("the characters", "the performances", "the visual effects", "the jokes"))
_WORKS = ("film", "movie", "story", "comedy", "drama", "thriller", "documentary", "debut", "romance", "adventure")
_INTENSIFIERS = ("very", "really", "truly", "remarkably", "incredibly", "quite", "genuinely", "surprisingly")
# plural and mass nouns that read well without an article: "a clever film with sharp dialogue"
_FEATURES = ("dialogue", "music", "performances", "characters", "jokes", "visual effects", "humor", "writing", "pacing")
# polarity-free descriptions of the work, for variety: "this animated film"
_NEUTRAL = ("new", "long", "short", "french", "korean", "animated", "two-hour", "low-budget", "independent", "latest")


def _adjective(rng: random.Random, positive: bool) -> str:
    return rng.choice(_POSITIVE if positive else _NEGATIVE)


def _be(aspect: str) -> str:
    return "are" if aspect in _PLURAL_ASPECTS else "is"


def _review(rng: random.Random, positive: bool) -> str:
    """One review sentence whose overall polarity is `positive`."""
    adj, other = _adjective(rng, positive), _adjective(rng, not positive)
    aspect, second = rng.sample(_ASPECTS, 2)
    work, intens = rng.choice(_WORKS), rng.choice(_INTENSIFIERS)
    if rng.random() < 0.6:
        work = f"{rng.choice(_NEUTRAL)} {work}"
    kind = rng.randrange(10)
    if kind == 0:
        return f"{aspect} {_be(aspect)} {intens} {adj}"
    if kind == 1:  # negation flips the adjective: "not boring" is praise
        flip = rng.choice(("not", "far from", "never"))
        return f"{aspect} {_be(aspect)} {flip} {other}"
    if kind == 2:
        return f"{aspect} {_be(aspect)} {adj} and {_adjective(rng, positive)}"
    if kind == 3:  # after "but" the second clause decides
        return f"{aspect} {_be(aspect)} {other}, but {second} {_be(second)} {adj}"
    if kind == 4:  # "although" concedes the first clause; the main clause decides
        return f"although {aspect} {_be(aspect)} {other}, {second} {_be(second)} {intens} {adj}"
    if kind == 5:
        return f"{_a(adj)} {work.split()[-1]} with {_adjective(rng, positive)} {rng.choice(_FEATURES)}"
    if kind == 6:
        verb = rng.choice(("loved", "enjoyed", "admired") if positive else ("hated", "disliked", "regretted watching"))
        if rng.random() < 0.4:  # "did not hate" praises, "did not enjoy" pans
            verb = "did not " + rng.choice(("hate", "dislike") if positive else ("enjoy", "like"))
        return f"i {verb} this {work}"
    if kind == 7:
        return f"it is hard to imagine a more {adj} {work.split()[-1]}"
    if kind == 8:
        audience = rng.choice(("anyone", "my friends", "everyone i know", "fans of the genre"))
        return f"i would {'' if positive else 'not '}recommend this {work} to {audience}"
    return f"there is nothing {other} about {aspect}"


def _sentiment(rng: random.Random) -> Row:
    label = rng.randrange(2)
    return {"sentence": _review(rng, bool(label)), "label": label, "idx": 0}


# --------------------------------------------------------------------------------------------------
# Dialogue: requests answered from a small knowledge base; the system prompt sets the answer style.

_STYLES = {
    "plain": ("", "You are a helpful assistant.", "You are an AI assistant. Answer the question briefly."),
    "explain": (
        "You are a helpful assistant who always explains the answer.",
        "You are an AI assistant. Give the answer and then a short explanation.",
    ),
    "friendly": (
        "You are a friendly assistant talking to a young child.",
        "You are a cheerful AI assistant. Keep a warm tone.",
    ),
}

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Australia": "Canberra",
    "India": "New Delhi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Ireland": "Dublin", "Argentina": "Buenos Aires", "Peru": "Lima", "China": "Beijing",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Turkey": "Ankara", "Austria": "Vienna",
    "Hungary": "Budapest", "Denmark": "Copenhagen", "Chile": "Santiago", "Cuba": "Havana", "Ghana": "Accra",
    "Vietnam": "Hanoi",
}  # fmt: skip

# name, the item word, the ordered items
_SEQUENCES = (
    ("days of the week", "day", _DAYS),
    ("months of the year", "month", _MONTHS),
    ("planets from the Sun", "planet", ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    ("colors of the rainbow", "color", ("red", "orange", "yellow", "green", "blue", "indigo", "violet")),
    ("letters of the alphabet", "letter", tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
)
_COUNT_WORDS = ("", "one", "two", "three", "four", "five")

_ANTONYMS = {
    "hot": "cold", "big": "small", "happy": "sad", "fast": "slow", "early": "late", "young": "old",
    "strong": "weak", "open": "closed", "full": "empty", "rich": "poor", "hard": "soft", "clean": "dirty",
    "wet": "dry", "loud": "quiet", "high": "low", "near": "far", "thick": "thin", "wide": "narrow",
    "safe": "dangerous", "cheap": "expensive", "easy": "difficult", "true": "false", "win": "lose", "buy": "sell",
    "push": "pull", "remember": "forget", "increase": "decrease", "always": "never", "above": "below",
    "inside": "outside", "day": "night", "north": "south", "east": "west", "question": "answer", "summer": "winter",
    "sweet": "sour", "smooth": "rough", "heavy": "light", "arrive": "leave",
}  # fmt: skip

_PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "house": "houses", "bus": "buses",
    "box": "boxes", "dish": "dishes", "church": "churches", "glass": "glasses", "fox": "foxes", "city": "cities",
    "baby": "babies", "party": "parties", "story": "stories", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "shelf": "shelves", "child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "sheep": "sheep", "deer": "deer", "potato": "potatoes",
    "tomato": "tomatoes", "hero": "heroes",
}  # fmt: skip

# term: (kind of thing, what it does)
_CONCEPTS = {
    "thermometer": ("tool", "measures temperature"),
    "telescope": ("instrument", "makes distant objects look closer"),
    "compass": ("tool", "shows which direction is north"),
    "calendar": ("chart", "shows the days, weeks and months of a year"),
    "dictionary": ("book", "lists words and explains what they mean"),
    "map": ("drawing", "shows where places are"),
    "volcano": ("mountain", "can erupt with hot lava"),
    "library": ("building", "lends books to the public"),
    "bakery": ("shop", "makes and sells bread and cakes"),
    "pharmacy": ("shop", "sells medicine"),
    "microscope": ("instrument", "makes very small things look bigger"),
    "umbrella": ("device", "protects you from the rain"),
    "refrigerator": ("machine", "keeps food cold"),
    "kettle": ("container", "is used to boil water"),
    "ladder": ("tool", "helps you climb up and down"),
    "bridge": ("structure", "lets people cross a river or a road"),
    "lighthouse": ("tower", "guides ships with a bright light"),
    "satellite": ("object", "travels around a planet"),
    "mammal": ("animal", "feeds its young with milk"),
    "reptile": ("animal", "has dry skin covered in scales"),
    "carnivore": ("animal", "eats mostly meat"),
    "herbivore": ("animal", "eats only plants"),
    "island": ("piece of land", "is surrounded by water"),
    "desert": ("dry area", "gets very little rain"),
    "orchard": ("piece of land", "is planted with fruit trees"),
    "museum": ("building", "shows art, history or science to visitors"),
    "passport": ("document", "proves who you are when you travel"),
    "recipe": ("set of instructions", "explains how to cook a dish"),
    "battery": ("device", "stores electrical energy"),
    "noun": ("word", "names a person, place or thing"),
    "verb": ("word", "describes an action"),
    "adjective": ("word", "describes a noun"),
}

# from, to, factor (both plural)
_UNITS = (
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000), ("years", "months", 12), ("feet", "inches", 12), ("yards", "feet", 3),
    ("gallons", "quarts", 4),
)  # fmt: skip
_SINGULAR_UNIT = {"feet": "foot", "inches": "inch"}

_WORDS = (
    "apple", "banana", "cherry", "garden", "window", "pencil", "rocket", "silver", "planet", "candle", "forest",
    "island", "ladder", "marble", "orange", "pepper", "rabbit", "saddle", "tiger", "violin", "wagon", "yellow",
    "zebra", "anchor", "basket", "castle", "dragon", "engine", "falcon", "guitar", "hammer", "jacket", "kitten",
    "lemon", "magnet", "needle", "ocean", "parrot", "quilt", "river", "shadow", "tunnel", "umbrella", "valley",
    "walnut", "butter", "cactus", "dolphin", "feather", "garlic", "helmet", "igloo", "jungle", "kettle", "lizard",
    "meadow", "noodle", "oyster", "pumpkin", "rainbow", "spider", "turtle", "velvet", "whistle",
)  # fmt: skip


def _answer_capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(tuple(_CAPITALS))
    capital = _CAPITALS[country]
    question = rng.choice(
        (
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Name the capital city of {country}.",
        )
    )
    return (
        question,
        f"The capital of {country} is {capital}.",
        f"{capital} is where the national government of {country} is based.",
    )


def _answer_first_items(rng: random.Random) -> tuple[str, str, str]:
    name, _, items = rng.choice(_SEQUENCES)
    k = rng.randint(2, 5)
    count = _COUNT_WORDS[k]
    question = rng.choice(
        (
            f"List the first {count} {name}.",
            f"What are the first {count} {name}?",
            f"Name the first {count} {name}, in order.",
        )
    )
    answer = f"The first {count} {name} are {_join_and(items[:k])}."
    return question, answer, f"The list starts with {items[0]}, and {items[k]} would come next."


def _answer_next_item(rng: random.Random) -> tuple[str, str, str]:
    name, item, items = rng.choice(_SEQUENCES)
    i = rng.randrange(len(items) - 1)
    question = rng.choice(
        (f"Which {item} comes after {items[i]}?", f"In the {name}, what comes right after {items[i]}?")
    )
    return (
        question,
        f"{_cap(items[i + 1])} comes after {items[i]}.",
        f"In the {name}, {items[i]} is number {i + 1} and {items[i + 1]} is number {i + 2}.",
    )


def _answer_opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(tuple(_ANTONYMS))
    opposite = _ANTONYMS[word]
    question = rng.choice(
        (
            f"What is the opposite of '{word}'?",
            f"Give me an antonym for '{word}'.",
            f"Which word means the opposite of '{word}'?",
        )
    )
    return question, f"The opposite of '{word}' is '{opposite}'.", f"'{word}' and '{opposite}' have opposite meanings."


def _plural_rule(singular: str, plural: str) -> str:
    if plural == singular:
        return "This noun has the same form in the singular and the plural."
    if plural == singular + "s":
        return "Most nouns form the plural by adding -s."
    if plural == singular + "es":
        return "Nouns that end in -s, -x, -ch, -sh or -o usually add -es."
    if plural == singular[:-1] + "ies":
        return "When a noun ends in a consonant and -y, the -y changes to -ies."
    if plural.endswith("ves"):
        return "Many nouns that end in -f or -fe change the ending to -ves."
    return "This is an irregular plural that does not follow the usual rules."


def _answer_plural(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(tuple(_PLURALS))
    plural = _PLURALS[word]
    question = rng.choice((f"What is the plural of '{word}'?", f"How do you write '{word}' in the plural?"))
    return question, f"The plural of '{word}' is '{plural}'.", _plural_rule(word, plural)


def _answer_define(rng: random.Random) -> tuple[str, str, str]:
    term = rng.choice(tuple(_CONCEPTS))
    kind, does = _CONCEPTS[term]
    question = rng.choice(
        (
            f"What is {_a(term)}?",
            f"Explain what {_a(term)} is.",
            f"Define the word '{term}'.",
            f"Can you tell me what {_a(term)} is?",
        )
    )
    return question, f"{_cap(_a(term))} is {_a(kind)} that {does}.", f"In other words, {_a(term)} is a kind of {kind}."


def _answer_convert(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(_UNITS)
    value = rng.randint(2, 99)
    question = rng.choice(
        (
            f"Convert {value} {source} to {target}.",
            f"How many {target} are in {value} {source}?",
            f"What is {value} {source} in {target}?",
        )
    )
    unit = _SINGULAR_UNIT.get(source, source[:-1])
    return (
        question,
        f"{value} {source} is {value * factor:,} {target}.",
        f"There are {factor:,} {target} in one {unit}, so {value} x {factor:,} = {value * factor:,}.",
    )


def _answer_sort(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    listed = ", ".join(words)
    question = rng.choice(
        (
            f"Sort these words alphabetically: {listed}.",
            f"Put the following words in alphabetical order: {listed}.",
            f"Arrange these words from A to Z: {listed}.",
        )
    )
    return (
        question,
        f"In alphabetical order: {', '.join(sorted(words))}.",
        "I compared the words letter by letter, starting with the first letter.",
    )


def _answer_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS)
    question = rng.choice((f"Spell the word '{word}' backwards.", f"Write '{word}' in reverse order."))
    return (
        question,
        f"'{word}' spelled backwards is '{word[::-1]}'.",
        f"Reading the letters {'-'.join(word)} from right to left gives '{word[::-1]}'.",
    )


def _answer_count_letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(_WORDS)
    question = rng.choice((f"How many letters are in the word '{word}'?", f"Count the letters in '{word}'."))
    return question, f"The word '{word}' has {len(word)} letters.", f"The letters are {'-'.join(word)}."


_INTENTS = (
    (_answer_capital, 2),
    (_answer_first_items, 2),
    (_answer_next_item, 2),
    (_answer_opposite, 2),
    (_answer_plural, 2),
    (_answer_define, 2),
    (_answer_convert, 4),
    (_answer_sort, 5),
    (_answer_reverse, 2),
    (_answer_count_letters, 2),
)


def _dialogue(rng: random.Random) -> Row:
    makers, weights = zip(*_INTENTS)
    question, answer, reason = rng.choices(makers, weights=weights)[0](rng)
    style = rng.choice(tuple(_STYLES))
    if style == "explain":
        response = f"{answer} {reason}"
    else:
        response = f"Sure! {answer} I hope that helps!" if style == "friendly" else answer
    system_prompt = rng.choice(_STYLES[style])
    return {
        "id": "synthetic." + _sha1(system_prompt + question)[:10],
        "system_prompt": system_prompt,
        "question": question,
        "response": response,
    }


# --------------------------------------------------------------------------------------------------
# Math: word problems with GSM8K-style worked answers: "<<a*b=c>>" annotations and a final "#### N".

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


def _math_packs(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    item, packs, per = rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(4, 12)
    given = rng.randint(1, packs * per - 1)
    question = (
        f"{p.first} buys {packs} packs of {item}. Each pack has {per} {item}. {_cap(p.he)} gives {given} "
        f"{item} to {p.his} {rng.choice(_RELATIVES)}. How many {item} does {p.first} have left?"
    )
    return question, [
        (f"{p.first} buys", (packs, "*", per), item),
        (f"{_cap(p.he)} has", (packs * per, "-", given), f"{item} left"),
    ]


def _math_wages(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    rate, h1, h2 = rng.randint(8, 30), rng.randint(2, 9), rng.randint(2, 9)
    d1, d2 = rng.sample(_DAYS[:5], 2)
    question = (
        f"{p.first} earns ${rate} an hour. {_cap(p.he)} works {h1} hours on {d1} and {h2} hours on {d2}. "
        f"How much money does {p.he} earn on those two days?"
    )
    return question, [
        (f"{_cap(p.he)} works", (h1, "+", h2), "hours"),
        (f"{_cap(p.he)} earns", (h1 + h2, "*", rate), "dollars"),
    ]


def _math_shopping(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    things = rng.choice(("notebooks", "pens", "candles", "pairs of socks", "markers"))
    thing = rng.choice(("backpack", "lunch box", "water bottle", "calendar", "pencil case"))
    n, price, extra = rng.randint(2, 8), rng.randint(2, 15), rng.randint(3, 30)
    spent = n * price + extra
    money = spent + rng.randint(1, 60)
    question = (
        f"{p.first} has ${money}. {_cap(p.he)} buys {n} {things} that cost ${price} each and a {thing} that "
        f"costs ${extra}. How much money does {p.he} have left?"
    )
    return question, [
        (f"The {things} cost", (n, "*", price), "dollars"),
        (f"{_cap(p.he)} spends", (n * price, "+", extra), "dollars in total"),
        (f"{_cap(p.he)} has", (money, "-", spent), "dollars left"),
    ]


def _math_bakery(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    pastries = rng.choice(("muffins", "rolls", "cupcakes", "bagels", "pies"))
    box, days = rng.randint(2, 12), rng.randint(2, 7)
    daily = box * rng.randint(2, 8)
    question = (
        f"{p.first} bakes {daily} {pastries} every day. After {days} days, {p.he} packs all of them into "
        f"boxes of {box}. How many boxes does {p.he} fill?"
    )
    return question, [
        (f"{_cap(p.he)} bakes", (daily, "*", days), pastries),
        (f"{_cap(p.he)} fills", (daily * days, "/", box), "boxes"),
    ]


def _math_fraction(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
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


def _math_farm(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    cows, times = rng.randint(3, 20), rng.randint(2, 6)
    chickens = cows * times
    start = f"{p.first} has {cows} cows on {p.his} farm and {times} times as many chickens."
    count = [(f"{_cap(p.he)} has", (cows, "*", times), "chickens")]
    if rng.random() < 0.5:
        return f"{start} How many animals are on the farm?", [*count, ("There are", (cows, "+", chickens), "animals")]
    return f"{start} How many legs do all the animals have together?", [
        *count,
        ("The cows have", (cows, "*", 4), "legs"),
        ("The chickens have", (chickens, "*", 2), "legs"),
        ("Together they have", (cows * 4, "+", chickens * 2), "legs"),
    ]


def _math_reading(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
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


def _math_travel(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
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


def _math_sharing(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    item, friends = rng.choice(_ITEMS), rng.randint(2, 8)
    total = friends * rng.randint(3, 15)
    have = rng.randint(1, total - 1)
    question = (
        f"{p.first} has {have} {item} and buys {total - have} more. {_cap(p.he)} shares them equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    return question, [
        (f"{_cap(p.he)} has", (have, "+", total - have), item),
        ("Each friend gets", (total, "/", friends), item),
    ]


def _math_sale(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    thing, price, pct = (
        rng.choice(("bike", "tent", "guitar", "coat", "lamp")),
        20 * rng.randint(2, 15),
        rng.choice((10, 20, 25, 50)),
    )
    discount = price * pct // 100
    question = f"A {thing} costs ${price}. {p.first} buys it during a sale with {pct}% off. How much does {p.he} pay?"
    return question, [
        ("The discount is", (price, "*", pct, "/", 100), "dollars"),
        (f"{_cap(p.he)} pays", (price, "-", discount), "dollars"),
    ]


def _math_savings(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    weekly, weeks, saved = rng.randint(5, 25), rng.randint(2, 12), rng.randint(10, 80)
    price = weekly * weeks + saved
    thing = rng.choice(("game", "bicycle", "telescope", "skateboard", "camera"))
    question = (
        f"{p.first} wants to buy a {thing} that costs ${price}. {_cap(p.he)} already has ${saved} and saves "
        f"${weekly} every week. How many weeks does {p.he} need to save?"
    )
    return question, [
        (f"{_cap(p.he)} still needs", (price, "-", saved), "dollars"),
        ("That takes", (weekly * weeks, "/", weekly), "weeks"),
    ]


def _math_tickets(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    adult, child, na, nc = rng.randint(8, 25), rng.randint(3, 12), rng.randint(1, 4), rng.randint(1, 5)
    place = rng.choice(("zoo", "museum", "aquarium", "cinema", "water park"))
    question = (
        f"Tickets to the {place} cost ${adult} for adults and ${child} for children. {p.first} buys {na} adult "
        f"tickets and {nc} child tickets. How much does {p.he} pay?"
    )
    return question, [
        ("The adult tickets cost", (na, "*", adult), "dollars"),
        ("The child tickets cost", (nc, "*", child), "dollars"),
        (f"{_cap(p.he)} pays", (na * adult, "+", nc * child), "dollars"),
    ]


def _math_cookies(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    ate, gave, bags = rng.randint(1, 6), rng.randint(2, 12), rng.randint(2, 6)
    rest = bags * rng.randint(2, 10)
    baked = ate + gave + rest
    question = (
        f"{p.first} baked {baked} cookies. {_cap(p.he)} ate {ate} and gave {gave} to {p.his} neighbors. "
        f"{_cap(p.he)} put the rest into {bags} bags with the same number in each. How many cookies are in each bag?"
    )
    return question, [
        (f"{_cap(p.he)} ate or gave away", (ate, "+", gave), "cookies"),
        ("That leaves", (baked, "-", ate + gave), "cookies"),
        ("Each bag has", (rest, "/", bags), "cookies"),
    ]


def _math_chairs(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    rooms, rows, per = rng.randint(2, 9), rng.randint(3, 8), rng.randint(4, 10)
    question = (
        f"{p.first}'s school has {rooms} classrooms. Each classroom has {rows} rows of chairs with {per} "
        "chairs in each row. How many chairs are in the school?"
    )
    return question, [
        ("Each classroom has", (rows, "*", per), "chairs"),
        ("The school has", (rows * per, "*", rooms), "chairs"),
    ]


def _math_ages(rng: random.Random, p: _Person) -> tuple[str, list[_Step]]:
    age, older, times = rng.randint(3, 10), rng.randint(1, 5), rng.randint(2, 4)
    question = (
        f"{p.first} is {age} years old. {_cap(p.his)} cousin is {older} years older. {_cap(p.his)} aunt is "
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


def _math(rng: random.Random) -> Row:
    question, steps = rng.choice(_MATH)(rng, _person_of(rng))
    return {"question": question, "answer": _math_answer(steps)}


# --------------------------------------------------------------------------------------------------

# task -> (row generator, the input text that must be unique and that picks the split)
_GENERATORS: dict[str, tuple[Callable[[random.Random], Row], Callable[[Row], str]]] = {
    "summarization": (_summarization, lambda r: str(r["article"])),
    "translation": (_translation, lambda r: r["translation"]["en"]),  # type: ignore[index]
    "qa": (_qa, lambda r: f"{r['context']}\n{r['question']}"),
    "sentiment": (_sentiment, lambda r: str(r["sentence"])),
    "dialogue": (_dialogue, lambda r: f"{r['system_prompt']}\n{r['question']}"),
    "math": (_math, lambda r: str(r["question"])),
}
