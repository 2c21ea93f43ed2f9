"""Learned token-level gates (moa.gates): X-LoRA against PEFT's XLoraModel with the same classifier weights,
LoRA-Flow's gate arithmetic, both served by the engine (packed prefill, prefix caching, continuous batching) as
a plain forward computes them, recording, saving and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import XLoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from moa.data.batching import Example, collate, lm_loss
from moa.errors import MoaError
from moa.gates import FlowGates, GateKind, GateSpec, XLoraGates, build_gates, gate_info, gate_spec, load_gates
from moa.generate import Request, Sampling, generate
from moa.io import write_safetensors
from moa.layout import LEARNED_COEFFICIENTS, LEARNED_INFO
from moa.lora import attach_experts, lora_layers
from moa.model import Documents, load_pretrained
from tests.conftest import hf_tiny_dir, with_random_experts
from tests.test_arrow import write_adapters

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
XLORA_SETTINGS = [
    {},  # PEFT's defaults: one linear layer, softmax, one scaling for every module
    {"layerwise_scalings": True, "softmax_temperature": 0.5, "global_scaling_weight": 1.5},
    {"layerwise_scalings": True, "top_k_lora": 2, "enable_softmax_topk": True},
    {"xlora_depth": 3, "xlora_size": 24, "top_k_lora": 1, "enable_softmax": False},
]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("gates")
    model_dir = hf_tiny_dir(tmp, "llama")
    return model_dir, write_adapters(model_dir, tmp / "adapters")


def peft_xlora(model_dir: Path, adapters: list[Path], settings: dict) -> torch.nn.Module:
    base = LlamaForCausalLM.from_pretrained(model_dir)
    base.config.use_cache = False  # X-LoRA's requirement
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                         adapters={str(i): str(p) for i, p in enumerate(adapters)}, **settings)
    torch.manual_seed(5)  # the classifier's random init
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("settings", XLORA_SETTINGS)
def test_xlora_equals_peft_with_the_same_classifier(library, settings: dict) -> None:
    """moa's X-LoRA (the scaling pass, the classifier, top-k, softmaxes, global weight) gives PEFT's logits when
    it holds PEFT's classifier weights."""
    model_dir, adapters = library
    peft = peft_xlora(model_dir, adapters, settings)
    classifier = {k.split("internal_xlora_classifier.", 1)[1]: v for k, v in peft.state_dict().items()
                  if "internal_xlora_classifier" in k}
    ours, _ = load_pretrained(model_dir)
    attach_experts(ours, adapters)
    gates = build_gates(gate_spec("xlora", ours, ["a", "b", "c"], **settings))
    gates.load_state_dict(classifier)
    gates.eval().attach(ours.eval())
    with torch.no_grad():
        expected, got = peft(input_ids=IDS).logits, ours(IDS)
        gates.detach()
        plain = ours(IDS)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-2  # the gated experts matter


def test_loraflow_gate_is_softmax_plus_bias_per_block(tiny) -> None:
    """Every LoRA module of block l applies softmax(W_l rms(x)) + b_l of the block's input x, per token: the
    model's logits equal a hand-written forward with those weights as the layers' per-token experts."""
    model = with_random_experts(tiny[0], seed=1)
    gates = FlowGates(gate_spec("loraflow", model, ["a", "b", "c"]))
    with torch.no_grad():
        gates.weight.normal_(std=0.5)
        gates.bias.normal_(std=0.1)
    inputs, seen = [], []
    gates.attach(model)
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        model(ids)
        for block, x in enumerate(inputs):
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
            expected = torch.softmax(normed @ gates.weight[block].T, -1) + gates.bias[block]
            for layer in (m for m in model.model.layers[block].modules() if m in lora_layers(model).values()):
                seen.append(layer)
                torch.testing.assert_close(layer.active, expected, atol=1e-6, rtol=1e-5)
    assert len(seen) == len(lora_layers(model))


@pytest.mark.parametrize("kind", list(GateKind))
def test_engine_serves_gates_as_a_plain_forward(tiny, kind: GateKind) -> None:
    """Greedy generations through continuous batching (3 slots for 5 requests, packed prefill, a shared prefix)
    equal step-by-step full forwards without a cache: X-LoRA's scaling pass keeps its own keys and values."""
    model = with_random_experts(tiny[0], seed=2)
    gates = build_gates(gate_spec(kind, model, ["a", "b", "c"], **({"layerwise_scalings": True}
                                                                       if kind == GateKind.XLORA else {})))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(std=0.3)
    gates.eval().attach(model)
    prefix = list(range(40, 52))
    prompts = [prefix + [60 + i] * (i + 1) for i in range(3)] + [[7, 8, 9], list(range(90, 110))]
    got = generate(model, tiny[1], [Request(p, Sampling(6)) for p in prompts], batch_size=3)
    for prompt, generation in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert generation.tokens == ids[len(prompt):][:len(generation.tokens)]
    assert (model.cache_passes == 2) == (kind == GateKind.XLORA)
    gates.detach()
    assert model.cache_passes == 1 and model.before_blocks is None


@pytest.mark.parametrize("kind", list(GateKind))
def test_packed_documents_are_gated_as_alone(tiny, kind: GateKind) -> None:
    """Two documents packed into one row get the logits each gets alone (the gate reads only its own tokens)."""
    model = with_random_experts(tiny[0], seed=3)
    gates = build_gates(gate_spec(kind, model, ["a", "b", "c"]))
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(std=0.3)
    gates.eval().attach(model)
    a, b = torch.randint(0, 200, (1, 6)), torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), positions=torch.cat([torch.arange(6), torch.arange(9)])[None],
                       attn_mask=Documents((6, 9)))
        alone = torch.cat([model(a), model(b)], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_recording_gives_the_mean_weight_per_block(tiny) -> None:
    model = with_random_experts(tiny[0], seed=4)
    gates = FlowGates(gate_spec("loraflow", model, ["a", "b", "c"])).attach(model)
    gates.start_recording()
    with torch.no_grad():
        model(torch.randint(0, 200, (2, 5)))
    usage = gates.stop_recording()
    assert usage.shape == (len(model.model.layers), 3)
    torch.testing.assert_close(usage, torch.full_like(usage, 1 / 3))  # W = 0, b = 0: the uniform average


def test_save_and_load_round_trip(tiny, tmp_path: Path) -> None:
    model = with_random_experts(tiny[0], seed=5)
    gates = build_gates(gate_spec("xlora", model, ["a", "b", "c"], top_k_lora=2))
    write_safetensors(tmp_path / LEARNED_COEFFICIENTS, gates.state_dict())
    (tmp_path / LEARNED_INFO).write_text(json.dumps(gate_info(gates)))
    loaded = load_gates(tmp_path)
    assert loaded.spec == gates.spec and isinstance(loaded, XLoraGates)
    for (k, v), (k2, v2) in zip(gates.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    (tmp_path / LEARNED_COEFFICIENTS).write_bytes(b"not safetensors")
    with pytest.raises(MoaError, match="not a readable gate"):
        load_gates(tmp_path)


@pytest.mark.parametrize(("settings", "message"), [
    ({"top_k_lora": 4}, "top_k_lora 4 must be in 1..3"),
    ({"softmax_temperature": 0.0}, "softmax_temperature 0.0 must be > 0"),
    ({"xlora_depth": 0}, "xlora_depth 0 must be >= 1"),
    ({"xlora_dropout_p": 1.0}, r"xlora_dropout_p 1.0 must be in \[0, 1\)"),
])
def test_bad_xlora_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(MoaError, match=message):
        GateSpec(GateKind.XLORA, 8, 2, 4, ("a", "b", "c"), **settings).check()


def test_a_gate_over_one_task_is_refused() -> None:
    with pytest.raises(MoaError, match="nothing to choose"):
        GateSpec(GateKind.LORAFLOW, 8, 2, 4, ("a",)).check()


def test_a_gate_for_another_model_is_refused(tiny) -> None:
    model = with_random_experts(tiny[0], seed=6, experts=2)
    with pytest.raises(MoaError, match="rerun `moa learn-merge`"):
        FlowGates(GateSpec(GateKind.LORAFLOW, 64, 2, 3, ("a", "b", "c"))).attach(model)



def test_every_row_weighs_the_same_in_gate_training(tiny, tmp_path: Path) -> None:
    """A one-token answer counts as much as a 60-token one: a gate step's loss is the mean of its rows' mean token
    losses (the token-summed loss would weigh the long row 30 times as much and teach the gate the long-target
    task), and splitting the step into micro-batches does not change it."""
    from dataclasses import replace

    from moa.config import read_config
    from moa.train.gates import GateTraining, gate_loss
    from moa.train.trainer import Precision, Trainer, TrainSettings

    model = with_random_experts(tiny[0], seed=6, experts=2)
    eos = tiny[1].eos_token_id
    rows = [Example(list(range(10, 20)), list(range(30, 89)) + [eos], 0), Example(list(range(50, 60)), [7, eos], 1)]
    smoke = read_config(Path(__file__).resolve().parents[1] / "config/smoke.yaml")
    settings = replace(TrainSettings.from_config(smoke["training"]), steps=1, batch_size=2, seq_len=72,
                       warmup_steps=1, lr=1e-9, precision=Precision.FP32)
    training = GateTraining(model, build_gates(gate_spec("loraflow", model, ["a", "b"])))
    batch = collate([[0], [1]], rows)  # a row each
    with torch.no_grad():
        per_row = lm_loss(model, batch, reduction="per_example")
        by_token = lm_loss(model, batch, reduction="mean")
        assert abs(per_row.mean() - by_token) > 0.01  # the two weightings differ here (tolerances below: 1e-5)
        assert float(gate_loss(training, batch)) == pytest.approx(float(per_row.sum()), rel=1e-5)
    for micro in (None, 1):
        trainer = Trainer(training, rows, [], replace(settings, micro_batch_size=micro), 0, tmp_path / f"c{micro}",
                          loss_fn=gate_loss, unit="example")
        assert trainer.run()["loss"].iloc[0] == pytest.approx(float(per_row.mean()), rel=1e-5)


# The gated experiment: 64 training rows per task, so the gates' default budget (one epoch) is a dozen steps.
GATED = ["data.sizes.train=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke experiment on two tasks with both gates learned (`moa learn-merge`) and composed."""
    import yaml

    from moa.compose.composition import compose
    from moa.experiment import load_config
    from moa.train.merge import learn_merge
    from tests.conftest import TINY_FAST, composed_experiment

    path = composed_experiment(tmp_path_factory.mktemp("gated"), ["qa", "sentiment"], {"oracle": None},
                               TINY_FAST + GATED)
    raw = yaml.safe_load(path.read_text())
    raw["methods"] |= {"xlora": {"layerwise_scalings": True}, "loraflow": None}
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, TINY_FAST + GATED)
    for method in ("xlora", "loraflow"):
        learn_merge(config, method)
        compose(config, method)
    return path


@pytest.mark.parametrize("method", ["xlora", "loraflow"])
def test_learned_gate_lowers_the_loss_and_serves(trained: Path, method: str) -> None:
    """learn-merge trains the gate for one epoch of its rows at 3 / hidden size by default, to a lower loss on them
    than the gate it started from; records its usage on validation; the composition loads with the gate attached
    and generates through the engine."""
    import pandas as pd

    from moa.compose.composition import load_composition
    from moa.experiment import load_config
    from moa.layout import GATE_USAGE, TRAIN_LOG, ExperimentPaths
    from moa.train.gates import LR_TIMES_WIDTH
    from moa.train.lora import balanced, task_examples
    from tests.conftest import TINY_FAST

    config = load_config(trained, TINY_FAST + GATED)
    folder = ExperimentPaths.of(config).learned(method)
    info = json.loads((folder / LEARNED_INFO).read_text())
    assert info["passes"] == (2 if method == "xlora" else 1) and info["parameters"] > 0
    composed = load_composition(config, method)
    assert composed.gates is not None and composed.model.cache_passes == info["passes"]
    per_task = min(config["data"]["sizes"]["train"], config["router"]["prompts_per_task"])
    per_task_rows = [task_examples(config, task, "train", composed.tokenizer, i)[:per_task]
                     for i, task in enumerate(config["tasks"])]
    assert info["labelled"] == sum(map(len, per_task_rows))
    rows = balanced(per_task_rows, config["seed"])  # what the gate learns from
    log = pd.read_parquet(folder / TRAIN_LOG)
    assert log["epoch"].eq(0).all() and log["tokens"].sum() == sum(map(len, rows))  # every row read once
    assert log["lr"].max() == pytest.approx(LR_TIMES_WIDTH / composed.model.config.hidden_size)  # the default rate
    usage = pd.read_parquet(folder / GATE_USAGE)
    assert set(usage.columns) == {"task", "layer", "expert", "weight", "tokens"}
    assert len(usage) == 2 * 2 * 2  # tasks x blocks x experts
    if method == "xlora":  # softmax over the experts: each token's weights sum to 1
        sums = usage.groupby(["task", "layer"])["weight"].sum()
        assert (sums - 1).abs().max() < 1e-5

    def loss() -> float:  # the gate's objective over all its rows
        with torch.no_grad():
            return float(lm_loss(composed.model, collate([[i] for i in range(len(rows))], rows), "per_example").mean())

    learned = loss()
    torch.manual_seed(config["seed"])
    composed.gates.load_state_dict(build_gates(composed.gates.spec).state_dict())  # the gate it started from
    assert learned < loss()
    generated = generate(composed.model, composed.tokenizer, [Request([10, 11, 12, 13], Sampling(4))])
    assert len(generated[0].tokens) > 0


def test_learning_a_gate_again_gives_the_same_weights(trained: Path, tmp_path: Path) -> None:
    """Reproducible on CPU: the same config and seed learn the same gate."""
    import shutil

    from safetensors.torch import load_file

    from moa.experiment import load_config
    from moa.layout import ExperimentPaths
    from moa.train.merge import learn_merge
    from tests.conftest import TINY_FAST

    config = load_config(trained, TINY_FAST + GATED)
    folder = ExperimentPaths.of(config).learned("loraflow")
    first = load_file(folder / LEARNED_COEFFICIENTS)
    shutil.copytree(folder, tmp_path / "first")
    learn_merge(config, "loraflow")
    again = load_file(folder / LEARNED_COEFFICIENTS)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_export_holds_the_experts_and_the_gate(trained: Path, tmp_path: Path) -> None:
    from moa.experiment import load_config
    from moa.export import export
    from moa.layout import ExperimentPaths
    from tests.conftest import TINY_FAST

    config = load_config(trained, TINY_FAST + GATED)
    export(config, "xlora", tmp_path / "out")
    exported, learned = load_gates(tmp_path / "out/gate"), load_gates(ExperimentPaths.of(config).learned("xlora"))
    assert exported.spec == learned.spec
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), learned.state_dict().values()))
    assert sorted(p.name for p in (tmp_path / "out/experts").iterdir()) == ["qa", "sentiment"]
    assert "X-LoRA's classifier" in (tmp_path / "out/README.md").read_text()


SMOKE = Path(__file__).resolve().parents[1] / "config/smoke.yaml"


@pytest.mark.parametrize(("overrides", "message"), [
    (["methods={xlora: {top_k_lora: 4}}"], r"methods.xlora: top_k_lora 4 must be in 1..3 \(the tasks\)"),
    (["methods={fast: {method: xlora, softmax_temperature: 0}}"], r"methods.fast.softmax_temperature: 0 is less than or equal to the minimum"),
    (["methods={xlora: {xlora_depth: 0}}"], "xlora_depth"),  # the schema's minimum
    (["methods={loraflow: null}", "tasks={qa: {source: {type: synthetic}}}"], "there is one task"),
])
def test_bad_gate_settings_stop_before_any_job(overrides: list[str], message: str) -> None:
    """Gate settings out of range and a gate over one task are one line when the config is read."""
    from moa.experiment import load_config

    with pytest.raises(MoaError, match=message) as error:
        load_config(SMOKE, overrides)
    assert "\n" not in str(error.value)
