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
    # Decoding with large batches is compute-bound: the job takes the cores, one composition at a time.
    threads: 2
    resources:
        mem_mb=planned_mem_mb("evaluate", 8000),
        runtime=120,
        gpu=GPU_JOB,
    shell:
        step_shell("evaluate")
