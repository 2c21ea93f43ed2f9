# The task-count sweep (config `sweep`, moa/sweep.py): on each seeded subset of the tasks, the routers retrained on
# its tasks, the learned merges learned again on them and every merge and router over the task LoRAs recomposed from
# the trained LoRAs, then evaluated on its
# tasks, under sweep/{subset}/. Each rule is a variant of a step's rule that runs it with --subset: sweep_compose runs
# `moa compose`. Its config_hash is of what the step reads of the subset's config, so a change to a task outside the
# subset reruns nothing here. The subset of every task is the main experiment: no rule here runs it. Without a sweep,
# no job.


rule sweep_tasks:
    output:
        str(SUBSET_PATHS.subset_tasks),
    params:
        tasks=lambda w: list(SUBSETS[w.subset].tasks),
    log:
        str(PATHS.log("sweep_tasks", "{subset}")),
    localrule: True
    run:
        write_tasks(output[0], SUBSETS[wildcards.subset])
        Path(log[0]).write_text(f"wrote {output[0]}\n")


# The step's rule on a subset: its command (with --subset, params.subset), params and resources; its own inputs,
# outputs, log and benchmark.
use rule train_router as sweep_train_router with:
    input:
        MODEL_FILES,
        str(SUBSET_PATHS.subset_tasks),
        lambda w: data_files(SUBSETS[w.subset].tasks),
        lambda w: task_adapters(tasks=SUBSETS[w.subset].tasks),
    output:
        files(SUBSET_PATHS.router_files),
    log:
        step_log("train_router", sweep=True),
    benchmark:
        step_benchmark("train_router", sweep=True)


use rule learn_merge as sweep_learn_merge with:
    wildcard_constraints:
        method=one_of(SWEPT),
    input:
        MODEL_FILES,
        str(SUBSET_PATHS.subset_tasks),
        lambda w: data_files(SUBSETS[w.subset].tasks),
        lambda w: task_adapters(tasks=SUBSETS[w.subset].tasks),
    output:
        files(SUBSET_PATHS.learned_files("{method}")),
    log:
        step_log("learn_merge", sweep=True),
    benchmark:
        step_benchmark("learn_merge", sweep=True)


use rule compose as sweep_compose with:
    wildcard_constraints:
        method=one_of(SWEPT),
    input:
        sweep_composition_inputs,
    output:
        str(SUBSET_PATHS.manifest("{method}")),
    log:
        step_log("compose", sweep=True),
    benchmark:
        step_benchmark("compose", sweep=True)


# One job per subset and composition; the subset's tasks vary, so its eval/{method}/ is one directory output.
use rule evaluate as sweep_evaluate with:
    wildcard_constraints:
        method=one_of(SWEPT),
    input:
        MODEL_FILES,
        composition=str(SUBSET_PATHS.manifest("{method}")),
        tests=lambda w: [str(PATHS.split(task, "test")) for task in SUBSETS[w.subset].tasks],
    output:
        directory(str(SUBSET_PATHS.evaluations("{method}"))),
    log:
        step_log("evaluate", sweep=True),
    benchmark:
        step_benchmark("evaluate", sweep=True)
