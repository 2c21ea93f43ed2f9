"""The report's sections, in the summary's order: adding a section is one entry here (and its functions).

Each entry names the files it writes under report/: the workflow's outputs and MLflow's artifacts are these."""

from __future__ import annotations

from moa.report.section import Section
from moa.report.sections import harness, routing, scores, sweep, training, tuning
from moa.report.sections.verdict import sweep_verdict, verdict

SECTIONS: list[Section] = [
    Section("verdict", verdict=verdict),
    Section("multitask score", text=scores.multitask, notes=scores.multitask_notes,
            tables={"intervals": lambda e: e.uncertainty.intervals, "comparisons": lambda e: e.uncertainty.comparisons},
            plots={"scores_heatmap": scores.scores_heatmap, "multitask_score": scores.multitask_plot}),
    Section("per task", text=scores.per_task, plots={"differences": scores.differences_plot}),
    Section("task-count sweep", text=sweep.sweep, verdict=sweep_verdict, notes=lambda e: e.sweep.notes,
            tables={sweep.SWEEP: lambda e: e.sweep.table}, plots={sweep.SWEEP: sweep.sweep_plot},
            configured=sweep.configured),
    Section("lm-evaluation-harness", text=harness.harness, notes=lambda e: e.harness.notes,
            tables={harness.HARNESS: lambda e: e.harness.figures, harness.COMPARISONS: lambda e: e.harness.comparisons},
            plots={harness.HARNESS: harness.harness_plot}, metrics=harness.harness_metrics,
            configured=harness.configured),
    Section("scores", text=scores.scores, tables={"metrics": scores.with_normalized}),
    Section("format adherence", text=scores.format_adherence, plots={"format_adherence": scores.format_plot}),
    Section("cost", text=scores.cost),
    Section("router", text=routing.router, tables={routing.ROUTING: lambda e: e.routing},
            plots={routing.CONFUSION: routing.confusion_plot, "router_layer_accuracy": routing.layer_accuracy_plot}),
    Section("token gates", text=routing.gates, notes=routing.gates_notes,
            tables={routing.GATES: lambda e: routing.gate_table(e.gates)}, plots={routing.GATES: routing.gates_plot},
            metrics=routing.gates_metrics, configured=routing.gates_configured),
    Section("tuned merges", text=tuning.tuning, tables={tuning.TUNING: lambda e: e.tuning},
            plots={tuning.TUNING: tuning.tuning_plot}, configured=tuning.configured),
    Section("implicit routing", text=routing.implicit, tables={"implicit_routing": lambda e: e.implicit},
            plots={"implicit_routing": routing.implicit_plot}),
    Section("training", notes=training.cosine_notes,
            plots={training.COSINE: training.cosine_plot, "train_loss": training.train_loss_plot}),
]
