# Every composition on every task's test split: one job per composition, serving all tasks' prompts as one
# mixed stream; a folder per task, so a changed task's test set reruns every composition's evaluation.


rule evaluate:
    input:
        MODEL_FILES,
        composition=str(PATHS.manifest("{method}")),
        tests=[str(PATHS.split(task, "test")) for task in TASKS],
    output:
        predictions=[str(PATHS.predictions("{method}", task)) for task in TASKS],
        metrics=[str(PATHS.metrics("{method}", task)) for task in TASKS],
    params:
        **step_params("evaluate"),
    log:
        step_log("evaluate"),
    benchmark:
        step_benchmark("evaluate")
    threads: step_threads("evaluate")
    resources:
        **step_resources("evaluate"),
    shell:
        step_shell("evaluate")


# With evaluation.lm_eval: the lm-evaluation-harness tasks on every composition (but the oracle where a harness task
# has no moa task), one job per composition, through moa's harness model. The harness's tasks are checked before any
# job runs (common.smk).


rule lm_eval:
    input:
        MODEL_FILES,
        composition=str(PATHS.manifest("{method}")),
        tests=[str(PATHS.split(task, "test")) for task in TASKS],  # what harness tasks over moa's own data read
    output:
        results=str(PATHS.harness_results("{method}")),
    params:
        **step_params("lm_eval"),
    log:
        step_log("lm_eval"),
    benchmark:
        step_benchmark("lm_eval")
    threads: step_threads("lm_eval")
    resources:
        **step_resources("lm_eval"),
    shell:
        step_shell("lm_eval")
