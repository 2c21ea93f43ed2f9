"""Routing: the trained router and the experts it chose for the test prompts; where the learned token gates (xlora,
loraflow) put their weight; whether an exact merge routes itself (implicit routing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moa.compose.registry import GATED_METHODS, METHODS
from moa.config import Config, schema
from moa.implicit import ALL, EVERY_LAYER
from moa.layout import GATE_USAGE
from moa.metrics import ROUTER_ACCURACY
from moa.plots import plot_confusion, plot_gates, plot_implicit, plot_layer_accuracy
from moa.report.evidence import Evidence
from moa.report.inputs import gated
from moa.report.markdown import fmt, markdown_table
from moa.roles import MOA

ROUTING, CONFUSION = "routing", "router_confusion"  # the router section's table and plot (moa.report.sections)
GATES = "gates"  # the token gates' table and plot
GATE_COLUMNS = ["method", "task", "layer", "own_weight", "top_expert", "top_weight", "tokens"]
GATES_NOTE = ("A token-gated composition weighs every task's LoRA at every token and layer with a learned gate (xlora: "
              "a classifier on a first pass's last hidden state; loraflow: a gate per block on its input). Own weight: "
              "the mean gate weight on the true task's own LoRA over its validation tokens, averaged over the layers, "
              "in % (a token's gate weights sum to 1, up to loraflow's bias: chance is 100/N); most weight: the "
              "expert with the largest mean weight over the layers. Beside them, the routers' accuracy (%): on the "
              "evaluated test prompts, and MoA's (`last`) on its held-out validation prompts. Per layer: gates.png and "
              "report/gates.parquet (layer −1: the mean over the layers).")
IMPLICIT_NOTE = ("An exact merge adds every task's update at once. Implicit routing accuracy: how often the true "
                 "task's component moves a sequence's hidden states most (the largest share of the summed "
                 "||w_i s_i B_i A_i x|| over every LoRA module), over its prompt and over its generated tokens "
                 "(a scored task: its reference), in %; chance is 100/N. MoA's router accuracy on the same test "
                 "prompts for comparison. Per layer: implicit_routing.png and report/implicit_routing.parquet.")


# --- the router ----------------------------------------------------------------------------------------


def router_summary(evaluation: pd.DataFrame, router_config: Mapping[str, object]) -> list[str]:
    params = evaluation.loc[evaluation["metric"] == "parameters", "value"]
    described = ", ".join(f"{k} {router_config[k]}" for k in ("type", "pooling", "mode", "eta") if k in router_config)
    lines = [f"Router parameters: {int(params.iloc[0]):,}" + (f" ({described})" if described else "")
             if len(params) else "Router parameters: –", ""]
    accuracy = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["task"] == "all")]
    whole = accuracy[accuracy["strategy"] != "layer"].set_index(["strategy", "routing"])["value"]
    layers = accuracy[accuracy["strategy"] == "layer"].groupby("routing")["value"].mean()
    rows = [[f"`{s}`", *(fmt(100 * whole.get((s, r), np.nan), 2) for r in ("teacher_forced", "routed"))]
            for s in pd.unique(whole.index.get_level_values(0))]
    rows.append(["each layer's router (mean)", *(fmt(100 * layers.get(r, np.nan), 2)
                                                 for r in ("teacher_forced", "routed"))])
    return lines + markdown_table(["strategy", "teacher-forced accuracy (%)", "routed accuracy (%)"], rows)


def routing_table(routing: pd.DataFrame, evaluation: pd.DataFrame | None, tasks: Sequence[str]) -> list[str]:
    """Routing accuracy per task and over all prompts: each routed composition's on the evaluated test prompts,
    then the trained router's on the held-out (validation) prompts with each whole-sequence strategy (routed)."""
    correct = routing.assign(correct=routing["count"].where(routing["task"] == routing["chosen"], 0))
    counts = correct.groupby(["method", "task"], sort=False)[["correct", "count"]].sum()
    rows = []
    for method, table in counts.groupby(level="method", sort=False):
        table = table.droplevel("method")
        share = 100 * table["correct"] / table["count"]
        rows.append([f"`{method}`, test", *(fmt(share.get(t), 2) for t in tasks),
                     fmt(100 * table["correct"].sum() / table["count"].sum(), 2)])
    if evaluation is not None:
        routed = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["routing"] == "routed")]
        accuracy = routed.set_index(["strategy", "task"])["value"]
        rows += [[f"validation, `{s}`", *(fmt(100 * accuracy.get((s, t), np.nan), 2) for t in [*tasks, "all"])]
                 for s in pd.unique(routed["strategy"]) if s != "layer"]
    return markdown_table(["routing accuracy (%)", *tasks, "all prompts"], rows)


def router(evidence: Evidence) -> list[str]:
    """The trained router on held-out prompts, then every routed composition on the evaluated test prompts."""
    paths, routing, evaluation = evidence.paths, evidence.routing, evidence.router_eval
    lines = ["## Router", ""]
    lines += router_summary(evaluation, evidence.router_config) if evaluation is not None \
        else [f"No router evaluation ({paths.router_eval.relative_to(paths.root)}): run `moa train-router` first."]
    if routing.empty:
        return [*lines, "", "No composition's evaluation was routed one expert per sequence by a router."]
    unrecorded = [t for t in evidence.tasks if t not in set(routing["task"])]
    note = [(f"No test routing is recorded for {', '.join(unrecorded)}: a task scored by perplexity generates nothing "
             "(its predictions have no `expert`), and a routed evaluation may be missing; `all prompts` of a test row "
             "covers the tasks it has.")] if unrecorded else []
    intro = ("On the evaluated test prompts: the expert each routed composition chose (its predictions' `expert`; "
             f"the counts are in {paths.report_table(ROUTING).name} and the {CONFUSION} plot), next to the "
             "router's routed accuracy on the held-out validation prompts.")
    return [*lines, "", intro, "", *routing_table(routing, evaluation, evidence.tasks), "", *note]


def confusion_plot(evidence: Evidence) -> Figure | str:
    """The held-out prompts' routing (where routed) beside the evaluated test prompts'."""
    confusion, paths = evidence.confusion, evidence.paths
    routed = confusion is not None and bool((confusion["routing"] == "routed").any())
    if not (routed or len(evidence.routing)):
        return f"no routed {paths.router_confusion.relative_to(paths.root)} and no routed evaluation"
    return plot_confusion(confusion if routed else None, evidence.routing, evidence.tasks)


def layer_accuracy_plot(evidence: Evidence) -> Figure | str:
    if evidence.router_eval is None:
        return f"no {evidence.paths.router_eval.relative_to(evidence.paths.root)}"
    return plot_layer_accuracy(evidence.router_eval, len(evidence.tasks))


# --- implicit routing ----------------------------------------------------------------------------------


def implicit(evidence: Evidence) -> list[str]:
    """Per exact merge and segment: how often the true task's component has the largest share over all its
    modules, per task and overall; MoA's routing accuracy on the same test prompts beside it."""
    table = evidence.implicit
    if not len(table):
        return []
    overall = table[(table["layer"] == EVERY_LAYER) & (table["module"] == ALL)]
    tasks = list(pd.unique(overall["task"]))
    rows = []
    for (method, segment), cells in overall.groupby(["method", "segment"], sort=False):
        by_task = cells.set_index("task")
        mean = float((by_task["accuracy"] * by_task["n"]).sum() / by_task["n"].sum())
        rows.append([f"`{method}`", segment, *(fmt(100 * by_task["accuracy"].get(t, np.nan), 1) for t in tasks),
                     fmt(100 * mean, 1)])
    rows += [[f"`{method}` (router)", "prompt", *(fmt(accuracy.get(t, np.nan), 1) for t in [*tasks, "all"])]
             for method, accuracy in router_accuracies(evidence.metrics).items()]
    return ["## Does a merged model route itself?", "", IMPLICIT_NOTE, "",
            *markdown_table(["method", "tokens", *tasks, "all"], rows)]


def router_accuracies(metrics: pd.DataFrame) -> dict[str, pd.Series]:
    """Each routed composition's router accuracy (%) on the evaluated test prompts per task, and over all of
    them ("all": the tasks' weighted by their prompts)."""
    accuracies = {}
    for method, cells in metrics[metrics["metric"] == ROUTER_ACCURACY].groupby("method"):
        by_task = cells.set_index("task")["value"]
        accuracies[method] = pd.concat([by_task, pd.Series(
            {"all": float((by_task * cells.set_index("task")["n"]).sum() / cells["n"].sum())})])
    return accuracies


def implicit_plot(evidence: Evidence) -> Figure | str:
    if not len(evidence.implicit):
        exact = ", ".join(m for m, entry in METHODS.items() if entry.implicit_routing)
        return f"no exact merge ({exact}) was evaluated"
    return plot_implicit(evidence.implicit, evidence.tasks)


# --- token gates ---------------------------------------------------------------------------------------


def gates_configured(config: Config) -> bool:
    """Whether any composition gates per token (xlora, loraflow), of the schema's default list where the config
    lists none."""
    methods = config.get("methods") or schema()["properties"]["methods"]["default"]
    return any(((entry or {}).get("method") or name) in GATED_METHODS for name, entry in methods.items())


def gate_table(gates: pd.DataFrame) -> pd.DataFrame:
    """report/gates.parquet: per gated composition, true task and layer (EVERY_LAYER: the mean over the layers),
    the mean gate weight on the task's own expert, and the expert with the most weight and its weight."""
    pooled = gates.groupby(["method", "task", "expert"], sort=False).agg(
        weight=("weight", "mean"), tokens=("tokens", "max")).reset_index().assign(layer=EVERY_LAYER)
    rows = []
    for (method, task, layer), cells in pd.concat([gates, pooled]).groupby(["method", "task", "layer"], sort=False):
        weights = cells.set_index("expert")["weight"]
        rows.append({"method": method, "task": task, "layer": int(layer), "own_weight": weights.get(task, np.nan),
                     "top_expert": weights.idxmax(), "top_weight": weights.max(), "tokens": int(cells["tokens"].max())})
    return pd.DataFrame(rows, columns=GATE_COLUMNS).astype({"method": str, "task": str, "layer": "int64",
                                                            "own_weight": float, "top_expert": str,
                                                            "top_weight": float, "tokens": "int64"})


def own_weights(evidence: Evidence) -> dict[str, pd.Series]:
    """Each gated composition's mean weight on the true task's expert over the layers, per task and over all
    ("all": the tasks' weighted by their validation tokens)."""
    table = gate_table(evidence.gates)
    pooled = table[table["layer"] == EVERY_LAYER]
    weights = {}
    for method, cells in pooled.groupby("method", sort=False):
        by_task = cells.set_index("task")
        overall = float((by_task["own_weight"] * by_task["tokens"]).sum() / by_task["tokens"].sum())
        weights[method] = pd.concat([by_task["own_weight"], pd.Series({"all": overall})])
    return weights


def _moa_validation(evaluation: pd.DataFrame | None) -> pd.Series:
    """MoA's routed accuracy (%) with `last` on its held-out validation prompts, per task and "all"."""
    if evaluation is None:
        return pd.Series(dtype=float)
    rows = evaluation[(evaluation["metric"] == "accuracy") & (evaluation["routing"] == "routed")
                      & (evaluation["strategy"] == "last")]
    return 100 * rows.set_index("task")["value"]


def gates(evidence: Evidence) -> list[str]:
    """Per gated composition, its mean weight on the true task's expert and the expert with the most weight, per
    task; the routers' accuracy beside them."""
    lines = ["## Token gates: how much weight goes to the true task's LoRA?", ""]
    if evidence.gates.empty:
        return [*lines, "No token-gated composition's gate usage is there yet (see the notes)."]
    columns, table = [*evidence.tasks, "all"], gate_table(evidence.gates)
    top = table[table["layer"] == EVERY_LAYER].set_index(["method", "task"])["top_expert"]
    rows = []
    for method, weights in own_weights(evidence).items():
        rows.append([f"`{method}`, own weight", *(fmt(100 * weights.get(c, np.nan), 1) for c in columns)])
        rows.append([f"`{method}`, most weight", *(f"`{top[method, t]}`" if (method, t) in top.index else "–"
                                                   for t in evidence.tasks), "–"])
    rows += [[f"`{method}` (router), test", *(fmt(accuracy.get(c, np.nan), 1) for c in columns)]
             for method, accuracy in router_accuracies(evidence.metrics).items()]
    if len(validation := _moa_validation(evidence.router_eval)):
        rows.append([f"`{MOA}` (router), validation", *(fmt(validation.get(c, np.nan), 1) for c in columns)])
    return [*lines, GATES_NOTE, "", *markdown_table(["method", *evidence.tasks, "all"], rows)]


def gates_notes(evidence: Evidence) -> list[str]:
    """The gated compositions without gate usage."""
    paths, recorded = evidence.paths, set(evidence.gates["method"])
    return [f"`{name}` has no gate usage ({(paths.learned(name) / GATE_USAGE).relative_to(paths.root)}): run "
            f"`moa learn-merge --method {name}`" for name in gated(evidence.config) if name not in recorded]


def gates_plot(evidence: Evidence) -> Figure | str:
    if evidence.gates.empty:
        return f"no gate usage of {', '.join(gated(evidence.config))} (learned/{{name}}/{GATE_USAGE})"
    return plot_gates(gate_table(evidence.gates), evidence.tasks)


def gates_metrics(evidence: Evidence) -> dict[str, float]:
    """gates.{method}.own_weight and gates.{method}.{task}.own_weight: the mean weight on the true task's expert."""
    return {f"gates.{method}.{'' if task == 'all' else f'{task}.'}own_weight": float(value)
            for method, weights in own_weights(evidence).items() for task, value in weights.items()}
