"""Synthetic extractive QA rows in the squad v1.1 schema: id, title, context, question, answers.

The context is a paragraph of templated facts about one entity (a person, a town, a species or a company), its
introduction first. The question asks for one slot of one of those facts, and the answer is that slot's value with
its character offset in the context, so every answer is a span of its context.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from moa.data.synthetic.common import CITIES, MONTHS, Row, cap, person_of, sha1


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
    who, spouse = person_of(rng), person_of(rng)
    birth = rng.randint(1940, 1990)
    industry = rng.choice(tuple(_PRODUCTS))
    values = {
        "name": who.name, "He": cap(who.he), "he": who.he, "his": who.his,
        "birth_city": rng.choice(CITIES), "birth_year": str(birth),
        "subject": rng.choice(("chemistry", "history", "economics", "music", "biology", "law", "architecture")),
        "uni_city": rng.choice(CITIES), "work_city": rng.choice(CITIES),
        "job": rng.choice(("teacher", "nurse", "journalist", "lawyer", "pilot", "chemist", "designer", "librarian")),
        "work_years": f"{rng.randint(2, 12)} years", "found_year": str(birth + rng.randint(25, 30)),
        "company": _company_name(rng), "product": rng.choice(_PRODUCTS[industry]),
        "spouse": spouse.name, "kids": rng.choice(("two", "three", "four", "five")),
        "hobby": rng.choice(("hiking", "playing chess", "growing tomatoes", "sailing", "bird watching")),
    }  # fmt: skip
    return who.name.replace(" ", "_"), values, _PERSON_FACTS


def _town_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    town = rng.choice(CITIES)
    values = {
        "town": town, "region": rng.choice(("northern", "southern", "eastern", "western", "central")),
        "country": rng.choice(("Norway", "Canada", "Scotland", "Chile", "New Zealand", "Austria", "Ireland")),
        "population": f"{rng.randrange(2000, 60000, 100):,}",
        "landmark": rng.choice(("old stone bridge", "clock tower", "castle", "lighthouse", "windmill", "market hall")),
        "landmark_year": str(rng.randint(1200, 1900)),
        "river": rng.choice(("Aller", "Tamar", "Wend", "Colne", "Esk", "Lune")) + " River",
        "month": rng.choice(MONTHS),
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
        "year": str(rng.randint(1850, 2015)), "scientist": person_of(rng).name,
        "lifespan": f"{rng.randint(2, 25)} years",
        "predator": rng.choice(("snakes", "owls", "hawks", "foxes", "monitor lizards", "wild cats")),
    }  # fmt: skip
    return cap(species).replace(" ", "_"), values, _SPECIES_FACTS


def _company_entity(rng: random.Random) -> tuple[str, dict[str, str], tuple[_Fact, ...]]:
    company, industry = _company_name(rng), rng.choice(tuple(_PRODUCTS))
    year = rng.randint(1900, 2010)
    values = {
        "company": company, "industry": industry, "year": str(year), "founder": person_of(rng).name,
        "city": rng.choice(CITIES), "employees": f"{rng.randrange(50, 90000, 50):,}",
        "product": rng.choice(_PRODUCTS[industry]), "abroad_year": str(rng.randint(year + 3, 2022)),
        "abroad_city": rng.choice(("Tokyo", "Berlin", "Toronto", "Madrid", "Oslo", "Dublin", "Lima", "Cairo")),
        "ceo": person_of(rng).name,
    }  # fmt: skip
    return company.replace(" ", "_"), values, _COMPANY_FACTS


_ENTITIES = (_person_entity, _town_entity, _species_entity, _company_entity)


def make_row(rng: random.Random) -> Row:
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
        "id": sha1(context + question)[:24],
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": [values[slot]], "answer_start": [answer_at[slot]]},
    }
