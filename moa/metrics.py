"""Evaluation metrics for moa tasks, each matching its reference implementation.

ROUGE is rouge-score's, BLEU and chrF are sacrebleu's, SQuAD EM/F1 follow the official evaluate-v1.1.py.
`score_task` computes a task's named metrics; values are on a 0-100 scale except perplexity.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import zip_longest

from sacrebleu.metrics import BLEU, CHRF

from moa.errors import MoaError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
KNOWN_METRICS = (*ROUGE_TYPES, "bleu", "chrf", "f1", "exact_match", "accuracy", "perplexity")


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    n: int  # examples scored


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (False only for perplexity)."""
    return metric != "perplexity"


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if not predictions:
        raise MoaError("cannot score 0 examples: the prediction list is empty")
    if len(predictions) != len(references):
        raise MoaError(f"{len(predictions)} predictions but {len(references)} reference lists; they must match")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise MoaError(f"example {empty[0]} has no reference ({len(empty)} such examples); each needs at least one")


# --- ROUGE -----------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum: existing line breaks are kept, each line is further split
    after ".", "!" or "?" followed by whitespace, and empty lines are dropped."""
    sentences = (s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line))
    return "\n".join(s for s in sentences if s)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure (rouge-score, Porter stemming) x100, averaged over examples; per example the
    reference with the best F-measure counts. Texts are split with `split_sentences` first, which changes only
    Lsum (rouge-score's tokenizer treats newlines as spaces)."""
    _check_pairs(predictions, references)
    from rouge_score import rouge_scorer  # imports nltk (~2 s): only the tasks scored by ROUGE pay for it

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        best = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(pred))
        for key in ROUGE_TYPES:
            totals[key] += best[key].fmeasure
    return {key: 100 * total / len(predictions) for key, total in totals.items()}


# --- BLEU / chrF -----------------------------------------------------------------------------------

def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every example's k-th reference; examples with fewer references
    are padded with None, which sacrebleu skips (its signature then reads nrefs:var)."""
    return [list(stream) for stream in zip_longest(*references, fillvalue=None)]


def _sacrebleu(metric: BLEU | CHRF, predictions: Sequence[str], references: Sequence[Sequence[str]],
               ) -> tuple[float, str]:
    _check_pairs(predictions, references)
    result = metric.corpus_score(list(predictions), _reference_streams(references))
    return result.score, str(metric.get_signature())


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (default 13a tokenizer) and its signature; any number of references per example."""
    return _sacrebleu(BLEU(), predictions, references)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """sacrebleu corpus chrF and its signature; any number of references per example."""
    return _sacrebleu(CHRF(), predictions, references)


# --- SQuAD v1.1 (official evaluate-v1.1.py) -----------------------------------------------------------

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1_one(prediction: str, reference: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals some normalized reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """Token-overlap F1 of the normalized texts (0-1), the maximum over references."""
    return max(_squad_f1_one(prediction, r) for r in references)


# --- GSM8K -----------------------------------------------------------------------------------------

_NUMBER = r"([-+]?)\$?(-?)(\d(?:[\d,]*\d)?(?:\.\d+)?)"
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUMBER)
_MARKED_RE = re.compile(r"####\s*" + _NUMBER)


def _canonical(match: re.Match[str]) -> str:
    value = Decimal(match.group(3).replace(",", ""))
    sign = "-" if value and "-" in match.group(1) + match.group(2) else ""
    return sign + format(value.normalize(), "f")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K solution: the number right after the first "####", or else the last
    number in the text (a number starts at no letter/digit/"."; a "-" directly after a digit is a dash).
    Canonical form: commas, "+", "$" and leading/trailing zeros dropped ("1,234" -> "1234", "12.0" -> "12",
    "012.50" -> "12.5"), "-" kept. None if the text has no number."""
    marked = _MARKED_RE.search(text)
    if marked:
        return _canonical(marked)
    numbers = list(_NUMBER_RE.finditer(text))
    return _canonical(numbers[-1]) if numbers else None


def math_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the prediction's final number equals some reference's ("#### N" or a bare number), else 0.0."""
    predicted = final_number(prediction)
    return float(predicted is not None and any(predicted == final_number(r) for r in references))


# --- classification --------------------------------------------------------------------------------

def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label that occurs earliest in `text` as a whole word (case-insensitive; on a tie the longer label);
    None if no label occurs."""
    found = []
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), label))
    return min(found)[2] if found else None


def _accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]], labels: Sequence[str] | None,
              ) -> tuple[float, int]:
    """Accuracy x100 of the parsed labels, and how many predictions held no label (counted wrong)."""
    labels = list(labels) if labels is not None else list(dict.fromkeys(r for refs in references for r in refs))
    if not labels:
        raise MoaError("accuracy needs at least one label to look for in the predictions")
    parsed = [parse_label(p, labels) for p in predictions]
    correct = sum(p is not None and p.casefold() in {r.casefold() for r in refs} for p, refs in zip(parsed, references))
    return 100 * correct / len(predictions), parsed.count(None)


def router_accuracy(chosen: Sequence[str], truth: Sequence[str]) -> float:
    """Percentage of examples whose chosen adapter is the task the example came from."""
    if not truth or len(chosen) != len(truth):
        raise MoaError(f"router accuracy needs equal, non-empty lists (got {len(chosen)} choices, {len(truth)} tasks)")
    return 100 * sum(c == t for c, t in zip(chosen, truth)) / len(truth)


# --- perplexity ------------------------------------------------------------------------------------

def _nll_per_token(nll: Sequence[float], n_tokens: Sequence[int]) -> float:
    if not nll or len(nll) != len(n_tokens):
        raise MoaError(f"perplexity needs equal, non-empty nll and n_tokens lists (got {len(nll)}, {len(n_tokens)})")
    if any(n < 0 for n in n_tokens) or sum(n_tokens) == 0:
        raise MoaError("perplexity needs non-negative token counts with a positive total")
    return sum(nll) / sum(n_tokens)


def perplexity(nll: Sequence[float], n_tokens: Sequence[int]) -> float:
    """Corpus perplexity exp(sum nll / sum n_tokens): each example's summed negative log-likelihood (nats) and
    its token count, so every token weighs the same; inf if it overflows."""
    try:
        return math.exp(_nll_per_token(nll, n_tokens))
    except OverflowError:
        return math.inf


# --- a task's metrics ------------------------------------------------------------------------------

def _mean(fn: Callable[[str, Sequence[str]], float], predictions: Sequence[str],
          references: Sequence[Sequence[str]]) -> float:
    return 100 * sum(fn(p, refs) for p, refs in zip(predictions, references)) / len(predictions)


def _text_scores(kind: str, metrics: Sequence[str], predictions: Sequence[str],
                 references: Sequence[Sequence[str]], labels: Sequence[str] | None) -> tuple[dict[str, float], dict]:
    values: dict[str, float] = {}
    extra: dict = {}
    if any(m in ROUGE_TYPES for m in metrics):
        values |= rouge(predictions, references)
    for name, fn in (("bleu", bleu), ("chrf", chrf)):
        if name in metrics:
            values[name], extra[f"{name}_signature"] = fn(predictions, references)
    if "f1" in metrics:
        values["f1"] = _mean(squad_f1, predictions, references)
    if "exact_match" in metrics:
        values["exact_match"] = _mean(math_exact_match if kind == "math" else squad_exact_match,
                                      predictions, references)
    if "accuracy" in metrics:
        values["accuracy"], extra["unparseable"] = _accuracy(predictions, references, labels)
    return values, extra


def score_task(kind: str, metrics: Sequence[str], predictions: list[str], references: list[list[str]],
               nll: Sequence[float] | None = None, n_tokens: Sequence[int] | None = None,
               labels: Sequence[str] | None = None) -> tuple[list[Score], dict]:
    """The named metrics (in the given order) and extras: bleu/chrf signatures, the count of unparseable
    predictions for accuracy, nll_per_token for perplexity. "exact_match" is GSM8K final-number match for
    kind "math", SQuAD EM otherwise; "accuracy" looks for `labels` (default: the distinct references);
    "perplexity" needs per-example nll and n_tokens instead of predictions."""
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown or not metrics:
        raise MoaError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}: known are {', '.join(KNOWN_METRICS)}")
    text_metrics = [m for m in metrics if m != "perplexity"]
    values, extra = {}, {}
    if text_metrics:
        _check_pairs(predictions, references)
        values, extra = _text_scores(kind, text_metrics, predictions, references, labels)
    if "perplexity" in metrics:
        if nll is None or n_tokens is None:
            raise MoaError("perplexity needs the per-example nll and n_tokens of the references")
        values["perplexity"] = perplexity(nll, n_tokens)
        extra["nll_per_token"] = _nll_per_token(nll, n_tokens)
    return [Score(m, values[m], len(nll) if m == "perplexity" else len(predictions)) for m in metrics], extra
