"""moa as an lm-evaluation-harness model: `lm_eval --model moa --model_args config=CONFIG,method=NAME ...` (with the
`lm-eval` extra installed; `moa-lm-eval` where the harness loads no model plugins).

The model is moa.lm_harness.ComposedLM on the config file's composition; the oracle serves each request with its
own task's LoRA, so it needs the moa task of each harness task: `tasks=HARNESS_TASK:MOA_TASK|...` in the model args
(else evaluation.lm_eval.task_map of the config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model

from moa.errors import MoaError
from moa.experiment import load_config
from moa.lm_harness import ComposedLM, leaf_map, task_manager


@register_model("moa")
class MoaLM(ComposedLM):
    """The composition `method` of the experiment config file `config`, behind the harness's model interface."""

    def __init__(self, config: str | Path, method: str, tasks: str = "", batch_size: int | str | None = None,
                 max_length: int | None = None, **harness_args: Any) -> None:  # device etc.: moa places the model
        loaded = load_config(Path(config))
        mapping = _task_map(tasks, list(loaded["tasks"]))
        settings = loaded["evaluation"]["lm_eval"]
        if not mapping and settings and settings["task_map"]:
            mapping = leaf_map(task_manager(loaded), settings["task_map"])
        super().__init__(loaded, method, mapping, batch_size, max_length)


def _task_map(spec: str, tasks: Sequence[str]) -> dict[str, str]:
    """`HARNESS:MOA|...` -> {harness task: moa task}, each moa task one of the config's."""
    pairs = [item.split(":", 1) for item in spec.split("|") if item.strip()]
    for pair in pairs:
        if len(pair) != 2 or pair[1].strip() not in tasks:
            raise MoaError(f"model args tasks: {':'.join(pair)!r} is not HARNESS_TASK:MOA_TASK with a moa task of the "
                           f"config ({', '.join(tasks)})")
    return {harness.strip(): task.strip() for harness, task in pairs}


def main() -> None:
    """`moa-lm-eval ...`: the harness's command line with moa's model registered, for harness versions that do not
    load the `lm_eval.models` entry point (0.4.13 and before) — the same arguments as `lm_eval`."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
