"""Any moa composition on lm-evaluation-harness tasks (the `lm-eval` extra): the harness model, the `lm-eval` step
and the check of the harness tasks before any job runs.

`ComposedLM` serves one composition as `moa evaluate` does: merges folded into the weights, the oracle, MoA and the
centroid router routed per request, Arrow per token, in the composition's dtype (evaluation.dtype). loglikelihood and
loglikelihood_rolling go through moa's packed scoring (moa.generate.scored), generate_until through its engine
(continuous batching, packed prefill, stop strings), and the harness's own tokenization rules (TemplateLM: context
and continuation encoded together, trailing context spaces moved to the continuation; rolling windows as its
utilities cut them) so that the numbers are the harness's. moa.harness registers it as the harness model `moa`.

The oracle serves each request with its own task's LoRA, so it needs the moa task of each harness task
(evaluation.lm_eval.task_map; a group maps every task in it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval import utils as harness_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from moa.compose.composition import Composed, load_composition
from moa.config import Config
from moa.data.batching import Example
from moa.errors import MoaError
from moa.generate import Request, Sampling, Scored, generate, scored
from moa.io import atomic_dir
from moa.layout import HARNESS_RESULTS, HARNESS_SAMPLES, ExperimentPaths
from moa.metrics import harness_figures, harness_metric
from moa.step_result import StepResult

MAX_GEN_TOKS = 256  # the harness's default for generate_until


class ComposedLM(TemplateLM):
    """One moa composition behind the harness's model interface (moa.harness registers it as `moa`)."""

    def __init__(self, config: Config, method: str, tasks: Mapping[str, str] | None = None,
                 batch_size: int | str | None = None, max_length: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.composed: Composed = load_composition(self.config, method, fold=self.config["evaluation"]["fold"])
        self.tokenizer = self.composed.tokenizer
        self.tasks = dict(tasks or {})  # harness task -> moa task, for the oracle
        self.batch = int(batch_size) if str(batch_size).isdigit() else self.config["evaluation"]["batch_size"]
        self.max_length = int(max_length or self.composed.model.config.max_position_embeddings)

    # -- tokens --------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What conditions an empty context: BOS where the tokenizer has one, else EOS (as the harness's hf model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens)

    # -- requests ------------------------------------------------------------------------------------

    def _expert(self, request: Instance) -> int | None:
        """The expert of a request's task where the composition serves each task with its own (the oracle)."""
        if not self.composed.by_task:
            return None
        task = self.tasks.get(request.task_name)
        if task is None:
            raise MoaError(f"{self.composed.manifest['name']}: the oracle serves each request with its task's LoRA, and "
                           f"harness task {request.task_name!r} has no moa task; map it in evaluation.lm_eval.task_map "
                           f"(or the model args' tasks={request.task_name}:MOA_TASK), or evaluate another method")
        return self.composed.expert_for(task)

    def _score(self, examples: Sequence[Example], experts: Sequence[int | None]) -> list[Scored]:
        """The examples scored, each by its expert (the oracle), the router's choice, or the folded model."""
        chosen = [e for e in experts if e is not None] if self.composed.by_task else None
        return scored(self.composed.model, examples, chosen, self.composed.router)

    def _window(self, context: list[int], continuation: list[int]) -> Example:
        """The example scored: at most max_length tokens, the context cut from the left (as the harness's hf model)."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return Example(whole[:len(whole) - len(continuation)], continuation)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._experts = [self._expert(r) for r in requests]  # the encoded requests below come in the same order
        return super().loglikelihood(requests, disable_tqdm)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        examples = [self._window(context, continuation) for _, context, continuation in requests]
        return [(-s.nll, s.greedy) for s in self._score(examples, self._experts)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood over disjoint windows of at most max_length tokens, the first conditioned
        on the prefix token (the harness's rolling windows)."""
        examples, owners, experts = [], [], []
        for index, request in enumerate(requests):
            windows = harness_utils.get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(harness_utils.make_disjoint_window, windows):
                examples.append(Example(list(context), list(continuation)))
                owners.append(index)
                experts.append(self._expert(request))
        totals = [0.0] * len(requests)
        for owner, result in zip(owners, self._score(examples, experts)):
            totals[owner] -= result.nll
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first of the request's `until` strings, as
        the harness cuts them."""
        batch = [self._generation(request) for request in requests]
        generations = generate(self.composed.model, self.tokenizer, [r for r, _ in batch], self.batch,
                               self.composed.router, progress=None if disable_tqdm else "generate_until")
        return [_cut(g.text, until) for g, (_, until) in zip(generations, batch)]

    def _generation(self, request: Instance) -> tuple[Request, list[str]]:
        context, settings = request.args
        settings = dict(settings)
        until = settings.pop("until", None) or [self.tokenizer.decode([self.eot_token_id], False)]
        until = [until] if isinstance(until, str) else list(until)
        new = int(settings.pop("max_gen_toks", MAX_GEN_TOKS))
        sampled = settings.pop("do_sample", False)
        temperature = float(settings.pop("temperature", 0.0)) if sampled else 0.0
        prompt = self.tok_encode(context)[-(self.max_length - new):]
        stops = tuple(s for s in until if s)
        return Request(prompt, Sampling(new, temperature, stop=stops), self._expert(request)), until


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of each stop string, as the harness's hf model cuts it."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# --- the harness's tasks ------------------------------------------------------------------------------------------

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # `datasets` builders over local data_files
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
MAX_DEPTH = 8  # groups nest groups; deeper is a cycle


def task_manager(config: Config) -> TaskManager:
    """The harness's task index with evaluation.lm_eval.include_path's task YAMLs: of those alone where they hold
    every configured task (instant), else with the harness's own (indexing its thousands of YAMLs takes seconds)."""
    settings = config["evaluation"]["lm_eval"]
    include = settings["include_path"]
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(_known(local, name) for name in settings["tasks"]):
            return local
    return TaskManager(include_path=include) if include else TaskManager()


def leaves(manager: TaskManager, name: str, depth: int = 0) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """The tasks a harness task, group or tag name stands for: (task name, its indexed config; None where the index
    does not know the name)."""
    entry = manager.task_index.get(name)
    if entry is None or depth > MAX_DEPTH:
        yield name, None
        return
    if entry.tags and entry.cfg is None:  # a tag: a set of task names
        for member in sorted(entry.tags):
            yield from leaves(manager, member, depth + 1)
        return
    members = (entry.cfg or {}).get("task")
    if isinstance(members, list):  # a group: task names or inline task configs
        for member in members:
            if isinstance(member, str):
                yield from leaves(manager, member, depth + 1)
            else:
                yield member.get("task", name), member
        return
    yield name, entry.cfg or {}


def _known(manager: TaskManager, name: str) -> bool:
    return all(spec is not None for _, spec in leaves(manager, name))


def offline() -> bool:
    return any(os.environ.get(key, "").upper() in {"1", "ON", "YES", "TRUE"} for key in OFFLINE_ENV)


def cached(dataset: str) -> bool:
    """Whether a hub dataset is in the local Hugging Face caches (the hub's, or datasets' own)."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir() or \
        (Path(datasets_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir()


def needs_network(task_config: Mapping[str, Any]) -> str | None:
    """The hub dataset a task downloads that is not cached, or None where its data is local or cached."""
    dataset = task_config.get("dataset_path")
    if not dataset or dataset in LOCAL_BUILDERS or Path(str(dataset)).expanduser().exists() or cached(str(dataset)):
        return None
    return str(dataset)


def check_tasks(config: Config, manager: TaskManager | None = None) -> None:
    """Every harness task of evaluation.lm_eval is known to the harness and, offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set), reads local or cached data: else one line naming the task and what to do."""
    settings, where = config["evaluation"]["lm_eval"], "evaluation.lm_eval"
    manager = manager or task_manager(config)
    for name in settings["tasks"]:
        if not _known(manager, name):
            include = settings["include_path"]
            raise MoaError(f"{where}.tasks: {name!r} is not a harness task, group or tag"
                           f"{f' (nor in include_path {include})' if include else ''}; see `lm_eval ls tasks`, or add "
                           f"its YAML to a folder named by {where}.include_path")
        remote = next(((task, dataset) for task, spec in leaves(manager, name) if (dataset := needs_network(spec))),
                      None)
        if remote and offline():
            task, dataset = remote
            raise MoaError(f"{where}.tasks: {name!r} ({task}) downloads dataset {dataset!r} from the Hugging Face Hub "
                           f"and this run is offline ({' or '.join(OFFLINE_ENV)} set); download it once online "
                           f"(python -c \"import datasets; datasets.load_dataset('{dataset}')\") or use a task over "
                           f"local files ({where}.include_path)")


def leaf_map(manager: TaskManager, task_map: Mapping[str, str] | None) -> dict[str, str]:
    """evaluation.lm_eval.task_map with every group or tag expanded to its tasks (a task's own entry wins)."""
    expanded: dict[str, str] = {}
    for name, task in (task_map or {}).items():
        expanded |= {leaf: task for leaf, spec in leaves(manager, name) if spec is not None}
    return expanded | dict(task_map or {})


# --- the step -----------------------------------------------------------------------------------------------------


def evaluate_harness(config: Config, method: str) -> StepResult:
    """The harness tasks of evaluation.lm_eval on composition `method` -> lm_eval/{method}/: results.json (the
    harness's results, configs and versions, as its --output_path writes them) and samples/{task}.jsonl (its
    per-sample logs, in document order: the same documents for every composition), written atomically."""
    settings, seed = config["evaluation"]["lm_eval"], config["seed"]
    manager = task_manager(config)
    check_tasks(config, manager)
    model = ComposedLM(config, method, leaf_map(manager, settings["task_map"]), settings["batch_size"],
                       settings["max_length"])
    results = simple_evaluate(model=model, tasks=list(settings["tasks"]), num_fewshot=settings["num_fewshot"],
                              limit=settings["limit"], task_manager=manager, log_samples=True, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    out = ExperimentPaths.of(config).harness(method)
    with atomic_dir(out) as tmp:
        logged = {key: value for key, value in results.items() if key != "samples"}
        (tmp / HARNESS_RESULTS).write_text(json.dumps(logged, indent=2, default=str) + "\n")
        (tmp / HARNESS_SAMPLES).mkdir()
        for task, samples in results["samples"].items():
            ordered = sorted(samples, key=lambda s: (s["doc_id"], s.get("filter", "")))
            lines = "".join(json.dumps(sample, default=str) + "\n" for sample in ordered)
            (tmp / HARNESS_SAMPLES / f"{task}.jsonl").write_text(lines)
    metrics = {f"{task}.{harness_metric(key)}": value for task, values in results["results"].items()
               for key, value in harness_figures(values).items()}
    return StepResult(out, metrics=metrics, artifacts=[out / HARNESS_RESULTS])
