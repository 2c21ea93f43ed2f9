"""The Snakemake workflow, through snakemake's own CLI: lint, the planned DAG, config errors, and (after
one real smoke run) what reruns when the config, the code or the run itself changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moa.compose.registry import LEARNED, Need, needs_of
from moa.compose.registry import METHODS as REGISTRY
from moa.config import method_params, schema
from moa.experiment import load_config
from moa.layout import MIXED, ExperimentPaths
from moa.lora import load_adapter
from moa.metrics import FORMAT_ADHERENCE, STREAM_COSTS
from moa.report import report_plots
from moa.routing import load_routers
from moa.steps import STEPS
from moa.sweep import proper_subsets, sweep_rule

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "config" / "smoke.yaml"
SMOKE_TASKS = ["qa", "sentiment", "math"]
METHODS = list(schema()["properties"]["methods"]["default"])  # smoke.yaml lists none: all of them
# Each rule -> the step it runs: the step's own rule, and the sweep rule of each step that takes --subset.
RULES = {rule: step for step in STEPS for rule in ([step, sweep_rule(step)] if "subset" in STEPS[step].options
                                                    else [step])}
SWEEP_METHODS = ["moa", "moa_vote", "moa_per_layer", "centroid", "arrow",
                 "concat", "linear", "avg", "task_arithmetic", "svd", "ties",
                 "dare_linear", "dare_ties", "magnitude_prune",
                 "breadcrumbs", "task_arithmetic_tuned", "ties_tuned", "cat", "lorahub",
                 "adamerging", "xlora", "loraflow"]  # of METHODS: those a sweep recomposes
HARNESS_TASKS = {"moa_sentiment_mc": "sentiment", "moa_qa_gen": "qa"}  # config/lm_eval/'s, -> the moa task
# Pinned so that the rerun checks see only what each test changes (test_code_change_reruns_everything
# covers the real code version, moa's version).
CODE_VERSION = "test-pinned"


def snakemake(workdir: Path, *args: str, configfile: Path | None = SMOKE, code_version: str | None = CODE_VERSION,
              timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """snakemake on the repository's Snakefile, in `workdir` (its .snakemake/ and results/ stay there).
    Without a configfile it reads config/config.yaml of the working directory, as a deployed workflow does."""
    if configfile is None and not (workdir / "config").exists():
        shutil.copytree(REPO / "config", workdir / "config")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *(["--configfile", str(configfile)] if configfile else []), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=environment(workdir, code_version))


def environment(workdir: Path, code_version: str | None = CODE_VERSION) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    env.pop("MOA_MLFLOW_PARENT_RUN_ID", None)
    env.pop("MOA_CODE_VERSION", None)
    if code_version:
        env["MOA_CODE_VERSION"] = code_version
    return env


def job_counts(output: str) -> Counter[str]:
    """The dry run's "Job stats" table: rule -> number of jobs."""
    if "Nothing to be done" in output:
        return Counter()
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = (line.split() for line in table.splitlines()[3:])  # after "job count" and the rule line
    return Counter({row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0] != "total"})


def planned(output: str, rule: str, field: str = "wildcards") -> list[str]:
    """A field of every planned job of `rule` in a dry run, by default its wildcards, e.g. ["task=qa"]."""
    found, current = [], None
    for line in output.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):
            current = match.group(1)
        elif not line.startswith(" "):
            current = None
        elif current == rule and (match := re.match(rf"^\s+{field}: (.*)$", line)):
            found.append(match.group(1))
    return sorted(found)


def dry_run(workdir: Path, *args: str, **kwargs: object) -> tuple[Counter[str], str]:
    result = snakemake(workdir, "--dry-run", *args, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr
    return job_counts(result.stdout), result.stdout


def results(workdir: Path) -> ExperimentPaths:
    return ExperimentPaths(workdir / "results" / "smoke")


def smoke_jobs(n_tasks: int = 3, n_methods: int = len(METHODS), n_learned: int = len(LEARNED)) -> Counter[str]:
    return Counter(prepare_model=1, prepare_data=n_tasks, train_lora=n_tasks, train_mixed=1, train_router=1,
                   learn_merge=n_learned, compose=n_methods, evaluate=n_methods, report=1, all=1)  # one per method


def sweep_jobs(n_subsets: int, n_methods: int = len(SWEEP_METHODS), n_learned: int = len(LEARNED)) -> Counter[str]:
    """The jobs of a sweep's proper subsets (each with a router to train and learned merges to learn), without the
    report."""
    return Counter(sweep_tasks=n_subsets, sweep_train_router=n_subsets, sweep_learn_merge=n_subsets * n_learned,
                   sweep_compose=n_subsets * n_methods, sweep_evaluate=n_subsets * n_methods)


def with_sweep(directory: Path, **sweep: object) -> Path:
    """smoke.yaml with a sweep (by default over pairs of its three tasks: three subsets)."""
    config = yaml.safe_load(SMOKE.read_text()) | {"sweep": {"n_tasks": [2]} | sweep}
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- without running anything ------------------------------------------------------------------------


NO_SOFTWARE_ENV = "Specify a conda environment or container for each rule."


def lints(output: str) -> dict[str, set[str]]:
    """`snakemake --lint` output: what each lint is for ("rule train_lora", "snakefile ...") -> its titles."""
    blocks = re.split(r"^Lints for ", output, flags=re.MULTILINE)[1:]
    return {block.split(" (", 1)[0]: set(re.findall(r"^    \* (.+?):$", block, re.MULTILINE)) for block in blocks}


@pytest.mark.parametrize("configfile", [SMOKE, None], ids=["smoke", "default"])
def test_lint_finds_only_the_rules_without_a_conda_environment(tmp_path: Path, configfile: Path | None) -> None:
    """No rule names a conda environment: jobs run in the environment snakemake runs in, since the `-e .`
    of environment.yml names the project only from the repository root, not in an environment Snakemake
    builds under .snakemake/conda/. Nothing else is linted."""
    result = snakemake(tmp_path, "--lint", configfile=configfile)
    output = result.stdout + result.stderr
    assert lints(output) == {f"rule {rule}": {NO_SOFTWARE_ENV} for rule in RULES}, output  # sweep_tasks: Python


def test_dry_run_plans_the_smoke_dag(tmp_path: Path) -> None:
    counts, out = dry_run(tmp_path, "--printshellcmds")
    assert counts == smoke_jobs()
    assert planned(out, "train_lora") == [f"task={t}" for t in sorted(SMOKE_TASKS)]
    assert planned(out, "evaluate") == sorted(f"method={m}" for m in METHODS)
    # each step gets the validated config as one content-addressed file under the experiment
    configs = list(results(tmp_path).config_dir.glob("*.yaml"))
    assert len(configs) == 1
    written = yaml.safe_load(configs[0].read_text())
    assert list(written["tasks"]) == SMOKE_TASKS and list(written["methods"]) == METHODS
    assert written["lora"]["rank"] == 8  # defaults filled in
    assert f"--config {configs[0].relative_to(tmp_path)}" in out


def test_every_rule_runs_the_moa_step_of_its_name(tmp_path: Path) -> None:
    """One hop from a rule to its code: rule train_lora runs `moa train-lora`, i.e. STEPS["train_lora"], and
    sweep_train_router runs `moa train-router --subset ...` (with a sweep and harness tasks: every rule has jobs)."""
    harness = {"tasks": ["moa_qa_gen"], "include_path": str(REPO / "config" / "lm_eval")}
    _, out = dry_run(tmp_path, "--printshellcmds", "--config", f"evaluation={{lm_eval: {json.dumps(harness)}}}",
                     configfile=with_sweep(tmp_path))
    shells = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?Shell command: moa ([\w-]+) (.*)$", out, re.MULTILINE)
    commands = {rule: command for rule, command, _ in shells}
    assert commands == {rule: step.replace("_", "-") for rule, step in RULES.items()}
    assert all(("--subset" in arguments) == rule.startswith("sweep_") for rule, _, arguments in shells)


def test_dry_run_plans_the_sweep(tmp_path: Path) -> None:
    """Every pair of the three tasks is a subset, and the subset of all three is the main experiment: three subsets
    run, each training its routers and recomposing and evaluating what a sweep recomposes."""
    counts, out = dry_run(tmp_path, configfile=with_sweep(tmp_path, n_tasks=[2, 3]))
    assert counts == smoke_jobs() + sweep_jobs(3)
    assert planned(out, "sweep_tasks") == planned(out, "sweep_train_router") == ["subset=n2-s1", "subset=n2-s2",
                                                                                 "subset=n2-s3"]
    assert planned(out, "sweep_compose") == sorted(f"subset=n2-s{k}, method={m}" for k in (1, 2, 3)
                                                   for m in SWEEP_METHODS)
    for step in ("train_router", "compose", "evaluate"):  # a sweep rule is a variant of its step's rule
        for field in ("threads", "resources"):
            assert set(planned(out, sweep_rule(step), field)) <= set(planned(out, step, field)), (step, field)


@pytest.mark.parametrize(("methods", "trained"), [
    ({"base": None, "concat": None}, {"train_lora"}),
    ({"base": None, "mixed": None}, {"train_mixed"}),
    ({"base": None, "moa": None}, {"train_lora", "train_router"}),
], ids=["merges", "mixed", "moa"])
def test_the_dag_trains_only_what_the_methods_need(tmp_path: Path, methods: dict, trained: set[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(SMOKE.read_text()) | {"methods": methods}))
    counts, _ = dry_run(tmp_path, configfile=config)
    assert {rule for rule in ("train_lora", "train_mixed", "train_router") if counts[rule]} == trained
    assert counts["compose"] == len(methods) and counts["evaluate"] == len(methods)
    assert {need for m in methods for need in REGISTRY[m].needs}  # the registry is what decides


@pytest.mark.parametrize("gpu", [0, 1])
def test_jobs_on_the_model_take_the_gpu_token_only_where_there_is_a_gpu(tmp_path: Path, monkeypatch, gpu: int) -> None:
    """Training, routers, evaluations and the compositions that read the model (centroid, tuned merges) take a GPU
    token where this host has an NVIDIA driver (a stand-in nvidia-smi here), other merges never."""
    if gpu:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\n")
        (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    elif shutil.which("nvidia-smi"):
        pytest.skip("this host has a GPU")
    _, out = dry_run(tmp_path)
    for rule in ("train_lora", "train_mixed", "train_router", "evaluate"):
        assert all(f"gpu={gpu}," in resources for resources in planned(out, rule, "resources")), rule
    smoke = load_config(SMOKE)
    reading = [m for m in METHODS if Need.TASK_PROMPTS in needs_of(method_params(smoke, m))]  # centroid, tuned
    compose = planned(out, "compose", "resources")
    assert reading and sum("gpu=1," in r for r in compose) == gpu * len(reading)
    assert sum("gpu=0," in r for r in compose) == len(compose) - gpu * len(reading)


def test_configfile_replaces_the_default_config(tmp_path: Path) -> None:
    """--configfile smoke.yaml is the experiment; without it config/config.yaml (six tasks, 10 methods of which two
    learned merges, and a sweep of one subset of two tasks, two methods) is."""
    counts, _ = dry_run(tmp_path, configfile=None)
    assert counts == smoke_jobs(n_tasks=6, n_methods=10, n_learned=2) + sweep_jobs(1, n_methods=2, n_learned=0)
    assert (tmp_path / "results" / "default" / ".config").is_dir()


def test_the_fair_overlay_adds_the_left_out_compositions(tmp_path: Path) -> None:
    """config/fair.yaml on top of config/config.yaml: its six compositions join the default's 10, adamerging with
    its learn_merge job beside the default's cat and lorahub."""
    counts, _ = dry_run(tmp_path, "--configfile", str(REPO / "config/config.yaml"), str(REPO / "config/fair.yaml"),
                        configfile=None)
    assert counts == smoke_jobs(n_tasks=6, n_methods=16, n_learned=3) + sweep_jobs(1, n_methods=2, n_learned=0)


def test_the_harness_overlay_adds_one_job_per_composition(tmp_path: Path) -> None:
    """config/lm_eval.yaml on top of config/config.yaml: an lm_eval job per composition (its task_map maps both harness
    tasks, so the oracle's too); nothing else changes."""
    counts, out = dry_run(tmp_path, "--configfile", str(REPO / "config/config.yaml"), str(REPO / "config/lm_eval.yaml"),
                          configfile=None)
    default, _ = dry_run(tmp_path / "default", configfile=None)
    assert counts == default + Counter(lm_eval=10)
    assert "method=oracle" in planned(out, "lm_eval")


def test_without_a_task_map_the_oracle_runs_no_harness_task(tmp_path: Path) -> None:
    tasks = tmp_path / "harness"
    tasks.mkdir()
    (tasks / "moa_qa_gen.yaml").write_text((REPO / "config/lm_eval/moa_qa_gen.yaml").read_text())
    counts, out = dry_run(tmp_path, "--config", f"evaluation={{lm_eval: {{tasks: [moa_qa_gen], include_path: {tasks}}}}}")
    assert counts == smoke_jobs() + Counter(lm_eval=len(METHODS) - 1)
    assert "method=oracle" not in planned(out, "lm_eval")


def test_nested_config_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    """Snakemake reads nested --config values as strings; they reach the steps typed like --set."""
    counts, _ = dry_run(tmp_path, "--config", "training={steps: 4, max_grad_norm: null}", "tracking={enabled: false}",
                        "methods={svd_r4: {method: svd, k: 4}, base: null}")
    assert counts == smoke_jobs(n_methods=2, n_learned=0) - Counter(train_mixed=1, train_router=1)  # neither needs them
    written = yaml.safe_load(next(results(tmp_path).config_dir.glob("*.yaml")).read_text())
    assert written["training"]["steps"] == 4 and written["training"]["max_grad_norm"] is None
    assert written["tracking"]["enabled"] is False
    assert written["methods"] == {"svd_r4": {"method": "svd", "k": 4}, "base": None}


@pytest.mark.parametrize(("override", "key"), [
    ("colour=blue", "colour"),
    ("seed=many", "seed"),
    ("lora={rank: zero}", "lora.rank"),
    ("tasks={capitals: {template: 'Capital of {country}?', target: '{capital}', metric: exact_match}}",
     "tasks.capitals"),
    ("methods={fancy: null}", "methods.fancy"),
    ("methods={svd: {strategy: vote}}", "methods.svd"),
    ("methods={concat: {k: 4}}", "methods.concat"),
    ("training={seq_len: 256}", "data.max_prompt_tokens"),
    ("sweep={n_tasks: [2, 4]}", "sweep.n_tasks: 4 is more than the 3 tasks; use sizes from 1 to 3"),
    ("sweep={n_tasks: [0]}", "sweep.n_tasks.0"),
    ("sweep={tasks: 2}", "sweep"),
    ("evaluation={lm_eval: {tasks: [no_such_task]}}", "evaluation.lm_eval.tasks: 'no_such_task' is not a harness task"),
], ids=["unknown-key", "wrong-type", "wrong-nested-type", "custom-task-without-source", "not-a-method",
        "key-of-another-method", "key-of-another-merge", "rows-shorter-than-an-example", "sweep-larger-than-the-tasks",
        "sweep-of-none", "malformed-sweep", "unknown-harness-task"])
def test_a_bad_config_stops_with_one_line_naming_the_key(tmp_path: Path, override: str, key: str) -> None:
    result = snakemake(tmp_path, "--dry-run", "--config", override)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("moa: error: ") and key in lines[0], lines[0]
    assert not (tmp_path / "results").exists()  # nothing was planned or written


# --- after one real smoke run -------------------------------------------------------------------------


def missing_steps() -> list[str]:
    commands = [step.replace("_", "-") for step in STEPS]
    return [command for command in commands
            if subprocess.run([sys.executable, "-m", "moa", command, "--help"], check=False,
                              capture_output=True).returncode]


def smoke_config(directory: Path, **changes: object) -> Path:
    """smoke.yaml with the evaluation cut to a few rows per task (the DAG is the same), plus `changes`."""
    config = yaml.safe_load(SMOKE.read_text()) | {"evaluation": {"limit": 4}} | changes
    path = directory / "smoke-test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory where the whole smoke DAG has run once."""
    if missing := missing_steps():
        pytest.skip(f"the workflow's CLI steps do not exist yet: moa {', '.join(missing)} --help fails")
    workdir = tmp_path_factory.mktemp("smoke")
    result = snakemake(workdir, configfile=smoke_config(workdir))
    output = result.stdout + result.stderr
    if result.returncode != 0 and "MissingOutputException in rule report" in output:
        pytest.fail("moa report left out plots the workflow declares: it must write every report/*.png of "
                    f"workflow/rules/common.smk's REPORT_PLOTS (a placeholder saying why, where the data allows "
                    f"no plot):\n{output[-3000:]}")
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in (workdir / "results").rglob("*.log"))
    assert result.returncode == 0, output[-5000:] + logs[-10000:]
    return workdir


def copy_of(built: Path, tmp_path: Path) -> Path:
    """A copy of the built tree (results/ and .snakemake/ metadata, mtimes kept): tests that run jobs
    do not change the tree the others plan against."""
    workdir = tmp_path / "w"
    shutil.copytree(built, workdir, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    return workdir


def test_smoke_run_wrote_every_artifact(built: Path) -> None:
    """Every output of the DAG exists and holds what it should: data rows, loadable adapters and routers,
    one evaluation per method and task, a report covering all of them, logs and benchmarks."""
    paths, config = results(built), yaml.safe_load(smoke_config(built).read_text())
    for task in SMOKE_TASKS:
        stats = json.loads(paths.data_stats(task).read_text())
        for split in ("train", "validation", "test"):
            assert len(pd.read_parquet(paths.split(task, split))) == stats["splits"][split]["rows_out"] > 0
        adapter_config, state = load_adapter(paths.adapter(task))
        assert adapter_config.r == 8 and state
        assert len(pd.read_parquet(paths.train_log(task))) == config["training"]["steps"]
    assert load_adapter(paths.adapter(MIXED))[0].r == 8
    assert load_routers(paths.moa).spec.tasks == tuple(SMOKE_TASKS)
    assert set(pd.read_parquet(paths.router_eval).routing.dropna()) == {"teacher_forced", "routed"}
    limit = config["evaluation"]["limit"]
    for method in METHODS:
        manifest = json.loads(paths.manifest(method).read_text())
        assert manifest["name"] == method and manifest["tasks"] == SMOKE_TASKS
        for task in SMOKE_TASKS:
            metrics = pd.read_parquet(paths.metrics(method, task))
            assert set(metrics.method) == {method} and set(metrics.task) == {task}
            per_stream = metrics.metric.isin(STREAM_COSTS)  # the n of the whole mixed-task stream
            assert set(metrics.n[~per_stream]) == {limit} and set(metrics.n[per_stream]) <= {limit * 2, limit * 3}
            assert len(pd.read_parquet(paths.predictions(method, task))) == limit
    table = pd.read_parquet(paths.report_table("metrics"))
    assert set(zip(table.method, table.task)) == {(m, t) for m in METHODS for t in SMOKE_TASKS}
    summary = paths.summary.read_text()
    assert all(f"| {method} |" in summary for method in METHODS)
    assert "## Verdict" in summary and "paired bootstrap percentile intervals" in summary
    intervals = pd.read_parquet(paths.report_table("intervals"))  # every metric of every evaluation has an interval
    assert set(zip(intervals.method, intervals.task)) >= {(m, t) for m in METHODS for t in SMOKE_TASKS}
    bounded = intervals.dropna(subset=["lo", "hi"])
    assert len(bounded) and (bounded.lo <= bounded.hi).all() and set(intervals.n) >= {limit}
    comparisons = pd.read_parquet(paths.report_table("comparisons"))
    assert set(comparisons.reference) <= {"moa", "oracle"} and comparisons.p.between(0, 1).all()
    formats = intervals[intervals.metric == FORMAT_ADHERENCE]  # every smoke task generates and has a format check
    assert set(zip(formats.method, formats.task)) == {(m, t) for m in METHODS for t in SMOKE_TASKS}
    assert "## Format adherence" in summary and "| routing accuracy (%) |" in summary
    # one expert per prompt chosen by a router: not the oracle's
    routing = pd.read_parquet(paths.report_table("routing"))
    assert set(routing.method) == {"moa", "moa_vote", "centroid"} and set(routing.task) == set(SMOKE_TASKS)
    assert (routing.groupby(["method", "task"])["count"].sum() == limit).all()
    for plot in report_plots(config):
        assert paths.plot(plot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), plot
    # the tiny random model's oracle may score 0 on 4 rows, leaving the score plots without data; the rest
    # always have theirs
    # the tuned merges' candidates, and every composition's tier, data and build time in the cost table
    tuning = pd.read_parquet(paths.report_table("tuning"))
    assert set(tuning.composition) == {"task_arithmetic_tuned", "ties_tuned"} and tuning.chosen.any()
    assert "## Tuned merges" in summary and "| learned merge |" in summary and "| tuned merge |" in summary
    for plot in ("format_adherence", "router_confusion", "router_layer_accuracy", "adapter_cosine", "train_loss",
                 "tuning"):
        assert f"{plot}.png skipped" not in summary and len(paths.plot(plot).read_bytes()) > 10_000, plot
    for rule, wildcards in (("prepare_model", ()), ("train_mixed", ()), ("report", ()), ("evaluate", ("svd",))):
        assert "wrote " in paths.log(rule, *wildcards).read_text()
        assert pd.read_csv(paths.benchmark(rule, *wildcards), sep="\t")["s"].iloc[0] > 0


def test_every_job_is_a_child_run_of_the_workflow_run(built: Path) -> None:
    with sqlite3.connect(built / "mlflow.db") as db:
        parents = db.execute("SELECT run_uuid, status FROM runs WHERE name LIKE 'workflow:%'").fetchall()
        children = db.execute("SELECT t.value, r.name FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                              "WHERE t.key = 'mlflow.parentRunId'").fetchall()
    assert len(parents) == 1 and parents[0][1] == "FINISHED", parents
    assert children and {parent for parent, _ in children} == {parents[0][0]}
    names = {name for _, name in children}
    assert {"train_lora:qa", "train_mixed", "train_router", "evaluate:svd", "report"} <= names, names
    preparations = 1 + len(SMOKE_TASKS)  # the model, each task's data
    trainings = len(SMOKE_TASKS) + 2 + len(LEARNED)  # one LoRA per task, the mixed adapter, the routers, learn-merge
    assert len(children) == preparations + trainings + 2 * len(METHODS) + 1  # compose, evaluate; the report
    assert {f"learn_merge:{name}" for name in LEARNED} <= names
    assert {"prepare_model", "prepare_data:qa"} <= names
    assert not any(results(built).spool.iterdir())  # the workflow logged every run


def test_a_second_run_does_nothing(built: Path) -> None:
    counts, out = dry_run(built, configfile=smoke_config(built))
    assert counts == Counter(), out


def test_adding_a_task_reruns_only_what_depends_on_it(built: Path) -> None:
    config = smoke_config(built)
    counts, out = dry_run(built, "--config", "tasks={dialogue: {source: {type: synthetic}}}", configfile=config)
    assert counts == Counter(prepare_data=1, train_lora=1, train_mixed=1, train_router=1, learn_merge=len(LEARNED),
                             compose=len(METHODS), evaluate=len(METHODS), report=1, all=1), out  # a new test set
    assert planned(out, "prepare_data") == planned(out, "train_lora") == ["task=dialogue"]


def test_changing_one_method_reruns_only_its_composition(built: Path) -> None:
    methods = dict(schema()["properties"]["methods"]["default"]) | {"svd": {"k": 4}}
    counts, out = dry_run(built, configfile=smoke_config(built, methods=methods))
    assert counts == Counter(compose=1, evaluate=1, report=1, all=1), out
    assert planned(out, "compose") == ["method=svd"]
    # and the same entry spelled out with its defaults is no change at all
    methods = dict(schema()["properties"]["methods"]["default"]) | {"svd": {"method": "svd"}}
    counts, out = dry_run(built, configfile=smoke_config(built, methods=methods))
    assert counts == Counter(), out


def test_changing_the_evaluation_reruns_only_evaluations(built: Path) -> None:
    counts, out = dry_run(built, configfile=smoke_config(built, evaluation={"limit": 3}))
    assert counts == Counter(evaluate=len(METHODS), report=1, all=1), out


def test_changing_the_router_reruns_it_and_the_moa_compositions(built: Path) -> None:
    counts, out = dry_run(built, configfile=smoke_config(built, router={"eta": 0.5}))
    moa = [m for m in METHODS if m.startswith("moa")]
    assert counts == Counter(train_router=1, compose=len(moa), evaluate=len(moa), report=1,
                             all=1), out


def test_code_change_reruns_everything(built: Path) -> None:
    """Without the pin, the code version is moa's version: not what built the tree."""
    counts, out = dry_run(built, configfile=smoke_config(built), code_version=None)
    assert counts == smoke_jobs(), out
    assert re.search(r"Params have changed since last execution", out)


def test_report_html(built: Path, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    result = snakemake(built, "--report", str(html), configfile=smoke_config(built))
    assert result.returncode == 0, result.stdout + result.stderr
    text = html.read_text()
    plots = [results(built).plot(plot).name for plot in report_plots({})]  # no sweep
    assert plots and all(name in text for name in plots), plots


def test_an_interrupted_run_resumes(built: Path, tmp_path: Path) -> None:
    """A run stopped by Ctrl-C while train_mixed trains, then the same command again: it finishes, and
    the job resumes from its checkpoint (checkpoints/ is no output, so Snakemake leaves it alone) to the
    uninterrupted run's adapter files, byte for byte."""
    workdir = copy_of(built, tmp_path)
    config = smoke_config(workdir)
    paths = results(workdir)
    for folder in (paths.adapter(MIXED), paths.report):  # as if the first run had stopped before these
        shutil.rmtree(folder)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(config)]
    # Ctrl-C's default disposition in the child: a script's background job (`nohup bash scripts/test.sh &`)
    # starts with SIGINT ignored, which children inherit, and the interrupt would then never land.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment(workdir), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = paths.checkpoint(MIXED) / "state.pt"
    deadline = time.monotonic() + 900
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not checkpoint.is_file():
        proc.kill()
        pytest.fail(f"train_mixed never checkpointed:\n{proc.communicate()[0][-5000:]}")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: snakemake and its job
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not paths.adapter_files(MIXED)[0].exists() and checkpoint.is_file()

    result = snakemake(workdir, configfile=config)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "resuming from step" in paths.log("train_mixed").read_text()
    assert paths.adapter_files(MIXED)[0].is_file() and not checkpoint.exists()
    resumed, uninterrupted = (p.adapter_files(MIXED, train_log=False) for p in (paths, results(built)))
    assert [f.read_bytes() for f in resumed] == [f.read_bytes() for f in uninterrupted]  # bitwise, as README says
    assert paths.summary.is_file()
    assert dry_run(workdir, configfile=config)[0] == Counter()


# --- a sweep on the built tree ------------------------------------------------------------------------

SWEEP = {"n_tasks": [2, 3], "subsets": 2}  # two pairs of the three tasks; the three: the main experiment
SWEEP_RUN = {"base": None, "oracle": None, "moa": None, "svd": None, "ties": None}  # a few methods, a short run


def sweep_config(directory: Path, **sweep: object) -> Path:
    return smoke_config(directory, methods=SWEEP_RUN, sweep=SWEEP | sweep)


@pytest.fixture(scope="module")
def swept(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the built tree on which a small sweep has run."""
    workdir = copy_of(built, tmp_path_factory.mktemp("sweep"))
    result = snakemake(workdir, configfile=sweep_config(workdir))
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in results(workdir).root.glob("logs/sweep_*/**/*.log"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:] + logs[-10000:]
    return workdir


def test_harness_tasks_on_a_built_tree_run_one_job_per_composition_and_reach_the_report(built: Path,
                                                                                         tmp_path: Path) -> None:
    """config/lm_eval's two harness tasks (over the experiment's own test splits) added to a built tree: only the
    lm_eval jobs and the report run; every composition's results and per-sample logs, the report's section."""
    workdir = copy_of(built, tmp_path)
    harness = workdir / "harness"
    harness.mkdir()
    for task in HARNESS_TASKS:
        text = (REPO / "config" / "lm_eval" / f"{task}.yaml").read_text()
        (harness / f"{task}.yaml").write_text(text.replace("results/default/", "results/smoke/"))
    lm_eval = {"tasks": list(HARNESS_TASKS), "include_path": str(harness), "limit": 4, "task_map": HARNESS_TASKS}
    config = smoke_config(workdir, evaluation={"limit": 4, "lm_eval": lm_eval})
    counts, _ = dry_run(workdir, configfile=config)
    assert counts == Counter(lm_eval=len(METHODS), report=1, all=1)
    result = snakemake(workdir, configfile=config)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    paths = results(workdir)
    for method in METHODS:
        harness_results = json.loads(paths.harness_results(method).read_text())["results"]
        assert set(harness_results) == set(HARNESS_TASKS)
        assert all(len(paths.harness_samples(method, t).read_text().splitlines()) == 4 for t in HARNESS_TASKS)
    figures = pd.read_parquet(paths.report_table("lm_eval"))
    assert set(figures["method"]) == set(METHODS) and set(figures["metric"]) == {"acc", "exact_match.strip"}
    assert figures[["lo", "hi"]].notna().all().all()
    assert "## lm-evaluation-harness tasks" in paths.summary.read_text()


def test_a_sweep_on_a_built_tree_runs_only_the_sweep(built: Path) -> None:
    """The main experiment's LoRAs, compositions and evaluations are reused: only the subsets' jobs and the report
    run (the subset of all three tasks is the main experiment: nothing of it)."""
    counts, out = dry_run(built, configfile=sweep_config(built))
    assert counts == sweep_jobs(2, n_methods=3, n_learned=0) + Counter(report=1, all=1), out
    assert planned(out, "sweep_train_router") == ["subset=n2-s1", "subset=n2-s2"]


def test_a_sweep_writes_each_subset_and_the_report(swept: Path) -> None:
    paths, config = results(swept), load_config(sweep_config(swept))
    for subset in proper_subsets(config):
        scoped = paths.of_subset(subset.name)
        assert json.loads(scoped.subset_tasks.read_text())["tasks"] == list(subset.tasks)
        assert load_routers(scoped.moa).spec.tasks == subset.tasks  # routers retrained on the subset's tasks
        assert json.loads(scoped.merge_report("svd").read_text())["rank"] == 8
        for method in ("moa", "svd", "ties"):
            assert json.loads(scoped.manifest(method).read_text())["tasks"] == list(subset.tasks)
            evaluated = {p.name for p in scoped.evaluations(method).iterdir() if not p.name.startswith(".")}
            assert evaluated == set(subset.tasks)
            assert all(len(pd.read_parquet(scoped.predictions(method, task))) == 4 for task in subset.tasks)
        assert not scoped.composition("base").exists() and not scoped.composition("oracle").exists()
    table = pd.read_parquet(paths.report_table("sweep"))
    assert list(table.columns)[:7] == ["method", "n_tasks", "subset", "tasks", "multitask_score", "lo", "hi"]
    assert set(table["subset"]) <= {"n2-s1", "n2-s2", "n3-s1"} and set(table["method"]) <= {"base", "moa", "svd", "ties"}
    assert paths.plot("sweep").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "Task-count sweep" in paths.summary.read_text()
    with sqlite3.connect(swept / "mlflow.db") as db:
        runs = dict(db.execute("SELECT r.name, t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                               "WHERE t.key = 'moa.subset'").fetchall())
    assert runs == {f"{rule}:{s}{wildcards}": s for s in ("n2-s1", "n2-s2")
                    for rule, wildcards in [("sweep_train_router", "")] + [("sweep_compose", f",{m}") for m in
                                                                            ("moa", "svd", "ties")]
                    + [("sweep_evaluate", f",{m}") for m in ("moa", "svd", "ties")]}
    assert dry_run(swept, configfile=sweep_config(swept))[0] == Counter()  # and a second run does nothing


def test_adding_a_size_or_a_subset_runs_only_what_is_new(swept: Path) -> None:
    counts, out = dry_run(swept, configfile=sweep_config(swept, n_tasks=[1, 2, 3], subsets=3))
    assert counts == sweep_jobs(4, n_methods=3, n_learned=0) + Counter(report=1, all=1), out
    assert planned(out, "sweep_tasks") == ["subset=n1-s1", "subset=n1-s2", "subset=n1-s3", "subset=n2-s3"]


def test_a_change_to_a_task_reruns_only_the_subsets_with_it(swept: Path) -> None:
    """math's data changes: of the sweep, only what the subset with math holds reruns."""
    (without,) = [s.name for s in proper_subsets(load_config(sweep_config(swept))) if "math" not in s.tasks]
    counts, out = dry_run(swept, "--config", "tasks={math: {source: {type: synthetic}, sizes: {test: 8}}}",
                          configfile=sweep_config(swept))
    jobs = [job for rule in sweep_jobs(1) for job in planned(out, rule)]
    assert counts["train_lora"] == 1 and counts["sweep_evaluate"] == 3, out
    assert jobs and not any(without in job for job in jobs), jobs
