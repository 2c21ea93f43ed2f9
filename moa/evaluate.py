"""`moa evaluate`: one composition on one task's test split -> eval/{method}/{task}/predictions.parquet
(every example's prompt, prediction, references, route, cost) and metrics.parquet (method, task,
metric, value, n), tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from moa.compose.composition import Composed, load_composition, read_manifest
from moa.config import Config, experiment_dir, method_params
from moa.data.batching import encode_examples, prompt_texts
from moa.data.prepare import read_split
from moa.data.tasks import LABELS, Task, get_task
from moa.generate import Generation, Sampling, generate, score
from moa.io import atomic_dir
from moa.metrics import Score, router_accuracy, score_task
from moa.tracking import log_step


def eval_dir(config: Config, method: str, task: str) -> Path:
    return experiment_dir(config) / "eval" / method / task


def test_rows(config: Config, task: str) -> pd.DataFrame:
    frame = read_split(config, task, "test")
    limit = config["evaluation"]["limit"]
    return frame.head(limit) if limit else frame


def sampling(config: Config, task: Task) -> Sampling:
    evaluation = config["evaluation"]
    return Sampling(evaluation["max_new_tokens"] or task.max_new_tokens, evaluation["temperature"],
                    evaluation["top_p"], config["seed"], task.stop)


def run_generation(config: Config, composed: Composed, task: Task, frame: pd.DataFrame,
                   desc: str) -> list[Generation]:
    texts = prompt_texts(frame.prompt.tolist(), composed.tokenizer, config["data"]["chat_template"])
    chat = config["data"]["chat_template"]
    prompts = [composed.tokenizer.encode(t, add_bos=False if chat else None) for t in texts]
    return generate(composed.model, composed.tokenizer, prompts, sampling(config, task),
                    config["evaluation"]["batch_size"], composed.route, progress=desc)


def run_scoring(config: Config, composed: Composed, frame: pd.DataFrame) -> list[tuple[float, int]]:
    examples = encode_examples(frame.prompt.tolist(), frame.target.tolist(), composed.tokenizer,
                               config["data"]["chat_template"])
    return score(composed.model, examples, config["evaluation"]["batch_size"], composed.route)


def predictions_frame(frame: pd.DataFrame, composed: Composed, generations: list[Generation] | None,
                      scores: list[tuple[float, int]] | None) -> pd.DataFrame:
    out = pd.DataFrame({"id": frame["id"].to_numpy(), "prompt": frame["prompt"].to_numpy(),
                        "references": [list(r) for r in frame["references"]]})
    if generations is not None:
        out["prediction"] = [g.text.strip() for g in generations]
        out["new_tokens"] = [len(g.tokens) for g in generations]
        out["finish"] = [g.finish for g in generations]
        out["latency_s"] = [g.latency_s for g in generations]
        out["expert"] = [None if g.expert is None else composed.experts[g.expert] for g in generations]
    else:  # scored only (perplexity): nothing is generated
        out["prediction"] = None
    if scores is not None:
        out["nll"] = [s[0] for s in scores]
        out["n_tokens"] = [s[1] for s in scores]
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


def evaluate(config: Config, method: str, task_name: str) -> Path:
    """Evaluate composition `method` on `task_name`; writes eval/{method}/{task}/ atomically."""
    params = method_params(config, method)
    read_manifest(config, method)  # fail fast, before the data and the model load
    task, frame = get_task(config, task_name), test_rows(config, task_name)
    composed = load_composition(config, method, task_name, fold=config["evaluation"]["fold"])
    needs_text = any(m != "perplexity" for m in task.metrics)
    desc = f"evaluate {method} on {task_name}"
    generations = run_generation(config, composed, task, frame, desc) if needs_text else None
    scores = run_scoring(config, composed, frame) if task.scored else None
    predictions = predictions_frame(frame, composed, generations, scores)
    labels = list(LABELS.values()) if task.kind == "sentiment" else None
    results, extra = score_task(task.kind, task.metrics, predictions["prediction"].fillna("").tolist(),
                                predictions["references"].tolist(),
                                None if scores is None else predictions["nll"].tolist(),
                                None if scores is None else predictions["n_tokens"].tolist(), labels)
    if generations is not None:
        results += cost_scores(generations)
        if composed.route is not None and predictions["expert"].notna().all():  # per_layer has no single expert
            results.append(Score("router_accuracy", router_accuracy(predictions["expert"].tolist(),
                                                                    [task_name] * len(frame)), len(frame)))
    results += [Score(k, float(v), len(frame)) for k, v in extra.items() if isinstance(v, (int, float))]
    metrics = pd.DataFrame([{"method": method, "task": task_name, "metric": s.metric, "value": s.value, "n": s.n}
                            for s in results])
    out = eval_dir(config, method, task_name)
    info = {"method": params, "sampling": vars(sampling(config, task)) | {"stop": list(task.stop)},
            "rows": len(frame)} | {k: v for k, v in extra.items() if isinstance(v, str)}
    with atomic_dir(out) as tmp:
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        metrics.to_parquet(tmp / "metrics.parquet", index=False)
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    log_step(config, f"evaluate:{method},{task_name}", {"moa.step": "evaluate", "moa.method": method,
                                                       "moa.task": task_name},
             {"method": params, "evaluation": config["evaluation"], "model": config["model"]},
             metrics={s.metric: s.value for s in results},
             artifacts=[out / "metrics.parquet", out / "predictions.parquet", out / "info.json"])
    return out
