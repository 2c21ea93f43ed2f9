"""moa's lm-evaluation-harness model against the harness's own `hf` model with `peft=`: on local harness tasks (a
multiple-choice, a generation and a rolling-loglikelihood task over JSON files this test writes), the oracle's
adapter of one task and a folded merge give the same loglikelihoods within 1e-4 and the same greedy generations, in
fp32 on the tiny model and (marked integration) on SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from moa.compose.composition import compose
from moa.errors import MoaError
from moa.experiment import load_config
from moa.harness import MoaLM
from moa.layout import ExperimentPaths
from moa.lm_harness import check_tasks, evaluate_harness, leaf_map, task_manager
from moa.lora import DEFAULT_TARGETS, AdapterConfig, adapter_state_dict, write_adapter
from moa.model.prepare import prepare_model
from tests.conftest import TINY_FAST, composed_experiment, with_random_experts

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["qa", "sentiment"]
FAST = [*TINY_FAST, "evaluation.dtype=float32"]
HARNESS = {"moa_mc": "qa", "moa_gen": "qa", "moa_rolling": "sentiment"}  # harness task -> moa task (the oracle's)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model prepared as an HF directory, two task LoRAs, the oracle and task arithmetic composed."""
    return composed_experiment(tmp_path_factory.mktemp("harness"), TASKS, {"oracle": None, "task_arithmetic": None},
                               FAST)


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three harness task YAMLs over local JSON files: nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("harness_tasks")
    rows = {
        "mc": [{"question": f"Question {i}: is {i} even?", "choices": [" yes", " no", " maybe"], "answer": i % 2}
               for i in range(6)],
        "gen": [{"prompt": f"Passage: item {i} sat.\nQuestion: what sat?\nAnswer:", "target": f" item {i}"}
                for i in range(4)],
        "rolling": [{"text": f"Review {i}: the film was {'good' if i % 2 else 'bad'}, and long." * 3} for i in range(3)],
    }
    for name, records in rows.items():
        (tmp / f"{name}.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    common = {"dataset_path": "json", "test_split": "train"}
    specs = {
        "moa_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
        "moa_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                    "metric_list": [{"metric": "exact_match"}]},
        "moa_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                        "metric_list": [{"metric": "word_perplexity"}]},
    }
    for task, spec in specs.items():
        data = str(tmp / f"{task.removeprefix('moa_')}.json")
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(
            {"task": task, **common, "dataset_kwargs": {"data_files": {"train": data}}, **spec}))
    return tmp


def peft_model(model_dir: Path, adapter: Path) -> PeftModel:
    """The base model with the adapter, as `hf` with `peft=` loads it but without its embedding resize (it cuts the
    tiny model's padded vocabulary, 320 rows, to the tokenizer's 259 tokens; SmolLM2's are equal)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def samples(model, harness_tasks: Path) -> dict[str, list[dict]]:
    results = simple_evaluate(model=model, tasks=list(HARNESS), task_manager=TaskManager(include_path=str(harness_tasks)),
                              log_samples=True, batch_size=4)
    return results["samples"]


def responses(entries: list[dict]) -> list[list]:
    """Each sample's raw responses, ordered by document."""
    return [entry["resps"] for entry in sorted(entries, key=lambda e: e["doc_id"])]


@pytest.mark.parametrize(("method", "adapter"), [("oracle", "qa"), ("task_arithmetic", None)])
def test_moa_gives_the_harness_hf_model_with_peft(experiment: Path, harness_tasks: Path, method: str,
                                                   adapter: str | None) -> None:
    compare(experiment, FAST, harness_tasks, method, adapter)


def compare(experiment: Path, overrides: list[str], harness_tasks: Path, method: str, adapter: str | None) -> None:
    """moa's samples equal hf's with the composition's PEFT adapter: the oracle on the qa-mapped tasks is the qa LoRA
    (the rolling task, mapped to sentiment, is compared for the merge only); task arithmetic is its own adapter."""
    paths = ExperimentPaths.of(load_config(experiment, overrides))
    peft = paths.adapter(adapter) if adapter else paths.composition(method)
    tasks = "|".join(f"{h}:{m}" for h, m in HARNESS.items())
    ours = samples(MoaLM(str(experiment), method, tasks=tasks), harness_tasks)
    theirs = samples(HFLM(pretrained=peft_model(paths.model, peft), tokenizer=AutoTokenizer.from_pretrained(paths.model),
                          batch_size=4), harness_tasks)
    for task in ["moa_mc", "moa_gen"] + ([] if adapter else ["moa_rolling"]):
        for mine, reference in zip(responses(ours[task]), responses(theirs[task]), strict=True):
            for a, b in zip(mine, reference, strict=True):
                if task == "moa_gen":
                    assert a == b
                elif task == "moa_mc":
                    assert a[0][0] == pytest.approx(b[0][0], abs=1e-4) and a[0][1] == b[0][1]
                else:
                    assert a[0] == pytest.approx(b[0], abs=1e-4)


def test_the_oracle_needs_each_harness_task_mapped(experiment: Path, harness_tasks: Path) -> None:
    with pytest.raises(MoaError, match="harness task 'moa_mc' has no moa task; map it in evaluation.lm_eval.task_map"):
        samples(MoaLM(str(experiment), "oracle"), harness_tasks)
    with pytest.raises(MoaError, match="model args tasks: 'moa_mc:nope' is not HARNESS_TASK:MOA_TASK"):
        MoaLM(str(experiment), "oracle", tasks="moa_mc:nope")


def test_the_command_line_runs_a_composition(experiment: Path, harness_tasks: Path, tmp_path: Path) -> None:
    """`moa-lm-eval` is the harness's command line with moa's model registered: results and per-sample logs."""
    args = ["--model", "moa", "--model_args", f"config={experiment},method=task_arithmetic", "--tasks", "moa_gen",
            "--include_path", str(harness_tasks), "--output_path", str(tmp_path / "out"), "--log_samples"]
    subprocess.run([sys.executable, "-c", "from moa.harness import main; main()", *args], check=True,
                   env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True)
    written = {p.name.split("_")[0] for p in (tmp_path / "out").rglob("*.json*")}
    assert {"results", "samples"} <= written


@pytest.fixture(scope="module")
def smollm2_experiment(tmp_path_factory: pytest.TempPathFactory, smollm2) -> Path:
    """SmolLM2-135M prepared as an HF directory, with a random rank-4 LoRA per task (nonzero B: each changes the
    output), the oracle and task arithmetic composed."""
    tmp = tmp_path_factory.mktemp("harness_smollm2")
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config |= {"results_dir": str(tmp / "results"), "tracking": {"enabled": False},
               "model": {"source": "smollm2-135m-instruct", "dtype": "float32"},
               "tasks": {task: {"source": {"type": "synthetic"}} for task in TASKS},
               "methods": {"oracle": None, "task_arithmetic": None}}
    path = tmp / "smollm2.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, ["evaluation.dtype=float32"])
    prepare_model(loaded)
    paths = ExperimentPaths.of(loaded)
    experts = with_random_experts(smollm2[0], seed=0, experts=len(TASKS))
    adapter = AdapterConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS))
    for index, task in enumerate(TASKS):
        write_adapter(paths.adapter(task), adapter, adapter_state_dict(experts, index))
    for method in ("oracle", "task_arithmetic"):
        compose(loaded, method)
    return path


@pytest.mark.integration
@pytest.mark.parametrize(("method", "adapter"), [("oracle", "qa"), ("task_arithmetic", None)])
def test_moa_gives_the_harness_hf_model_on_smollm2(smollm2_experiment: Path, harness_tasks: Path, method: str,
                                                    adapter: str | None) -> None:
    compare(smollm2_experiment, ["evaluation.dtype=float32"], harness_tasks, method, adapter)


def test_the_step_writes_results_and_samples(experiment: Path, harness_tasks: Path) -> None:
    """evaluation.lm_eval: the harness's results and its per-sample logs under lm_eval/{method}/, the samples those
    of the harness model run directly."""
    lm_eval = {"tasks": ["moa_mc", "moa_gen"], "include_path": str(harness_tasks), "limit": 3,
               "task_map": {"moa_mc": "qa", "moa_gen": "qa"}}
    config = load_config(experiment, [*FAST, f"evaluation.lm_eval={json.dumps(lm_eval)}"])
    result = evaluate_harness(config, "oracle")
    assert result.path == ExperimentPaths.of(config).harness("oracle")
    results = json.loads((result.path / "results.json").read_text())["results"]
    assert set(results) == {"moa_mc", "moa_gen"} and result.metrics["moa_mc.acc"] == results["moa_mc"]["acc,none"]
    assert set(result.metrics) == {"moa_mc.acc", "moa_gen.exact_match"}  # figures only: no counts, no stderr
    logged = [json.loads(line) for line in (result.path / "samples" / "moa_gen.jsonl").read_text().splitlines()]
    direct = simple_evaluate(model=MoaLM(str(experiment), "oracle", tasks="moa_gen:qa"), tasks=["moa_gen"], limit=3,
                             task_manager=TaskManager(include_path=str(harness_tasks)), log_samples=True)
    direct = direct["samples"]["moa_gen"]
    assert [s["resps"] for s in logged] == responses(direct)


def with_harness(experiment: Path, harness_tasks: Path, **settings: object):
    lm_eval = {"tasks": ["moa_mc"], "include_path": str(harness_tasks)} | settings
    return load_config(experiment, [*FAST, f"evaluation.lm_eval={json.dumps(lm_eval)}"])


def test_the_task_index_is_the_include_path_alone_where_it_holds_every_task(experiment: Path,
                                                                             harness_tasks: Path) -> None:
    """Indexing the harness's own thousands of task YAMLs takes seconds per job: only where a task needs them."""
    assert sorted(task_manager(with_harness(experiment, harness_tasks)).all_tasks) == sorted(HARNESS)
    assert "arc_easy" in task_manager(with_harness(experiment, harness_tasks, tasks=["moa_mc", "arc_easy"])).all_tasks


def test_a_group_in_the_task_map_maps_each_of_its_tasks(experiment: Path, harness_tasks: Path, tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.mkdir()
    (group / "moa_both.yaml").write_text(yaml.safe_dump({"group": "moa_both", "task": ["moa_mc", "moa_gen"]}))
    config = with_harness(experiment, harness_tasks, tasks=["moa_both"], include_path=[str(harness_tasks), str(group)])
    assert leaf_map(task_manager(config), {"moa_both": "qa", "moa_gen": "sentiment"}) == {
        "moa_both": "qa", "moa_mc": "qa", "moa_gen": "sentiment"}  # a task's own entry wins over its group's


@pytest.mark.parametrize(("tasks", "offline", "message"), [
    (["moa_mc", "no_such_task"], False, (r"evaluation.lm_eval.tasks: 'no_such_task' is not a harness task, group "
                                         r"or tag \(nor in include_path")),
    (["arc_easy"], True, (r"evaluation.lm_eval.tasks: 'arc_easy' \(arc_easy\) downloads dataset 'allenai/ai2_arc' "
                          r"from the Hugging Face Hub and this run is offline")),
    (["ai2_arc"], True, r"'ai2_arc' \(arc_challenge\) downloads dataset 'allenai/ai2_arc'"),  # a tag: its tasks
])
def test_a_bad_harness_task_is_one_line_before_any_job(experiment: Path, harness_tasks: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, tasks: list[str], offline: bool,
                                                       message: str) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = with_harness(experiment, harness_tasks, tasks=tasks)
    with pytest.raises(MoaError, match=message) as error:
        check_tasks(config)
    assert "\n" not in str(error.value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if offline:  # online, the same task is fine: the harness downloads it
        check_tasks(config)
    check_tasks(with_harness(experiment, harness_tasks, tasks=list(HARNESS)))  # local data: fine offline too


def test_the_harness_finds_moa_by_its_registry_and_entry_point() -> None:
    """`@register_model("moa")` (harness versions that import moa.harness) and the package's `lm_eval.models` entry
    point (harness versions that load model plugins) both name MoaLM."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model("moa") is MoaLM
    [entry] = [e for e in entry_points(group="lm_eval.models") if e.name == "moa"]
    assert entry.load() is MoaLM
