# One task's data: data/{task}/{train,validation,test}.parquet and stats.json. The tokenizer comes from
# model.source itself (no weights are read), so data does not wait for prepare_model.
# A local rule (Snakefile): on a cluster it runs on the login node, where the hub is reachable.


rule prepare_data:
    input:
        local_source_files,
    output:
        data=[str(PATHS.split("{task}", split)) for split in SPLITS],
        stats=str(PATHS.data_stats("{task}")),
    params:
        **step_params("prepare_data"),
    log:
        step_log("prepare_data"),
    benchmark:
        step_benchmark("prepare_data")
    threads: step_threads("prepare_data")
    resources:
        **step_resources("prepare_data"),
    shell:
        step_shell("prepare_data")
