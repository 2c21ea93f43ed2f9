"""The synthetic datasets: schema, determinism, variety, split disjointness and correct targets."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import pytest

from moa.data import synthetic
from moa.data.synthetic import NP, PP, TASKS, Clause, Pro, dialogue, generate, render_translation, sentiment
from moa.data.synthetic.common import sha1
from moa.errors import MoaError

# the text that must be distinct per row and that decides the split
INPUTS = {
    "summarization": lambda r: r["article"],
    "translation": lambda r: r["translation"]["en"],
    "qa": lambda r: r["context"] + "\n" + r["question"],
    "sentiment": lambda r: r["sentence"],
    "dialogue": lambda r: r["system_prompt"] + "\n" + r["question"],
    "math": lambda r: r["question"],
}


@pytest.fixture(scope="module")
def big() -> dict[str, list[dict]]:
    return {task: generate(task, 5000, 0, "train") for task in TASKS}


def test_tasks_and_schemas_cover_the_same_names() -> None:
    assert set(synthetic.SCHEMAS) == set(TASKS) == set(INPUTS)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_rows_other_seed_other_rows(task: str) -> None:
    rows = generate(task, 200, 7, "train")
    assert rows == generate(task, 200, 7, "train")
    other = generate(task, 200, 8, "train")
    assert len({INPUTS[task](r) for r in rows} & {INPUTS[task](r) for r in other}) < 50


def _check_types(task: str, row: dict) -> None:
    if task == "translation":
        assert set(row["translation"]) == {"en", "de"} and all(isinstance(v, str) for v in row["translation"].values())
    elif task == "qa":
        answers = row["answers"]
        assert isinstance(answers["text"][0], str) and isinstance(answers["answer_start"][0], int)
    elif task == "sentiment":
        assert row["label"] in (0, 1) and isinstance(row["idx"], int)
    for column, value in row.items():
        if column not in ("translation", "answers", "label", "idx"):
            assert isinstance(value, str), (task, column)


@pytest.mark.parametrize("task", TASKS)
def test_rows_have_the_real_schema(task: str) -> None:
    rows = generate(task, 300, 1, "validation")
    assert len(rows) == 300
    for row in rows:
        assert tuple(row) == synthetic.SCHEMAS[task]
        _check_types(task, row)


@pytest.mark.parametrize("task", TASKS)
def test_inputs_are_varied(big: dict[str, list[dict]], task: str) -> None:
    assert len({INPUTS[task](r) for r in big[task]}) >= 4000


@pytest.mark.parametrize("task", TASKS)
def test_splits_never_share_an_input(task: str) -> None:
    inputs = {split: {INPUTS[task](r) for r in generate(task, 1500, 3, split)} for split in synthetic.SPLITS}
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]
    # a different seed draws from the same partition
    assert not {INPUTS[task](r) for r in generate(task, 1500, 4, "train")} & inputs["test"]


def test_unknown_task_or_split_is_a_one_line_error() -> None:
    with pytest.raises(MoaError, match="known tasks: summarization, translation, qa, sentiment, dialogue, math"):
        generate("poetry", 10, 0, "train")
    with pytest.raises(MoaError, match="known splits"):
        generate("qa", 10, 0, "dev")


def test_sentiment_idx_counts_rows_and_labels_are_balanced(big: dict[str, list[dict]]) -> None:
    rows = big["sentiment"]
    assert [r["idx"] for r in rows] == list(range(len(rows)))
    assert 0.4 <= sum(r["label"] for r in rows) / len(rows) <= 0.6


POSITIVE, NEGATIVE = set(sentiment.POSITIVE), set(sentiment.NEGATIVE)


def _polarity(sentence: str) -> int:
    """An independent reading of the surface cues: the deciding clause's adjective, flipped by negation."""
    if sentence.startswith("i would"):
        return int("would not" not in sentence)
    if sentence.startswith("i "):
        return int(any(v in sentence for v in ("loved", "enjoyed", "admired", "not hate", "not dislike")))
    clause = sentence.split(", ")[-1]  # after "but", and the main clause after "although ..."
    words = clause.split()
    position, word = next((i, w) for i, w in enumerate(words) if w in POSITIVE or w in NEGATIVE)
    flipped = words[position - 1] in ("not", "never", "nothing") or words[position - 2 : position] == ["far", "from"]
    return int((word in POSITIVE) != flipped)


def test_sentiment_labels_follow_from_the_words(big: dict[str, list[dict]]) -> None:
    for row in big["sentiment"]:
        assert _polarity(row["sentence"]) == row["label"], row


def test_qa_answers_are_exact_spans(big: dict[str, list[dict]]) -> None:
    for row in big["qa"]:
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(text)] == text
        assert row["id"] and row["title"]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _safe_eval(expr: str) -> Fraction:
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


def test_math_annotations_are_correct_and_end_in_the_answer(big: dict[str, list[dict]]) -> None:
    for row in big["math"]:
        answer = row["answer"]
        annotations = re.findall(r"<<([^=>]+)=(-?\d+)>>(-?\d+)", answer)
        assert 2 <= len(annotations) <= 4, answer
        for expr, result, shown in annotations:
            assert _safe_eval(expr) == int(result) == int(shown), answer
        final = re.fullmatch(r"(?s).*\n#### (-?\d+)", answer)
        assert final and int(final.group(1)) == int(annotations[-1][1]) >= 0


def test_summaries_are_short_and_taken_from_the_article(big: dict[str, list[dict]]) -> None:
    for row in big["summarization"][:1000]:
        article, highlights = row["article"], row["highlights"].split("\n")
        assert 80 <= len(article.split()) <= 250
        assert 4 <= article.count(". ") + 1 <= 10  # quotes end in ',"' so ". " ends a sentence
        assert 2 <= len(highlights) <= 3
        for number in re.findall(r"\d+(?:,\d{3})*", row["highlights"]):
            assert number in article, (number, row)
        assert row["id"] == sha1(article)


def test_translation_sentences_are_short(big: dict[str, list[dict]]) -> None:
    for row in big["translation"]:
        en, de = row["translation"]["en"], row["translation"]["de"]
        assert 5 <= len(en.split()) <= 15
        assert en[-1] == de[-1] and en[-1] in ".?" and de[0].isupper()


def test_dialogue_answers_follow_the_question() -> None:
    for row in generate("dialogue", 500, 2, "test"):
        match = re.match(r"Convert (\d+) (\w+) to (\w+)\.", row["question"])
        if match:
            value, source, target = match.groups()
            factor = next(f for s, t, f in dialogue.UNITS if (s, t) == (source, target))
            assert f"{int(value) * factor:,} {target}" in row["response"]
        if row["question"].startswith("Sort these words alphabetically: "):
            words = row["question"].removeprefix("Sort these words alphabetically: ").rstrip(".").split(", ")
            assert ", ".join(sorted(words)) in row["response"]


# German agreement: article, gender, case, adjective ending, conjugation and word order.
GERMAN = [
    (
        Clause(NP("dog", adj="big"), "see", (NP("cat", adj="small"),)),
        "The big dog sees the small cat.",
        "Der große Hund sieht die kleine Katze.",
    ),
    (
        Clause(NP("child"), "play", pp=PP("with", NP("dog", adj="small"))),
        "The child plays with the small dog.",
        "Das Kind spielt mit dem kleinen Hund.",
    ),
    (
        Clause(NP("woman"), "see", (NP("man", adj="old"),)),
        "The woman sees the old man.",
        "Die Frau sieht den alten Mann.",
    ),
    (
        Clause(NP("child", plural=True), "read", (NP("book", adj="new", plural=True),)),
        "The children read the new books.",
        "Die Kinder lesen die neuen Bücher.",
    ),
    (
        Clause(NP("man"), "talk", pp=PP("withp", NP("child", plural=True))),
        "The man talks with the children.",
        "Der Mann spricht mit den Kindern.",
    ),
    (
        Clause(NP("woman", "indef", "young"), "buy", (NP("car", "indef", "red"),)),
        "A young woman buys a red car.",
        "Eine junge Frau kauft ein rotes Auto.",
    ),
    (
        Clause(NP("student"), "buy", (NP("bike", "indef", "expensive"),)),
        "The student buys an expensive bike.",
        "Der Student kauft ein teures Fahrrad.",
    ),
    (
        Clause(NP("man"), "read", (NP("book", "indef"),), front="today"),
        "Today the man reads a book.",
        "Heute liest der Mann ein Buch.",
    ),
    (
        Clause(NP("dog"), "see", (NP("cat"),), matrix="I think"),
        "I think that the dog sees the cat.",
        "Ich denke, dass der Hund die Katze sieht.",
    ),
    (
        Clause(NP("child"), "read", (NP("book", "indef"),), modal="want"),
        "The child wants to read a book.",
        "Das Kind will ein Buch lesen.",
    ),
    (
        Clause(NP("man"), "have", (NP("dog", "indef"),), negated=True),
        "The man does not have a dog.",
        "Der Mann hat keinen Hund.",
    ),
    (
        Clause(NP("girl"), "open", (NP("door"),), modal="can", negated=True),
        "The girl cannot open the door.",
        "Das Mädchen kann die Tür nicht öffnen.",
    ),
    (Clause(NP("teacher"), "help", (NP("boy"),)), "The teacher helps the boy.", "Der Lehrer hilft dem Jungen."),
    (
        Clause(NP("cat"), "sleep", pp=PP("in", NP("garden"))),
        "The cat sleeps in the garden.",
        "Die Katze schläft im Garten.",
    ),
    (
        Clause(NP("dog", "num:two", plural=True), "run", pp=PP("into", NP("house"))),
        "Two dogs run into the house.",
        "Zwei Hunde laufen ins Haus.",
    ),
    (
        Clause(NP("child", plural=True), "drink", (NP("milk", "indef", "cold"),)),
        "The children drink cold milk.",
        "Die Kinder trinken kalte Milch.",
    ),
    (
        Clause(NP("woman"), "play", pp=PP("with", NP("cat", "indef", "small", plural=True))),
        "The woman plays with small cats.",
        "Die Frau spielt mit kleinen Katzen.",
    ),
    (Clause(Pro("you"), "see", (NP("dog"),), question=True), "Do you see the dog?", "Siehst du den Hund?"),
    (
        Clause(NP("man"), "give", (NP("child"), NP("book", "indef"))),
        "The man gives the child a book.",
        "Der Mann gibt dem Kind ein Buch.",
    ),
    (
        Clause(Pro("he"), "live", pp=PP("bei", NP("grandmother", "poss:he"))),
        "He lives with his grandmother.",
        "Er wohnt bei seiner Großmutter.",
    ),
    (
        Clause(NP("house", "poss:we"), "be", adj="old", negated=True),
        "Our house is not old.",
        "Unser Haus ist nicht alt.",
    ),
    (
        Clause(NP("horse", "poss:I", "fast"), "be", pp=PP("in", NP("forest", "indef", "dark"))),
        "My fast horse is in a dark forest.",
        "Mein schnelles Pferd ist in einem dunklen Wald.",
    ),
    (
        Clause(Pro("we"), "wait", pp=PP("wait", NP("train")), front="in the evening"),
        "In the evening we wait for the train.",
        "Am Abend warten wir auf den Zug.",
    ),
    (
        Clause(Pro("I"), "be", adj="tired", question=True),
        "Am I tired?",
        "Bin ich müde?",
    ),
    (
        Clause(NP("neighbor", "poss:she"), "go", pp=PP("to", NP("school")), matrix="we know", modal="must"),
        "We know that her neighbor must go to the school.",
        "Wir wissen, dass ihr Nachbar zur Schule gehen muss.",
    ),
]


@pytest.mark.parametrize(("clause", "en", "de"), GERMAN, ids=[en for _, en, _ in GERMAN])
def test_german_agreement_and_word_order(clause: Clause, en: str, de: str) -> None:
    assert render_translation(clause) == (en, de)
