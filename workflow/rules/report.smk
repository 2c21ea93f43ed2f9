# Every evaluation in one table, the paired bootstrap's intervals and comparisons, the test prompts' routing,
# summary.md with the verdict, and the plots (also in `snakemake --report report.html`); with a sweep, every
# subset's evaluations too, and sweep.parquet.

from moa.report import report_plots, report_tables
from moa.report.harness import harness_methods


rule report:
    input:
        [str(PATHS.metrics(method, task)) for method in METHODS for task in TASKS],
        files(PATHS.router_files) if Need.ROUTERS in NEEDS else [],
        task_adapters(train_log=True) if NEEDS & {Need.TASK_ADAPTERS, Need.ROUTERS} else [],  # routers need them
        [str(PATHS.train_log(MIXED))] if Need.MIXED_ADAPTER in NEEDS else [],
        [str(PATHS.of_subset(name).evaluations(method)) for name, subset in SUBSETS.items()
         for method in swept_methods(config, subset)],
        [str(PATHS.harness_results(method)) for method in harness_methods(config)],
    output:
        # every section's files (moa.report.sections), each plot with its caption workflow/report/{plot}.rst
        **{table: str(PATHS.report_table(table)) for table in report_tables(config)},
        summary=report(str(PATHS.summary), category="Summary", caption="../report/summary.rst"),
        plots=[
            report(str(PATHS.plot(plot)), category="Plots", caption=f"../report/{plot}.rst")
            for plot in report_plots(config)
        ],
    params:
        **step_params("report"),
    log:
        step_log("report"),
    benchmark:
        step_benchmark("report")
    threads: step_threads("report")
    resources:
        **step_resources("report"),
    shell:
        step_shell("report")
