"""The task registry: what each task reads, how its prompt and target are built, how it is scored.

A built-in task (the six of the proposal) is defined here; a custom task is defined in the config alone
(source + template + target + references + metric). Both become a `Task`.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moa.errors import MoaError

Row = Mapping[str, Any]


class DropRow(Exception):
    """Raised by a builder for a row that cannot become an example; the message is the reason counted
    in the data stats."""


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
    scored: bool = False  # evaluated by likelihood of the target (perplexity), not generation
    meta: Callable[[Row], dict[str, Any]] = field(default=lambda row: {})

    @property
    def metric(self) -> str:
        return self.metrics[0]

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
        return Task(**common, columns=("article", "highlights"), truncate="article",
                    template=template or "Summarize the news article in a few short sentences.\n\n"
                                         "Article: {article}\n\nSummary:",
                    target=lambda r: _text(r["highlights"], "target"),
                    references=lambda r: [_text(r["highlights"], "target")],
                    metrics=("rougeL", "rouge1", "rouge2", "rougeLsum"), max_new_tokens=96)
    if kind == "translation":
        return Task(**common, columns=("translation",), stop=("\n",),
                    template=template or "Translate from English to German.\n\nEnglish: {translation[en]}\nGerman:",
                    target=lambda r: _text(r["translation"]["de"], "target"),
                    references=lambda r: [_text(r["translation"]["de"], "target")],
                    metrics=("bleu", "chrf"), max_new_tokens=64)
    if kind == "qa":
        return Task(**common, columns=("context", "question", "answers"), truncate="context", stop=("\n",),
                    template=template or "Answer the question with a short phrase copied from the passage.\n\n"
                                         "Passage: {context}\n\nQuestion: {question}\nAnswer:",
                    target=_qa_target, references=lambda r: list(dict.fromkeys(r["answers"]["text"])),
                    check=_qa_check, metrics=("f1", "exact_match"), max_new_tokens=24,
                    meta=lambda r: {"answer_start": list(r["answers"]["answer_start"])})
    if kind == "sentiment":
        return Task(**common, columns=("sentence", "label"), stop=("\n",),
                    template=template or "Is the sentiment of this movie review positive or negative?\n\n"
                                         "Review: {sentence}\nSentiment:",
                    target=_sentiment_target, references=lambda r: [_sentiment_target(r)],
                    metrics=("accuracy",), max_new_tokens=4, meta=lambda r: {"label": int(r["label"])})
    if kind == "dialogue":
        return _DialogueTask(**common, columns=("question", "response"), truncate="question", scored=True,
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
                    metrics=("exact_match",), max_new_tokens=192)
    raise AssertionError(kind)


BUILTIN = tuple(BUILTIN_SOURCES)


# --- custom tasks ----------------------------------------------------------------------------------

def template_fields(template: str) -> list[str]:
    """Top-level columns a str.format template reads ("{a[b]}" reads column a)."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return list(dict.fromkeys(re.split(r"[.\[]", f, maxsplit=1)[0] for f in names))


def _render(template: str, row: Row) -> str:
    return template.format_map(row)


def _custom(name: str, spec: Mapping[str, Any]) -> Task:
    missing = [k for k in ("template", "target", "metric") if k not in spec]
    if missing:
        raise MoaError(f"tasks.{name}: a custom task needs {', '.join(missing)} "
                       f"(or use a built-in name: {', '.join(BUILTIN)})")
    references = spec.get("references") or [spec["target"]]
    columns = template_fields(spec["template"] + spec["target"] + "".join(references))
    return Task(name=name, kind="custom", source=dict(spec["source"]), columns=tuple(columns),
                template=spec["template"], target=lambda r: _text(_render(spec["target"], r), "target"),
                references=lambda r: [_render(t, r).strip() for t in references],
                metrics=(spec["metric"],), max_new_tokens=spec.get("max_new_tokens", 64),
                stop=tuple(spec.get("stop", ("\n\n",))), truncate=spec.get("truncate"),
                scored=spec["metric"] == "perplexity")


def get_task(config: Mapping[str, Any], name: str) -> Task:
    """The task `name` of a validated config."""
    tasks = config["tasks"]
    if name not in tasks:
        raise MoaError(f"unknown task {name!r}: the config defines {', '.join(tasks)}")
    spec = tasks[name] or {}
    if name not in BUILTIN:
        if "source" not in spec:
            raise MoaError(f"tasks.{name}: a custom task needs a source (type synthetic, hf or local)")
        return _custom(name, spec)
    task = _builtin(name, name, dict(spec.get("source") or BUILTIN_SOURCES[name]), spec.get("template"))
    overrides = {k: (tuple(v) if k == "stop" else v) for k, v in spec.items() if k in ("max_new_tokens", "stop")}
    return dataclasses.replace(task, **overrides)
