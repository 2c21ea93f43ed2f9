# One task's data: data/{task}/{train,validation,test}.parquet and stats.json. The tokenizer comes from
# model.source itself (no weights are read), so data does not wait for prepare_model.


rule prepare_data:
    input:
        local_source_files,
    output:
        data=expand(f"{EXP}/data/{{{{task}}}}/{{split}}.parquet", split=SPLITS),
        stats=f"{EXP}/data/{{task}}/stats.json",
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=lambda w: sections(
            model_source=config["model"]["source"],
            data=config["data"],
            task=config["tasks"][w.task],
            seed=config["seed"],
        ),
    log:
        f"{EXP}/logs/prepare_data/{{task}}.log",
    benchmark:
        f"{EXP}/benchmarks/prepare_data/{{task}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "moa prepare-data --config {params.config_file} --task {wildcards.task} > {log} 2>&1"
