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
