"""moa.metrics against rouge-score and sacrebleu called directly, and against hand-computed official values."""

import math

import pytest
import sacrebleu
import yaml
from rouge_score import rouge_scorer

from moa import metrics
from moa.config import SCHEMA_PATH
from moa.data.tasks import BUILTIN, get_task
from moa.errors import MoaError
from moa.metrics import (
    Score,
    bleu,
    chrf,
    final_number,
    higher_is_better,
    math_exact_match,
    normalize_answer,
    parse_label,
    perplexity,
    rouge,
    router_accuracy,
    score_task,
    split_sentences,
    squad_exact_match,
    squad_f1,
)

PREDICTIONS = ["The cats were sitting on the mat. It was sunny!", "", "Police arrested two men on Tuesday."]
REFERENCES = [
    ["A cat sat on the mat. The sun shone.", "Dogs ran in the park."],
    ["Nothing to see here."],
    ["Two men were arrested by police.", "Police arrested two men on Tuesday night."],
]


# --- ROUGE -----------------------------------------------------------------------------------------

def test_rouge_matches_rouge_score_with_max_over_references() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = rouge(PREDICTIONS, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[key].fmeasure for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
        assert got[key] == pytest.approx(100 * sum(best) / len(best))
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_rouge_empty_prediction_scores_zero() -> None:
    assert rouge([""], [["Some reference text."]]) == dict.fromkeys(["rouge1", "rouge2", "rougeL", "rougeLsum"], 0.0)


def test_rouge_lsum_splits_sentences_like_pre_split_text() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    pred, ref = "The cat sat on the mat. Then it slept! Did it dream?", "The cat slept.\nIt sat on the mat first."
    expected = scorer.score("The cat slept.\nIt sat on the mat first.",
                            "The cat sat on the mat.\nThen it slept!\nDid it dream?")["rougeLsum"].fmeasure
    unsplit = scorer.score(ref, pred)["rougeLsum"].fmeasure
    assert expected != pytest.approx(unsplit)  # the splitting matters
    assert rouge([pred], [[ref]])["rougeLsum"] == pytest.approx(100 * expected)


def test_split_sentences_rule() -> None:
    assert split_sentences("One. Two!  Three? Four") == "One.\nTwo!\nThree?\nFour"
    assert split_sentences("Line one\n\nLine two. Still two") == "Line one\nLine two.\nStill two"
    assert split_sentences("3.5 million, e.g.no split") == "3.5 million, e.g.no split"
    assert split_sentences("") == ""


# --- BLEU / chrF -----------------------------------------------------------------------------------

def test_bleu_and_chrf_match_sacrebleu_single_reference() -> None:
    preds = ["Der Hund bellt laut.", "Ich habe heute keine Zeit.", ""]
    refs = [["Der Hund bellt sehr laut."], ["Heute habe ich keine Zeit."], ["Guten Morgen."]]
    streams = [[r[0] for r in refs]]
    reference = sacrebleu.metrics.BLEU()
    expected = reference.corpus_score(preds, streams).score
    assert bleu(preds, refs) == (pytest.approx(expected), str(reference.get_signature()))
    assert str(reference.get_signature()).startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
    value, signature = chrf(preds, refs)
    assert value == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    assert signature.startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")


def test_bleu_ragged_references_pad_with_none() -> None:
    preds = ["the cat is on the mat", "a quick brown fox jumps"]
    refs = [["there is a cat on the mat", "the cat is on the mat"], ["the quick brown fox jumped"]]
    streams = [["there is a cat on the mat", "the quick brown fox jumped"], ["the cat is on the mat", None]]
    expected = sacrebleu.metrics.BLEU().corpus_score(preds, streams).score
    value, signature = bleu(preds, refs)
    assert value == pytest.approx(expected)
    assert signature.startswith("nrefs:var|")
    # the second reference of example 0 is an exact match: more references can only help
    assert value > bleu(preds, [refs[0][:1], refs[1]])[0]
    assert chrf(preds, refs)[0] == pytest.approx(sacrebleu.metrics.CHRF().corpus_score(preds, streams).score)


def test_bleu_perfect_multi_reference() -> None:
    assert bleu(["a b c d e"], [["x y z", "a b c d e"]])[0] == pytest.approx(100.0)


# --- SQuAD -----------------------------------------------------------------------------------------

def test_normalize_answer_official_rules() -> None:
    assert normalize_answer("The Quick, Brown Fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("  Theory   of  the\tthings ") == "theory of things"  # "the" only as a word
    assert normalize_answer("Denver Broncos.") == "denver broncos"
    assert normalize_answer("U.S.-based") == "usbased"  # punctuation removed before splitting


def test_squad_exact_match_and_f1() -> None:
    assert squad_exact_match("the Denver Broncos!", ["Denver Broncos", "Broncos"]) == 1.0
    assert squad_exact_match("Broncos of Denver", ["Denver Broncos"]) == 0.0
    # tokens [cat, sat, on, mat] vs [cat, on, mat]: 3 shared, P = 3/4, R = 1, F1 = 2*(3/4)/(7/4) = 6/7
    assert squad_f1("The cat sat on a mat", ["cat on the mat"]) == pytest.approx(6 / 7)
    # max over references: [cat] vs [cat] is 1.0
    assert squad_f1("a cat", ["cat on the mat", "the cat"]) == pytest.approx(1.0)
    assert squad_f1("", ["cat"]) == 0.0
    assert squad_f1("the", ["a"]) == 0.0  # both normalize to nothing: no shared token, as in the official script


def test_score_task_qa_corpus_level() -> None:
    preds, refs = ["The cat sat on a mat", "Denver"], [["cat on the mat"], ["Denver Broncos", "Denver"]]
    scores, extra = score_task("qa", ["f1", "exact_match"], preds, refs)
    # f1: (6/7 + 1) / 2 x100; EM: (0 + 1) / 2 x100
    assert scores == [Score("f1", pytest.approx(100 * (6 / 7 + 1) / 2), 2), Score("exact_match", 50.0, 2)]
    assert extra == {}


# --- GSM8K -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "number"), [
    ("She pays 3 * 4 = 12 dollars.\n#### 1,234", "1234"),
    ("He has 5 apples, then 7 more, so 12 in all.", "12"),
    ("#### 42 and later 7", "42"),
    ("The answer is 12.0.", "12"),
    ("Total: $1,200.50", "1200.5"),
    ("It changed by -5", "-5"),
    ("#### -3", "-3"),
    ("A gain of +8", "8"),
    ("#### 0.00", "0"),
    ("Pages 3-4", "4"),
    ("#### unknown, maybe 9", "9"),
    ("no number here", None),
    ("", None),
])
def test_final_number(text: str, number: str | None) -> None:
    assert final_number(text) == number


def test_math_exact_match() -> None:
    assert math_exact_match("So she earns 1,000.0 dollars.", ["So 500 + 500 = 1000\n#### 1000"]) == 1.0
    assert math_exact_match("#### 18", ["18"]) == 1.0  # moa's math references are the bare final number
    assert math_exact_match("The answer is 17", ["#### 18"]) == 0.0
    assert math_exact_match("I don't know", ["18"]) == 0.0
    scores, _ = score_task("math", ["exact_match"], ["#### 5", "it is 6", "no idea"], [["5"], ["7"], ["1"]])
    assert scores == [Score("exact_match", pytest.approx(100 / 3), 3)]


def test_exact_match_is_squad_for_other_kinds() -> None:
    # "#### 5" normalizes to "5" under SQuAD rules; "five 5" does not, although its last number is 5
    scores, _ = score_task("custom", ["exact_match"], ["#### 5", "five 5"], [["5"], ["5"]])
    assert scores[0].value == 50.0


# --- classification --------------------------------------------------------------------------------

def test_parse_label() -> None:
    labels = ["negative", "positive"]
    assert parse_label(" Positive.", labels) == "positive"
    assert parse_label("positive, not negative", labels) == "positive"
    assert parse_label("not positive but NEGATIVE", labels) == "positive"  # the earliest occurrence wins
    assert parse_label("positively", labels) is None  # whole words only
    assert parse_label("", labels) is None
    assert parse_label("very positive", ["positive", "very positive"]) == "very positive"


def test_accuracy_counts_unparseable() -> None:
    preds = ["Positive", "negative review", "I cannot tell", "positive"]
    refs = [["positive"], ["negative"], ["negative"], ["negative"]]
    scores, extra = score_task("sentiment", ["accuracy"], preds, refs)
    assert scores == [Score("accuracy", 50.0, 4)]  # 2 of 4 right; the unparseable one counts as wrong
    assert extra == {"unparseable": 1}
    # labels given explicitly: "neutral" is then a label, not unparseable
    _, extra = score_task("sentiment", ["accuracy"], ["neutral"], [["positive"]], labels=["positive", "neutral"])
    assert extra == {"unparseable": 0}


def test_router_accuracy() -> None:
    assert router_accuracy(["qa", "math", "qa"], ["qa", "qa", "qa"]) == pytest.approx(200 / 3)
    with pytest.raises(MoaError):
        router_accuracy([], [])
    with pytest.raises(MoaError):
        router_accuracy(["qa"], ["qa", "math"])


# --- perplexity ------------------------------------------------------------------------------------

def test_perplexity_is_token_weighted() -> None:
    # 12 nats over 5 tokens: exp(2.4); the mean of per-example perplexities would be (e^2 + e^2.5) / 2
    assert perplexity([2.0, 10.0], [1, 4]) == pytest.approx(math.exp(2.4))
    assert perplexity([1e6], [1]) == math.inf
    scores, extra = score_task("dialogue", ["perplexity"], [], [], nll=[2.0, 10.0], n_tokens=[1, 4])
    assert scores == [Score("perplexity", pytest.approx(math.exp(2.4)), 2)]
    assert extra == {"nll_per_token": pytest.approx(2.4)}


@pytest.mark.parametrize(("nll", "n_tokens"), [([], []), ([1.0], [1, 2]), ([1.0], [0]), ([1.0, 1.0], [2, -1])])
def test_perplexity_errors(nll: list[float], n_tokens: list[int]) -> None:
    with pytest.raises(MoaError):
        perplexity(nll, n_tokens)


# --- score_task ------------------------------------------------------------------------------------

def test_score_task_summarization_order_and_values() -> None:
    scores, extra = score_task("summarization", ["rougeL", "rouge1"], PREDICTIONS, REFERENCES)
    expected = rouge(PREDICTIONS, REFERENCES)
    assert scores == [Score("rougeL", expected["rougeL"], 3), Score("rouge1", expected["rouge1"], 3)]
    assert extra == {}


def test_score_task_translation_signatures() -> None:
    preds, refs = ["Guten Tag."], [["Guten Tag!"]]
    scores, extra = score_task("translation", ["bleu", "chrf"], preds, refs)
    assert [s.metric for s in scores] == ["bleu", "chrf"]
    assert scores[0].value == pytest.approx(sacrebleu.corpus_bleu(preds, [["Guten Tag!"]]).score)
    assert extra["bleu_signature"].startswith("nrefs:1|") and extra["chrf_signature"].startswith("nrefs:1|")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"metrics": ["rougeL", "meteor"]}, "unknown metric(s) meteor: known are rouge1, rouge2"),
    ({"metrics": []}, "unknown metric"),
    ({"predictions": [], "references": []}, "0 examples"),
    ({"predictions": ["a", "b"]}, "2 predictions but 1"),
    ({"references": [[]]}, "no reference"),
    ({"metrics": ["perplexity"]}, "nll and n_tokens"),
])
def test_score_task_errors(kwargs: dict, message: str) -> None:
    args = {"kind": "qa", "metrics": ["f1"], "predictions": ["a"], "references": [["a"]]} | kwargs
    with pytest.raises(MoaError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        score_task(**args)
    assert "\n" not in str(err.value)


def test_higher_is_better() -> None:
    assert not higher_is_better("perplexity")
    assert all(higher_is_better(m) for m in metrics.KNOWN_METRICS if m != "perplexity")


def test_task_metric_names_are_known() -> None:
    config = {"tasks": dict.fromkeys(BUILTIN)}
    used = {m for name in BUILTIN for m in get_task(config, name).metrics}
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    custom = set(schema["$defs"]["task"]["properties"]["metric"]["enum"])
    assert used | custom <= set(metrics.KNOWN_METRICS)
