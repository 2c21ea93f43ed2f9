"""Synthetic data: an offline stand-in for moa's six task datasets.

What this is: seeded generators (stdlib `random` only, no network) that write rows in the same schema as
each real dataset (cnn_dailymail 3.0.0, wmt14 de-en, squad v1.1, glue/sst2, OpenOrca, gsm8k main), so
the whole pipeline -- data preparation, LoRA training, routing, merging, evaluation -- runs without a
dataset hub. Every target is derivable from its input by fixed rules, vocabularies are small and
outputs short, so a ~135M-parameter model's LoRA can learn each task in a few hundred steps.

What this is not: a benchmark. Scores on these rows show that the pipeline works and that adapters
learned task-shaped mappings; they say nothing about, and are not comparable to, results on the real
datasets.

Guarantees: the same (task, n, seed, split) gives identical rows; rows within a split have distinct
inputs; and each input belongs to exactly one split (a hash of it picks the split), so train,
validation and test never share an input whatever the seeds.

Layout: one module per task holds its generator and the rule that makes its targets (summarization, translation,
qa, sentiment, dialogue, math); `common` holds what several of them share.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from moa.data.synthetic import dialogue, math, qa, sentiment, summarization, translation
from moa.data.synthetic.common import Row
from moa.data.synthetic.translation import NP, PP, Clause, Nominal, Pro, render_translation
from moa.errors import MoaError

__all__ = [
    "NP",
    "PP",
    "SCHEMAS",
    "SPLITS",
    "TASKS",
    "Clause",
    "Nominal",
    "Pro",
    "Row",
    "generate",
    "render_translation",
]

TASKS = ("summarization", "translation", "qa", "sentiment", "dialogue", "math")
SPLITS = ("train", "validation", "test")
SCHEMAS: dict[str, tuple[str, ...]] = {
    "summarization": ("article", "highlights", "id"),
    "translation": ("translation",),
    "qa": ("id", "title", "context", "question", "answers"),
    "sentiment": ("sentence", "label", "idx"),
    "dialogue": ("id", "system_prompt", "question", "response"),
    "math": ("question", "answer"),
}

# Share of the input space owned by each split: hash(input) % 4 picks the split. The shares set how many
# candidates a split rejects (not how many rows it gets), so smaller held-out shares would only make
# validation and test rows slower to generate.
_SPLIT_BUCKETS = {"train": range(2), "validation": range(2, 3), "test": range(3, 4)}


def generate(task: str, n: int, seed: int, split: str) -> list[Row]:
    """`n` distinct rows of `task` in its real dataset's schema, deterministic in (task, n, seed, split)."""
    if task not in _GENERATORS:
        raise MoaError(f"unknown synthetic task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in _SPLIT_BUCKETS:
        raise MoaError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if n < 0:
        raise MoaError(f"cannot generate a negative number of rows ({n})")
    make, key = _GENERATORS[task]
    rng = random.Random(f"moa.synthetic:{task}:{split}:{seed}")
    rows: list[Row] = []
    seen: set[str] = set()
    budget = 100 * n + 1000  # far above what any split needs; stops a loop if a space ran dry
    while len(rows) < n and budget:
        budget -= 1
        row = make(rng)
        text = key(row)
        if text not in seen and _split_of(task, text) == split:
            seen.add(text)
            rows.append(row)
    if len(rows) < n:
        raise MoaError(f"synthetic {task}: only {len(rows)} distinct {split} rows could be generated, asked for {n}")
    if task == "sentiment":  # GLUE's idx is the row's position in its split
        rows = [{**row, "idx": i} for i, row in enumerate(rows)]
    return rows


def _split_of(task: str, text: str) -> str:
    bucket = zlib.crc32(f"{task}\0{text}".encode()) % 4
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


# task -> (row generator, the input text that must be unique and that picks the split)
_GENERATORS: dict[str, tuple[Callable[[random.Random], Row], Callable[[Row], str]]] = {
    "summarization": (summarization.make_row, lambda r: str(r["article"])),
    "translation": (translation.make_row, lambda r: r["translation"]["en"]),  # type: ignore[index]
    "qa": (qa.make_row, lambda r: f"{r['context']}\n{r['question']}"),
    "sentiment": (sentiment.make_row, lambda r: str(r["sentence"])),
    "dialogue": (dialogue.make_row, lambda r: f"{r['system_prompt']}\n{r['question']}"),
    "math": (math.make_row, lambda r: str(r["question"])),
}
