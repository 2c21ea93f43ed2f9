# Stage 1: one LoRA per task and the mixed-data baseline; stage 2: the MoA routers.
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
    threads: 8
    resources:
        mem_mb=planned_mem_mb("train_lora", 16000),
        runtime=360,
        gpu=GPU_JOB,
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
    threads: 8
    resources:
        mem_mb=planned_mem_mb("train_mixed", 16000),
        runtime=480,
        gpu=GPU_JOB,
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
    threads: 8
    resources:
        mem_mb=planned_mem_mb("train_router", 16000),
        runtime=480,
        gpu=GPU_JOB,
    shell:
        step_shell("train_router")
