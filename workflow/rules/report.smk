# Every evaluation in one table, summary.md and the plots (also in `snakemake --report report.html`).


rule report:
    input:
        expand(f"{EXP}/eval/{{method}}/{{task}}/metrics.parquet", method=METHODS, task=TASKS),
        [f"{EXP}/moa/{file}" for file in ROUTER_FILES],
        task_adapters(ADAPTER_FILES),
        adapter_files("_mixed", ["train_log.parquet"]),
    output:
        metrics=f"{EXP}/report/metrics.parquet",
        summary=report(f"{EXP}/report/summary.md", category="Summary", caption="../report/summary.rst"),
        plots=[
            report(f"{EXP}/report/{plot}.png", category="Plots", caption=f"../report/{plot}.rst")
            for plot in REPORT_PLOTS
        ],
    params:
        config_file=moa_config,
        code_version=CODE_VERSION,
        config_hash=sections(
            methods={m: method_params(config, m) for m in METHODS},
            tasks=config["tasks"],
            order=[METHODS, TASKS],
        ),
    log:
        f"{EXP}/logs/report.log",
    benchmark:
        f"{EXP}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "moa report --config {params.config_file} > {log} 2>&1"
