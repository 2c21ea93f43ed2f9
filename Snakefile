# moa: one LoRA per task -> MoA routers and every merge -> evaluation -> report.
#
#   snakemake --cores all --configfile config/smoke.yaml      # the whole DAG on a tiny model, minutes
#   snakemake --cores all                                      # config/config.yaml, the offline default
#   snakemake --cores all --configfile config/config.yaml config/sweep.yaml   # + the task-count sweep
#   snakemake --profile workflow/profiles/slurm --configfile config/real.yaml
#   snakemake --report report.html --configfile ...            # after a run: plots + provenance
#
# `--configfile` replaces config/config.yaml (it is not merged into it); several files merge, later ones
# winning key by key (nested keys merge); `--config key=value` overrides keys on top (nested values are typed by
# the schema, e.g. --config training='{steps: 4}').
# The config is validated (workflow/schemas/config.schema.yaml) before any job runs.

if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/compose.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Under a cluster executor these run where snakemake runs (on SLURM: the login node, which reaches the Hugging Face
# Hub), not as submitted jobs: the prepare steps are the only ones that download (the model, the `hf` datasets), so
# every submitted job reads local files only (results/{experiment}/model/ and data/). Locally every rule runs alike.
localrules:
    all,
    prepare_model,
    prepare_data,


rule all:
    input:
        rules.report.output,
    default_target: True


onstart:
    check_slurm_jobs()
    start_tracking()


onsuccess:
    end_tracking("FINISHED")


onerror:
    end_tracking("FAILED")
