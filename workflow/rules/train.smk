# Stage 1: one LoRA per task and the mixed-data baseline; stage 2: the MoA routers.
# Each trainer checkpoints under checkpoints/ (not an output, so Snakemake never deletes it): rerunning
# after an interruption resumes where the job stopped.


rule train_lora:
    input:
        MODEL_FILES,
        data_files(["{task}"]),
    output:
        adapter_files("{task}", ADAPTER_FILES),
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=lambda w: sections(
            model=config["model"],
            data=config["data"],
            task=config["tasks"][w.task],
            seed=config["seed"],
            lora=config["lora"],
            training=config["training"],
        ),
    log:
        f"{EXP}/logs/train_lora/{{task}}.log",
    benchmark:
        f"{EXP}/benchmarks/train_lora/{{task}}.tsv"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=360,
        gpu=GPU_JOB,
    conda:
        ENV
    shell:
        "moa train-lora --config {params.config_file} --task {wildcards.task} --threads {threads} > {log} 2>&1"


rule train_mixed:
    input:
        MODEL_FILES,
        data_files(TASKS),
    output:
        adapter_files("_mixed", ADAPTER_FILES),
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=sections(
            model=config["model"],
            data=config["data"],
            tasks=config["tasks"],
            order=TASKS,  # the expert / label index of each task
            seed=config["seed"],
            lora=config["lora"],
            training=config["training"],
        ),
    log:
        f"{EXP}/logs/train_mixed.log",
    benchmark:
        f"{EXP}/benchmarks/train_mixed.tsv"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=GPU_JOB,
    conda:
        ENV
    shell:
        "moa train-mixed --config {params.config_file} --threads {threads} > {log} 2>&1"


rule train_router:
    input:
        MODEL_FILES,
        data_files(TASKS),
        task_adapters(),
    output:
        [f"{EXP}/moa/{file}" for file in ROUTER_FILES],
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=sections(
            model=config["model"],
            data=config["data"],
            tasks=config["tasks"],
            order=TASKS,  # the expert / label index of each task
            seed=config["seed"],
            lora=config["lora"],
            training=config["training"],
            router=config["router"],
        ),
    log:
        f"{EXP}/logs/train_router.log",
    benchmark:
        f"{EXP}/benchmarks/train_router.tsv"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=GPU_JOB,
    conda:
        ENV
    shell:
        "moa train-router --config {params.config_file} --threads {threads} > {log} 2>&1"
