# The base model, written once as an HF directory that every later step loads (a GGUF is dequantized here).


rule prepare_model:
    output:
        MODEL_FILES,
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=sections(model=config["model"], seed=config["seed"]),
    log:
        f"{EXP}/logs/prepare_model.log",
    benchmark:
        f"{EXP}/benchmarks/prepare_model.tsv"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        ENV
    shell:
        "moa prepare-model --config {params.config_file} > {log} 2>&1"
