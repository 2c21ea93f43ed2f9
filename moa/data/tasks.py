"""The task registry: what each task reads, how its prompt and target are built, how it is scored.

A built-in task (the six of the proposal) is defined here; a custom task is defined in the config alone
(source + template + target + references + metric, optionally `labels` naming a class-index column's values and a
`format` regex). Both become a `Task`.

Each generating task also says what a well-formed output looks like (`FormatCheck`): the report's format
adherence, whether a composition still answers in the task's format when it must tell tasks apart from the
prompt alone.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moa.errors import MoaError
from moa.metrics import FORMAT_ADHERENCE, METRICS, marked_number, normalize_answer, parse_label, split_sentences

Row = Mapping[str, Any]
Meta = Mapping[str, Any]  # a prepared example's `meta` (what its row adds to prompt, target and references)


class DropRow(Exception):
    """Raised by a builder for a row that cannot become an example; the message is the reason counted
    in the data stats."""


@dataclass(frozen=True)
class FormatCheck:
    """Whether a generated output is in the task's format (not whether it is right)."""

    rule: str  # what a well-formed output is, in words (the report lists it)
    follows: Callable[[str, Meta], bool]  # (output, the example's meta) -> in format?


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # the built-in task it is, or "custom"
    source: dict[str, Any]  # where its rows come from (see moa.data.sources)
    columns: tuple[str, ...]  # columns a row must have
    template: str  # prompt template: str.format over the row, e.g. "{translation[en]}"
    target: Callable[[Row], str]
    references: Callable[[Row], list[str]]
    metrics: tuple[str, ...]  # representative metric first
    max_new_tokens: int
    stop: tuple[str, ...] = ("\n\n",)
    truncate: str | None = None  # the long column cut to make the prompt fit
    check: Callable[[Row], None] = lambda row: None  # raises DropRow for unusable rows
    meta: Callable[[Row], dict[str, Any]] = field(default=lambda row: {})
    format: FormatCheck | None = None  # None: nothing generated to check (perplexity), or a custom task without one

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def scored(self) -> bool:
        """Evaluated by the likelihood of its target (perplexity), nothing generated: what its metrics are read from."""
        return all(METRICS[m].scored for m in self.metrics)

    @property
    def evaluated_metrics(self) -> tuple[str, ...]:
        """Its metrics, then format adherence where it has a format check: what evaluate records per example."""
        return self.metrics + ((FORMAT_ADHERENCE,) if self.format else ())

    def prompt(self, row: Row) -> str:
        try:
            return self.template.format_map(row)
        except (KeyError, IndexError) as err:
            raise MoaError(f"task {self.name}: template field {err} is not in the row "
                           f"(columns present: {', '.join(row)})") from err


def _text(value: Any, what: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise DropRow(f"empty_{what}")
    return text


# --- built-in tasks ------------------------------------------------------------------------------

def _qa_target(row: Row) -> str:
    texts = row["answers"]["text"]
    if not texts:
        raise DropRow("no_answer")
    return _text(texts[0], "target")


def _qa_check(row: Row) -> None:
    answers = row["answers"]
    for text, start in zip(answers["text"], answers["answer_start"]):
        if row["context"][start:start + len(text)] != text:
            raise DropRow("invalid_answer_span")


LABELS = {0: "negative", 1: "positive"}


def _sentiment_target(row: Row) -> str:
    try:
        return LABELS[int(row["label"])]
    except (KeyError, TypeError, ValueError):
        raise DropRow("invalid_label") from None  # GLUE's unlabeled test split has label -1


_FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def gsm8k_final(answer: str) -> str:
    match = _FINAL_NUMBER.search(answer)
    if match is None:
        raise DropRow("no_final_answer")
    return match.group(1).replace(",", "")


def _dialogue_prompt_row(row: Row) -> dict[str, Any]:
    system = (row.get("system_prompt") or "").strip()
    return dict(row) | {"system": f"{system}\n\n" if system else ""}


class _DialogueTask(Task):
    def prompt(self, row: Row) -> str:
        return super().prompt(_dialogue_prompt_row(row))


# --- format checks ---------------------------------------------------------------------------------

def _in_passage(answer: str, meta: Meta) -> bool:
    """A non-empty SQuAD-normalized answer that is a run of whole words of the normalized passage. The passage
    is the one the prompt shows (truncated as it was), kept in the example's meta by prepare-data."""
    if "context" not in meta:
        raise MoaError("task qa: the test rows' meta has no passage (`context`): they were prepared by an older moa; "
                       "rerun `moa prepare-data --task qa`")
    normalized = normalize_answer(answer)
    return bool(normalized) and f" {normalized} " in f" {normalize_answer(meta['context'])} "


# Frequent function words of each language that are not words of the other ("an", "was", "will", "hat", "war"
# are both and in neither list), and spellings rare in the other language: umlauts and ß, "sch", "tz" and noun
# suffixes in German; "th", "wh" and "-ing"/"-ly" endings in English.
GERMAN_WORDS = frozenset({
    "der", "die", "das", "den", "dem", "des", "ein", "eine", "einen", "einem", "einer", "eines", "kein", "keine",
    "und", "oder", "aber", "nicht", "ist", "sind", "wird", "werden", "wurde", "haben", "mit", "von", "zu", "zum",
    "zur", "vom", "im", "auf", "für", "über", "unter", "nach", "bei", "aus", "durch", "gegen", "ohne", "ich", "du",
    "er", "es", "sie", "wir", "ihr", "sich", "mich", "dich", "mir", "dir", "ihm", "ihn", "ihnen", "uns", "mein",
    "meine", "dein", "deine", "sein", "seine", "ihre", "unser", "unsere", "diese", "dieser", "dieses", "alle",
    "dass", "weil", "wenn", "auch", "noch", "nur", "schon", "sehr", "mehr", "jetzt", "heute", "hier", "dort", "wie",
    "wer", "warum",
})
ENGLISH_WORDS = frozenset({
    "the", "a", "and", "or", "but", "not", "no", "is", "are", "were", "be", "been", "being", "has", "have", "had",
    "would", "can", "could", "do", "does", "did", "of", "to", "for", "with", "from", "by", "at", "on", "as", "that",
    "this", "these", "those", "it", "its", "i", "you", "he", "she", "we", "they", "my", "your", "his", "her", "our",
    "their", "them", "him", "me", "what", "which", "who", "when", "where", "why", "there", "here", "very", "today",
})
_GERMAN_SPELLING = re.compile(r"[äöüß]|sch|tz|\w{3}(?:ung|ungen|keit|heit|lich|schaft)$")
_ENGLISH_SPELLING = re.compile(r"th|wh|\w{2}(?:ing|ly)$")
_WORD = re.compile(r"[^\W\d_]+")


def is_german(text: str) -> bool:
    """A light lexical language check for translation outputs: German if it has more German than English
    function words (GERMAN_WORDS, ENGLISH_WORDS: frequent words that are not words of the other language), or as
    many (most often none, in a short output) and more words with a German spelling (umlauts or ß, "sch", "tz", a
    noun suffix such as -ung or -keit) than with an English one ("th", "wh", an -ing or -ly ending). One article or
    one umlaut decides a two-word output ("Der Hund", "schöne Grüße"), and a copy of the English source, the usual
    failure, does not pass. Known failure modes: a German output without any function word or German spelling
    ("Guten Morgen", "Obama trifft Netanjahu") is not recognized, nor one of names and numbers alone; text mixing
    both languages passes when its German function words outnumber the English ones; Dutch or Scandinavian text
    may pass on "sch"/"tz" spellings; German words spelt with "th" or ending in -ing ("Theater", "gering") count as
    English spellings."""
    words = _WORD.findall(text.lower())
    german = (sum(w in GERMAN_WORDS for w in words), sum(bool(_GERMAN_SPELLING.search(w)) for w in words))
    english = (sum(w in ENGLISH_WORDS for w in words), sum(bool(_ENGLISH_SPELLING.search(w)) for w in words))
    return german > english


def _echo_free(template: str) -> FormatCheck:
    """At least one sentence of the output that is not a piece of the prompt template's own text (the instruction
    and its "Article:"/"Summary:" labels) echoed back; sentences as ROUGE-Lsum splits them, compared after SQuAD
    normalization as whole words."""
    instruction = normalize_answer("".join(literal for literal, *_ in string.Formatter().parse(template)))

    def follows(output: str, meta: Meta) -> bool:
        sentences = (normalize_answer(s) for s in split_sentences(output).splitlines())
        return any(s and f" {s} " not in f" {instruction} " for s in sentences)

    return FormatCheck("a sentence that is not the instruction echoed", follows)


def pattern_check(name: str, pattern: str) -> FormatCheck:
    """A task's `format` regex: the output follows the format if the pattern matches anywhere in it (re.search;
    anchor with ^ to match from the start). An invalid pattern is one line naming tasks.NAME.format."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise MoaError(f"tasks.{name}.format: {pattern!r} is not a valid regular expression ({err}); fix the pattern "
                       "(Python `re` syntax)") from None
    return FormatCheck(f"matches the regular expression `{pattern}`", lambda output, meta: bool(regex.search(output)))


SENTIMENT_FORMAT = FormatCheck("a sentiment label (" + " or ".join(LABELS.values()) + ") as a whole word",
                               lambda output, meta: parse_label(output, list(LABELS.values())) is not None)
MATH_FORMAT = FormatCheck("a `#### N` answer (a number right after ####)",
                          lambda output, meta: marked_number(output) is not None)
QA_FORMAT = FormatCheck("a span of the passage (after SQuAD normalization)", _in_passage)
TRANSLATION_FORMAT = FormatCheck("German (more German than English words, see moa.data.tasks.is_german)",
                                 lambda output, meta: is_german(output))


BUILTIN_SOURCES = {
    "summarization": {"type": "hf", "path": "cnn_dailymail", "name": "3.0.0"},
    "translation": {"type": "hf", "path": "wmt14", "name": "de-en"},
    "qa": {"type": "hf", "path": "squad", "splits": {"train": "train", "validation": "validation", "test": None}},
    "sentiment": {"type": "hf", "path": "glue", "name": "sst2",
                  "splits": {"train": "train", "validation": "validation", "test": None}},
    "dialogue": {"type": "hf", "path": "Open-Orca/OpenOrca",
                 "splits": {"train": "train", "validation": None, "test": None}},
    "math": {"type": "hf", "path": "gsm8k", "name": "main", "splits": {"train": "train", "validation": None,
                                                                    "test": "test"}},
}


def _builtin(name: str, kind: str, source: dict[str, Any], template: str | None) -> Task:
    common = {"name": name, "kind": kind, "source": source}
    if kind == "summarization":
        template = template or "Summarize the news article in a few short sentences.\n\nArticle: {article}\n\nSummary:"
        return Task(**common, columns=("article", "highlights"), truncate="article", template=template,
                    target=lambda r: _text(r["highlights"], "target"),
                    references=lambda r: [_text(r["highlights"], "target")],
                    metrics=("rougeL", "rouge1", "rouge2", "rougeLsum"), max_new_tokens=96,
                    format=_echo_free(template))
    if kind == "translation":
        return Task(**common, columns=("translation",), stop=("\n",),
                    template=template or "Translate from English to German.\n\nEnglish: {translation[en]}\nGerman:",
                    target=lambda r: _text(r["translation"]["de"], "target"),
                    references=lambda r: [_text(r["translation"]["de"], "target")],
                    metrics=("bleu", "chrf"), max_new_tokens=64, format=TRANSLATION_FORMAT)
    if kind == "qa":
        return Task(**common, columns=("context", "question", "answers"), truncate="context", stop=("\n",),
                    template=template or "Answer the question with a short phrase copied from the passage.\n\n"
                                         "Passage: {context}\n\nQuestion: {question}\nAnswer:",
                    target=_qa_target, references=lambda r: list(dict.fromkeys(r["answers"]["text"])),
                    check=_qa_check, metrics=("f1", "exact_match"), max_new_tokens=24,
                    meta=lambda r: {"answer_start": list(r["answers"]["answer_start"]), "context": r["context"]},
                    format=QA_FORMAT)
    if kind == "sentiment":
        return Task(**common, columns=("sentence", "label"), stop=("\n",),
                    template=template or "Is the sentiment of this movie review positive or negative?\n\n"
                                         "Review: {sentence}\nSentiment:",
                    target=_sentiment_target, references=lambda r: [_sentiment_target(r)],
                    metrics=("accuracy",), max_new_tokens=4, meta=lambda r: {"label": int(r["label"])},
                    format=SENTIMENT_FORMAT)
    if kind == "dialogue":
        return _DialogueTask(**common, columns=("question", "response"), truncate="question",
                             template=template or "{system}User: {question}\nAssistant:",
                             target=lambda r: _text(r["response"], "target"),
                             references=lambda r: [_text(r["response"], "target")],
                             metrics=("perplexity",), max_new_tokens=128)
    if kind == "math":
        return Task(**common, columns=("question", "answer"),
                    template=template or "Solve the math word problem step by step. End with '#### <answer>'.\n\n"
                                         "Question: {question}\nAnswer:",
                    target=lambda r: _text(r["answer"], "target"), references=lambda r: [gsm8k_final(r["answer"])],
                    check=lambda r: gsm8k_final(r["answer"]) and None,
                    metrics=("exact_match",), max_new_tokens=192, format=MATH_FORMAT)
    raise AssertionError(kind)


BUILTIN = tuple(BUILTIN_SOURCES)


# --- custom tasks ----------------------------------------------------------------------------------

def template_fields(template: str) -> list[str]:
    """Top-level columns a str.format template reads ("{a[b]}" reads column a)."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return list(dict.fromkeys(re.split(r"[.\[]", f, maxsplit=1)[0] for f in names))


def _render(template: str, row: Row) -> str:
    return template.format_map(row)


Labels = Mapping[str, Sequence[str]]  # a custom task's `labels`: class-index column -> the names of 0, 1, ...


def named(labels: Labels, row: Row) -> Row:
    """The row with each class-index column's value replaced by its name (DropRow where it has none)."""
    if not labels:
        return row
    out = dict(row)
    for column, names in labels.items():
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
            raise DropRow("invalid_label")
        out[column] = names[value]
    return out


@dataclass(frozen=True)
class _CustomTask(Task):
    labels: Labels = field(default_factory=dict)

    def prompt(self, row: Row) -> str:
        return super().prompt(named(self.labels, row))


def _custom(name: str, spec: Mapping[str, Any]) -> Task:
    missing = [k for k in ("template", "target", "metric") if k not in spec]
    if missing:
        raise MoaError(f"tasks.{name}: a custom task needs {', '.join(missing)} "
                       f"(or use a built-in name: {', '.join(BUILTIN)})")
    references = spec.get("references") or [spec["target"]]
    labels = spec.get("labels", {})
    columns = template_fields(spec["template"] + spec["target"] + "".join(references)) + list(labels)
    return _CustomTask(name=name, kind="custom", source=dict(spec["source"]), columns=tuple(dict.fromkeys(columns)),
                       template=spec["template"], labels=labels,
                       target=lambda r: _text(_render(spec["target"], named(labels, r)), "target"),
                       references=lambda r: [_render(t, named(labels, r)).strip() for t in references],
                       check=lambda r: named(labels, r) and None,
                       metrics=(spec["metric"],), max_new_tokens=spec.get("max_new_tokens", 64),
                       stop=tuple(spec.get("stop", ("\n\n",))), truncate=spec.get("truncate"))


def get_task(config: Mapping[str, Any], name: str) -> Task:
    """The task `name` of a validated config."""
    tasks = config["tasks"]
    if name not in tasks:
        raise MoaError(f"unknown task {name!r}: the config defines {', '.join(tasks)}")
    spec = tasks[name] or {}
    if name not in BUILTIN:
        if "source" not in spec:
            raise MoaError(f"tasks.{name}: a custom task needs a source (type synthetic, hf or local)")
        task = _custom(name, spec)
    else:
        task = _builtin(name, name, dict(spec.get("source") or BUILTIN_SOURCES[name]), spec.get("template"))
        task = dataclasses.replace(task, **{k: (tuple(v) if k == "stop" else v) for k, v in spec.items()
                                            if k in ("max_new_tokens", "stop")})
    if "format" not in spec:
        return task
    if task.scored:
        raise MoaError(f"tasks.{name}.format: {name} is scored by the perplexity of its target and generates no "
                       "output to check; remove the format")
    return dataclasses.replace(task, format=pattern_check(name, spec["format"]))
