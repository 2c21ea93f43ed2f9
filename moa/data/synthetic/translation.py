"""Synthetic translation rows in the wmt14 de-en schema: {"translation": {"en": ..., "de": ...}}.

A row is one sampled clause structure (`Clause`: subject, verb, objects, prepositional phrase, modal, negation,
sentence type) rendered into English and into German from the same structure, with the vocabulary of
`moa.data.lexicon`. The German follows from the English by fixed rules: case and gender of articles, adjective
endings, verb-second, verb-first (questions) and verb-final ("dass" clauses) order, "kein" for a negated
indefinite object and "nicht" otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from moa.data import lexicon as lex
from moa.data.synthetic.common import Row, a, cap


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
    return cap(" ".join(words)) + end


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
    return " ".join(words) if x.plural or _mass(x) else a(" ".join(words))


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


def make_row(rng: random.Random) -> Row:
    en, de = render_translation(_sample_clause(rng))
    return {"translation": {"en": en, "de": de}}
