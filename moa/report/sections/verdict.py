"""The verdict: the answer in words, first in the summary; the sweep adds its own lines (sweep_verdict)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moa.compose.registry import Kind, Tier
from moa.report.evidence import Evidence
from moa.report.markdown import difference, fmt, names, with_interval
from moa.report.uncertainty import Uncertainty
from moa.roles import FLOOR, MOA
from moa.stats import ALL_TASKS, MULTITASK, NORMALIZED, POWER


def verdict(evidence: Evidence) -> list[str]:
    """Which merges are indistinguishable from each reference (alpha, after Holm), the best merge and its gap,
    where the first reference matters per task, and what the test sizes can detect."""
    uncertainty = evidence.uncertainty
    result, alpha = uncertainty.result, uncertainty.alpha
    if not uncertainty.signal:
        return [("No task carries signal (on none does the oracle beat base beyond the interval of their difference; "
                 "each task's reason is under Multitask score), so there is no multitask score and nothing to decide.")]
    if not result.multitask:
        return [(f"No method was evaluated on every task with signal ({', '.join(uncertainty.signal)}): nothing to "
                 "decide.")]
    merges = [m for m in uncertainty.multitask().index if evidence.kinds[m] == Kind.MERGE]
    sizes = sorted({result.items[t] for t in uncertainty.signal})
    span = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    first = (f"- Multitask score {uncertainty.tasks_used()} ({span} test items per task, {uncertainty.resamples} "
             f"paired resamples); alpha {alpha:g}, Holm-corrected over the methods compared with each reference.")
    if not merges:
        return [first, "- No merge was evaluated on every task with signal.", *_routing_or_gating(evidence)]
    best = merges[0]
    return [first, *_merges_vs_references(uncertainty, merges), *_tiers(evidence, merges),
            *_routing_or_gating(evidence),
            f"- **Best merge**: `{best}`, {with_interval(uncertainty.figure(best, ALL_TASKS, MULTITASK), 3)}"
            + "".join(f"; minus `{r}`: {difference(uncertainty.compared(best, r))}"
                      for r in uncertainty.references if uncertainty.compared(best, r) is not None) + ".",
            *_per_task_verdict(uncertainty, merges), *_detectable_verdict(uncertainty, merges)]


def _merges_vs_references(uncertainty: Uncertainty, merges: Sequence[str]) -> list[str]:
    lines = []
    for reference in uncertainty.references:
        rows = {m: uncertainty.compared(m, reference) for m in merges}
        rows = {m: row for m, row in rows.items() if row is not None}
        if not rows:
            lines.append(f"- `{reference}` has no multitask score: no comparison with it.")
            continue
        same = [m for m, row in rows.items() if not row["significant"]]
        worse = [f"`{m}` ({with_interval(row, 3, True, 'difference')})" for m, row in rows.items()
                 if row["significant"] and row["difference"] < 0]
        better = [f"`{m}` ({with_interval(row, 3, True, 'difference')})" for m, row in rows.items()
                  if row["significant"] and row["difference"] > 0]
        lines.append(f"- **Merges vs `{reference}`**: indistinguishable: {names(same)}; worse: "
                     f"{', '.join(worse) or 'none'}; better: {', '.join(better) or 'none'}.")
    return lines


def _tiers(evidence: Evidence, merges: Sequence[str]) -> list[str]:
    """The best merge of each tier against MoA (or the first reference), and whether a merge that used no more
    labelled data than MoA's router matches it: what "a merge suffices" is decided on."""
    uncertainty = evidence.uncertainty
    reference = MOA if MOA in uncertainty.references else next(iter(uncertainty.references), None)
    budgets = evidence.budgets.set_index("method")
    if reference is None or uncertainty.compared(merges[0], reference) is None:
        return []
    best = {tier: next((m for m in merges if budgets.loc[m, "tier"] == tier), None)
            for tier in (Tier.TRAINING_FREE, Tier.TUNED, Tier.LEARNED)}
    parts = [f"{tier} `{m}` {with_interval(uncertainty.figure(m, ALL_TASKS, MULTITASK), 3)} (minus `{reference}`: "
             f"{difference(uncertainty.compared(m, reference))}; {_data(budgets.loc[m, 'labelled'])})"
             for tier, m in best.items() if m is not None]
    lines = [f"- **Best merge of each tier**: {'; '.join(parts)}."]
    budget = budgets.loc[reference, "labelled"] if reference in budgets.index else np.nan
    within = [m for m in merges if not budgets.loc[m, "labelled"] > budget] if not np.isnan(budget) else []
    if within:
        top, row = within[0], uncertainty.compared(within[0], reference)
        needed = row["significant"] and row["difference"] < 0
        answer = (f"the router is needed: the best merge within `{reference}`'s {_data(budget)}, `{top}`, is worse"
                  if needed else f"a merge suffices: the best merge within `{reference}`'s {_data(budget)}, `{top}`, "
                  "is not significantly worse")
        lines.append(f"- **A merge, or `{reference}`?** {answer} ({difference(row)}).")
    return lines


# The ways to compose the task LoRAs, cheapest at decoding first.
MERGE, ROUTING, GATING = "a merge", "per-sequence routing", "per-token gating"
GROUPS = {MERGE: (Tier.TRAINING_FREE, Tier.TUNED, Tier.LEARNED), ROUTING: (Tier.ROUTED,), GATING: (Tier.GATED,)}


def _routing_or_gating(evidence: Evidence) -> list[str]:
    """With a token-gated composition configured: the best of each group (merge < per-sequence routing <
    per-token gating, by cost) minus the best composition evaluated, Holm over the methods compared with it;
    the cheapest group not significantly worse suffices. The best gate minus MoA beside it."""
    uncertainty, tiers = evidence.uncertainty, evidence.budgets.set_index("method")["tier"]
    if Tier.GATED not in set(tiers):
        return []
    head = "- **Per-sequence routing, per-token gating or a merge?**"
    scored = list(uncertainty.multitask().index)  # best first
    best = {group: next((m for m in scored if tiers[m] in members), None) for group, members in GROUPS.items()}
    if best[GATING] is None:
        return [f"{head} No token-gated composition has a multitask score: nothing to decide on gating."]
    top = next(m for m in scored if m in best.values())
    rows = {group: uncertainty.versus(m, top) for group, m in best.items() if m is not None and m != top}
    enough = next(g for g, m in best.items() if m == top or (m is not None and not rows[g]["significant"]))
    parts = [f"{group} `{m}` {with_interval(uncertainty.figure(m, ALL_TASKS, MULTITASK), 3)}"
             + (" (the best)" if m == top else f" (minus `{top}`: {difference(rows[group])})")
             for group, m in best.items() if m is not None]
    router = MOA if MOA in scored else best[ROUTING]
    gate = (f" `{best[GATING]}` minus `{router}`: {difference(uncertainty.versus(best[GATING], router))}."
            if router is not None else "")
    return [(f"{head} {_suffices(enough, best, top)}. Best of each, cheapest first (minus the best, Holm over "
             f"the methods compared with it): {'; '.join(parts)}.{gate}")]


NAMED = {MERGE: "merge", ROUTING: "per-sequence router", GATING: "token gate"}


def _suffices(enough: str, best: dict[str, str | None], top: str) -> str:
    """The cheapest group not significantly worse than the best composition (`top`), in words."""
    order = list(GROUPS)
    cheaper = [f"the best {NAMED[g]}, `{best[g]}`," for g in order[:order.index(enough)] if best[g] is not None]
    worse = (f"{' and '.join(cheaper)} {'are' if len(cheaper) > 1 else 'is'} significantly worse than `{top}`"
             if cheaper else f"no cheaper composition than {NAMED[enough]}s was evaluated")
    held = "is the best composition" if best[enough] == top else f"is not significantly worse than `{top}`"
    if enough == MERGE:
        return f"a merge suffices: the best merge, `{best[MERGE]}`, {held}"
    if enough == ROUTING:
        return f"per-sequence routing is needed and per-token gating is not: {worse}; `{best[ROUTING]}` {held}"
    return f"per-token gating is needed: {worse}"


def _data(labelled: float) -> str:
    return "labelled rows: –" if np.isnan(labelled) else f"{int(labelled)} labelled rows"


def _per_task_verdict(uncertainty: Uncertainty, merges: Sequence[str]) -> list[str]:
    if not uncertainty.references:
        return []
    reference, parts = uncertainty.references[0], []
    for task in uncertainty.signal:
        rows = {m: uncertainty.compared(m, reference, task, NORMALIZED) for m in merges}
        rows = {m: r for m, r in rows.items() if r is not None}
        if not rows:
            continue
        below = [m for m, r in rows.items() if r["significant"] and r["difference"] < 0]
        above = [m for m, r in rows.items() if r["significant"] and r["difference"] > 0]
        if below or above:
            worst = min(rows, key=lambda m: rows[m]["difference"])
            parts.append(f"{task}: {len(below)} of {len(rows)} merges below, {len(above)} above (largest gap "
                         f"`{worst}` {fmt(rows[worst]['difference'], 2, True)})")
        else:
            detectable = np.nanmedian([r["detectable"] for r in rows.values()])
            parts.append(f"{task}: no merge differs (detectable: about {fmt(detectable, 2)})")
    return [f"- **Per task, merges vs `{reference}`** (normalized score): {'; '.join(parts)}."] if parts else []


def _detectable_verdict(uncertainty: Uncertainty, merges: Sequence[str]) -> list[str]:
    sizes = []
    for reference in uncertainty.references:
        detectable = [row["detectable"] for m in merges if (row := uncertainty.compared(m, reference)) is not None]
        if detectable:
            sizes.append(f"{fmt(np.nanmedian(detectable), 3)} to `{reference}`")
    if not sizes:
        return []
    text = (f"- **What these test sizes can decide**: a multitask difference smaller than about {', '.join(sizes)} "
            f"(median over the merges of (z_{{1-alpha/2}} + z_{POWER:g}) x the bootstrap standard error of the "
            f"difference: {POWER:.0%} power, before Holm) is likely to be missed, so \"indistinguishable\" means "
            "that no difference of about that size was shown, not that the methods are equal.")
    return [text]


def _held(rows: pd.DataFrame) -> str:
    """Up to how many tasks one method stays indistinguishable from the reference (its rows of sweep.parquet): the
    largest size at and below which no subset differs significantly; then the largest difference at the next size."""
    sizes = sorted(rows["n_tasks"].unique())
    for i, n in enumerate(sizes):
        differing = rows[(rows["n_tasks"] == n) & rows["significant"].fillna(False)]
        if len(differing):
            row = differing.loc[differing["difference"].abs().idxmax()]
            held = f"up to {sizes[i - 1]} tasks" if i else "at no size swept"
            return (f"{held}; at {n}, {row['subset']} is {'worse' if row['difference'] < 0 else 'better'}: "
                    f"{fmt(row['difference'], 3, True)} [{fmt(row['difference_lo'], 3, True)}, "
                    f"{fmt(row['difference_hi'], 3, True)}], p {fmt(row['p_holm'], 3)}")
    return f"at every size swept (up to {sizes[-1]} tasks)"


def sweep_verdict(evidence: Evidence) -> list[str]:
    """Per recomposed method, up to how many tasks it stays indistinguishable from the reference on the same
    subsets."""
    assert evidence.sweep is not None, "the sweep section is configured only with a sweep"
    sweep, reference = evidence.sweep.table, evidence.sweep.reference
    if reference is None:
        return [("- **Task-count sweep**: the sweep recomposes no reference (report.compare_to, by default `moa`): "
                 "nothing to compare with.")]
    compared = sweep[sweep["difference"].notna() & (sweep["method"] != FLOOR)]
    if not len(compared):
        return [f"- **Task-count sweep**: no subset has multitask scores of `{reference}` and another method."]
    sizes = ", ".join(str(n) for n in sorted(sweep["n_tasks"].unique()))
    head = (f"- **Task-count sweep, each method vs `{reference}` on the same subsets** (sizes {sizes}): a method stays "
            f"indistinguishable up to the largest size at and below which no subset differs significantly (alpha "
            f"{evidence.uncertainty.alpha:g}, Holm over the methods of each subset):")
    return [head] + [f"  - `{method}`: {_held(rows)}" for method, rows in compared.groupby("method", sort=False)]
