# One composition per entry of `methods`: a PEFT adapter for merges (+ merge_report.json), a manifest for
# base, oracle, mixed and moa. composition.json is always written; it is what evaluate depends on.


rule compose:
    input:
        composition_inputs,
    output:
        f"{EXP}/compositions/{{method}}/composition.json",
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=lambda w: sections(
            method=method_params(config, w.method),
            lora=config["lora"],
            tasks=TASKS,
            seed=config["seed"],
        ),
    log:
        f"{EXP}/logs/compose/{{method}}.log",
    benchmark:
        f"{EXP}/benchmarks/compose/{{method}}.tsv"
    threads: 1  # merges are small matrix work: compositions run side by side
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    shell:
        "moa compose --config {params.config_file} --method {wildcards.method} --threads {threads} > {log} 2>&1"
