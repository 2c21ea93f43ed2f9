# The base model, written once as an HF directory that every later step loads (a GGUF is dequantized here).
# Each rule runs the moa step of its name: moa.steps.STEPS["prepare_model"].
# A local rule (Snakefile): on a cluster it runs on the login node, where the hub is reachable.


rule prepare_model:
    output:
        MODEL_FILES,
    params:
        **step_params("prepare_model"),
    log:
        step_log("prepare_model"),
    benchmark:
        step_benchmark("prepare_model")
    threads: step_threads("prepare_model")
    resources:
        **step_resources("prepare_model"),
    shell:
        step_shell("prepare_model")
