# Helpers shared by the rule files (config validation, the experiment's paths, tasks and
# compositions, what each composition needs) and the provenance params that decide reruns.
#
# How reruns are decided (Snakemake's default rerun triggers: mtime, params, input, software-env, code):
# every rule has two params,
#   code_version  moa's version (moa.__version__), so upgrading moa reruns every step the old version
#                 built, while editing a file between releases (say, a plot) does not rerun 30 minutes
#                 of training; set MOA_CODE_VERSION (e.g. to a git commit) to rerun on every change;
#   config_hash   a short hash of exactly the config sections the step reads (moa.steps.STEPS[rule].reads),
# so a config change reruns the steps that read the changed section, and everything downstream of
# them through their newer inputs. The merged config itself reaches the steps as one YAML file
# (moa_config()): a derived param, so its name changing with any key never triggers a rerun.

import functools
import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Callable

import yaml

import moa
from moa.compose.registry import Need, needs_of
from moa.config import schema_node, apply_overrides, method_params
from moa.data.tasks import get_task
from moa.errors import MoaError
from moa.experiment import validate
from moa.io import atomic_file
from moa.layout import MIXED, SPLITS, ExperimentPaths
from moa.slurm import check_jobs
from moa.steps import STEPS, step_hash
from moa.sweep import proper_subsets, sweep_rule, swept_methods, write_tasks
from moa.tracking import PARENT_RUN_ENV, SPOOL_ENV, Spool, end_workflow_run, start_workflow_run

# The YAML file(s) and --config overrides the config came from, for error messages.
CONFIG_SOURCE = ", ".join(os.path.relpath(f) for f in workflow.configfiles) or "config"
if workflow.config_settings.config:
    CONFIG_SOURCE = f"{CONFIG_SOURCE} with --config overrides"


def _retyped_overrides(overrides, path=()):
    """`--config` values below the top level arrive as strings (Snakemake parses them with YAML's
    BaseLoader); give each the type the schema wants, as `moa ... --set` does."""
    for key, value in overrides.items():
        where = (*path, str(key))
        if isinstance(value, dict):
            yield from _retyped_overrides(value, where)
        elif isinstance(value, list):
            wants_str = schema_node(where).get("items", {}).get("type") == "string"
            yield where, [v if wants_str or not isinstance(v, str) else yaml.safe_load(v) for v in value]
        elif isinstance(value, str):
            yield where, _typed_leaf(where, value)
        elif schema_node(where).get("type") == "string":  # e.g. experiment=123
            yield where, str(value)


def _typed_leaf(where, value):
    """A string typed by the schema at `where`, exactly as `--set where=value` would type it."""
    scratch = apply_overrides({}, [f"{'.'.join(where)}={value}"])
    for part in where:
        scratch = scratch[part]
    return scratch


def _set(node, where, value):
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = value


def stop(err):
    """One line on stderr and exit status 1, before any job runs."""
    print(f"moa: error: {err}", file=sys.stderr)
    sys.exit(1)


def validated_config():
    """The merged config, validated with defaults filled in (in place: rules see the defaults too), or
    one line naming the bad key (`stop`)."""
    try:
        for where, value in list(_retyped_overrides(workflow.config_settings.config)):
            _set(config, where, value)
        validate(config, CONFIG_SOURCE)
        for task in config["tasks"]:
            get_task(config, task)  # what the schema cannot say, e.g. a custom task without a source
    except MoaError as err:
        stop(err)
    return config


validated_config()


def checked_harness_tasks():
    """With evaluation.lm_eval: every harness task known and, offline, local or cached (`stop` where not); once, where
    snakemake plans the jobs (not again inside each cluster job)."""
    if config["evaluation"]["lm_eval"] is None or not workflow.is_main_process:
        return
    from moa.lm_harness import check_tasks

    try:
        check_tasks(config)
    except MoaError as err:
        stop(f"{CONFIG_SOURCE}: {err}")


checked_harness_tasks()

PATHS = ExperimentPaths.of(config)
TASKS = list(config["tasks"])
METHODS = list(config["methods"])
SWEEP = "sweep" in config
SUBSETS = {subset.name: subset for subset in proper_subsets(config)}  # the sweep's, computed under sweep/{subset}/
SWEPT = swept_methods(config) if SWEEP else []  # the methods recomposed on each of them
SUBSET_PATHS = PATHS.of_subset("{subset}")


def one_of(names):
    """A wildcard constraint: exactly one of `names` (none matches where there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    task=one_of(TASKS),
    method=one_of(METHODS),
    subset=one_of(SUBSETS),


def _code_version():
    """moa's version, or MOA_CODE_VERSION when set."""
    return os.environ.get("MOA_CODE_VERSION") or moa.__version__


CODE_VERSION = _code_version()


def _write_config_file():
    """results/{experiment}/.config/{hash}.yaml: the validated config every step reads (content-addressed,
    written once, atomically)."""
    text = yaml.safe_dump(config, sort_keys=False)
    path = PATHS.config_dir / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    return str(path)


MOA_CONFIG = _write_config_file()


def moa_config(wildcards, input):
    """The config file every step gets; a function of `input`, so Snakemake treats it as a derived param
    and never reruns a job because the file's name changed."""
    return MOA_CONFIG


# --- what each step reads and runs ------------------------------------------------------------------


def rule_wildcards(name, sweep):
    """The wildcards of the step's rule: the step's, after the subset for its sweep rule."""
    return ("subset", *STEPS[name].wildcards) if sweep else STEPS[name].wildcards


def subset_option(wildcards, input):
    """` --subset S` in a sweep rule's command, nothing in the main rule's (the sweep rule is a variant of it,
    workflow/rules/sweep.smk); a function of `input`, so a derived param that never triggers a rerun."""
    subset = getattr(wildcards, "subset", None)
    return f" --subset {subset}" if subset else ""


def sweeps(name):
    """Whether the step has a sweep rule: it takes --subset."""
    return "subset" in STEPS[name].options


def step_params(name):
    """The params every rule has (see the top of this file), for the step of the rule's name; its sweep rule inherits
    them: a job's config_hash is of what the step reads of its subset's config, where it has a subset."""
    return dict(config_file=moa_config, code_version=CODE_VERSION,
                config_hash=lambda w: step_hash(name, config, **dict(w.items())),
                **({"subset": subset_option} if sweeps(name) else {}))


def step_shell(name):
    """The rule's command (its sweep rule's too): `moa <step>` on the job's config, subset, wildcards and threads,
    logged to {log}."""
    args = "".join(f" --{w} {{wildcards.{w}}}" for w in STEPS[name].wildcards)
    subset = "{params.subset}" if sweeps(name) else ""
    return (f"moa {name.replace('_', '-')} --config {{params.config_file}}{subset}{args} --threads {{threads}} "
            "> {log} 2>&1")


def rule_name(name, sweep):
    return sweep_rule(name) if sweep else name


def step_log(name, sweep=False):
    return str(PATHS.log(rule_name(name, sweep), *(f"{{{w}}}" for w in rule_wildcards(name, sweep))))


def step_benchmark(name, sweep=False):
    return str(PATHS.benchmark(rule_name(name, sweep), *(f"{{{w}}}" for w in rule_wildcards(name, sweep))))


# --- resources --------------------------------------------------------------------------------------

# Training and evaluation put the model on the GPU where there is one: there they take one "gpu" token,
# so that with the default profile's single token they run one at a time instead of sharing (and
# exhausting) its memory; on a machine without an NVIDIA driver (nvidia-smi) they take none and run
# side by side. On SLURM the slurm profile's set-resources decide what each job requests.
GPU_JOB = 1 if shutil.which("nvidia-smi") else 0


def executor():
    """The executor's name once jobs are planned (None while the Snakefile is parsed)."""
    return workflow.executor_plugin.name if workflow.executor_plugin is not None else None


def reads_model(wildcards):
    """Whether the job's composition reads the tasks' prompts through the model (centroid, a tuned merge)."""
    return Need.TASK_PROMPTS in needs_of(method_params(config, wildcards.method))


def composition_threads(wildcards):
    """Merges are small matrix work (compositions run side by side); reading prompts through the model
    takes the cores."""
    return 2 if reads_model(wildcards) else 1


def composition_gpus(wildcards):
    """A composition that reads prompts through the model (centroid, a tuned merge) runs it on a GPU: where this
    host has one, and on SLURM (whose profile gives the other model-reading rules theirs; a cluster without GPUs
    takes it back with --set-resources compose:gpu=0). Other merges are matrix work on the host."""
    return int(reads_model(wildcards) and (GPU_JOB or executor() == "slurm"))


@functools.cache
def planned_shapes():
    """The model's shapes for the plans (None where they cannot be read), looked up once per invocation."""
    from moa.plan import shapes_of

    try:
        return shapes_of(config)
    except MoaError:
        return None


def planned_mem_mb(step, unplanned):
    """A job's host memory (sbatch --mem) from its plan (`moa plan`): the planned host peak plus a quarter,
    rounded up to a GB, planned for a GPU where the job gets one. `unplanned` (MB) where the model's shapes
    cannot be read (offline, before prepare-model) and inside a submitted job (its --mem is decided)."""

    def mem_mb(wildcards):
        from moa.plan import HOST_BASELINE, Setting, job_plan

        on = executor()
        if on == "slurm-jobstep":
            return unplanned
        shapes = planned_shapes()
        if shapes is None:
            return unplanned
        gpu = 1 << 60 if GPU_JOB or on == "slurm" else None
        plan = job_plan(config, shapes, step, Setting(gpu, 1 << 60), getattr(wildcards, "method", None))
        host = plan.memory.host if plan else HOST_BASELINE
        return 1024 * -(-int(1.25 * host) // 2**30)

    return mem_mb


@dataclass(frozen=True)
class StepJob:
    """What a step's job asks for: threads (its cores and torch's thread pool; --cpus-per-task on SLURM), host
    memory in MB (sbatch --mem; planned: from the job's plan, planned_mem_mb, and this only where there is none),
    wall time in minutes (sbatch -t) and "gpu" tokens (None: the job declares none)."""

    threads: int | Callable
    mem_mb: int
    runtime: int
    gpu: int | Callable | None = None
    planned: bool = False


# Every step's job; its sweep rule's jobs ask for the same. The profiles' set-threads and set-resources override
# them by rule name.
STEP_JOBS = {
    "prepare_model": StepJob(threads=2, mem_mb=16000, runtime=60),
    "prepare_data": StepJob(threads=1, mem_mb=8000, runtime=120),
    "train_lora": StepJob(threads=8, mem_mb=16000, runtime=360, gpu=GPU_JOB, planned=True),
    "train_mixed": StepJob(threads=8, mem_mb=16000, runtime=480, gpu=GPU_JOB, planned=True),
    "train_router": StepJob(threads=8, mem_mb=16000, runtime=480, gpu=GPU_JOB, planned=True),
    "learn_merge": StepJob(threads=8, mem_mb=16000, runtime=480, gpu=GPU_JOB, planned=True),
    "compose": StepJob(threads=composition_threads, mem_mb=8000, runtime=60, gpu=composition_gpus, planned=True),
    # Decoding with large batches is compute-bound: the job takes the cores, one composition at a time.
    "evaluate": StepJob(threads=2, mem_mb=8000, runtime=120, gpu=GPU_JOB, planned=True),
    "lm_eval": StepJob(threads=2, mem_mb=8000, runtime=240, gpu=GPU_JOB, planned=True),
    "report": StepJob(threads=1, mem_mb=4000, runtime=30),
}


def step_threads(name):
    return STEP_JOBS[name].threads


def step_resources(name):
    """The `resources:` of the step's rule (STEP_JOBS)."""
    job = STEP_JOBS[name]
    mem_mb = planned_mem_mb(name, job.mem_mb) if job.planned else job.mem_mb
    return dict(mem_mb=mem_mb, runtime=job.runtime, **({} if job.gpu is None else {"gpu": job.gpu}))


def check_slurm_jobs():
    """onstart with the slurm executor, before anything is submitted: every job's CPUs, memory and GPUs
    (threads and resources with the profile's and command line's set-threads/set-resources applied)
    against the nodes of its partition (`sinfo`), or one line naming the rule and the fix (`stop`).
    A job no node can hold would otherwise wait in the queue forever (reason PartitionConfig)."""
    if workflow.executor_plugin.name != "slurm":
        return
    jobs = sorted((job for job in workflow.dag.needrun_jobs() if not workflow.is_local(job.rule)),
                  key=lambda job: (job.rule.name, str(job.wildcards_dict)))  # the same rule named every time
    try:
        check_jobs((job.rule.name, job.threads, job.resources) for job in jobs)
    except MoaError as err:
        stop(err)


# --- paths (moa.layout) and what each composition is built from (moa.compose.registry) -----------------


def files(paths):
    return [str(p) for p in paths]


MODEL_FILES = files(PATHS.model_files)
NEEDS = {need for m in METHODS for need in needs_of(method_params(config, m))}


def data_files(tasks, splits=("train", "validation")):
    return [str(PATHS.split(task, split)) for task in tasks for split in splits]


def task_adapters(train_log=False, tasks=TASKS):
    return [str(path) for task in tasks for path in PATHS.adapter_files(task, train_log)]


def local_source_files(wildcards):
    """A local source's files (globs expanded) are inputs of prepare_data: editing one reruns the task."""
    source = (config["tasks"][wildcards.task] or {}).get("source") or {}
    if source.get("type") != "local":
        return []
    files = source["files"]
    patterns = [files] if isinstance(files, str) else [
        p for value in files.values() for p in ([value] if isinstance(value, str) else value)]
    return sorted({match for pattern in patterns for match in (sorted(glob(pattern)) or [pattern])})


def inputs_of(needs, method, tasks=TASKS, paths=PATHS):
    """The files that what `needs` of composition `method` names are read from (of a sweep subset's tasks and
    paths, where given)."""
    return [
        *(task_adapters(tasks=tasks) if Need.TASK_ADAPTERS in needs else []),
        *(files(PATHS.adapter_files(MIXED, train_log=False)) if Need.MIXED_ADAPTER in needs else []),
        *(files(paths.routers) if Need.ROUTERS in needs else []),
        *([*MODEL_FILES, *data_files(tasks)] if Need.TASK_PROMPTS in needs else []),
        *(files(paths.learned_files(method)) if Need.LEARNED in needs else []),
    ]


def composition_inputs(wildcards):
    """What `moa compose --method M` reads (the registry's `needs` of M)."""
    return inputs_of(needs_of(method_params(config, wildcards.method)), wildcards.method)


def sweep_composition_inputs(wildcards):
    """What `moa compose --method M --subset S` reads: M's needs on S's tasks and routers, and S's tasks.json."""
    paths = PATHS.of_subset(wildcards.subset)
    needs = needs_of(method_params(config, wildcards.method))
    return [str(paths.subset_tasks), *inputs_of(needs, wildcards.method, SUBSETS[wildcards.subset].tasks, paths)]


# --- MLflow: one parent run per invocation; every job's run is its child -----------------------------
# Jobs (local, or sbatch --export=ALL) inherit the parent run's id and the spool directory from the
# environment; they write their runs there, and a thread of this process logs them as they appear.

WORKFLOW_RUN = {}


def start_tracking():
    """onstart: create the parent run and start logging the jobs' runs (leftovers of an interrupted
    invocation first)."""
    if not config["tracking"]["enabled"]:
        return
    run_id = start_workflow_run(config)
    if run_id:
        os.environ[PARENT_RUN_ENV] = run_id
    spool = Spool(PATHS.spool.resolve())
    spool.start()
    os.environ[SPOOL_ENV] = str(spool.directory)
    WORKFLOW_RUN.update(id=run_id, spool=spool)


def end_tracking(status):
    """onsuccess / onerror: log the last jobs' runs, then close the parent run."""
    if "spool" in WORKFLOW_RUN:
        WORKFLOW_RUN["spool"].stop()
    end_workflow_run(config, WORKFLOW_RUN.get("id"), status)
