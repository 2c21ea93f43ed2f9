"""Evaluation metrics for moa tasks, each matching its reference implementation.

ROUGE is rouge-score's, BLEU and chrF are sacrebleu's, SQuAD EM/F1 follow the official evaluate-v1.1.py.
`METRICS` holds one record per metric name an evaluation writes (label, direction, digits, statistics,
aggregation, cost): adding a metric is one record plus the function computing its per-example statistics.
Every task metric is computed from per-example statistics (`example_statistics`): the example's own value for
metrics that are a mean over examples, sacrebleu's sufficient statistics for corpus BLEU and chrF, the
summed nll and token count for perplexity, 0 or 100 per output for format adherence. `aggregate` turns them
into the metric of any weighting of the examples, so a bootstrap resample's corpus BLEU is recomputed exactly
without sacrebleu (moa.stats), and `score_task` is the same computation on the test set itself. Values are on a
0-100 scale except perplexity.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import zip_longest

import numpy as np
import pandas as pd
from sacrebleu.metrics import BLEU, CHRF

from moa.errors import MoaError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The share of outputs that follow their task's format (its check: moa.data.tasks), the mean of a 0/100 statistic
FORMAT_ADHERENCE = "format_adherence"
ROUTER_ACCURACY = "router_accuracy"  # evaluate's metric where a router chose one expert per sequence
NO_FILTER = "none"  # the harness's filter of a metric computed on the raw responses


def harness_metric(key: str) -> str:
    """An lm-evaluation-harness result key as moa names the figure: "acc,none" -> "acc", "exact_match,strict-match"
    -> "exact_match.strict-match" (a metric under a filter)."""
    metric, _, kept = key.partition(",")
    return metric if kept in ("", NO_FILTER) else f"{metric}.{kept}"


def harness_figures(results: Mapping[str, object]) -> dict[str, float]:
    """One task's figures of the harness's results ("metric,filter" -> value): not its name, alias, sample count or
    standard errors."""
    return {key: float(value) for key, value in results.items()
            if "," in key and "_stderr," not in key and isinstance(value, int | float)}
Statistics = dict[str, np.ndarray]  # column -> [n] or [n, k], one row per example


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    n: int  # examples scored


@dataclass(frozen=True)
class Outputs:
    """What a task's metrics are computed from: each example's prediction and references (for a scored task, the
    nll and token count of its reference), the task's kind and the labels accuracy looks for."""

    kind: str
    predictions: Sequence[str]
    references: Sequence[Sequence[str]]
    labels: Sequence[str] | None = None
    nll: Sequence[float] | None = None
    n_tokens: Sequence[int] | None = None


Compute = Callable[[Outputs], tuple[Statistics, dict]]  # -> per-example statistics and extras (signatures, counts)
Aggregate = Callable[..., np.ndarray]  # (weights [R, n], each of the metric's statistics) -> its value [R]


@dataclass(frozen=True)
class Metric:
    """One metric name of an evaluation's metrics.parquet: everything evaluate, stats, the report and plots know
    about it (the table: METRICS)."""

    name: str
    label: str  # its name in the report's tables and plots
    higher_is_better: bool
    digits: int  # decimals the report shows
    statistics: tuple[str, ...] = ()  # its per-example statistics: columns of predictions.parquet
    aggregate: Aggregate | None = None  # its value under any weighting of the examples; None: not resampled
    cost: bool = False  # a serving figure (speed, latency, routing), not the task's quality: the report's cost table
    compute: Compute | None = None  # a task metric's per-example statistics; None: evaluate measures it otherwise
    scored: bool = False  # read from the likelihood of the references: nothing is generated
    per_stream: bool = False  # a figure of the whole mixed-task stream: each task carries it, with the stream's n


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


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Each example's ROUGE-1/2/L/Lsum F-measure (rouge-score, Porter stemming) x100, with the reference of
    the best F-measure. Texts are split with `split_sentences` first, which changes only Lsum (rouge-score's
    tokenizer treats newlines as spaces)."""
    _check_pairs(predictions, references)
    from rouge_score import rouge_scorer  # imports nltk (~2 s): only the tasks scored by ROUGE pay for it

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    best = [scorer.score_multi([split_sentences(r) for r in refs], split_sentences(pred))
            for pred, refs in zip(predictions, references)]
    return {key: 100 * np.array([b[key].fmeasure for b in best]) for key in ROUGE_TYPES}


# --- BLEU / chrF -----------------------------------------------------------------------------------

def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every example's k-th reference; examples with fewer references
    are padded with None, which sacrebleu skips (its signature then reads nrefs:var)."""
    return [list(stream) for stream in zip_longest(*references, fillvalue=None)]


def _sacrebleu_statistics(metric: BLEU | CHRF, predictions: Sequence[str], references: Sequence[Sequence[str]],
                          ) -> tuple[np.ndarray, str]:
    """What sacrebleu's corpus_score sums over examples, one row per example (its own extraction, which
    its paired significance tests use too), and the metric's signature."""
    _check_pairs(predictions, references)
    stats = metric._extract_corpus_statistics(list(predictions), _reference_streams(references))
    return np.array(stats, dtype=np.int64), str(metric.get_signature())


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[np.ndarray, str]:
    """Per example [hypothesis length, closest reference length, matches of 1..4-grams, 1..4-grams in the
    hypothesis] for sacrebleu's corpus BLEU (13a tokenizer, exp smoothing), and its signature."""
    return _sacrebleu_statistics(BLEU(), predictions, references)


def chrf_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[np.ndarray, str]:
    """Per example [hypothesis, reference, matching] character n-gram counts for n = 1..6 (the best
    reference's) for sacrebleu's corpus chrF, and its signature."""
    return _sacrebleu_statistics(CHRF(), predictions, references)


def bleu_score(totals: np.ndarray) -> np.ndarray:
    """sacrebleu's BLEU.compute_bleu (exp smoothing, no effective order) on summed statistics [..., 10]."""
    totals = totals.astype(float)
    sys_len, ref_len, correct, ngrams = totals[..., 0], totals[..., 1], totals[..., 2:6], totals[..., 6:10]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        brevity = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0), 1.0)
        halvings = np.cumsum(correct == 0, axis=-1)  # each order without a match halves the next smoothed one
        precision = np.where(correct > 0, 100 * correct / ngrams, 100 / (2.0 ** halvings * ngrams))
        log_mean = np.log(precision).sum(axis=-1) / 4
    # no match at all, or an order the hypotheses are too short to have (precision 0): BLEU is 0
    zero = (correct.sum(axis=-1) == 0) | (ngrams == 0).any(axis=-1)
    return np.where(zero, 0.0, brevity * np.exp(np.where(zero, 0.0, log_mean)))


def chrf_score(totals: np.ndarray, beta: float = CHRF.BETA) -> np.ndarray:
    """sacrebleu's chrF (effective-order averaging, its default) on summed statistics [..., 3 * orders]."""
    counts = totals.astype(float).reshape(*totals.shape[:-1], -1, 3)
    hyp, ref, match = counts[..., 0], counts[..., 1], counts[..., 2]
    used = (hyp > 0) & (ref > 0)  # orders both sides have: the only ones averaged
    with np.errstate(divide="ignore", invalid="ignore"):
        orders = used.sum(axis=-1)
        precision = np.where(used, match / hyp, 0.0).sum(axis=-1) / orders
        recall = np.where(used, match / ref, 0.0).sum(axis=-1) / orders
        f = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    return np.where((orders > 0) & (precision + recall > 0), 100 * f, 0.0)


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


def marked_number(text: str) -> str | None:
    """The number right after the first "####" (GSM8K's answer line), in canonical form (see final_number);
    None if no "####" is followed by a number."""
    marked = _MARKED_RE.search(text)
    return _canonical(marked) if marked else None


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K solution: the number right after the first "####", or else the last
    number in the text (a number starts at no letter/digit/"."; a "-" directly after a digit is a dash).
    Canonical form: commas, "+", "$" and leading/trailing zeros dropped ("1,234" -> "1234", "12.0" -> "12",
    "012.50" -> "12.5"), "-" kept. None if the text has no number."""
    marked = marked_number(text)
    if marked is not None:
        return marked
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
              ) -> tuple[np.ndarray, int]:
    """Each example's accuracy (100 if its parsed label is a reference, else 0), and how many predictions
    held no label (counted wrong)."""
    labels = list(labels) if labels is not None else list(dict.fromkeys(r for refs in references for r in refs))
    if not labels:
        raise MoaError("accuracy needs at least one label to look for in the predictions")
    parsed = [parse_label(p, labels) for p in predictions]
    correct = [p is not None and p.casefold() in {r.casefold() for r in refs} for p, refs in zip(parsed, references)]
    return 100 * np.array(correct, dtype=float), parsed.count(None)


def router_accuracy(chosen: Sequence[str], truth: Sequence[str]) -> float:
    """Percentage of examples whose chosen adapter is the task the example came from."""
    if not truth or len(chosen) != len(truth):
        raise MoaError(f"router accuracy needs equal, non-empty lists (got {len(chosen)} choices, {len(truth)} tasks)")
    return 100 * sum(c == t for c, t in zip(chosen, truth)) / len(truth)


# --- perplexity ------------------------------------------------------------------------------------

def _likelihoods(outputs: Outputs) -> tuple[Statistics, dict]:
    """Each example's summed negative log-likelihood (nats) and token count: corpus perplexity is
    exp(sum nll / sum n_tokens), so every token weighs the same."""
    nll, n_tokens = outputs.nll, outputs.n_tokens
    if nll is None or n_tokens is None:
        raise MoaError("perplexity needs the per-example nll and n_tokens of the references")
    if not len(nll) or len(nll) != len(n_tokens):
        raise MoaError(f"perplexity needs equal, non-empty nll and n_tokens lists (got {len(nll)}, {len(n_tokens)})")
    counts = np.asarray(n_tokens, dtype=np.int64)
    if (counts < 0).any() or counts.sum() == 0:
        raise MoaError("perplexity needs non-negative token counts with a positive total")
    losses = np.asarray(nll, dtype=float)
    return {"nll": losses, "n_tokens": counts}, {"nll_per_token": losses.sum() / counts.sum()}


def _perplexity(weights: np.ndarray, nll: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # inf, or NaN for 0 tokens drawn
        return np.exp((weights @ nll) / (weights @ n_tokens))


# --- the metric table ------------------------------------------------------------------------------

def _per_example(fn: Callable[[str, Sequence[str]], float], outputs: Outputs) -> np.ndarray:
    return 100 * np.array([fn(p, refs) for p, refs in zip(outputs.predictions, outputs.references)], dtype=float)


def _rouge(outputs: Outputs) -> tuple[Statistics, dict]:
    return rouge(outputs.predictions, outputs.references), {}


def _bleu(outputs: Outputs) -> tuple[Statistics, dict]:
    stats, signature = bleu_statistics(outputs.predictions, outputs.references)
    return {"bleu_stats": stats}, {"bleu_signature": signature}


def _chrf(outputs: Outputs) -> tuple[Statistics, dict]:
    stats, signature = chrf_statistics(outputs.predictions, outputs.references)
    return {"chrf_stats": stats}, {"chrf_signature": signature}


def _f1(outputs: Outputs) -> tuple[Statistics, dict]:
    return {"f1": _per_example(squad_f1, outputs)}, {}


def _exact_match(outputs: Outputs) -> tuple[Statistics, dict]:
    """GSM8K final-number match for kind "math", SQuAD EM otherwise."""
    return {"exact_match": _per_example(math_exact_match if outputs.kind == "math" else squad_exact_match, outputs)}, {}


def _label_accuracy(outputs: Outputs) -> tuple[Statistics, dict]:
    values, unparseable = _accuracy(outputs.predictions, outputs.references, outputs.labels)
    return {"accuracy": values}, {"unparseable": unparseable}


def _mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    return (weights @ values) / weights.sum(axis=1)


def _corpus_bleu(weights: np.ndarray, stats: np.ndarray) -> np.ndarray:
    return bleu_score(weights @ stats)


def _corpus_chrf(weights: np.ndarray, stats: np.ndarray) -> np.ndarray:
    return chrf_score(weights @ stats)


def _mean_of(name: str, label: str, compute: Compute) -> Metric:
    """A task metric that is the mean of its own per-example value (0-100), shown with 2 decimals."""
    return Metric(name, label, True, 2, (name,), _mean, compute=compute)


# One record per metric name evaluate writes; the report's tables list them in this order.
METRICS: dict[str, Metric] = {m.name: m for m in (
    *(_mean_of(name, label, _rouge)
      for name, label in zip(ROUGE_TYPES, ("ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"), strict=True)),
    Metric("bleu", "BLEU", True, 2, ("bleu_stats",), _corpus_bleu, compute=_bleu),
    Metric("chrf", "chrF", True, 2, ("chrf_stats",), _corpus_chrf, compute=_chrf),
    _mean_of("f1", "F1", _f1),
    _mean_of("exact_match", "EM", _exact_match),
    _mean_of("accuracy", "accuracy", _label_accuracy),
    Metric("perplexity", "perplexity", False, 2, ("nll", "n_tokens"), _perplexity, compute=_likelihoods, scored=True),
    Metric(FORMAT_ADHERENCE, "format adherence (%)", True, 1, ("format",), _mean),  # statistics: format_statistics
    # extras of the task metrics above
    Metric("unparseable", "predictions without a label", False, 0),
    Metric("nll_per_token", "nll per token (nats)", False, 3),
    # what serving cost (evaluate: stream_costs, latency), and how well a router chose
    Metric("new_tokens_per_s", "generated tokens/s", True, 1, cost=True, per_stream=True),
    Metric("decode_tokens_per_s", "decoding tokens/s", True, 1, cost=True, per_stream=True),
    Metric("prompt_tokens_per_s", "prefill tokens/s", True, 0, cost=True, per_stream=True),
    Metric("shared_prefix_pct", "prompt tokens from a shared prefix (%)", True, 1, cost=True, per_stream=True),
    Metric("latency_s", "latency per sequence (s)", False, 2, cost=True),
    Metric(ROUTER_ACCURACY, "router accuracy (%)", True, 2, cost=True),
)}
TASK_METRICS = tuple(name for name, m in METRICS.items() if m.compute)  # what a task can be scored by
COST_METRICS = tuple(m for m in METRICS.values() if m.cost)
STREAM_COSTS = tuple(m.name for m in COST_METRICS if m.per_stream)


# --- a task's metrics ------------------------------------------------------------------------------

def example_statistics(kind: str, metrics: Sequence[str], predictions: Sequence[str],
                       references: Sequence[Sequence[str]], nll: Sequence[float] | None = None,
                       n_tokens: Sequence[int] | None = None, labels: Sequence[str] | None = None,
                       ) -> tuple[Statistics, dict]:
    """The per-example statistics of the named task metrics (each Metric's `statistics` columns) and extras:
    bleu/chrf signatures, the count of unparseable predictions for accuracy, nll_per_token for perplexity.
    "accuracy" looks for `labels` (default: the distinct references); "perplexity" needs per-example nll and
    n_tokens instead of predictions."""
    unknown = [m for m in metrics if m not in TASK_METRICS]
    if unknown or not metrics:
        raise MoaError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}: known are {', '.join(TASK_METRICS)}")
    if not all(METRICS[m].scored for m in metrics):
        _check_pairs(predictions, references)
    outputs = Outputs(kind, predictions, references, labels, nll, n_tokens)
    wanted = {column for m in metrics for column in METRICS[m].statistics}
    stats, extra = {}, {}
    for compute in dict.fromkeys(METRICS[m].compute for m in metrics):  # once each: ROUGE's one pass gives all four
        computed, more = compute(outputs)
        stats |= {column: values for column, values in computed.items() if column in wanted}
        extra |= more
    return stats, extra


def aggregate(metric: str, stats: Mapping[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The metric under each weighting of the examples: `weights` [R, n] says how often each example
    counts (a bootstrap resample's draw counts; a row of ones is the test set itself) -> [R]. Corpus
    metrics sum their statistics first, exactly as sacrebleu's corpus_score does; perplexity is inf
    where it overflows."""
    record = METRICS[metric]
    return record.aggregate(weights, *(stats[column] for column in record.statistics))


def score_task(kind: str, metrics: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]],
               nll: Sequence[float] | None = None, n_tokens: Sequence[int] | None = None,
               labels: Sequence[str] | None = None) -> tuple[list[Score], Statistics, dict]:
    """The named metrics on the whole test set (in the given order), the per-example statistics they are
    computed from and the extras (see `example_statistics`)."""
    stats, extra = example_statistics(kind, metrics, predictions, references, nll, n_tokens, labels)
    n = len(next(iter(stats.values())))
    scores = [Score(m, float(aggregate(m, stats, np.ones((1, n)))[0]), n) for m in metrics]
    return scores, stats, extra


def format_statistics(follows: Sequence[bool]) -> Statistics:
    """Each output's format statistic: 100 if it follows its task's format, else 0 (format_adherence is its mean)."""
    return {METRICS[FORMAT_ADHERENCE].statistics[0]: 100 * np.array(follows, dtype=float)}


def statistics_columns(stats: Statistics) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Per-example statistics as columns of predictions.parquet ([n, k] ones as list columns)."""
    return {name: list(values) if values.ndim == 2 else values for name, values in stats.items()}


def read_statistics(frame: pd.DataFrame, metrics: Sequence[str], where: str) -> Statistics:
    """The per-example statistics of `metrics` from a predictions table (`where` names it in errors)."""
    columns = list(dict.fromkeys(c for m in metrics for c in METRICS[m].statistics))
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MoaError(f"{where}: no per-example statistics {', '.join(missing)} (written by an older moa?); "
                       "rerun `moa evaluate` for this method and task")
    return {c: np.stack(frame[c].to_numpy()) if frame[c].dtype == object else frame[c].to_numpy() for c in columns}
