"""The report step: results/{experiment}/report/ holds every evaluation in one long table (metrics.parquet),
the reference study's summary table with the multitask ability score (summary.md) and PNG plots.

Any input may be missing (a step not run yet, a failed job): what it would have fed is skipped or shown
as "–", and the summary's notes say so, so a partial report is still a report.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # Figure.savefig renders PNGs with Agg; no pyplot global state
from matplotlib.ticker import LogFormatter
from torch import Tensor

from moa.config import Config
from moa.data.tasks import get_task
from moa.io import atomic_dir, read_json
from moa.layout import ADAPTER_WEIGHTS, MIXED, ROUTER_CONFIG, TRAIN_LOG, ExperimentPaths, Plot
from moa.lora.peft_io import load_adapter
from moa.metrics import higher_is_better
from moa.tracking import StepResult

COLUMNS = ["method", "task", "metric", "value", "n"]
LABELS = {"rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeLsum": "ROUGE-Lsum",
          "bleu": "BLEU", "chrf": "chrF", "f1": "F1", "exact_match": "EM"}
DPI = 120
SCORE_NOTE = ("Task metrics on a 0–100 scale (perplexity: lower is better). Multitask score: the mean over tasks of "
              "the method's representative metric (the first of each task) divided by the oracle's (inverted for "
              "perplexity); oracle = 1.000, base is the floor.")


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


# --- scores ------------------------------------------------------------------------------------------


def normalized_scores(metrics: pd.DataFrame, representative: Mapping[str, str],
                      reference: str = "oracle") -> pd.DataFrame:
    """Methods x tasks: each method's representative metric divided by the reference's (reference over
    method where lower is better, i.e. perplexity), so the reference is 1.0 on every task."""
    rows = metrics[metrics["metric"] == metrics["task"].map(representative)]
    values = rows.set_index(["method", "task"])["value"].astype(float).unstack("task")
    values = values.reindex(index=pd.unique(metrics["method"]), columns=list(representative))
    ratios = values / (values.loc[reference] if reference in values.index else np.nan)
    lower = [task for task, metric in representative.items() if not higher_is_better(metric)]
    ratios[lower] = 1 / ratios[lower]
    return ratios.replace([np.inf, -np.inf], np.nan)  # a zero denominator leaves the ratio undefined


def multitask_scores(metrics: pd.DataFrame, representative: Mapping[str, str], reference: str = "oracle") -> pd.Series:
    """The reference study's multitask ability score: the mean over tasks of `normalized_scores`; NaN for a
    method missing any task, since a mean over the tasks it has would flatter it."""
    scores = normalized_scores(metrics, representative, reference).mean(axis=1, skipna=False)
    return scores.rename("multitask_score")


def _factors(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A [r, in], B [out, r]) in float64, so near-orthogonal adapters do not round to noise."""
    return {key.removesuffix(".lora_A.weight"): (a.double(), state[key.replace(".lora_A.", ".lora_B.")].double())
            for key, a in state.items() if key.endswith(".lora_A.weight")}


def _inner(x: Mapping[str, tuple[Tensor, Tensor]], y: Mapping[str, tuple[Tensor, Tensor]]) -> float:
    """sum over modules of <B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)): r x r products, no out x in matrix.
    A module only one adapter targets is zero in the other's vector and adds nothing."""
    total = 0.0
    for module in x.keys() & y.keys():
        (a1, b1), (a2, b2) = x[module], y[module]
        total += ((b1.T @ b2) * (a2 @ a1.T).T).sum().item()
    return total


def adapter_cosine(states: Sequence[Mapping[str, Tensor]], scalings: Sequence[float]) -> np.ndarray:
    """Cosine similarity between the adapters' full updates dW_i = s_i B_i A_i, all modules as one vector."""
    factors = [_factors(state) for state in states]
    gram = np.zeros((len(states), len(states)))
    for i, j in itertools.combinations_with_replacement(range(len(states)), 2):
        gram[i, j] = gram[j, i] = scalings[i] * scalings[j] * _inner(factors[i], factors[j])
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero (untrained) adapter has no direction
        return gram / np.outer(norms, norms)


# --- inputs ------------------------------------------------------------------------------------------


def read_metrics(config: Config) -> tuple[pd.DataFrame, list[str]]:
    """All eval/{method}/{task}/metrics.parquet of the config's methods and tasks, and notes on the missing."""
    layout, frames, notes = ExperimentPaths.of(config), [], []
    for method in config["methods"]:
        paths = {task: layout.metrics(method, task) for task in config["tasks"]}
        frames += [pd.read_parquet(path, columns=COLUMNS) for path in paths.values() if path.is_file()]
        missing = [task for task, path in paths.items() if not path.is_file()]
        if missing:
            where = layout.metrics(method, "TASK").relative_to(layout.root)
            notes.append(f"`{method}` has no evaluation on {', '.join(missing)} ({where})")
    empty = pd.DataFrame({"method": [], "task": [], "metric": [], "value": [], "n": []})
    return pd.concat([empty, *frames], ignore_index=True).astype({"value": float}), notes


def _parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def task_adapter_cosine(config: Config) -> tuple[list[str], np.ndarray] | None:
    """The trained task adapters (at least two) and their cosine matrix."""
    dirs = [ExperimentPaths.of(config).adapter(task) for task in config["tasks"]]
    adapters = [(d.name, *load_adapter(d)) for d in dirs if (d / ADAPTER_WEIGHTS).is_file()]
    if len(adapters) < 2:
        return None
    cosine = adapter_cosine([state for *_, state in adapters], [cfg.spec.scaling for _, cfg, _ in adapters])
    return [name for name, *_ in adapters], cosine


def train_logs(config: Config) -> dict[str, pd.DataFrame]:
    layout = ExperimentPaths.of(config)
    paths = {task: layout.adapter(task) for task in config["tasks"]}
    paths |= {"mixed (all tasks)": layout.adapter(MIXED), "router": layout.moa}
    return {name: pd.read_parquet(p / TRAIN_LOG) for name, p in paths.items() if (p / TRAIN_LOG).is_file()}


# --- plots -------------------------------------------------------------------------------------------


def _heatmap(ax: Axes, values: np.ndarray, rows: Sequence[str], columns: Sequence[str], fmt: str, cmap: str,
             vmin: float, vmax: float) -> None:
    """An annotated heatmap; each number is black or white, whichever reads on its cell's colour."""
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    tilt = len(columns) > 4
    ax.set_xticks(range(len(columns)), columns, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(values):
        r, g, b, _ = image.cmap(image.norm(value))
        dark = not np.isnan(value) and 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # NaN cells are left blank
        ax.text(j, i, "–" if np.isnan(value) else format(value, fmt), ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot_scores(normalized: pd.DataFrame, representative: Mapping[str, str]) -> Figure:
    fig = Figure(figsize=(1.4 * normalized.shape[1] + 3, 0.5 * len(normalized) + 2))
    ax = fig.subplots()
    top = max(1.0, float(np.nanmax(normalized.to_numpy())))
    _heatmap(ax, normalized.to_numpy(), list(normalized.index),
             [f"{task}\n{label(metric)}" for task, metric in representative.items()], ".2f", "RdYlGn", 0.0, top)
    ax.set_title("Score relative to oracle (representative metric; perplexity inverted)")
    ax.set_xlabel("task")
    ax.set_ylabel("method")
    return fig


def plot_multitask(scores: pd.Series) -> Figure:
    fig = Figure(figsize=(0.8 * len(scores) + 3, 4.5))
    ax = fig.subplots()
    colors = ["tab:red" if m == "base" else "tab:green" if m == "oracle" else "tab:blue" for m in scores.index]
    bars = ax.bar(scores.index, scores.fillna(0).to_numpy(), color=colors)
    ax.bar_label(bars, [format(s, ".3f") if np.isfinite(s) else "n/a" for s in scores], fontsize=9, padding=3)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="oracle = 1.000")
    if np.isfinite(scores.get("base", np.nan)):
        ax.axhline(scores["base"], color="tab:red", linestyle=":", linewidth=1, label="base (floor)")
    ax.set_title("Multitask ability score (mean over tasks of method / oracle)")
    ax.set_ylabel("multitask score")
    ax.set_ylim(0, 1.25 * max(1.0, float(np.nanmax(scores.to_numpy(), initial=1.0))))  # room for the legend
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(loc="upper left", ncols=2)
    return fig


def plot_confusion(confusion: pd.DataFrame, tasks: Sequence[str]) -> Figure:
    """Routed confusion per whole-sequence strategy: what inference without labels does."""
    routed = confusion[confusion["routing"] == "routed"]
    strategies = list(pd.unique(routed["strategy"]))
    fig = Figure(figsize=(4.2 * len(strategies) + 1, 0.5 * len(tasks) + 3))
    for ax, strategy in zip(np.atleast_1d(fig.subplots(1, len(strategies))), strategies):
        counts = routed[routed["strategy"] == strategy].pivot_table(
            index="true_task", columns="predicted_task", values="count", aggfunc="sum", fill_value=0)
        counts = counts.reindex(index=tasks, columns=tasks, fill_value=0).to_numpy(dtype=float)
        _heatmap(ax, counts, tasks, tasks, ".0f", "Blues", 0.0, max(counts.max(), 1.0))
        ax.set_title(f"strategy `{strategy}` (routed): {100 * np.trace(counts) / max(counts.sum(), 1):.1f}% correct")
        ax.set_xlabel("predicted task")
        ax.set_ylabel("true task")
    fig.suptitle("Router confusion on held-out prompts")
    return fig


def plot_layer_accuracy(evaluation: pd.DataFrame, n_tasks: int) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    layers = evaluation[(evaluation["strategy"] == "layer") & (evaluation["task"] == "all")]
    for routing, rows in layers.groupby("routing", sort=False):
        rows = rows.sort_values("layer")
        ax.plot(rows["layer"].astype(int), 100 * rows["value"], marker="o", markersize=3,
                label=str(routing).replace("_", "-"))
    ax.axhline(100 / n_tasks, color="gray", linestyle=":", label=f"chance (1/{n_tasks})")
    ax.set_title("Routing accuracy of each layer's router (held-out prompts)")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    return fig


def plot_cosine(tasks: Sequence[str], cosine: np.ndarray) -> Figure:
    fig = Figure(figsize=(0.9 * len(tasks) + 3, 0.8 * len(tasks) + 2))
    ax = fig.subplots()
    _heatmap(ax, cosine, tasks, tasks, ".3f", "coolwarm", -1.0, 1.0)
    ax.set_title("Cosine similarity of task adapters' updates ΔW = s·B·A")
    return fig


def plot_train_loss(logs: Mapping[str, pd.DataFrame]) -> Figure:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, log in logs.items():
        (line,) = ax.plot(log["step"], log["loss"], linewidth=1, label=name)
        val = log.dropna(subset=["val_loss"]) if "val_loss" in log else log.iloc[:0]
        ax.plot(val["step"], val["val_loss"], "o", color=line.get_color(), markersize=5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:g}")  # "0.1", not "10^-1" nor "1e-01"
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_title("Training loss (lines) and validation loss (markers)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(title="adapter")
    return fig


# --- summary -----------------------------------------------------------------------------------------


def _fmt(value: object, digits: int) -> str:
    return format(float(value), f".{digits}f") if value is not None and np.isfinite(float(value)) else "–"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def score_table(config: Config, metrics: pd.DataFrame, scores: pd.Series) -> list[str]:
    columns = [(task, metric) for task in config["tasks"] for metric in get_task(config, task).metrics]
    values = metrics.drop_duplicates(["method", "task", "metric"]).set_index(["method", "task", "metric"])["value"]
    header = ["method", *(f"{task} {label(metric)}" for task, metric in columns), "multitask score"]
    rows = [[method, *(_fmt(values.get((method, *c)), 2) for c in columns), _fmt(scores.get(method), 3)]
            for method in config["methods"]]
    return markdown_table(header, rows)


COST_METRICS = {"new_tokens_per_s": ("decoding tokens/s", 1), "latency_s": ("latency per sequence (s)", 2),
                "router_accuracy": ("router accuracy (%)", 2)}


def cost_table(config: Config, metrics: pd.DataFrame) -> list[str]:
    """What each method costs at decoding (means over the generated tasks) and how well MoA routes."""
    means = metrics[metrics["metric"].isin(list(COST_METRICS))].groupby(["method", "metric"])["value"].mean()
    rows = [[method, *(_fmt(means.get((method, m)), digits) for m, (_, digits) in COST_METRICS.items())]
            for method in config["methods"]]
    return markdown_table(["method", *(name for name, _ in COST_METRICS.values())], rows)


def router_summary(evaluation: pd.DataFrame, router_config: Mapping[str, object]) -> list[str]:
    params = evaluation.loc[evaluation["metric"] == "parameters", "value"]
    described = ", ".join(f"{k} {router_config[k]}" for k in ("type", "pooling", "mode", "eta") if k in router_config)
    lines = [f"Router parameters: {int(params.iloc[0]):,}" + (f" ({described})" if described else "")
             if len(params) else "Router parameters: –", ""]
    accuracy = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["task"] == "all")]
    whole = accuracy[accuracy["strategy"] != "layer"].set_index(["strategy", "routing"])["value"]
    layers = accuracy[accuracy["strategy"] == "layer"].groupby("routing")["value"].mean()
    rows = [[f"`{s}`", *(_fmt(100 * whole.get((s, r), np.nan), 2) for r in ("teacher_forced", "routed"))]
            for s in pd.unique(whole.index.get_level_values(0))]
    rows.append(["each layer's router (mean)", *(_fmt(100 * layers.get(r, np.nan), 2)
                                                 for r in ("teacher_forced", "routed"))])
    return lines + markdown_table(["strategy", "teacher-forced accuracy (%)", "routed accuracy (%)"], rows)


# --- the step ----------------------------------------------------------------------------------------


def placeholder(name: str, reason: str) -> Figure:
    """A plot with nothing to show: its title and why, so a reader of the PNG alone knows."""
    figure = Figure(figsize=(6, 2))
    ax = figure.subplots()
    ax.axis("off")
    ax.set_title(name.replace("_", " "))
    ax.text(0.5, 0.5, f"no data: {reason}", ha="center", va="center", wrap=True)
    return figure


def figures(config: Config, normalized: pd.DataFrame, scores: pd.Series, evaluation: pd.DataFrame | None,
            confusion: pd.DataFrame | None, cosine: tuple[list[str], np.ndarray] | None) -> dict[Plot, Figure | str]:
    """Each plot's figure, or why it was skipped."""
    tasks = list(config["tasks"])
    representative = {task: get_task(config, task).metric for task in tasks}
    logs = train_logs(config)
    paths = ExperimentPaths.of(config)
    return {
        Plot.SCORES_HEATMAP: plot_scores(normalized, representative) if normalized.notna().to_numpy().any()
        else "no method has an oracle-normalized score",
        Plot.MULTITASK_SCORE: plot_multitask(scores) if scores.notna().any() else "no method has scores on every task",
        Plot.ROUTER_CONFUSION: plot_confusion(confusion, tasks)
        if confusion is not None and (confusion["routing"] == "routed").any()
        else f"no routed {paths.router_confusion.relative_to(paths.root)}",
        Plot.ROUTER_LAYER_ACCURACY: plot_layer_accuracy(evaluation, len(tasks)) if evaluation is not None
        else f"no {paths.router_eval.relative_to(paths.root)}",
        Plot.ADAPTER_COSINE: plot_cosine(*cosine) if cosine else "fewer than two trained task adapters",
        Plot.TRAIN_LOSS: plot_train_loss(logs) if logs else f"no {TRAIN_LOG}",
    }


def summary(config: Config, metrics: pd.DataFrame, normalized: pd.DataFrame, scores: pd.Series,
            evaluation: pd.DataFrame | None, router_config: Mapping[str, object], plots: Mapping[Plot, Figure | str],
            notes: list[str]) -> str:
    paths = ExperimentPaths.of(config)
    lines = [f"# Report: {config['experiment']}", "", "## Scores", "", *score_table(config, metrics, scores), "",
             SCORE_NOTE, "", "## Cost", "", *cost_table(config, metrics), "",
             "Means over the tasks with generated answers (batched greedy decoding, the batch size of `evaluation`).",
             "", "## Router", ""]
    lines += router_summary(evaluation, router_config) if evaluation is not None \
        else [f"No router evaluation ({paths.router_eval.relative_to(paths.root)}): run `moa train-router` first."]
    lines += ["", "## Plots", "", *(f"![{name}]({paths.plot(name).name})" for name, p in plots.items()
                                    if isinstance(p, Figure))]
    notes = notes + [f"`{method}` multitask score is – (no normalized score on "
                     f"{', '.join(normalized.columns[normalized.loc[method].isna()])})"
                     for method in scores.index[scores.isna()]]
    notes += [f"{paths.plot(name).name} skipped (it says why): {plot}" for name, plot in plots.items()
              if isinstance(plot, str)]
    return "\n".join(lines + (["", "## Notes", "", *(f"- {note}" for note in notes)] if notes else [])) + "\n"


def with_normalized(metrics: pd.DataFrame, normalized: pd.DataFrame, representative: Mapping[str, str]) -> pd.DataFrame:
    """`metrics` plus a `normalized` column: the ratio to the oracle on each task's representative metric."""
    long = normalized.rename_axis(index="method").reset_index().melt("method", var_name="task", value_name="normalized")
    long["metric"] = long["task"].map(representative)
    return metrics.merge(long, on=["method", "task", "metric"], how="left")


def build_report(config: Config) -> StepResult:
    """Write results/{experiment}/report/ (metrics.parquet, summary.md, PNGs) atomically."""
    paths, methods = ExperimentPaths.of(config), list(config["methods"])
    representative = {task: get_task(config, task).metric for task in config["tasks"]}
    metrics, notes = read_metrics(config)
    normalized = normalized_scores(metrics, representative).reindex(methods)
    scores = multitask_scores(metrics, representative).reindex(methods)
    evaluation, confusion = _parquet(paths.router_eval), _parquet(paths.router_confusion)
    router_file = paths.moa / ROUTER_CONFIG
    router_config = read_json(router_file, "rerun `moa train-router`") if router_file.is_file() else {}
    cosine = task_adapter_cosine(config)
    if cosine and len(cosine[0]) < len(config["tasks"]):
        notes.append(f"{paths.plot(Plot.ADAPTER_COSINE).name} covers only the trained adapters: {', '.join(cosine[0])}")
    plots = figures(config, normalized, scores, evaluation, confusion, cosine)
    with atomic_dir(paths.report) as tmp:
        with_normalized(metrics, normalized, representative).to_parquet(tmp / paths.report_metrics.name, index=False)
        for name, plot in plots.items():  # every PNG is written (the workflow declares them all)
            figure = plot if isinstance(plot, Figure) else placeholder(name, plot)
            figure.tight_layout()
            figure.savefig(tmp / paths.plot(name).name, dpi=DPI)
        text = summary(config, metrics, normalized, scores, evaluation, router_config, plots, notes)
        (tmp / paths.summary.name).write_text(text)
    return StepResult(paths.report, metrics={f"multitask_score.{m}": v for m, v in scores.items()},
                      artifacts=paths.report_files)
