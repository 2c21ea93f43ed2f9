"""MoA stage 2: routers learn the tasks on the tiny model, joint mode trains the experts (routers mode
leaves them bitwise alone), the reports are complete, and pooling reads each packed document alone."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import Tensor

from moa.cli import main
from moa.data.batching import Example, pack
from moa.data.prepare import prepare_task
from moa.errors import MoaError
from moa.experiment import load_config
from moa.lora import ExpertSpec, activated, inject_lora
from moa.model import random_model
from moa.model.tokenizer import byte_tokenizer
from moa.routing import LayerRouters, RouterSpec, choose_experts, fit_centroids, load_routers, router_logits
from moa.train.lora import train_lora
from moa.train.router import fit_routers, router_settings, train_router

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["math", "qa", "sentiment"]  # the config's order (yaml.safe_dump sorts keys): experts 0, 1, 2
SIX = ["dialogue", "math", "qa", "sentiment", "summarization", "translation"]
FAST = ["training.steps=4", "training.seq_len=512", "training.batch_size=4", "training.warmup_steps=2",
        "training.eval_every=20", "training.checkpoint_every=100", "training.lr=0.003"]
ROUTER = ["router.steps=40", "router.lr=0.03"]
H, L = 64, 2  # the tiny preset


def experiment(tmp: Path, tasks: list[str], sets: list[str], train: int = 64, validation: int = 16) -> Path:
    """The smoke config on the synthetic `tasks` (prompts cut to 384 tokens to fit seq_len 512), with their
    data (`validation` held-out prompts per task) and task LoRAs (trained with FAST + sets) under tmp."""
    config = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())
    config["results_dir"] = str(tmp / "results")
    config["data"] |= {"max_prompt_tokens": 384, "max_target_tokens": 127}
    config["data"]["sizes"] |= {"train": train, "validation": validation}
    config["tasks"] = {task: {"source": {"type": "synthetic"}} for task in tasks}
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, FAST + sets)
    assert list(loaded["tasks"]) == tasks
    for task in tasks:
        prepare_task(loaded, task, byte_tokenizer())
        train_lora(loaded, task)
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return experiment(tmp_path_factory.mktemp("router"), TASKS, [])


@pytest.fixture(scope="module")
def six_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six built-in tasks: six distinct templates, prompts of ~50 to 384 tokens; 256 training prompts each
    (40 router steps of 4 rows see a fraction of an epoch) and 64 held-out ones. The LoRAs take one step at
    a negligible rate: the routers need experts, not good ones, and with near-identical experts a misroute
    by the first router (the random model's mean embedding) cannot shift what the second one reads."""
    return experiment(tmp_path_factory.mktemp("six"), SIX, ["training.steps=1", "training.lr=1.0e-9"], train=256,
                      validation=64)


def results(path: Path) -> Path:
    return Path(load_config(path)["results_dir"]) / "smoke"


def accuracy(evaluation: pd.DataFrame, strategy: str, routing: str = "teacher_forced") -> float:
    rows = evaluation[(evaluation.metric == "accuracy") & (evaluation.routing == routing)
                      & (evaluation.strategy == strategy) & (evaluation.task == "all")]
    assert len(rows) == 1
    return float(rows.value.iloc[0])


@pytest.fixture(scope="module")
def trained(smoke: Path) -> tuple[Path, str]:
    """`moa train-router` run once on the smoke experiment: moa/ and what the command printed."""
    args = [a for item in FAST + ROUTER for a in ("--set", item)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["train-router", "--config", str(smoke), *args, "--threads", "2"]) == 0
    return results(smoke) / "moa", printed.getvalue()


def held_out(smoke: Path) -> int:
    return sum(len(pd.read_parquet(results(smoke) / f"data/{t}/validation.parquet")) for t in TASKS)


def test_train_router_writes_the_bundle_and_leaves_no_checkpoint(smoke: Path, trained: tuple[Path, str]) -> None:
    out, printed = trained
    assert f"wrote {out}" in printed
    assert list(pd.read_parquet(out / "train_log.parquet").step) == list(range(1, 41))
    assert not (results(smoke) / "checkpoints/_router").exists()


def test_routers_learn_the_tasks(trained: tuple[Path, str]) -> None:
    evaluation = pd.read_parquet(trained[0] / "router_eval.parquet")
    assert accuracy(evaluation, "last") >= 0.95
    assert accuracy(evaluation, "last", routing="routed") >= 0.95  # from the prompt alone, no labels


def test_routers_learn_every_one_of_six_tasks(six_tasks: Path) -> None:
    """Short-prompt tasks too. Routers trained over packed rows of one task each saw a task in proportion
    to its tokens: here the dialogue task in few of the steps, and 86% of its prompts (0% in 40 steps) went
    elsewhere; fitted on every prompt's features, all tasks are learned."""
    out = train_router(load_config(six_tasks, FAST + ["router.steps=100", "router.lr=0.03"])).path
    evaluation = pd.read_parquet(out / "router_eval.parquet")
    per_task = evaluation[(evaluation.metric == "accuracy") & evaluation.strategy.isin(["last", "vote"])
                          & (evaluation.task != "all")]
    assert len(per_task) == 2 * 2 * len(SIX)  # two routings x two strategies x six tasks
    assert (per_task.value >= 0.95).all(), per_task[per_task.value < 0.95].to_string()


def test_router_eval_covers_every_layer_task_and_held_out_prompt(smoke: Path, trained: tuple[Path, str]) -> None:
    evaluation = pd.read_parquet(trained[0] / "router_eval.parquet")
    for routing in ("teacher_forced", "routed"):
        layers = evaluation[(evaluation.routing == routing) & (evaluation.strategy == "layer")]
        assert sorted(set(layers.layer)) == list(range(L)) and set(layers.task) == {"all", *TASKS}
        assert (layers[layers.task == "all"].n == held_out(smoke)).all()


def test_confusion_counts_every_held_out_prompt_once(smoke: Path, trained: tuple[Path, str]) -> None:
    out = trained[0]
    confusion = pd.read_parquet(out / "confusion.parquet")
    last = confusion[(confusion.routing == "teacher_forced") & (confusion.strategy == "last")]
    assert len(last) == len(TASKS) ** 2 and last["count"].sum() == held_out(smoke)
    correct = last[last.true_task == last.predicted_task]["count"].sum()
    assert correct / held_out(smoke) == pytest.approx(accuracy(pd.read_parquet(out / "router_eval.parquet"), "last"))


def test_router_config_and_weights_round_trip(trained: tuple[Path, str]) -> None:
    out = trained[0]
    n_params = L * (H * 3 + 3)
    evaluation = pd.read_parquet(out / "router_eval.parquet")
    assert evaluation[evaluation.metric == "parameters"].value.tolist() == [n_params]
    config = json.loads((out / "router_config.json").read_text())
    assert config["parameters"] == n_params and config["tasks"] == TASKS and config["n_experts"] == 3
    assert config["type"] == "linear" and config["pooling"] == "mean" and config["n_layers"] == L
    saved = load_file(out / "routers.safetensors")
    assert sorted(saved) == [f"routers.{layer}.{p}" for layer in range(L) for p in ("bias", "weight")]
    routers = load_routers(out)
    assert all(torch.equal(routers.state_dict()[k], v) for k, v in saved.items())


def test_the_same_config_trains_the_same_routers(smoke: Path, trained: tuple[Path, str]) -> None:
    weights = trained[0] / "routers.safetensors"
    first = weights.read_bytes()
    train_router(load_config(smoke, FAST + ROUTER))  # rewrites moa/
    assert weights.read_bytes() == first


def test_routers_mode_leaves_the_experts_bitwise_alone(smoke: Path, trained: tuple[Path, str]) -> None:
    for task in TASKS:
        given, kept = results(smoke) / "adapters" / task, trained[0] / "experts" / task
        assert (kept / "adapter_model.safetensors").read_bytes() == (given / "adapter_model.safetensors").read_bytes()
        assert json.loads((kept / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_joint_mode_trains_the_experts_and_an_mlp_router(smoke: Path) -> None:
    sets = ["router.mode=joint", "router.type=mlp", "router.hidden=16", "router.activation=relu",
            "router.pooling=mean"]
    out = train_router(load_config(smoke, FAST + ROUTER + sets)).path
    evaluation = pd.read_parquet(out / "router_eval.parquet")
    # Mean pooling lets even the first router see the prompt, so routing without labels works too.
    assert accuracy(evaluation, "last", routing="routed") >= 0.95
    assert evaluation[evaluation.metric == "parameters"].value.tolist() == [L * (H * 16 + 16 + 16 * 3 + 3)]
    assert json.loads((out / "router_config.json").read_text())["hidden"] == 16
    for task in TASKS:
        given = load_file(results(smoke) / "adapters" / task / "adapter_model.safetensors")
        tuned = load_file(out / "experts" / task / "adapter_model.safetensors")
        assert given.keys() == tuned.keys()
        assert any(not torch.equal(given[k], tuned[k]) for k in given)


def test_a_missing_task_adapter_is_one_line_naming_it(smoke: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    config = yaml.safe_load(smoke.read_text())
    config["tasks"]["dialogue"] = {"source": {"type": "synthetic"}}
    path = tmp_path / "more.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MoaError, match="adapters/dialogue: no trained adapter .* run `moa train-lora"):
        train_router(load_config(path))
    assert main(["train-router", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(results(smoke) / "adapters/dialogue") in err


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_reads_each_packed_document_alone(pooling: str) -> None:
    model, _ = random_model("tiny", seed=0)
    inject_lora(model, experts=[ExpertSpec(4, 8.0)] * 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-zero B: the experts differ
    routers = LayerRouters(RouterSpec("linear", pooling, L, H, ("a", "b")))
    gen = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, 300, (int(n),), generator=gen).tolist(), [5, 6, 2][: 1 + k % 3], k % 2)
                for k, n in enumerate(torch.randint(4, 30, (10,), generator=gen))]
    batch = pack(examples, 80, 8, by_task=True)[0]
    assert batch.n_examples == 10 and bool((batch.doc_ids.amax(1) > 0).any())  # packed
    with activated(model, batch.tasks):
        packed = router_logits(model, routers, batch, follow=False)
    for d, i in enumerate(batch.example_index):
        ex = examples[i]
        for alone in (ex, Example(ex.prompt_ids, [], ex.task)):  # with or without the target
            with activated(model, ex.task):
                single = router_logits(model, routers, pack([alone], 80, 1)[0], follow=False)
            torch.testing.assert_close(packed[:, d], single[:, 0], atol=1e-5, rtol=1e-5)
    # following the routers' own choices, each packed document routes as if alone too
    routed = router_logits(model, routers, batch)
    for d, i in enumerate(batch.example_index):
        alone = router_logits(model, routers, pack([Example(examples[i].prompt_ids, [])], 80, 1)[0])
        torch.testing.assert_close(routed[:, d], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_strategies_last_and_vote() -> None:
    scores = torch.tensor([[[2.0, 0, 0]], [[0, 3.0, 0]], [[0, 2.0, 0]], [[0, 0, 9.0]]])  # [L=4, D=1, N=3]
    assert choose_experts(scores, "last").tolist() == [2] and choose_experts(scores, "vote").tolist() == [1]
    assert choose_experts(scores[2:], "vote").tolist() == [2]  # a tie goes to the higher mean probability
    with pytest.raises(MoaError, match="unknown routing strategy"):
        choose_experts(scores, "oracle")


def test_centroids_are_each_tasks_mean_pooled_base_states() -> None:
    """fit_centroids: unit-norm means of each task's unit-norm mean-pooled block inputs, every layer, and
    each layer's nearest-centroid accuracy on held-out prompts."""
    model, _ = random_model("tiny", seed=0)
    gen = torch.Generator().manual_seed(0)
    # two "tasks" of prompts from disjoint vocabularies: separable at the embeddings already
    prompts = [[torch.randint(lo, lo + 40, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (6,),
                                                                                                      generator=gen)]
               for lo in (10, 200)]
    centroids, accuracy = fit_centroids(model, [p[:4] for p in prompts], [p[4:] for p in prompts])
    assert centroids.shape == (L, 2, H) and accuracy.shape == (L,)  # the input of every block
    for task, train in enumerate(p[:4] for p in prompts):
        for layer in range(L):
            with torch.no_grad():
                alone = [F.normalize(model.block_input(torch.tensor([q]), layer=layer)[0].mean(0), dim=-1) for q in train]
            expected = F.normalize(torch.stack(alone).mean(0), dim=-1)
            torch.testing.assert_close(centroids[layer, task], expected, atol=1e-5, rtol=1e-5)
    assert accuracy[0] == 1.0  # disjoint vocabularies: the embeddings alone tell the tasks apart


def passage_features(seed: int, per_task: int = 48, passages: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean-pooled prompts of three tasks as a router reads them (H = 64): a direction common to every prompt, the
    task's template (norm 1) and the prompt's passage (norm 1.5, most of a long prompt's mean). The training prompts
    ask about `passages` passages per task (as SQuAD asks several questions about each paragraph); the held-out ones,
    of the same templates, each about a passage of its own. Returns (train, train tasks, held-out, held-out tasks)."""
    gen = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(H, generator=gen), dim=0) * 3
    templates = F.normalize(torch.randn(3, H, generator=gen), dim=-1)

    def prompts(task: int, bank: Tensor) -> Tensor:
        passage = bank[torch.randint(len(bank), (per_task,), generator=gen)]
        return common + templates[task] + passage + 0.05 * torch.randn(per_task, H, generator=gen) / H ** 0.5

    def bank(n: int) -> Tensor:
        return F.normalize(torch.randn(n, H, generator=gen), dim=-1) * 1.5

    train = torch.cat([prompts(task, bank(passages)) for task in range(3)])
    held_out = torch.cat([prompts(task, bank(per_task)) for task in range(3)])
    tasks = torch.arange(3).repeat_interleave(per_task)
    return train, tasks, held_out, tasks


def test_routers_route_prompts_on_other_passages_like_the_centroid_rule() -> None:
    """Routers mode on features of prompts whose passages dominate their mean: the routers (config.yaml's 32 steps
    at 0.05) are fitted on prompts about two passages per task and route prompts about new passages of the same
    templates as well as the training-free nearest-centroid rule does. Fitted from a random start to L_cls ~ 0,
    they separated the training prompts by their passages and routed 92.0% of these right over 8 draws (one
    draw: 76%), the centroid rule 97.6%, anchored and augmented (fit_routers) 97.6%; every training prompt right
    either way."""
    settings = router_settings(load_config(ROOT / "config/config.yaml"))
    fitted, nearest = [], []
    for seed in range(8):
        train, tasks, held_out, truth = passage_features(seed)
        torch.manual_seed(seed)
        routers = LayerRouters(RouterSpec("linear", "mean", 1, H, ("qa", "summarization", "dialogue")))
        fit_routers(routers, [train], tasks, settings, eta=1.0)
        with torch.no_grad():
            assert torch.equal(routers([train])[0].argmax(-1), tasks)
            fitted.append((routers([held_out])[0].argmax(-1) == truth).float().mean())
        centroids = F.normalize(torch.stack([train[tasks == k].mean(0) for k in range(3)]), dim=-1)
        nearest.append(((F.normalize(held_out, dim=-1) @ centroids.T).argmax(-1) == truth).float().mean())
    fitted, nearest = torch.stack(fitted).mean().item(), torch.stack(nearest).mean().item()
    assert fitted >= nearest - 0.01, (fitted, nearest)


def passage_about(prompt: str) -> str:
    """What a synthetic qa prompt's passage is about (moa.data.synthetic.qa's entities, from its first fact)."""
    passage = prompt.split("Passage: ", 1)[1]
    first = passage.split(". ", 1)[0]
    if " was born in " in first:
        return "person"
    if " is a small town " in first:
        return "town"
    return "company" if " company founded in " in first else "species"


@pytest.fixture(scope="module")
def qa_on_other_passages(six_tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six-task experiment with qa's training prompts about people and towns only and its validation prompts
    about species and companies only: the same template, passages about other things (as SQuAD's test articles)."""
    root = tmp_path_factory.mktemp("passages")
    config = yaml.safe_load(six_tasks.read_text())
    shutil.copytree(config["results_dir"], root / "results", ignore=shutil.ignore_patterns("moa", "checkpoints"))
    config["results_dir"] = str(root / "results")
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    data = results(path) / "data/qa"
    for split, kinds in (("train", {"person", "town"}), ("validation", {"species", "company"})):
        frame = pd.read_parquet(data / f"{split}.parquet")
        kept = frame[frame.prompt.map(passage_about).isin(kinds)]
        assert len(kept) >= 20 and set(kept.prompt.map(passage_about)) == kinds
        kept.to_parquet(data / f"{split}.parquet", index=False)
    return path


def test_routers_route_qa_prompts_about_other_things(qa_on_other_passages: Path) -> None:
    """The tiny model's side of the test above: qa's routers learn from passages about people and towns and route
    passages about species and companies, with every other task's held-out prompts still right. (The random tiny
    model's mean-pooled states are nearly a bag of the prompt's bytes, in which the template's bytes weigh more than
    the entity's words: unanchored, 96% of such prompts on its base states already went right, so the mechanism is
    shown on the constructed features above.)"""
    out = train_router(load_config(qa_on_other_passages, FAST)).path
    evaluation = pd.read_parquet(out / "router_eval.parquet")
    per_task = evaluation[(evaluation.metric == "accuracy") & (evaluation.strategy == "last") & (evaluation.task != "all")]
    assert len(per_task) == 2 * len(SIX)
    assert (per_task.value >= 0.95).all(), per_task[per_task.value < 0.95].to_string()
