"""A merge tuned on the validation split: every candidate of its grid is scored by the teacher-forced loss of
every task's validation targets, normalized by the oracle's on the same rows so that each task counts the same,
averaged over the tasks (lower is better; 1 is the oracle's). The normalization is the ratio of perplexities,
exp(loss - oracle's loss), not of losses: a task the oracle answers almost surely (one-token labels, loss ~0.002)
would otherwise weigh a hundred times the others and decide alone. The validation rows are the ones the router
may see, never the test rows.

A candidate whose merge is linear in its weights (every merge but the factor sums) is merged once per setting of
its other parameters, at scale 1, and served unfolded at each scale lambda: the same update as merging at lambda,
without merging again; an untruncated element-wise merge, a dense update with no factors to serve, is merged and
folded for each candidate. Each candidate is one packed scoring pass (moa.generate.score) over all validation rows.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm import tqdm

from moa.compose.merge import MergeSpec, dense_updates, is_dense, merge_adapters, scale_linear
from moa.config import Config
from moa.data.batching import Example, encode_examples
from moa.data.splits import read_split
from moa.generate import score
from moa.lora import AdapterConfig, activate, add_to_weights, attach_experts, load_adapter, write_adapter
from moa.model import DTYPES, Tokenizer
from moa.model.llama import Transformer
from moa.model.prepared import base_model, device

Grid = Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class Validation:
    """Every task's validation rows, encoded once, and the oracle's mean loss per target token on each task's."""

    tasks: tuple[str, ...]
    examples: list[Example]  # Example.task: the task's index
    oracle: np.ndarray  # [tasks]

    def losses(self, model: Transformer, experts: Sequence[int] | None = None) -> np.ndarray:
        """[tasks]: the model's mean loss per target token on each task's rows (one packed pass)."""
        nll, tokens = np.zeros(len(self.tasks)), np.zeros(len(self.tasks))
        for example, (total, n) in zip(self.examples, score(model, self.examples, experts)):
            nll[example.task] += total
            tokens[example.task] += n
        return nll / tokens

    def normalized(self, losses: np.ndarray) -> np.ndarray:
        """[tasks]: each task's perplexity over the oracle's on the same rows."""
        return np.exp(losses - self.oracle)

    def criterion(self, losses: np.ndarray) -> float:
        return float(self.normalized(losses).mean())


def _model(config: Config, adapters: Sequence[Path]) -> tuple[Transformer, Tokenizer]:
    """The base model with `adapters` attached as experts, in the dtype evaluation serves it in."""
    model, tokenizer = base_model(config)
    attach_experts(model, adapters)
    return model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval(), tokenizer


def validation(config: Config, dirs: Sequence[Path], rows: int | None = None) -> Validation:
    """The validation rows of the tasks (in the order of `dirs`, the task adapters; the first `rows` of each, all if
    None) and the oracle's losses."""
    tasks = tuple(d.name for d in dirs)
    model, tokenizer = _model(config, dirs)
    examples: list[Example] = []
    for index, task in enumerate(tasks):
        frame = read_split(config, task, "validation").head(rows)
        examples += encode_examples(frame.prompt.tolist(), frame.target.tolist(), tokenizer,
                                    config["data"]["chat_template"], [index] * len(frame))
    rows = Validation(tasks, examples, np.ones(len(tasks)))
    return replace(rows, oracle=rows.losses(model, [e.task for e in examples]))


def candidates(grid: Grid) -> list[dict[str, float]]:
    """Every combination of the grid's values, in its order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


@dataclass(frozen=True)
class Tuned:
    chosen: dict[str, float]  # the grid's best setting
    criterion: float  # its criterion
    table: pd.DataFrame  # every candidate's scores (tune.parquet)
    labelled: int  # the validation rows it was chosen on, over every task


def tune(config: Config, spec: MergeSpec, grid: Grid, dirs: Sequence[Path], rows_per_task: int | None = None) -> Tuned:
    """The grid's best setting of `spec` on the validation rows (the first `rows_per_task` of each task's, all if
    None; the first in grid order of equal criteria)."""
    rows = validation(config, dirs, rows_per_task)
    adapters = [load_adapter(d) for d in dirs]
    shared = scale_linear(spec.method) and not is_dense(spec)  # no factors to serve at each scale
    groups: dict[tuple, list[int]] = {}  # one merge per group: its candidates differ only in scale
    grid_order = candidates(grid)
    for index, candidate in enumerate(grid_order):
        groups.setdefault(tuple((k, v) for k, v in candidate.items() if k != "scale" or not shared), []).append(index)
    criteria: dict[int, float] = {}
    losses: dict[int, np.ndarray] = {}
    with tqdm(total=len(grid_order), desc=f"tune {spec.method}") as progress:
        for key, members in groups.items():
            merged = replace(spec, **dict(key), **({"scale": 1.0} if shared else {}))
            scales = [grid_order[i].get("scale", spec.scale) if shared else 1.0 for i in members]
            for index, task_losses in zip(members, _score_merge(config, merged, adapters, rows, scales)):
                losses[index], criteria[index] = task_losses, rows.criterion(task_losses)
                progress.update()
    best = min(criteria, key=lambda i: (criteria[i], i))
    return Tuned(grid_order[best], criteria[best], _table(grid_order, losses, criteria, rows, best),
                 len(rows.examples))


def _score_merge(config: Config, spec: MergeSpec, adapters: Sequence[tuple[AdapterConfig, dict[str, Tensor]]],
                 rows: Validation, scales: Sequence[float]) -> Iterator[np.ndarray]:
    """The validation losses of the merge of `adapters` by `spec`, served unfolded at each of `scales` (a dense
    update: folded, at its own scale)."""
    if is_dense(spec):
        model, _ = base_model(config)
        add_to_weights(model, dense_updates(spec, adapters, list(rows.tasks)))
        yield rows.losses(model.to(device(), DTYPES[config["evaluation"]["dtype"]]).eval())
        return
    adapter_config, state, _ = merge_adapters(spec, adapters, list(rows.tasks))
    with tempfile.TemporaryDirectory() as scratch:
        write_adapter(Path(scratch), adapter_config, state)
        model, _ = _model(config, [Path(scratch)])
    for scale in scales:
        activate(model, [scale])
        yield rows.losses(model)


def _table(grid_order: Sequence[dict[str, float]], losses: Mapping[int, np.ndarray], criteria: Mapping[int, float],
           rows: Validation, best: int) -> pd.DataFrame:
    """One row per candidate and task: its parameters, the task's loss, the oracle's, the perplexity ratio, the
    criterion."""
    return pd.DataFrame([
        {"candidate": i, **candidate, "task": task, "loss": float(losses[i][t]), "oracle_loss": float(rows.oracle[t]),
         "normalized": float(rows.normalized(losses[i])[t]), "criterion": criteria[i], "chosen": i == best}
        for i, candidate in enumerate(grid_order) for t, task in enumerate(rows.tasks)])
