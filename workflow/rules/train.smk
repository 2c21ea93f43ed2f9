# Stage 1: one LoRA per task and the mixed-data baseline; stage 2: the MoA routers and the learned merges'
# coefficients.
# Each trainer checkpoints under checkpoints/ (not an output, so Snakemake never deletes it): rerunning
# after an interruption resumes where the job stopped.


rule train_lora:
    input:
        MODEL_FILES,
        data_files(["{task}"]),
    output:
        files(PATHS.adapter_files("{task}")),
    params:
        **step_params("train_lora"),
    log:
        step_log("train_lora"),
    benchmark:
        step_benchmark("train_lora")
    threads: step_threads("train_lora")
    resources:
        **step_resources("train_lora"),
    shell:
        step_shell("train_lora")


rule train_mixed:
    input:
        MODEL_FILES,
        data_files(TASKS),
    output:
        files(PATHS.adapter_files(MIXED)),
    params:
        **step_params("train_mixed"),
    log:
        step_log("train_mixed"),
    benchmark:
        step_benchmark("train_mixed")
    threads: step_threads("train_mixed")
    resources:
        **step_resources("train_mixed"),
    shell:
        step_shell("train_mixed")


rule train_router:
    input:
        MODEL_FILES,
        data_files(TASKS),
        task_adapters(),
    output:
        files(PATHS.router_files),
    params:
        **step_params("train_router"),
    log:
        step_log("train_router"),
    benchmark:
        step_benchmark("train_router")
    threads: step_threads("train_router")
    resources:
        **step_resources("train_router"),
    shell:
        step_shell("train_router")


rule learn_merge:
    input:
        MODEL_FILES,
        data_files(TASKS),
        task_adapters(),
    output:
        files(PATHS.learned_files("{method}")),
    params:
        **step_params("learn_merge"),
    log:
        step_log("learn_merge"),
    benchmark:
        step_benchmark("learn_merge")
    threads: step_threads("learn_merge")
    resources:
        **step_resources("learn_merge"),
    shell:
        step_shell("learn_merge")
