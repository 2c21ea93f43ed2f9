"""`moa evaluate`: one composition on every task's test split in one job -> eval/{method}/{task}/
predictions.parquet (every example's prompt, prediction, references, expert, cost and the per-example
statistics of every metric, format adherence included, which the report's paired bootstrap resamples) and
metrics.parquet (method, task, metric, value, n), tracked in MLflow.

Every task's test prompts go through the engine as one stream, so a batch mixes tasks and each sequence
is served by its own route (the oracle: its task's expert; MoA: its routed expert; merges: folded), as a
deployed composition would serve them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from moa.compose.composition import Composed, load_composition, read_manifest
from moa.compose.registry import Kind, method_of
from moa.config import Config, method_params
from moa.data.batching import encode_examples, encode_prompts
from moa.data.splits import read_split
from moa.data.tasks import LABELS, Task, get_task
from moa.generate import Generation, Request, Sampling, Served, score, serve
from moa.io import atomic_dir
from moa.layout import ExperimentPaths
from moa.metrics import (
    FORMAT_ADHERENCE,
    ROUTER_ACCURACY,
    Score,
    aggregate,
    format_statistics,
    router_accuracy,
    score_task,
    statistics_columns,
)
from moa.step_result import StepResult

DEFAULT_MAX_NEW_TOKENS = 128  # `moa generate` without a task


def test_rows(config: Config, task: str) -> pd.DataFrame:
    frame = read_split(config, task, "test")
    limit = config["evaluation"]["limit"]
    return frame.head(limit) if limit else frame


def sampling_settings(config: Config, task: Task | None = None, max_new_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None) -> Sampling:
    """How to decode: the arguments given, else the config's `evaluation`, else the task's own budget and
    stop strings (`moa evaluate` and `moa generate` decode a prompt alike)."""
    evaluation = config["evaluation"]
    budget = max_new_tokens or evaluation["max_new_tokens"] or (task.max_new_tokens if task else DEFAULT_MAX_NEW_TOKENS)
    return Sampling(budget, evaluation["temperature"] if temperature is None else temperature,
                    evaluation["top_p"] if top_p is None else top_p, config["seed"], task.stop if task else ())


def stream_costs(served: Served) -> dict[str, float]:
    """What serving the whole mixed-task stream cost (moa.metrics.STREAM_COSTS; every task carries the same
    values): generated tokens per second of its wall time and of decoding alone, prompt tokens per second of
    prefill, and the share of prompt tokens read from a shared prefix."""
    return {"new_tokens_per_s": served.new_tokens / max(served.seconds, 1e-9),
            "decode_tokens_per_s": served.new_tokens / max(served.decode_s, 1e-9),
            "prompt_tokens_per_s": served.prompt_tokens / max(served.prefill_s, 1e-9),
            "shared_prefix_pct": 100 * served.reused_tokens / max(served.prompt_tokens, 1)}


def run_generation(config: Config, composed: Composed, tasks: Sequence[Task], frames: dict[str, pd.DataFrame],
                   desc: str) -> tuple[dict[str, list[Generation]], Served]:
    """Every task's prompts in one stream; each task's generations, in its rows' order."""
    chat = config["data"]["chat_template"]
    requests, owners = [], []
    for task in tasks:
        sampling, expert = sampling_settings(config, task), composed.expert_for(task.name)
        prompts = encode_prompts(frames[task.name].prompt.tolist(), composed.tokenizer, chat)
        requests += [Request(prompt, sampling, expert) for prompt in prompts]
        owners += [task.name] * len(prompts)
    served = serve(composed.model, composed.tokenizer, requests, config["evaluation"]["batch_size"], composed.router,
                   progress=desc)
    by_task: dict[str, list[Generation]] = {task.name: [] for task in tasks}
    for owner, generation in zip(owners, served.generations):
        by_task[owner].append(generation)
    return by_task, served


def run_scoring(config: Config, composed: Composed, task: Task, frame: pd.DataFrame) -> list[tuple[float, int]]:
    examples = encode_examples(frame.prompt.tolist(), frame.target.tolist(), composed.tokenizer,
                               config["data"]["chat_template"])
    expert = composed.expert_for(task.name)
    return score(composed.model, examples, None if expert is None else [expert] * len(examples), composed.router)


def predictions_frame(frame: pd.DataFrame, composed: Composed, generations: list[Generation] | None) -> pd.DataFrame:
    out = pd.DataFrame({"id": frame["id"].to_numpy(), "prompt": frame["prompt"].to_numpy(),
                        "references": [list(r) for r in frame["references"]]})
    if generations is not None:
        out["prediction"] = [g.text.strip() for g in generations]
        out["new_tokens"] = [len(g.tokens) for g in generations]
        out["finish"] = [str(g.finish) for g in generations]
        out["latency_s"] = [g.latency_s for g in generations]
        out["expert"] = [None if g.expert is None else composed.experts[g.expert] for g in generations]
    else:  # scored only (perplexity): nothing is generated
        out["prediction"] = None
    return out


def task_scores(task: Task, predictions: pd.DataFrame, metas: list[dict], composed: Composed, served: Served | None,
                scores: list[tuple[float, int]] | None) -> tuple[list[Score], pd.DataFrame, dict]:
    """The task's metrics and its format adherence, then what serving it cost, and MoA's routing accuracy
    where one expert served each sequence (not per_layer); the predictions with every metric's per-example
    statistics."""
    labels = list(LABELS.values()) if task.kind == "sentiment" else None
    nll, n_tokens = (None, None) if scores is None else ([s[0] for s in scores], [s[1] for s in scores])
    texts = predictions["prediction"].fillna("").tolist()
    results, stats, extra = score_task(task.kind, task.metrics, texts, predictions["references"].tolist(), nll,
                                       n_tokens, labels)
    n = len(predictions)
    if task.format is not None:
        stats |= format_statistics([task.format.follows(text, meta) for text, meta in zip(texts, metas)])
        results.append(Score(FORMAT_ADHERENCE, float(aggregate(FORMAT_ADHERENCE, stats, np.ones((1, n)))[0]), n))
    predictions = predictions.assign(**statistics_columns(stats))
    if served is not None:
        results += [Score(name, value, len(served.generations)) for name, value in stream_costs(served).items()]
        results.append(Score("latency_s", float(predictions["latency_s"].mean()), n))
        if composed.router is not None and predictions["expert"].notna().all():
            results.append(Score(ROUTER_ACCURACY, router_accuracy(predictions["expert"].tolist(), [task.name] * n), n))
    results += [Score(k, float(v), n) for k, v in extra.items() if isinstance(v, (int, float))]
    return results, predictions, extra


def precision(config: Config, params: dict) -> dict[str, str]:
    """The dtypes a composition ran in: its weights' (model.dtype, where it is built), its decoding's
    (evaluation.dtype) and, for an adapter folded into the weights, the fold's sum (W0 + delta in float32,
    rounded once to model.dtype; see LoRALinear.fold)."""
    record = {"weights": config["model"]["dtype"], "decode": config["evaluation"]["dtype"]}
    if config["evaluation"]["fold"] and method_of(params).kind in (Kind.ADAPTER, Kind.MERGE):
        record["fold"] = "float32"
    return record


def evaluate(config: Config, method: str, task: str | None = None) -> StepResult:
    """Evaluate composition `method` on every task (or only `task`); writes eval/{method}/{task}/
    atomically, one folder per task."""
    params = method_params(config, method)
    read_manifest(config, method)  # fail fast, before the data and the model load
    tasks = [get_task(config, name) for name in ([task] if task else config["tasks"])]
    frames = {t.name: test_rows(config, t.name) for t in tasks}
    composed = load_composition(config, method, fold=config["evaluation"]["fold"])
    generated, served = run_generation(config, composed, [t for t in tasks if not t.scored], frames,
                                       f"evaluate {method}")
    scored = {t.name: run_scoring(config, composed, t, frames[t.name]) for t in tasks if t.scored}
    implicit, hook = {}, method_of(params).implicit_routing
    if hook is not None:  # its own model: the served one is released first (one 7B at a time)
        composed.model.to("meta")
        implicit = hook(config, params | composed.manifest.get("tuned", {}), tasks, frames, generated)
    paths, metrics, artifacts, lines = ExperimentPaths.of(config), {}, [], []
    for spec in tasks:
        scores = scored.get(spec.name)
        predictions = predictions_frame(frames[spec.name], composed, generated.get(spec.name))
        metas = [json.loads(meta) for meta in frames[spec.name]["meta"]]
        results, predictions, extra = task_scores(spec, predictions, metas, composed,
                                                  served if spec.name in generated else None, scores)
        table = pd.DataFrame([{"method": method, "task": spec.name, "metric": s.metric, "value": s.value, "n": s.n}
                              for s in results])
        info = {"method": params, "precision": precision(config, params),
                "sampling": vars(sampling_settings(config, spec)) | {"stop": list(spec.stop)},
                "rows": len(predictions)} | {k: v for k, v in extra.items() if isinstance(v, str)}
        with atomic_dir(paths.evaluation(method, spec.name)) as tmp:
            predictions.to_parquet(tmp / paths.predictions(method, spec.name).name, index=False)
            table.to_parquet(tmp / paths.metrics(method, spec.name).name, index=False)
            (tmp / paths.eval_info(method, spec.name).name).write_text(json.dumps(info, indent=2) + "\n")
            if spec.name in implicit:
                implicit[spec.name].to_parquet(tmp / paths.implicit_routing(method, spec.name).name, index=False)
        metrics |= {f"{spec.name}.{s.metric}": s.value for s in results}
        artifacts += [paths.metrics(method, spec.name), paths.predictions(method, spec.name),
                      paths.eval_info(method, spec.name)]
        lines.append(f"{spec.name}: " + ", ".join(f"{s.metric} {s.value:.4g}" for s in results))
    return StepResult(paths.evaluations(method), metrics=metrics, artifacts=artifacts,
                      summary="\n".join(lines))
