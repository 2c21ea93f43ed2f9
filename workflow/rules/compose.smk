# One composition per entry of `methods`: a PEFT adapter for merges (+ merge_report.json), a manifest for
# base, oracle, mixed and moa. composition.json is always written; it is what evaluate depends on.


rule compose:
    input:
        composition_inputs,
    output:
        str(PATHS.manifest("{method}")),
    params:
        **step_params("compose"),
    log:
        step_log("compose"),
    benchmark:
        step_benchmark("compose")
    threads: step_threads("compose")
    resources:
        **step_resources("compose"),
    shell:
        step_shell("compose")
