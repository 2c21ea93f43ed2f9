# Helpers shared by the rule files (config validation, the experiment's paths, tasks and
# compositions, what each composition needs) and the provenance params that decide reruns.
#
# How reruns are decided (Snakemake's default rerun triggers: mtime, params, input, software-env, code):
# every rule has two params,
#   code_version  moa's version (moa.__version__), so upgrading moa reruns every step the old version
#                 built, while editing a file between releases (say, a plot) does not rerun 30 minutes
#                 of training; set MOA_CODE_VERSION (e.g. to a git commit) to rerun on every change;
#   config_hash   a short hash of exactly the config sections the step reads (see the rule files),
# so a config change reruns the steps that read the changed section, and everything downstream of
# them through their newer inputs. The merged config itself reaches the steps as one YAML file
# (moa_config()): a derived param, so its name changing with any key never triggers a rerun.

import hashlib
import os
import re
import shutil
import sys
from glob import glob
from pathlib import Path

import yaml

import moa
from moa.config import _schema_node, apply_overrides, config_hash, method_params, validate
from moa.data.tasks import get_task
from moa.errors import MoaError
from moa.io import atomic_file
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
            wants_str = _schema_node(where).get("items", {}).get("type") == "string"
            yield where, [v if wants_str or not isinstance(v, str) else yaml.safe_load(v) for v in value]
        elif isinstance(value, str):
            yield where, _typed_leaf(where, value)
        elif _schema_node(where).get("type") == "string":  # e.g. experiment=123
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


def validated_config():
    """The merged config, validated with defaults filled in (in place: rules see the defaults too), or
    one line naming the bad key on stderr and exit status 1 before any job runs."""
    try:
        for where, value in list(_retyped_overrides(workflow.config_settings.config)):
            _set(config, where, value)
        validate(config, CONFIG_SOURCE)
        for task in config["tasks"]:
            get_task(config, task)  # what the schema cannot say, e.g. a custom task without a source
    except MoaError as err:
        print(f"moa: error: {err}", file=sys.stderr)
        sys.exit(1)
    return config


validated_config()

EXP = f"{config['results_dir']}/{config['experiment']}"
TASKS = list(config["tasks"])
METHODS = list(config["methods"])
ENV = "../../environment.yml"  # relative to workflow/rules/

wildcard_constraints:
    task="|".join(re.escape(t) for t in TASKS),
    method="|".join(re.escape(m) for m in METHODS),


def _code_version():
    """moa's version, or MOA_CODE_VERSION when set."""
    return os.environ.get("MOA_CODE_VERSION") or moa.__version__


CODE_VERSION = _code_version()


def _write_config_file():
    """results/{experiment}/.config/{hash}.yaml: the validated config every step reads (content-addressed,
    written once, atomically)."""
    text = yaml.safe_dump(config, sort_keys=False)
    path = Path(EXP) / ".config" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    return str(path)


MOA_CONFIG = _write_config_file()


def moa_config(wildcards, input):
    """The config file every step gets; a function of `input`, so Snakemake treats it as a derived param
    and never reruns a job because the file's name changed."""
    return MOA_CONFIG


def method_of(name):
    """The method of composition `name` (the entry's `method`, else its name)."""
    return method_params(config, name)["method"]


def sections(**parts):
    """A short hash of config sections; `parts` name them so that moving a key changes the hash."""
    return config_hash(parts)


# --- resources --------------------------------------------------------------------------------------

# Training and evaluation put the model on the GPU where there is one: there they take one "gpu" token,
# so that with the default profile's single token they run one at a time instead of sharing (and
# exhausting) its memory; on a machine without an NVIDIA driver (nvidia-smi) they take none and run
# side by side. On SLURM the slurm profile's set-resources decide what each job requests.
GPU_JOB = 1 if shutil.which("nvidia-smi") else 0


# --- paths ------------------------------------------------------------------------------------------

MODEL_FILES = [f"{EXP}/model/{name}" for name in ("config.json", "model.safetensors", "tokenizer.json")]
SPLITS = ("train", "validation", "test")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "train_log.parquet")
ROUTER_FILES = ("routers.safetensors", "router_config.json", "router_eval.parquet", "confusion.parquet",
                "train_log.parquet")
REPORT_PLOTS = ("scores_heatmap", "multitask_score", "router_confusion", "router_layer_accuracy",
                "adapter_cosine", "train_loss")


def data_files(tasks, splits=("train", "validation")):
    return [f"{EXP}/data/{task}/{split}.parquet" for task in tasks for split in splits]


def adapter_files(name, files=("adapter_model.safetensors", "adapter_config.json")):
    return [f"{EXP}/adapters/{name}/{file}" for file in files]


def task_adapters(files=("adapter_model.safetensors", "adapter_config.json")):
    return [path for task in TASKS for path in adapter_files(task, files)]


def local_source_files(wildcards):
    """A local source's files (globs expanded) are inputs of prepare_data: editing one reruns the task."""
    source = (config["tasks"][wildcards.task] or {}).get("source") or {}
    if source.get("type") != "local":
        return []
    files = source["files"]
    patterns = [files] if isinstance(files, str) else [
        p for value in files.values() for p in ([value] if isinstance(value, str) else value)]
    return sorted({match for pattern in patterns for match in (sorted(glob(pattern)) or [pattern])})


def composition_inputs(wildcards):
    """What `moa compose --method M` reads: nothing for base, the task adapters for oracle and the
    merges, adapters/_mixed for mixed, the routers for moa."""
    method = method_of(wildcards.method)
    if method == "base":
        return []
    if method == "mixed":
        return adapter_files("_mixed")
    if method == "moa":
        return [f"{EXP}/moa/{file}" for file in ROUTER_FILES[:2]]
    return task_adapters()


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
    spool = Spool(Path(EXP, "mlflow-spool").resolve())
    spool.start()
    os.environ[SPOOL_ENV] = str(spool.directory)
    WORKFLOW_RUN.update(id=run_id, spool=spool)


def end_tracking(status):
    """onsuccess / onerror: log the last jobs' runs, then close the parent run."""
    if "spool" in WORKFLOW_RUN:
        WORKFLOW_RUN["spool"].stop()
    end_workflow_run(config, WORKFLOW_RUN.get("id"), status)
