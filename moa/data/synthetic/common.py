"""What several synthetic tasks share: the row type, small English text helpers, and person and place names."""

from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

Row = dict[str, object]


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def cap(text: str) -> str:
    """The text with its first letter upper-cased (str.capitalize would lower-case the rest)."""
    return text[:1].upper() + text[1:]


def a(word: str) -> str:
    """The word with its indefinite article: "a dog", "an owl"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


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
CITIES = (
    "Millbrook", "Riverton", "Oakdale", "Ashford", "Fairview", "Greenfield", "Harborview", "Lakeside", "Northport",
    "Pinecrest", "Redwood", "Silverton", "Stonebridge", "Westfield", "Brookhaven", "Clearwater", "Eastwood",
    "Glenwood", "Kingsbury", "Longmeadow", "Marston", "Newbury", "Oldcastle", "Rockport", "Springvale", "Thornbury",
    "Upton", "Valemont", "Whitby", "Yarrow",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip


class Person(NamedTuple):
    first: str
    last: str
    he: str
    his: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def person_of(rng: random.Random) -> Person:
    if rng.random() < 0.5:
        return Person(rng.choice(_FEMALE), rng.choice(_LAST), "she", "her")
    return Person(rng.choice(_MALE), rng.choice(_LAST), "he", "his")
