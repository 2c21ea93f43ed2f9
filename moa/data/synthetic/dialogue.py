"""Synthetic instruction rows in the OpenOrca schema: id, system_prompt, question, response.

The question is one request answered from a small knowledge base or by a mechanical rule: a capital, the first or
next items of a sequence, an antonym, a plural, a definition, a unit conversion, sorting words, spelling a word
backwards or counting its letters. The response holds its one correct answer, in the style the system prompt asks
for: the answer alone (plain), the answer and then its reason (explain), or "Sure! <answer> I hope that helps!"
(friendly).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from moa.data.synthetic.common import DAYS, MONTHS, Row, a, cap, sha1


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


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
    ("days of the week", "day", DAYS),
    ("months of the year", "month", MONTHS),
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
UNITS = (
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
        f"{cap(items[i + 1])} comes after {items[i]}.",
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
            f"What is {a(term)}?",
            f"Explain what {a(term)} is.",
            f"Define the word '{term}'.",
            f"Can you tell me what {a(term)} is?",
        )
    )
    return question, f"{cap(a(term))} is {a(kind)} that {does}.", f"In other words, {a(term)} is a kind of {kind}."


def _answer_convert(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(UNITS)
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


def make_row(rng: random.Random) -> Row:
    makers, weights = zip(*_INTENTS)
    question, answer, reason = rng.choices(makers, weights=weights)[0](rng)
    style = rng.choice(tuple(_STYLES))
    if style == "explain":
        response = f"{answer} {reason}"
    else:
        response = f"Sure! {answer} I hope that helps!" if style == "friendly" else answer
    system_prompt = rng.choice(_STYLES[style])
    return {
        "id": "synthetic." + sha1(system_prompt + question)[:10],
        "system_prompt": system_prompt,
        "question": question,
        "response": response,
    }
