"""`moa evaluate`: one composition on one task's test split -> eval/{method}/{task}/predictions.parquet
(every example's prompt, prediction, references, route, cost and the per-example statistics of every
metric, which the report's paired bootstrap resamples) and metrics.parquet (method, task, metric, value,
n), tracked in MLflow."""

from __future__ import annotations

import json

import pandas as pd

from moa.compose.composition import Composed, load_composition, read_manifest
from moa.config import Config, method_params
from moa.data.batching import encode_examples, encode_prompts
from moa.data.prepare import read_split
from moa.data.tasks import LABELS, Task, get_task
from moa.generate import Generation, Sampling, generate, score
from moa.io import atomic_dir
from moa.layout import ExperimentPaths
from moa.metrics import Score, router_accuracy, score_task, statistics_columns
from moa.tracking import StepResult

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


def run_generation(config: Config, composed: Composed, task: Task, frame: pd.DataFrame,
                   desc: str) -> list[Generation]:
    prompts = encode_prompts(frame.prompt.tolist(), composed.tokenizer, config["data"]["chat_template"])
    return generate(composed.model, composed.tokenizer, prompts, sampling_settings(config, task),
                    config["evaluation"]["batch_size"], composed.router, progress=desc)


def run_scoring(config: Config, composed: Composed, frame: pd.DataFrame) -> list[tuple[float, int]]:
    examples = encode_examples(frame.prompt.tolist(), frame.target.tolist(), composed.tokenizer,
                               config["data"]["chat_template"])
    return score(composed.model, examples, config["evaluation"]["batch_size"], composed.router)


def predictions_frame(frame: pd.DataFrame, composed: Composed, generations: list[Generation] | None,
                      ) -> pd.DataFrame:
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


def cost_scores(generations: list[Generation]) -> list[Score]:
    """What the composition costs at decoding: generated tokens per second of wall time (a batch's wall
    time is its slowest sequence) and the mean per-sequence latency."""
    n, tokens = len(generations), sum(len(g.tokens) for g in generations)
    walls: dict[int, float] = {}
    for g in generations:
        walls[g.batch] = max(walls.get(g.batch, 0.0), g.latency_s)
    return [Score("new_tokens_per_s", tokens / max(sum(walls.values()), 1e-9), n),
            Score("latency_s", sum(g.latency_s for g in generations) / n, n)]


def evaluate(config: Config, method: str, task: str) -> StepResult:
    """Evaluate composition `method` on `task`; writes eval/{method}/{task}/ atomically."""
    params = method_params(config, method)
    read_manifest(config, method)  # fail fast, before the data and the model load
    spec, frame = get_task(config, task), test_rows(config, task)
    composed = load_composition(config, method, task, fold=config["evaluation"]["fold"])
    needs_text = any(m != "perplexity" for m in spec.metrics)
    desc = f"evaluate {method} on {task}"
    generations = run_generation(config, composed, spec, frame, desc) if needs_text else None
    scores = run_scoring(config, composed, frame) if spec.scored else None
    predictions = predictions_frame(frame, composed, generations)
    labels = list(LABELS.values()) if spec.kind == "sentiment" else None
    nll, n_tokens = (None, None) if scores is None else ([s[0] for s in scores], [s[1] for s in scores])
    results, stats, extra = score_task(spec.kind, spec.metrics, predictions["prediction"].fillna("").tolist(),
                                       predictions["references"].tolist(), nll, n_tokens, labels)
    predictions = predictions.assign(**statistics_columns(stats))
    if generations is not None:
        results += cost_scores(generations)
        if composed.router is not None and predictions["expert"].notna().all():  # per_layer has no single expert
            results.append(Score("router_accuracy", router_accuracy(predictions["expert"].tolist(),
                                                                    [task] * len(frame)), len(frame)))
    results += [Score(k, float(v), len(frame)) for k, v in extra.items() if isinstance(v, (int, float))]
    metrics = pd.DataFrame([{"method": method, "task": task, "metric": s.metric, "value": s.value, "n": s.n}
                            for s in results])
    paths = ExperimentPaths.of(config)
    info = {"method": params, "sampling": vars(sampling_settings(config, spec)) | {"stop": list(spec.stop)},
            "rows": len(frame)} | {k: v for k, v in extra.items() if isinstance(v, str)}
    with atomic_dir(paths.evaluation(method, task)) as tmp:
        predictions.to_parquet(tmp / paths.predictions(method, task).name, index=False)
        metrics.to_parquet(tmp / paths.metrics(method, task).name, index=False)
        (tmp / paths.eval_info(method, task).name).write_text(json.dumps(info, indent=2) + "\n")
    return StepResult(paths.evaluation(method, task), metrics={s.metric: s.value for s in results},
                      artifacts=[paths.metrics(method, task), paths.predictions(method, task),
                                 paths.eval_info(method, task)],
                      summary=", ".join(f"{s.metric} {s.value:.4g}" for s in results))
