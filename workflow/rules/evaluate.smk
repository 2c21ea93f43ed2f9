# Every composition on every task's test split.


rule evaluate:
    input:
        MODEL_FILES,
        composition=str(PATHS.manifest("{method}")),
        test=str(PATHS.split("{task}", "test")),
    output:
        predictions=str(PATHS.predictions("{method}", "{task}")),
        metrics=str(PATHS.metrics("{method}", "{task}")),
    params:
        **step_params("evaluate"),
    log:
        step_log("evaluate"),
    benchmark:
        step_benchmark("evaluate")
    # One thread: decoding a small model on CPU is memory-bound, so one-thread evaluations side by side
    # finish sooner than multi-thread ones in turn. The slurm profile raises it for GPU nodes.
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU_JOB,
    shell:
        step_shell("evaluate")
