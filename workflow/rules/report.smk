# Every evaluation in one table, the paired bootstrap's intervals and comparisons, the test prompts' routing,
# summary.md with the verdict, and the plots (also in `snakemake --report report.html`); with a sweep, every
# subset's evaluations too, and sweep.parquet.


rule report:
    input:
        [str(PATHS.metrics(method, task)) for method in METHODS for task in TASKS],
        files(PATHS.router_files) if Need.ROUTERS in NEEDS else [],
        task_adapters(train_log=True) if NEEDS & {Need.TASK_ADAPTERS, Need.ROUTERS} else [],  # routers need them
        [str(PATHS.train_log(MIXED))] if Need.MIXED_ADAPTER in NEEDS else [],
        [str(PATHS.of_subset(subset).evaluations(method)) for subset in SUBSETS for method in SWEPT],
    output:
        metrics=str(PATHS.report_metrics),
        intervals=str(PATHS.report_intervals),
        comparisons=str(PATHS.report_comparisons),
        routing=str(PATHS.report_routing),
        implicit_routing=str(PATHS.report_implicit_routing),
        summary=report(str(PATHS.summary), category="Summary", caption="../report/summary.rst"),
        **({"sweep": str(PATHS.report_sweep)} if SWEEP else {}),
        plots=[
            report(str(PATHS.plot(plot)), category="Plots", caption=f"../report/{plot}.rst")
            for plot in report_plots(SWEEP)
        ],
    params:
        **step_params("report"),
    log:
        step_log("report"),
    benchmark:
        step_benchmark("report")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        step_shell("report")
