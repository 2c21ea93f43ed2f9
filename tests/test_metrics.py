"""moa.metrics against rouge-score and sacrebleu called directly, and against hand-computed official values;
per-example statistics recompute any resample's corpus BLEU and chrF as sacrebleu does."""

import math
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sacrebleu
import yaml
from rouge_score import rouge_scorer

from moa.config import SCHEMA_PATH
from moa.data.sources import load_split
from moa.data.tasks import BUILTIN, get_task, is_german
from moa.errors import MoaError
from moa.experiment import validate
from moa.metrics import (
    FORMAT_ADHERENCE,
    METRICS,
    TASK_METRICS,
    Score,
    aggregate,
    example_statistics,
    final_number,
    format_statistics,
    marked_number,
    math_exact_match,
    normalize_answer,
    parse_label,
    read_statistics,
    rouge,
    router_accuracy,
    score_task,
    split_sentences,
    squad_exact_match,
    squad_f1,
    statistics_columns,
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
        np.testing.assert_allclose(got[key], 100 * np.array(best), rtol=1e-12)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_rouge_empty_prediction_scores_zero() -> None:
    assert all(v.tolist() == [0.0] for v in rouge([""], [["Some reference text."]]).values())


def test_rouge_lsum_splits_sentences_like_pre_split_text() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    pred, ref = "The cat sat on the mat. Then it slept! Did it dream?", "The cat slept.\nIt sat on the mat first."
    expected = scorer.score("The cat slept.\nIt sat on the mat first.",
                            "The cat sat on the mat.\nThen it slept!\nDid it dream?")["rougeLsum"].fmeasure
    unsplit = scorer.score(ref, pred)["rougeLsum"].fmeasure
    assert expected != pytest.approx(unsplit)  # the splitting matters
    assert rouge([pred], [[ref]])["rougeLsum"][0] == pytest.approx(100 * expected)


def test_split_sentences_rule() -> None:
    assert split_sentences("One. Two!  Three? Four") == "One.\nTwo!\nThree?\nFour"
    assert split_sentences("Line one\n\nLine two. Still two") == "Line one\nLine two.\nStill two"
    assert split_sentences("3.5 million, e.g.no split") == "3.5 million, e.g.no split"
    assert split_sentences("") == ""


# --- BLEU / chrF -----------------------------------------------------------------------------------

def corpus(metric: str, predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    scores, _, extra = score_task("translation", [metric], predictions, references)
    return scores[0].value, extra[f"{metric}_signature"]


def test_bleu_and_chrf_match_sacrebleu_single_reference() -> None:
    preds = ["Der Hund bellt laut.", "Ich habe heute keine Zeit.", ""]
    refs = [["Der Hund bellt sehr laut."], ["Heute habe ich keine Zeit."], ["Guten Morgen."]]
    streams = [[r[0] for r in refs]]
    reference = sacrebleu.metrics.BLEU()
    expected = reference.corpus_score(preds, streams).score
    assert corpus("bleu", preds, refs) == (pytest.approx(expected, rel=1e-13), str(reference.get_signature()))
    assert str(reference.get_signature()).startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
    value, signature = corpus("chrf", preds, refs)
    assert value == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score, rel=1e-13)
    assert signature.startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")


def test_bleu_ragged_references_pad_with_none() -> None:
    preds = ["the cat is on the mat", "a quick brown fox jumps"]
    refs = [["there is a cat on the mat", "the cat is on the mat"], ["the quick brown fox jumped"]]
    streams = [["there is a cat on the mat", "the quick brown fox jumped"], ["the cat is on the mat", None]]
    expected = sacrebleu.metrics.BLEU().corpus_score(preds, streams).score
    value, signature = corpus("bleu", preds, refs)
    assert value == pytest.approx(expected, rel=1e-13)
    assert signature.startswith("nrefs:var|")
    # the second reference of example 0 is an exact match: more references can only help
    assert value > corpus("bleu", preds, [refs[0][:1], refs[1]])[0]
    assert corpus("chrf", preds, refs)[0] == pytest.approx(
        sacrebleu.metrics.CHRF().corpus_score(preds, streams).score, rel=1e-13)


def test_bleu_perfect_multi_reference() -> None:
    assert corpus("bleu", ["a b c d e"], [["x y z", "a b c d e"]])[0] == pytest.approx(100.0)


def random_corpus(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Short and long sentences over a small vocabulary, 1-3 references each: every BLEU branch occurs in
    its subsets (no 4-gram match, too few words for a 4-gram, empty hypotheses, brevity penalty)."""
    rng = np.random.default_rng(seed)
    vocab = ["der", "die", "das", "Hund", "Katze", "bellt", "schläft", "laut", "heute", "nicht", ",", "."]

    def sentence() -> str:
        return " ".join(rng.choice(vocab, size=rng.integers(0, 9)))

    refs = [[sentence() or "Hund" for _ in range(rng.integers(1, 4))] for _ in range(n)]
    preds = [r[0] if rng.random() < 0.2 else sentence() for r in refs]
    return preds, refs


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_corpus_metrics_of_any_resample_equal_sacrebleu(metric: str) -> None:
    """A bootstrap resample's corpus score, from the summed per-example statistics, is sacrebleu's corpus
    score of the resampled examples (exact up to numpy's exp/log, which may differ from libm's in the last
    bit); on the full set the summed statistics are sacrebleu's own, integer for integer."""
    preds, refs = random_corpus(40, seed=0)
    stats, _ = example_statistics("translation", [metric], preds, refs)
    reference = sacrebleu.metrics.BLEU() if metric == "bleu" else sacrebleu.metrics.CHRF()
    streams = [list(s) for s in zip_longest(*refs)]
    full = reference._extract_corpus_statistics(preds, streams)
    np.testing.assert_array_equal(stats[f"{metric}_stats"].sum(axis=0), np.sum(full, axis=0))
    rng = np.random.default_rng(1)
    draws = [rng.integers(0, len(preds), size=rng.integers(1, 12)) for _ in range(300)]
    weights = np.stack([np.bincount(d, minlength=len(preds)) for d in draws]).astype(float)
    got = aggregate(metric, stats, np.vstack([np.ones(len(preds)), weights]))
    expected = [reference.corpus_score(preds, streams).score]
    for d in draws:
        picked = [refs[i] for i in d]
        expected.append(reference.corpus_score([preds[i] for i in d],
                                               [list(s) for s in zip_longest(*picked)]).score)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
    assert 0 < np.mean(np.array(expected) == 0) < 0.5  # not vacuous: zero and non-zero scores both occur


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
    scores, stats, extra = score_task("qa", ["f1", "exact_match"], preds, refs)
    # f1: (6/7 + 1) / 2 x100; EM: (0 + 1) / 2 x100
    assert scores == [Score("f1", pytest.approx(100 * (6 / 7 + 1) / 2), 2), Score("exact_match", 50.0, 2)]
    assert extra == {}
    np.testing.assert_allclose(stats["f1"], [600 / 7, 100.0])
    np.testing.assert_array_equal(stats["exact_match"], [0.0, 100.0])


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
    scores, _, _ = score_task("math", ["exact_match"], ["#### 5", "it is 6", "no idea"], [["5"], ["7"], ["1"]])
    assert scores == [Score("exact_match", pytest.approx(100 / 3), 3)]


def test_exact_match_is_squad_for_other_kinds() -> None:
    # "#### 5" normalizes to "5" under SQuAD rules; "five 5" does not, although its last number is 5
    scores, _, _ = score_task("custom", ["exact_match"], ["#### 5", "five 5"], [["5"], ["5"]])
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
    scores, stats, extra = score_task("sentiment", ["accuracy"], preds, refs)
    assert scores == [Score("accuracy", 50.0, 4)]  # 2 of 4 right; the unparseable one counts as wrong
    assert stats["accuracy"].tolist() == [100.0, 100.0, 0.0, 0.0]
    assert extra == {"unparseable": 1}
    # labels given explicitly: "neutral" is then a label, not unparseable
    _, _, extra = score_task("sentiment", ["accuracy"], ["neutral"], [["positive"]], labels=["positive", "neutral"])
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
    scores, stats, extra = score_task("dialogue", ["perplexity"], [], [], nll=[2.0, 10.0], n_tokens=[1, 4])
    assert scores == [Score("perplexity", pytest.approx(math.exp(2.4)), 2)]
    assert extra == {"nll_per_token": pytest.approx(2.4)}
    assert stats["n_tokens"].tolist() == [1, 4]
    assert score_task("dialogue", ["perplexity"], [], [], nll=[1e6], n_tokens=[1])[0][0].value == math.inf
    # a resample drawing the second example twice: exp((10 + 10) / 8)
    assert aggregate("perplexity", stats, np.array([[0.0, 2.0]]))[0] == pytest.approx(math.exp(2.5))


@pytest.mark.parametrize(("nll", "n_tokens"), [([], []), ([1.0], [1, 2]), ([1.0], [0]), ([1.0, 1.0], [2, -1])])
def test_perplexity_errors(nll: list[float], n_tokens: list[int]) -> None:
    with pytest.raises(MoaError):
        score_task("dialogue", ["perplexity"], [], [], nll=nll, n_tokens=n_tokens)


# --- score_task ------------------------------------------------------------------------------------

def test_score_task_summarization_order_and_values() -> None:
    scores, stats, extra = score_task("summarization", ["rougeL", "rouge1"], PREDICTIONS, REFERENCES)
    expected = rouge(PREDICTIONS, REFERENCES)
    assert scores == [Score("rougeL", pytest.approx(expected["rougeL"].mean()), 3),
                      Score("rouge1", pytest.approx(expected["rouge1"].mean()), 3)]
    assert extra == {} and set(stats) == {"rougeL", "rouge1"}  # only the statistics of the metrics asked for


def test_score_task_translation_signatures() -> None:
    preds, refs = ["Guten Tag."], [["Guten Tag!"]]
    scores, _, extra = score_task("translation", ["bleu", "chrf"], preds, refs)
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


def test_metric_records_are_consistent() -> None:
    """A metric is resampled exactly when it has per-example statistics; costs and extras have none; only a task
    metric (one with a compute) can be scored from likelihoods; perplexity alone of them is lower-better."""
    assert all(name == m.name for name, m in METRICS.items())
    for m in METRICS.values():
        assert bool(m.statistics) == (m.aggregate is not None), m.name
        assert not (m.cost and m.statistics) and (m.cost or not m.per_stream), m.name
        assert bool(m.compute) >= m.scored and m.digits >= 0 and m.label, m.name
    assert [m for m in TASK_METRICS if not METRICS[m].higher_is_better] == ["perplexity"]
    assert METRICS[FORMAT_ADHERENCE].statistics and not METRICS[FORMAT_ADHERENCE].compute


def test_task_metric_names_are_known() -> None:
    """The schema's custom-task metrics and every built-in task's metrics are task metrics of the table; a task is
    scored (nothing generated) exactly when its metric is perplexity."""
    config = {"tasks": dict.fromkeys(BUILTIN)}
    used = {m for name in BUILTIN for m in get_task(config, name).metrics}
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    custom = schema["$defs"]["task"]["properties"]["metric"]["enum"]
    assert used | set(custom) <= set(TASK_METRICS)
    for metric in custom:
        spec = {"source": {"type": "local", "path": "x.jsonl"}, "template": "{q}", "target": "{a}", "metric": metric}
        assert get_task({"tasks": {"mine": spec}}, "mine").scored == (metric == "perplexity")
    assert [name for name in BUILTIN if get_task(config, name).scored] == ["dialogue"]


def test_statistics_round_trip_through_parquet(tmp_path) -> None:
    """What evaluate writes to predictions.parquet is what the report reads back, for every kind of column."""
    preds, refs = random_corpus(6, seed=2)
    stats, _ = example_statistics("translation", ["bleu", "chrf", "rouge1"], preds, refs)
    stats |= example_statistics("dialogue", ["perplexity"], [], [], nll=[1.5] * 6, n_tokens=[3] * 6)[0]
    path = tmp_path / "predictions.parquet"
    pd.DataFrame({"id": range(6)} | statistics_columns(stats)).to_parquet(path)
    back = read_statistics(pd.read_parquet(path), ["bleu", "chrf", "rouge1", "perplexity"], str(path))
    assert back.keys() == stats.keys()
    for name, values in stats.items():
        np.testing.assert_array_equal(back[name], values)
        assert back[name].shape == values.shape
    with pytest.raises(MoaError, match=r"predictions.parquet: no per-example statistics f1 .*rerun `moa evaluate`"):
        read_statistics(pd.read_parquet(path), ["f1"], str(path))
    assert {m for m, record in METRICS.items() if record.statistics} == {*TASK_METRICS, FORMAT_ADHERENCE}


# --- format adherence ------------------------------------------------------------------------------

BUILTIN_TASKS = {"tasks": dict.fromkeys(BUILTIN)}


def follows(task: str, outputs: list[str], meta: dict | None = None, config: dict = BUILTIN_TASKS) -> list[bool]:
    check = get_task(config, task).format
    return [check.follows(output, meta or {}) for output in outputs]


def test_sentiment_format_is_a_whole_word_label() -> None:
    assert follows("sentiment", ["positive", "  Negative.", "It is negative, clearly", "POSITIVE!"]) == [True] * 4
    assert follows("sentiment", ["", "positively", "nonnegative", "neutral", "   "]) == [False] * 5


def test_math_format_is_a_marked_answer() -> None:
    assert follows("math", ["#### 42", "3 + 4 = 7\n#### 7", "####-3.5", "  #### $1,000"]) == [True] * 4
    assert follows("math", ["", "The answer is 42", "####", "#### forty-two", "# 42"]) == [False] * 5
    assert marked_number("3 + 4 = 7\n#### 7") == "7" and marked_number("The answer is 42") is None
    assert final_number("The answer is 42") == "42"  # the metric falls back to the last number; the format does not


def test_qa_format_is_a_span_of_the_passage_after_squad_normalization() -> None:
    meta = {"context": "The Eiffel Tower, built in 1889, stands in Paris."}
    assert follows("qa", ["The Eiffel tower.", "eiffel tower", "  1889", "an Eiffel Tower", "stands in paris!"],
                   meta) == [True] * 5  # articles, case and punctuation are normalized away
    assert follows("qa", ["", "The", "London", "iffel", "Tower in Paris"], meta) == [False] * 5  # whole words only
    with pytest.raises(MoaError, match=r"task qa: the test rows' meta has no passage .*rerun `moa prepare-data"):
        follows("qa", ["Paris"], {"answer_start": [0]})


def test_qa_meta_keeps_the_passage_the_prompt_shows() -> None:
    row = {"context": "Ada wrote the notes.", "question": "Who wrote the notes?",
           "answers": {"text": ["Ada"], "answer_start": [0]}}
    task = get_task(BUILTIN_TASKS, "qa")
    assert task.meta(row)["context"] in task.prompt(row)


def test_translation_format_is_german() -> None:
    german = ["Der Hund schläft.", "Die Mäuse sind neben dem grünen Tisch.", "schöne Grüße", "Zeitung",
              "Ich bin in unserer Bibliothek.", "Wiederaufnahme der Sitzungsperiode", "  Das ist gut"]
    english = ["The dog sleeps.", "Resumption of the session", "The Schützenfest is fun", "Hello", "", "2009"]
    assert follows("translation", german) == [True] * len(german)
    assert follows("translation", english) == [False] * len(english)
    assert not is_german("Guten Morgen")  # documented failure mode: no function word, no German spelling


def test_translation_format_on_the_synthetic_corpus() -> None:
    rows = load_split({"type": "synthetic"}, "test", task="translation", n=300, seed=3, base_dir=Path("."))
    pairs = [row["translation"] for row in rows]
    assert not any(is_german(pair["en"]) for pair in pairs)  # the source copied is never German
    assert sum(is_german(pair["de"]) for pair in pairs) >= 0.99 * len(pairs)


def test_summarization_format_is_a_sentence_not_the_instruction() -> None:
    echoes = ["", "Summarize the news article in a few short sentences.", "Summary:", "  article:",
              "Summarize the news article in a few short sentences.\nSummary:", "..."]
    assert follows("summarization", echoes) == [False] * len(echoes)
    summaries = ["The mayor opened a bridge.", "Summary: Mayor opens bridge in Pinecrest.",
                 "Summarize the news article in a few short sentences. The bridge cost $59 million."]
    assert follows("summarization", summaries) == [True] * len(summaries)
    own = {"tasks": {"summarization": {"template": "TL;DR of {article}:"}}}  # the check follows the template
    assert follows("summarization", ["Summarize the news article.", "TL;DR:"], config=own) == [True, False]


def test_dialogue_has_no_format_and_others_record_it() -> None:
    assert get_task(BUILTIN_TASKS, "dialogue").format is None
    assert get_task(BUILTIN_TASKS, "dialogue").evaluated_metrics == ("perplexity",)
    assert get_task(BUILTIN_TASKS, "qa").evaluated_metrics == ("f1", "exact_match", FORMAT_ADHERENCE)
    stats = format_statistics([True, False, True, True])
    assert stats == {"format": pytest.approx([100.0, 0.0, 100.0, 100.0])}
    weights = np.array([[1, 1, 1, 1], [0, 2, 1, 0]])  # the test set; a resample drawing the 2nd twice, the 3rd once
    assert aggregate(FORMAT_ADHERENCE, stats, weights).tolist() == pytest.approx([75.0, 100 / 3])


def yes_no(**spec: object) -> dict:
    return {"experiment": "x", "tasks": {"yn": {"source": {"type": "synthetic", "generator": "sentiment"},
                                                "template": "{sentence}?", "target": "yes", "metric": "accuracy"}
                                         | spec}}


def test_custom_format_regex() -> None:
    config = validate(yes_no(format="^\\s*(yes|no)\\b"))
    assert follows("yn", ["yes, it is", "  no", "No"], config=config) == [True, True, False]  # case-sensitive
    assert follows("yn", ["", "maybe yes", "nope"], config=config) == [False, False, False]
    assert get_task(validate(yes_no()), "yn").format is None  # a custom task without one is not checked
    own = validate({"experiment": "x", "tasks": {"sentiment": {"format": "^(positive|negative)$"}}})
    assert follows("sentiment", ["positive", "positive!"], config=own) == [True, False]  # replaces the built-in


@pytest.mark.parametrize(("config", "message"), [
    (yes_no(format="(yes|no"), (r"config: tasks\.yn\.format: '\(yes\|no' is not a valid regular expression "
                                r"\(missing \), unterminated subpattern at position 0\); fix the pattern")),
    ({"experiment": "x", "tasks": {"dialogue": {"format": "."}}},
     r"config: tasks\.dialogue\.format: dialogue is scored by the perplexity of its target and generates no output"),
], ids=["invalid-regex", "scored-task"])
def test_bad_format_is_one_line_when_the_config_is_validated(config: dict, message: str) -> None:
    with pytest.raises(MoaError, match=message) as err:
        validate(config)
    assert "\n" not in str(err.value)
