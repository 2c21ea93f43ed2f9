"""Synthetic sentiment rows in the glue/sst2 schema: sentence, label, idx.

A sentence is a lowercase movie-review line from one of ten patterns. Its label (1 positive, 0 negative) is the
polarity of the deciding adjective or verb: negation ("not", "far from", "never", "did not", "nothing ... about")
flips it, and in "X, but Y" and "although X, Y" the second clause decides. `generate` fills in idx, the row's
position in its split.
"""

from __future__ import annotations

import random

from moa.data.synthetic.common import Row, a

POSITIVE = (
    "brilliant", "charming", "moving", "delightful", "clever", "gripping", "beautiful", "funny", "warm",
    "thoughtful", "powerful", "fresh", "engaging", "wonderful", "smart", "touching", "stunning", "memorable",
    "inventive", "enjoyable", "entertaining", "sharp", "heartfelt", "satisfying", "lovely",
)  # fmt: skip
NEGATIVE = (
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
    return rng.choice(POSITIVE if positive else NEGATIVE)


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
        return f"{a(adj)} {work.split()[-1]} with {_adjective(rng, positive)} {rng.choice(_FEATURES)}"
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


def make_row(rng: random.Random) -> Row:
    label = rng.randrange(2)
    return {"sentence": _review(rng, bool(label)), "label": label, "idx": 0}
