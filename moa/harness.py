"""moa as an lm-evaluation-harness model: `lm_eval --model moa --model_args config=CONFIG,method=NAME ...` (with the
`lm-eval` extra installed).

It serves one composition as `moa evaluate` does: merges folded into the weights, the oracle, MoA and the centroid
router routed per request, Arrow per token, in the composition's dtype (evaluation.dtype). loglikelihood and
loglikelihood_rolling go through moa's packed scoring (moa.generate.scored), generate_until through its engine
(continuous batching, packed prefill, stop strings), and the harness's own tokenization rules (TemplateLM: context
and continuation encoded together, trailing context spaces moved to the continuation; rolling windows as its
utilities cut them) so that the numbers are the harness's.

The oracle serves each request with its own task's LoRA, so it needs the moa task of each harness task:
`tasks=HARNESS_TASK:MOA_TASK|...` in the model args.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval import utils as harness_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from moa.compose.composition import Composed, load_composition
from moa.config import Config
from moa.data.batching import Example
from moa.errors import MoaError
from moa.experiment import load_config
from moa.generate import Request, Sampling, Scored, generate, scored
from moa.io import atomic_dir
from moa.layout import ExperimentPaths
from moa.step_result import StepResult

MAX_GEN_TOKS = 256  # the harness's default for generate_until


@register_model("moa")
class MoaLM(TemplateLM):
    """One moa composition behind the harness's model interface."""

    def __init__(self, config: str | Config, method: str, tasks: str = "", batch_size: int | str | None = None,
                 max_length: int | None = None, **harness_args: Any) -> None:
        super().__init__()
        self.config = load_config(Path(config)) if isinstance(config, str | Path) else config
        self.composed: Composed = load_composition(self.config, method, fold=self.config["evaluation"]["fold"])
        self.tokenizer = self.composed.tokenizer
        self.tasks = _task_map(tasks, list(self.config["tasks"]))
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
                           f"harness task {request.task_name!r} has no moa task; add it to the model args "
                           f"(tasks={request.task_name}:MOA_TASK) or evaluate another method")
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


def _task_map(spec: str, tasks: Sequence[str]) -> dict[str, str]:
    """`HARNESS:MOA|...` -> {harness task: moa task}, each moa task one of the config's."""
    pairs = [item.split(":", 1) for item in spec.split("|") if item.strip()]
    for pair in pairs:
        if len(pair) != 2 or pair[1] not in tasks:
            raise MoaError(f"model args tasks: {':'.join(pair)!r} is not HARNESS_TASK:MOA_TASK with a moa task of the "
                           f"config ({', '.join(tasks)})")
    return {harness.strip(): task.strip() for harness, task in pairs}


def main() -> None:
    """`moa-lm-eval ...`: the harness's command line with moa's model registered, for harness versions that do not
    load the `lm_eval.models` entry point (0.4.13 and before) — the same arguments as `lm_eval`."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


def evaluate_harness(config: Config, method: str) -> StepResult:
    """The harness tasks of evaluation.lm_eval on composition `method` -> lm_eval/{method}/: results.json (the
    harness's results) and samples/{task}.jsonl (its per-sample logs, the same samples for every composition),
    written atomically."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    settings = config["evaluation"]["lm_eval"]
    mapping = "|".join(f"{harness}:{task}" for harness, task in (settings["task_map"] or {}).items())
    model = MoaLM(config, method, tasks=mapping, batch_size=settings["batch_size"])
    manager = TaskManager(include_path=settings["include_path"]) if settings["include_path"] else TaskManager()
    results = simple_evaluate(model=model, tasks=list(settings["tasks"]), num_fewshot=settings["num_fewshot"],
                              limit=settings["limit"], task_manager=manager, log_samples=True,
                              random_seed=config["seed"], numpy_random_seed=config["seed"],
                              torch_random_seed=config["seed"], fewshot_random_seed=config["seed"])
    out = ExperimentPaths.of(config).harness(method)
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results["results"], indent=2, default=str) + "\n")
        (tmp / "samples").mkdir()
        for task, samples in results["samples"].items():
            lines = (json.dumps(sample, default=str) for sample in sorted(samples, key=lambda s: s["doc_id"]))
            (tmp / "samples" / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    metrics = {f"{task}.{name.split(',')[0]}": value for task, values in results["results"].items()
               for name, value in values.items() if isinstance(value, int | float) and "stderr" not in name}
    return StepResult(out, metrics=metrics, artifacts=[out / "results.json"])
