"""Synthetic summarization rows in the cnn_dailymail 3.0.0 schema: article, highlights, id.

An article is a short local news story: a lead, a key-figure sentence, some of the story's extra details, a quote in
60% of articles, and background fillers shuffled in. The highlights restate the lead, the key figure and (when the
article has it) the quote, so the target follows from those sentences and the extras and fillers are what a summary
leaves out. The id is the article's sha1, as in the real dataset.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from moa.data.synthetic.common import CITIES, DAYS, MONTHS, Row, cap, person_of, sha1


class _Story(NamedTuple):
    lead: str
    key: str
    quote: str
    extras: tuple[str, ...]
    highlights: tuple[str, str, str]  # from the lead, the key sentence and the quote


def _story_opening(rng: random.Random, city: str, day: str) -> _Story:
    who, role = person_of(rng), rng.choice(("Mayor", "Governor"))
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
    who = person_of(rng)
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
    who, storm = person_of(rng), rng.choice(("storm", "thunderstorm", "snowstorm", "hailstorm"))
    homes, power, speed = rng.randint(20, 900), rng.randrange(1000, 60000, 100), rng.randint(50, 110)
    return _Story(
        f"A powerful {storm} hit {city} on {day}, damaging {homes} homes and leaving {power:,} residents "
        "without power.",
        f"Winds reached {speed} miles per hour, according to the weather service.",
        f'"We will rebuild every street," Mayor {who.name} said.',
        (
            f"{rng.randint(2, 40)} people were treated for minor injuries.",
            f"Schools in the area will stay closed until {rng.choice(DAYS)}.",
            "Crews worked through the night to restore electricity.",
        ),
        (
            f"{cap(storm)} damages {homes} homes in {city}.",
            f"{power:,} residents lost power as winds reached {speed} miles per hour.",
            f"Mayor {who.name} promises to rebuild every street.",
        ),
    )


def _story_match(rng: random.Random, city: str, day: str) -> _Story:
    who, coach = person_of(rng), person_of(rng)
    team, rival = rng.sample(("Lions", "Eagles", "Rovers", "Wolves", "Falcons", "Tigers", "Sharks", "Bears"), 2)
    other = rng.choice([c for c in CITIES if c != city])
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
    who = person_of(rng)
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
    who = person_of(rng)
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
            f"Residents had reported {rng.randint(10, 80)} incidents since {rng.choice(MONTHS)}.",
        ),
        (
            f"Police arrest {arrested} people after {crime} in {city}.",
            f"Officers recover goods worth ${amount:,}.",
            f"Police chief {who.name} says neighborhoods are safer.",
        ),
    )


def _story_council(rng: random.Random, city: str, day: str) -> _Story:
    who = person_of(rng)
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
    who = person_of(rng)
    job = rng.choice(("teacher", "nurse", "baker", "painter", "engineer", "farmer", "writer", "chef"))
    award = rng.choice(("Golden Pen award", "National Service prize", "Young Talent award", "Community Hero award"))
    age, rivals, prize = rng.randint(19, 80), rng.randint(5, 300), rng.randrange(1000, 50000, 500)
    return _Story(
        f"{who.name}, a {age}-year-old {job} from {city}, won the {award} on {day}.",
        f"{cap(who.he)} beat {rivals} other candidates and will receive ${prize:,}.",
        f'"I never expected to win," {who.last} said after the ceremony.',
        (
            f"The award has been given every year since {rng.randint(1950, 2005)}.",
            f"Friends and family traveled from {rng.choice(CITIES)} to attend.",
            "The ceremony was shown live on local television.",
        ),
        (
            f"{who.name}, {age}, wins the {award}.",
            f"{who.last} beat {rivals} other candidates and will receive ${prize:,}.",
            f"{who.last} says {who.he} never expected to win.",
        ),
    )


def _story_fire(rng: random.Random, city: str, day: str) -> _Story:
    who = person_of(rng)
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
    who = person_of(rng)
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
    local = person_of(rng)
    feeling = rng.choice(("surprised", "pleased", "worried", "not surprised"))
    sentences = [
        f"{city} has a population of about {rng.randrange(8000, 400000, 100):,} people.",
        f"The news was first reported by the {city} {rng.choice(('Herald', 'Times', 'Gazette', 'Courier'))}.",
        "Local officials are expected to give more details later this week.",
        f"{local.name}, who has lived in {city} for {rng.randint(2, 40)} years, was {feeling} by the news.",
        "Many residents shared photos on social media.",
        f"{city} is about {rng.randint(20, 400)} kilometers from the capital.",
        f"A full report will be published on {rng.choice([d for d in DAYS if d != day])}.",
        "The weather in the region has been unusually mild this month.",
    ]
    rng.shuffle(sentences)
    return sentences


def make_row(rng: random.Random) -> Row:
    city, day = rng.choice(CITIES), rng.choice(DAYS)
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
    return {"article": article, "highlights": "\n".join(story.highlights[: 3 if quoted else 2]), "id": sha1(article)}
