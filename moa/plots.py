"""The report's figures, each a matplotlib Figure (rendered with Agg by Figure.savefig: no pyplot state)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from moa.compose.registry import Kind
from moa.metrics import METRICS
from moa.roles import FLOOR, ORACLE

KIND_COLORS = {Kind.BASE: "tab:red", Kind.ADAPTER: "tab:purple", Kind.ROUTE: "tab:orange", Kind.MERGE: "tab:blue"}
ORACLE_COLOR = "tab:green"


def placeholder(name: str, reason: str) -> Figure:
    """A plot with nothing to show: its title and why, so a reader of the PNG alone knows."""
    figure = Figure(figsize=(6, 2))
    ax = figure.subplots()
    ax.axis("off")
    ax.set_title(name.replace("_", " "))
    ax.text(0.5, 0.5, f"no data: {reason}", ha="center", va="center", wrap=True)
    return figure


def _heatmap(ax: Axes, values: np.ndarray, rows: Sequence[str], columns: Sequence[str], fmt: str, cmap: str,
             vmin: float, vmax: float, fontsize: float | None = 9) -> Colorbar:
    """An annotated heatmap (fontsize None: not annotated); each number is black or white, whichever reads on its
    cell's colour."""
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    tilt = len(columns) > 4
    ax.set_xticks(range(len(columns)), columns, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(values if fontsize else np.empty((0, 0))):
        r, g, b, _ = image.cmap(image.norm(value))
        dark = not np.isnan(value) and 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # NaN cells are left blank
        ax.text(j, i, "–" if np.isnan(value) else format(value, fmt), ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "black")
    return ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot_scores(normalized: pd.DataFrame, representative: Mapping[str, str], excluded: Collection[str]) -> Figure:
    """Methods x tasks, oracle-normalized; a task without signal has no normalized scores (its column says so)."""
    fig = Figure(figsize=(1.4 * normalized.shape[1] + 3, 0.5 * len(normalized) + 2))
    ax = fig.subplots()
    top = max(1.0, float(np.nanmax(normalized.to_numpy())))
    columns = [f"{task}\n{METRICS[metric].label}" + ("\n(no signal)" if task in excluded else "")
               for task, metric in representative.items()]
    _heatmap(ax, normalized.to_numpy(), list(normalized.index), columns, ".2f", "RdYlGn", 0.0, top)
    inverted = [METRICS[m].label for m in dict.fromkeys(representative.values()) if not METRICS[m].higher_is_better]
    ax.set_title("Score relative to oracle (representative metric" + "".join(f"; {m} inverted" for m in inverted) + ")")
    ax.set_xlabel("task")
    ax.set_ylabel("method")
    return fig


def plot_format_adherence(adherence: pd.DataFrame) -> Figure:
    """Methods x tasks with a format check: the percentage of generated outputs in the task's format."""
    fig = Figure(figsize=(1.3 * adherence.shape[1] + 3, 0.5 * len(adherence) + 2))
    ax = fig.subplots()
    _heatmap(ax, adherence.to_numpy(), list(adherence.index), list(adherence.columns), ".0f", "RdYlGn", 0.0, 100.0)
    ax.set_title("Format adherence: % of generated outputs in the task's format")
    ax.set_xlabel("task")
    ax.set_ylabel("method")
    return fig


def _counts(rows: pd.DataFrame, true: str, chosen: str, tasks: Sequence[str]) -> np.ndarray:
    """A confusion matrix [true task, chosen expert] of counts; NaN rows for the tasks without any."""
    table = rows.pivot_table(index=true, columns=chosen, values="count", aggfunc="sum", fill_value=0)
    return table.reindex(index=tasks, columns=tasks).to_numpy(dtype=float)


def plot_confusion(validation: pd.DataFrame | None, routing: pd.DataFrame, tasks: Sequence[str]) -> Figure:
    """Router confusion: on the held-out prompts per whole-sequence strategy (routed, as inference without labels
    runs; moa/confusion.parquet), and on the evaluated test prompts per routed composition (report/routing.parquet),
    one row of panels each."""
    rows = []
    if validation is not None:
        routed = validation[validation["routing"] == "routed"]
        rows.append([(f"held-out, strategy `{s}`", _counts(routed[routed["strategy"] == s], "true_task",
                                                            "predicted_task", tasks))
                     for s in pd.unique(routed["strategy"])])
    methods = list(pd.unique(routing["method"]))
    if methods:
        rows.append([(f"test, `{m}`", _counts(routing[routing["method"] == m], "task", "chosen", tasks))
                     for m in methods])
    columns = max(len(row) for row in rows)
    fig = Figure(figsize=(4.4 * columns + 1, (0.5 * len(tasks) + 2.6) * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, panels in enumerate(rows):
        for ax, (title, counts) in zip(axes[row], panels):
            _heatmap(ax, counts, tasks, tasks, ".0f", "Blues", 0.0, max(np.nanmax(counts), 1.0))
            ax.set_title(f"{title}: {100 * np.nansum(np.diag(counts)) / max(np.nansum(counts), 1):.1f}% correct",
                         fontsize=10)
            ax.set_xlabel("chosen expert")
            ax.set_ylabel("true task")
        for ax in axes[row, len(panels):]:
            ax.axis("off")
    fig.suptitle("Router confusion on held-out (validation) prompts and on the evaluated test prompts "
                 "(– : no routing recorded)")
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
        if "val_loss" in log:  # not in the router's log of routers mode: it fits on features, no held-out loss
            val = log.dropna(subset=["val_loss"])
            ax.plot(val["step"], val["val_loss"], "o", color=line.get_color(), markersize=5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:g}")  # "0.1", not "10^-1" nor "1e-01"
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_title("Training loss (lines) and validation loss (markers)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(title="adapter")
    return fig


def _color(method: str, kind: Kind) -> str:
    return ORACLE_COLOR if method == ORACLE else KIND_COLORS[kind]


def _kind_legend(ax: Axes, kinds: Collection[Kind], **kwargs: object) -> None:
    names = {Kind.BASE: "base model", Kind.ADAPTER: "one trained adapter", Kind.ROUTE: "routed",
             Kind.MERGE: "merge"}
    handles = [Line2D([], [], color=KIND_COLORS[k], marker="o", linestyle="", label=names[k]) for k in names if k in kinds]
    ax.legend(handles=handles, **kwargs)


def plot_multitask(scores: pd.DataFrame, kinds: Mapping[str, Kind], confidence: float, tasks_used: str) -> Figure:
    """A forest plot: each method's multitask score (rows `value`, `lo`, `hi`, best first) with its interval."""
    fig = Figure(figsize=(8, 0.38 * len(scores) + 2.2))
    ax = fig.subplots()
    y = np.arange(len(scores))[::-1]
    colors = [_color(m, kinds[m]) for m in scores.index]
    errors = np.abs(scores[["lo", "hi"]].to_numpy().T - scores["value"].to_numpy())
    for i, (yi, color) in enumerate(zip(y, colors)):
        ax.errorbar(scores["value"].iloc[i], yi, xerr=errors[:, [i]], fmt="o", color=color, capsize=3, markersize=6)
        ax.annotate(f"{scores['value'].iloc[i]:.3f}", (scores["hi"].iloc[i], yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.axvline(1.0, color=ORACLE_COLOR, linestyle="--", linewidth=1)
    if FLOOR in scores.index:
        ax.axvline(scores.loc[FLOOR, "value"], color=KIND_COLORS[Kind.BASE], linestyle=":", linewidth=1)
    ax.set_yticks(y, list(scores.index))
    ax.set_xlim(min(0.0, float(scores["lo"].min())) - 0.02, max(1.1, float(scores["hi"].max()) + 0.12))
    ax.set_xlabel(f"multitask score (oracle = 1, dashed; base dotted), {confidence:.0%} bootstrap interval")
    ax.set_title(f"Multitask ability score\n{tasks_used}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _kind_legend(ax, {kinds[m] for m in scores.index}, loc="lower right", fontsize=8)
    return fig


def _method_panels(n_panels: int, methods: Sequence[str], top: float) -> tuple[Figure, np.ndarray, dict[str, int]]:
    """A grid of up to three panels a row sharing one row per method (the first on top), each with the methods'
    names and an x grid, the unused cells hidden; `top` inches above for the title. Returns the figure, its panels'
    axes and each method's y."""
    columns = min(3, n_panels)
    rows = -(-n_panels // columns)
    fig = Figure(figsize=(4.2 * columns, (0.28 * len(methods) + 1.2) * rows + top), layout="constrained")
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    y = {m: i for i, m in enumerate(reversed(methods))}
    for ax in axes[:n_panels]:
        ax.set_yticks(list(y.values()), list(y))
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[n_panels:]:
        ax.axis("off")
    return fig, axes[:n_panels], y


def plot_harness(figures: pd.DataFrame, kinds: Mapping[str, Kind], confidence: float) -> Figure:
    """One panel per harness task and metric: each composition's figure with its interval (rows method, task,
    metric, value, lo, hi, higher_is_better; a figure without an interval is a bare marker)."""
    panels = list(dict.fromkeys(zip(figures["task"], figures["metric"])))
    fig, axes, y = _method_panels(len(panels), list(dict.fromkeys(figures["method"])), top=0.6)
    for ax, (task, metric) in zip(axes, panels):
        panel = figures[(figures["task"] == task) & (figures["metric"] == metric)].set_index("method")
        for method, row in panel.iterrows():
            color = _color(method, kinds[method])
            spread = [[row["value"] - row["lo"]], [row["hi"] - row["value"]]] if pd.notna(row["lo"]) else None
            ax.errorbar(row["value"], y[method], xerr=spread, fmt="o", capsize=2, markersize=5, color=color)
        ax.set_title(f"{task}: {metric}{'' if panel['higher_is_better'].iloc[0] else ' (lower is better)'}",
                     fontsize=10)
    fig.suptitle(f"lm-evaluation-harness tasks, {confidence:.0%} paired bootstrap intervals over the documents",
                 fontsize=10)
    return fig


def plot_differences(differences: pd.DataFrame, order: Sequence[str], kinds: Mapping[str, Kind], reference: str,
                     confidence: float, alpha: float) -> Figure:
    """One panel per figure (`panel`, in the table's order): each method's paired difference to `reference`
    (rows `difference`, `lo`, `hi`, `significant`) with its interval; filled markers differ after Holm."""
    panels = list(pd.unique(differences["panel"]))
    methods = [m for m in dict.fromkeys(order) if m in set(differences["method"])]
    fig, axes, y = _method_panels(len(panels), methods, top=0.8)
    for ax, panel in zip(axes, panels):
        for method, row in differences[differences["panel"] == panel].set_index("method").iterrows():
            color = _color(method, kinds[method])
            ax.errorbar(row["difference"], y[method], xerr=[[row["difference"] - row["lo"]], [row["hi"] - row["difference"]]],
                        fmt="o", capsize=2, markersize=5, color=color,
                        markerfacecolor=color if row["significant"] else "white")
        ax.axvline(0, color="black", linewidth=1)
        ax.set_title(panel, fontsize=10)
    fig.suptitle(f"Difference to `{reference}` (method minus {reference}) with its {confidence:.0%} paired bootstrap "
                 f"interval\nfilled: significant at alpha {alpha:g} after Holm's correction", fontsize=10)
    fig.supxlabel("difference of the oracle-normalized score (multitask score: of the mean over tasks)", fontsize=9)
    return fig


def plot_implicit(implicit: pd.DataFrame, tasks: Sequence[str]) -> Figure:
    """Per exact merge and segment: layers x tasks, the mean share of the true task's component (all of a
    layer's modules together). 1/N (the dashed level in the colour bar) is no preference at all."""
    pooled = implicit[(implicit["module"] == "all") & (implicit["layer"] >= 0)]
    methods, segments = list(pd.unique(pooled["method"])), list(pd.unique(pooled["segment"]))
    layers = sorted(pooled["layer"].unique())
    fig = Figure(figsize=(1.1 * len(tasks) * len(segments) + 3, 0.18 * len(layers) * len(methods) + 2.5),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(methods), len(segments), squeeze=False))
    for row, method in enumerate(methods):
        for col, segment in enumerate(segments):
            cells = pooled[(pooled["method"] == method) & (pooled["segment"] == segment)]
            grid = cells.pivot(index="layer", columns="task", values="share_true").reindex(index=layers, columns=tasks)
            ax = axes[row, col]
            image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
            ax.set_yticks(range(0, len(layers), max(1, len(layers) // 8)), layers[::max(1, len(layers) // 8)])
            ax.set_title(f"`{method}`, {segment} tokens", fontsize=10)
            ax.set_ylabel("layer")
            bar = fig.colorbar(image, ax=ax, shrink=0.8)
            bar.ax.axhline(1 / len(tasks), color="white", linestyle="--", linewidth=1)
    fig.suptitle("Does the merge route itself? Mean share of the true task's component in each layer's update")
    return fig


def plot_gates(gates: pd.DataFrame, tasks: Sequence[str]) -> Figure:
    """One panel per token-gated composition (report/gates.parquet): true tasks x layers, the mean gate weight on
    the task's own expert over its validation tokens, the last column their mean over the layers; each row names
    the expert with the most weight over all layers (in red where it is not the task's own). 1/N (dashed in the
    colour bar) is no preference."""
    methods = list(pd.unique(gates["method"]))
    layers = sorted(int(layer) for layer in gates["layer"].unique() if layer >= 0)
    columns = [*map(str, layers), "all"]
    fontsize = 9 if len(columns) <= 12 else 6.5 if len(columns) <= 24 else None  # None: only `all` annotated
    fig = Figure(figsize=(max(7.0, 0.42 * len(columns) + 3.5), (0.42 * len(tasks) + 1.3) * len(methods) + 0.9),
                 layout="constrained")
    for ax, method in zip(fig.subplots(len(methods), 1, squeeze=False)[:, 0], methods):
        cells = gates[gates["method"] == method]
        grid = cells.pivot(index="task", columns="layer", values="own_weight").reindex(index=tasks,
                                                                                    columns=[*layers, -1])
        top = cells[cells["layer"] < 0].set_index("task")["top_expert"]
        rows = [f"{task} (most: {top.get(task, '–')})" for task in tasks]
        bar = _heatmap(ax, grid.to_numpy(dtype=float), rows, columns, ".2f", "viridis", 0.0, 1.0, fontsize)
        bar.ax.axhline(1 / len(tasks), color="white", linestyle="--", linewidth=1.5)
        ax.set_xticks(range(len(columns)), columns, rotation=0, ha="center", fontsize=8 if len(columns) > 12 else None)
        for label, task in zip(ax.get_yticklabels(), tasks):
            label.set_color("black" if top.get(task) == task else "tab:red")
        if fontsize is None:
            for i, value in enumerate(grid[-1].to_numpy(dtype=float)):
                r, g, b, _ = bar.mappable.cmap(bar.mappable.norm(value))
                ax.text(len(layers), i, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        fontsize=8, color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
        ax.axvline(len(layers) - 0.5, color="white", linewidth=3)  # the layers' mean apart
        ax.set_title(f"`{method}`", fontsize=10)
        ax.set_xlabel("layer (all: the mean over the layers)")
        ax.set_ylabel("true task")
    fig.suptitle("Token gates: mean weight on the true task's own LoRA per layer (validation tokens)\n"
                 "most: the expert with the most weight over all layers (red: not the task's own); "
                 "dashed: 1/N", fontsize=10)
    return fig


SWEEP_LINES = {Kind.ROUTE: "-", Kind.MERGE: "--", Kind.BASE: ":"}
SWEEP_COLORS = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
SWEEP_MARKERS = "os^Dv<>P"  # with the colours, one pair per method for up to 64 methods (no oracle green, base red)


def plot_sweep(sweep: pd.DataFrame, kinds: Mapping[str, Kind], confidence: float) -> Figure:
    """The multitask score against the number of tasks composed (sweep.parquet's rows): each method a line through
    its mean over the subsets of each size, and each subset a point with its bootstrap interval; the methods side by
    side at each size."""
    methods = list(dict.fromkeys(sweep["method"]))
    sizes = sorted(sweep["n_tasks"].unique())
    width = 0.3 * min(np.diff(sizes), default=1)  # of the methods side by side at one size
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    others = [m for m in methods if m != FLOOR]
    for i, method in enumerate(methods):
        rows = sweep[sweep["method"] == method]
        offset = width * ((i + 0.5) / len(methods) - 0.5)
        j = others.index(method) if method in others else 0
        color = KIND_COLORS[Kind.BASE] if method == FLOOR else SWEEP_COLORS[j % len(SWEEP_COLORS)]
        marker = SWEEP_MARKERS[j // len(SWEEP_COLORS) % len(SWEEP_MARKERS)]
        score = rows["multitask_score"]
        ax.errorbar(rows["n_tasks"] + offset, score, yerr=[score - rows["lo"], rows["hi"] - score], fmt=marker,
                    markersize=4, capsize=2, elinewidth=0.8, color=color, alpha=0.6)
        means = score.groupby(rows["n_tasks"]).mean()
        ax.plot(means.index + offset, means.to_numpy(), SWEEP_LINES[kinds[method]], color=color, marker=marker,
                markersize=7, linewidth=1.8, label=method)
    ax.axhline(1.0, color=ORACLE_COLOR, linestyle="--", linewidth=1, label="oracle (= 1)")
    ax.set_xticks(sizes)
    ax.set_xlim(sizes[0] - width, sizes[-1] + width)
    ax.set_xlabel("tasks composed")
    ax.set_ylabel("multitask score (oracle = 1)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Multitask score against the number of tasks composed\nlarge markers and lines: the mean over the "
                 f"subsets of each size (solid: routed, dashed: merge, dotted: base)\nsmall: each subset, with its "
                 f"{confidence:.0%} paired bootstrap interval", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="method")
    return fig


def plot_tuning(tuning: pd.DataFrame) -> Figure:
    """Each tuned composition's criterion over its scale, a line per setting of its other parameters; the chosen
    candidate starred."""
    compositions = list(dict.fromkeys(tuning["composition"]))
    fig = Figure(figsize=(5 * len(compositions), 4))
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(compositions), squeeze=False)[0]), compositions):
        rows = tuning[tuning["composition"] == name].groupby("candidate").first()
        others = [c for c in ("density", "k") if c in rows and rows[c].notna().any()]
        for setting, line in (rows.groupby(others) if others else [((), rows)]):
            values = setting if isinstance(setting, tuple) else (setting,)
            label = ", ".join(f"{c} {v:g}" for c, v in zip(others, values)) or None
            line = line.sort_values("scale")
            ax.plot(line["scale"], line["criterion"], marker="o", markersize=3, label=label)
        chosen = rows[rows["chosen"]]
        ax.plot(chosen["scale"], chosen["criterion"], "*", color="black", markersize=12, label="chosen")
        ax.axhline(1.0, color=ORACLE_COLOR, linestyle=":", label="oracle")
        ax.set_title(name)
        ax.set_xlabel("scale (every task weight times)")
        ax.set_ylabel("validation perplexity / oracle's (mean over tasks)")
        ax.legend(fontsize=8)
    fig.suptitle("Tuning on the validation split (lower is better)")
    return fig
