# Every composition on every task's test split.


rule evaluate:
    input:
        MODEL_FILES,
        composition=f"{EXP}/compositions/{{method}}/composition.json",
        test=f"{EXP}/data/{{task}}/test.parquet",
    output:
        predictions=f"{EXP}/eval/{{method}}/{{task}}/predictions.parquet",
        metrics=f"{EXP}/eval/{{method}}/{{task}}/metrics.parquet",
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=lambda w: sections(
            method=method_params(config, w.method),
            evaluation=config["evaluation"],
            task=config["tasks"][w.task],
            model=config["model"],
            data=config["data"],
            seed=config["seed"],
        ),
    log:
        f"{EXP}/logs/evaluate/{{method}}/{{task}}.log",
    benchmark:
        f"{EXP}/benchmarks/evaluate/{{method}}/{{task}}.tsv"
    # One thread: decoding a small model on CPU is memory-bound, so one-thread evaluations side by side
    # finish sooner than multi-thread ones in turn. The slurm profile raises it for GPU nodes.
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU_JOB,
    conda:
        ENV
    shell:
        "moa evaluate --config {params.config_file} --method {wildcards.method} --task {wildcards.task} "
        "--threads {threads} > {log} 2>&1"
