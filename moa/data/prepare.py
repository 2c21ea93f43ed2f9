"""`moa prepare-data`: a task's raw rows -> data/{task}/{split}.parquet + stats.json.

Per split: load (the dataset's own split, or a seeded carve-out of train), shuffle with the seed, then
build prompt/target/references row by row until the configured size is reached, dropping unusable rows
(each reason counted), truncating long inputs at token level and skipping duplicates (across splits:
held-out splits are built first, so a duplicate leaves train); write atomically.

Truncation rule: when a rendered prompt exceeds `data.max_prompt_tokens`, the task's long field (the
article, the passage) keeps its first tokens, as many as make the prompt fit; news and passages put the
key facts first. A QA row whose answer falls in the cut-off part is dropped ("answer_truncated"); a row
whose prompt still does not fit, or whose target exceeds `data.max_target_tokens`, is dropped too.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moa.config import Config
from moa.data.sources import check_columns, load_split
from moa.data.splits import COLUMNS
from moa.data.tasks import DropRow, Task, get_task
from moa.errors import MoaError
from moa.io import atomic_dir
from moa.layout import SPLITS, ExperimentPaths
from moa.model.load import load_tokenizer
from moa.model.tokenizer import Tokenizer
from moa.step_result import StepResult

MARGIN = 1.2  # read/carve a little more than a split needs: some rows may be dropped


def split_sizes(config: Mapping[str, Any], task: str) -> dict[str, int]:
    own = (config["tasks"][task] or {}).get("sizes", {})
    return {split: own.get(split, config["data"]["sizes"][split]) for split in SPLITS}


def raw_splits(task: Task, sizes: dict[str, int], seed: int, base_dir: Path) -> dict[str, list[dict]]:
    """Rows per split; splits the source lacks are carved out of train (seeded, disjoint)."""
    wanted = {s: int(sizes[s] * MARGIN) + 1 for s in SPLITS}
    raw = {s: load_split(task.source, s, task=task.kind if task.kind != "custom" else task.name,
                         n=wanted[s], seed=seed, base_dir=base_dir) for s in SPLITS}
    if raw["train"] is None:
        raise MoaError(f"task {task.name}: its source has no train split; map one in tasks.{task.name}.source")
    for split, rows in raw.items():
        if rows is not None:
            check_columns(rows, task.columns, f"task {task.name} ({split} split)")
    missing = [s for s in SPLITS if raw[s] is None]
    if missing:
        train = list(raw["train"])
        random.Random(f"carve:{task.name}:{seed}").shuffle(train)
        for split in missing:
            raw[split], train = train[:wanted[split]], train[wanted[split]:]
        if not train:
            raise MoaError(f"task {task.name}: train has {len(raw['train'])} rows, too few to carve "
                           f"{' and '.join(missing)} out of it; give those splits their own files or lower the sizes")
        raw["train"] = train
    return raw


class _Builder:
    """Turns raw rows of one task into examples, counting every drop by reason."""

    def __init__(self, task: Task, tokenizer: Tokenizer, data: Mapping[str, Any], keys: set[tuple[str, str]]) -> None:
        self.task, self.tokenizer = task, tokenizer
        self.max_prompt, self.max_target = data["max_prompt_tokens"], data["max_target_tokens"]
        self.keys = keys  # (prompt, target) of every example kept so far, shared across splits
        self.drops: Counter[str] = Counter()
        self.truncated = 0
        self.seen = 0  # rows read before the split was full

    def build(self, rows: list[dict], split: str, limit: int) -> list[dict]:
        """Up to `limit` examples from `rows`, in order (the caller shuffles)."""
        examples = []
        for index, row in enumerate(rows):
            if len(examples) == limit:
                break
            self.seen += 1
            try:
                example = self._example(row, f"{split}-{index}")
            except DropRow as reason:
                self.drops[str(reason)] += 1
                continue
            key = (example["prompt"], example["target"])
            if key in self.keys:
                self.drops["duplicate"] += 1
                continue
            self.keys.add(key)
            examples.append(example)
        return examples

    def _example(self, row: dict, fallback_id: str) -> dict:
        task = self.task
        task.check(row)
        target = task.target(row)
        if len(self.tokenizer.encode(target)) > self.max_target:
            raise DropRow("target_too_long")
        row = self._fit(row)
        row_id = next((row[k] for k in ("id", "idx") if row.get(k) is not None), fallback_id)
        return {"id": str(row_id), "task": task.name,
                "prompt": task.prompt(row), "target": target, "references": task.references(row),
                "meta": json.dumps(task.meta(row))}

    def _fit(self, row: dict) -> dict:
        """Cut the long field's tail until the prompt fits (see the module docstring)."""
        excess = len(self.tokenizer.encode(self.task.prompt(row))) - self.max_prompt
        if excess <= 0:
            return row
        field = self.task.truncate
        if field is None:
            raise DropRow("prompt_too_long")
        ids = self.tokenizer.encode(row[field])
        keep = len(ids) - excess - 2  # BPE may merge differently at the new edge: leave room
        if keep < 8:
            raise DropRow("prompt_too_long")
        cut = dict(row) | {field: self.tokenizer.decode(ids[:keep]).rstrip()}
        if len(self.tokenizer.encode(self.task.prompt(cut))) > self.max_prompt:
            raise DropRow("prompt_too_long")
        if self.task.kind == "qa" and any(s + len(t) > len(cut["context"])
                                          for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])):
            raise DropRow("answer_truncated")
        self.truncated += 1
        return cut


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.percentile(lengths, [50, 90, 99])
    return {"p50": float(values[0]), "p90": float(values[1]), "p99": float(values[2]), "max": max(lengths)}


def prepare_task(config: Config, name: str, tokenizer: Tokenizer, base_dir: Path = Path(".")) -> Path:
    """Write data/{name}/{split}.parquet and stats.json for one task; returns the folder.

    Relative paths of local sources are resolved against `base_dir` (the working directory, as for
    results_dir)."""
    task = get_task(config, name)
    sizes, seed = split_sizes(config, name), config["seed"]
    raw = raw_splits(task, sizes, seed, base_dir)
    frames, split_stats, keys = {}, {}, set()
    for split in reversed(SPLITS):  # held-out splits first: a duplicate is dropped from train, not test
        rows = list(raw[split])
        random.Random(f"sample:{name}:{split}:{seed}").shuffle(rows)  # a seeded sample of the split
        builder = _Builder(task, tokenizer, config["data"], keys)
        examples = builder.build(rows, split, sizes[split])
        if not examples:
            raise MoaError(f"task {name}, {split} split: no rows left after filtering "
                           f"(dropped: {dict(builder.drops) or 'none'}, rows in: {len(rows)})")
        frames[split] = pd.DataFrame(examples, columns=COLUMNS)
        split_stats[split] = {
            "rows_in": len(rows), "rows_read": builder.seen, "rows_out": len(examples), "requested": sizes[split],
            "drops": dict(builder.drops), "truncated": builder.truncated,
            "prompt_tokens": _percentiles([len(ids) for ids in tokenizer.encode_batch(frames[split].prompt.tolist())]),
            "target_tokens": _percentiles([len(ids) for ids in tokenizer.encode_batch(frames[split].target.tolist())]),
        }
    stats = {"task": name, "kind": task.kind, "source": task.source,
             "splits": {split: split_stats[split] for split in SPLITS}}
    paths = ExperimentPaths.of(config)
    out = paths.data(name)
    with atomic_dir(out) as tmp:
        for split, frame in frames.items():
            frame.to_parquet(tmp / paths.split(name, split).name, index=False)
        (tmp / paths.data_stats(name).name).write_text(json.dumps(stats, indent=2))
    return out


def prepare_data(config: Config, task: str) -> StepResult:
    """`moa prepare-data`: one task's data with the model's tokenizer (no weights are read)."""
    out = prepare_task(config, task, load_tokenizer(config["model"]["source"]))
    stats_file = ExperimentPaths.of(config).data_stats(task)
    stats = json.loads(stats_file.read_text())["splits"]
    return StepResult(out, metrics={f"{split}_{key}": s[key] for split, s in stats.items()
                                    for key in ("rows_out", "truncated")},
                      artifacts=[stats_file], summary=", ".join(f"{split} {s['rows_out']} rows"
                                                                for split, s in stats.items()))
