"""The cluster recipe: only the prepare steps download (the model, the `hf` datasets); under a cluster executor they
run where snakemake runs (on SLURM the login node, which reaches the hub), and every later step reads model/ and
fails with one line rather than try the network."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moa.model.load
import moa.model.prepare
from moa.config import Config
from moa.errors import MoaError
from moa.experiment import load_config
from moa.layout import ExperimentPaths
from moa.model import random_model
from moa.model.prepare import prepare_model
from moa.model.prepared import base_model
from tests.test_workflow import REPO, SMOKE, environment

HUB_ID = "Qwen/Qwen2-1.5B"


def config_of(tmp_path: Path, source: str) -> tuple[Path, Config]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "results_dir": str(tmp_path / "results"),
                                    "model": {"source": source},
                                    "tasks": {"sentiment": {"source": {"type": "synthetic"}}}}))
    return path, load_config(path)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the hub fails the test."""
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step tried to download the model")

    monkeypatch.setattr(moa.model.load, "load_hub", no_network)


@pytest.mark.usefixtures("offline")
def test_a_step_after_prepare_model_never_downloads(tmp_path: Path) -> None:
    path, config = config_of(tmp_path, HUB_ID)
    with pytest.raises(MoaError, match=rf"model: not prepared from model.source '{HUB_ID}', and no step after "
                                       r"prepare-model downloads; run `moa prepare-model --config \.\.\.` first"):
        base_model(config)
    run = subprocess.run([sys.executable, "-m", "moa", "train-lora", "--config", str(path), "--task", "sentiment"],
                         capture_output=True, text=True, cwd=REPO)  # the CLI: exit 2, one line, before any download
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "prepare-model" in run.stderr, run.stderr
    assert not (tmp_path / "results" / "t" / "adapters").exists()


def test_a_prepared_hub_model_is_read_from_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare-model (on the login node) writes model/ from the hub; later steps read it with no network."""
    _, config = config_of(tmp_path, HUB_ID)
    with monkeypatch.context() as hub:  # the hub's model, played by a random one
        hub.setattr(moa.model.prepare, "load_pretrained", lambda source, dtype, **_: random_model("tiny", 0, dtype))
        prepare_model(config)
    monkeypatch.setattr(moa.model.load, "load_hub", lambda *args, **kwargs: pytest.fail("tried the network"))
    model, _ = base_model(config)
    expected, _ = random_model("tiny", 0)
    assert all((a.cpu() == b).all() for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    _, other = config_of(tmp_path, "Qwen/Qwen2-0.5B")  # model/ is not this source's: not read, and no download
    with pytest.raises(MoaError, match="run `moa prepare-model"):
        base_model(other)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("source", ["random:tiny", "model-dir"])
def test_local_sources_load_without_prepare_model(tmp_path: Path, source: str) -> None:
    if source == "model-dir":  # a local HF directory, as a cluster user might point model.source at
        _, prepared = config_of(tmp_path / "other", "random:tiny")
        prepare_model(prepared)
        source = str(ExperimentPaths.of(prepared).model)
    _, config = config_of(tmp_path, source)
    model, tokenizer = base_model(config)
    assert tokenizer.vocab_size > 0 and not ExperimentPaths.of(config).model.exists()


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="needs snakemake-executor-plugin-slurm")
def test_prepare_steps_run_where_snakemake_runs_under_slurm(tmp_path: Path) -> None:
    """With the slurm executor and no SLURM at all, the prepare rules still run: on this host, as local rules,
    submitting nothing (the plugin keeps a log of every job it submits under .snakemake/slurm_logs/)."""
    config = yaml.safe_load(SMOKE.read_text())
    config["tasks"] = {"sentiment": config["tasks"]["sentiment"]}
    configfile = tmp_path / "one-task.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(configfile), "--executor", "slurm", "--jobs", "2", "--until", "prepare_model",
           "prepare_data"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environment(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rule in ("prepare_model", "prepare_data"):
        assert f"localrule {rule}:" in run.stdout + run.stderr
    paths = ExperimentPaths(tmp_path / "results" / "smoke")
    assert all(path.is_file() for path in paths.model_files)
    assert paths.split("sentiment", "train").is_file()
    assert not (tmp_path / ".snakemake" / "slurm_logs").exists()
