"""Each job's peak memory, planned from the model's shapes before anything is loaded, and the pre-flight check
that every step runs against the device it got (`moa plan` prints the plan of a whole config).

Weights and LoRA sizes come from the model built on the meta device (a config.json suffices). Activations come
from one block run under FakeTensorMode (no memory, no weights) with the job's dtype, autocast, LoRA and dropout,
counting the tensors autograd saves: the code's own saved tensors, not a formula that could drift from it. The
transient terms (gradients in flight in backward, the loss over the vocabulary) are calibrated against peaks
measured on CPU with torch's MemTracker (tests/test_plan.py: within 15%).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moa.data.batching import loss_chunk
from moa.errors import MoaError
from moa.generate import PREFILL_TOKENS
from moa.lora import inject_lora, lora_layers
from moa.model.config import DTYPES, ModelConfig, preset
from moa.model.llama import Block, Transformer, rope_cos_sin
from moa.routing import POOL_TOKENS
from moa.train.trainer import TrainSettings

GiB = 2**30
HOST_BASELINE = int(1.0 * GiB)  # a step's process before it loads anything: python, torch, moa (RSS, measured)
LOAD_FACTOR = 1.3  # host RAM while loading a checkpoint shard by shard: this times the largest shard
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, assumed when the checkpoint is not local
DEVICE_MARGIN = 0.9  # of a device's memory a plan may fill: the rest is the CUDA context and fragmentation
T = TypeVar("T")


@dataclass(frozen=True)
class LoraShape:
    targets: tuple[str, ...]
    rank: int
    dropout: float
    experts: int = 1


@dataclass(frozen=True)
class Memory:
    """A job's peak memory on its device, by part (bytes), and on the host."""

    weights: int = 0
    lora: int = 0  # LoRA factors, with their gradients and AdamW state where they train
    activations: int = 0  # saved for backward (training) or in flight (inference)
    kv_cache: int = 0
    workspace: int = 0  # logits and the loss over the vocabulary, gradients in flight
    host: int = 0

    @property
    def device(self) -> int:
        return self.weights + self.lora + self.activations + self.kv_cache + self.workspace


@dataclass(frozen=True)
class Training:
    """What a training step's memory depends on."""

    micro_tokens: int  # tokens per forward/backward
    loss_tokens: int  # of them, tokens with a loss (the LM head runs only there)
    checkpointing: bool
    autocast: torch.dtype | None  # bf16 autocast, or None (fp32 arithmetic)


# --- shapes ------------------------------------------------------------------------------------------


def cached(fn: Callable[..., T]) -> Callable[..., T]:
    """Memoized by the arguments' repr: a ModelConfig is unhashable where it holds rope_scaling's dict, and the
    workflow plans every job of a DAG in one process."""
    results: dict[str, T] = {}

    @wraps(fn)
    def memo(*args: Any) -> T:
        key = repr(args)
        if key not in results:
            results[key] = fn(*args)
        return results[key]

    return memo


def _meta_model(config: ModelConfig, dtype: torch.dtype, lora: LoraShape | None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
        if lora is not None:
            inject_lora(model, lora.targets, rank=lora.rank, experts=lora.experts)
    return model


@cached
def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """The base model's parameters in `dtype` (tied embeddings once)."""
    params = {id(p): p for p in _meta_model(config, dtype, None).parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


@cached
def lora_numel(config: ModelConfig, lora: LoraShape) -> int:
    """Parameters of all of `lora`'s experts over the whole model."""
    model = _meta_model(config, torch.float32, lora)
    return sum(p.numel() for layer in lora_layers(model).values() for p in (*layer.lora_A, *layer.lora_B))


@cached
def block_saved_bytes(config: ModelConfig, lora: LoraShape, dtype: torch.dtype,
                      autocast: torch.dtype | None) -> tuple[float, int]:
    """Bytes one training block saves for backward: (per token, fixed), from two fake runs of a block with
    `lora` (fp32 factors, dropout on) in `dtype` under `autocast`. The fixed part is autocast's casts of the
    frozen weights, which live as long as the step's graph."""
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    saved = []
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            block = Block(config, 0)
        finally:
            torch.set_default_dtype(default)
        block.requires_grad_(False)
        inject_lora(block, lora.targets, rank=lora.rank, dropout=lora.dropout, experts=lora.experts)
        for layer in lora_layers(block).values():
            for p in (*layer.lora_A, *layer.lora_B):
                p.data = p.data.float().requires_grad_(True)
        weights = {storage(p) for p in block.parameters()}
        for tokens in (64, 128):
            x = torch.empty(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
            cos, sin = rope_cos_sin(torch.ones(config.dim_per_head // 2), torch.arange(tokens)[None], dtype)
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                seen[storage(t)] = t.untyped_storage().nbytes()
                return t

            with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                  torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)):
                block.train()(x, cos, sin, None, None)
            saved.append(sum(n for k, n in seen.items() if k not in weights))
    per_token = (saved[1] - saved[0]) / 64
    return per_token, max(0, int(saved[0] - 64 * per_token))


# --- the parts of a job ------------------------------------------------------------------------------


def training_memory(config: ModelConfig, lora: LoraShape, dtype: torch.dtype, step: Training,
                    trainable_experts: int | None = None) -> Memory:
    """Device memory of one training step: frozen weights, fp32 LoRA factors (those that train with their
    gradient and two AdamW moments), what autograd saves, and the workspace of backward and of the loss."""
    per_token, fixed = block_saved_bytes(config, lora, dtype, step.autocast)
    layers, tokens = config.num_hidden_layers, step.micro_tokens
    block = per_token * tokens + fixed
    if step.checkpointing:  # every block keeps its input; one block at a time is recomputed in backward
        saved = layers * tokens * config.hidden_size * dtype.itemsize + block
    else:
        saved = layers * block
    trainable = lora_numel(config, replace(lora, experts=trainable_experts or lora.experts))
    frozen = lora_numel(config, lora) - trainable
    compute = (step.autocast or dtype).itemsize
    # The loss: logits in the compute dtype, their fp32 copy, the log-softmax saved, and two fp32 gradients of
    # them in backward; then the gradients in flight through a block: about three of its MLP's width.
    loss = min(step.loss_tokens, loss_chunk(config.vocab_size)) * config.vocab_size * (compute + 4 + 4 + 2 * 4)
    gradients = 3 * tokens * config.intermediate_size * compute
    return Memory(weights=weight_bytes(config, dtype), lora=4 * (4 * trainable + frozen), activations=int(saved),
                  workspace=loss + gradients)


def inference_memory(config: ModelConfig, lora: LoraShape | None, dtype: torch.dtype, tokens: int, slots: int = 0,
                     cache_len: int = 0, logits_rows: int = 0, passes: int = 1) -> Memory:
    """Device memory of serving: weights, fp32 LoRA experts, the slot KV cache (of every pass that keeps one:
    X-LoRA's scaling pass is a second), and one layer's activations of a forward over `tokens` (nothing is kept
    across layers without autograd) with `logits_rows` rows of fp32 logits."""
    kv = 2 * passes * config.num_hidden_layers * slots * config.num_key_value_heads * cache_len * config.dim_per_head
    q = config.num_attention_heads * config.dim_per_head
    layer = tokens * (3 * config.hidden_size + 2 * q + 3 * config.intermediate_size) * dtype.itemsize
    return Memory(weights=weight_bytes(config, dtype), lora=4 * lora_numel(config, lora) if lora else 0,
                  activations=int(layer), kv_cache=kv * dtype.itemsize,
                  workspace=logits_rows * config.vocab_size * (dtype.itemsize + 4))


# --- budgets -----------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '81920MB', '80g' -> bytes (GB and GiB both read as GiB, as nvidia-smi and SLURM do)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        return int(float(value.removesuffix(unit)) * units[unit])
    except ValueError:
        raise MoaError(f"memory size {text!r}: expected a number with a unit, e.g. 80GB or 81920MB") from None


def host_limit() -> int:
    """The RAM this process may use: what is available, capped by a SLURM job's --mem or a cgroup limit."""
    limits = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        limits.append(int(os.environ["SLURM_MEM_PER_NODE"]) * 2**20)
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup.isdigit():
            limits.append(int(cgroup))
    except OSError:
        pass
    return min(limits)


def device_limit(device: torch.device) -> int:
    """The memory a job on `device` may plan to fill."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * DEVICE_MARGIN)
    return host_limit()


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def shards_of(directory: Path) -> int | None:
    """The largest safetensors file of a model directory (None if it has none)."""
    sizes = [p.stat().st_size for p in directory.glob("*.safetensors")]
    return max(sizes) if sizes else None


@cached
def model_config_of(source: str) -> ModelConfig:
    """A model's shapes without its weights: a preset name, random:PRESET, an HF directory or config.json, a
    .gguf file (its metadata), or a hub id (its config.json alone is fetched)."""
    from moa.model.checkpoint import read_config
    from moa.model.config import PRESETS
    from moa.model.gguf_file import open_gguf
    from moa.model.gguf_file import read_config as gguf_config
    from moa.model.load import DEFAULT_MODEL, RANDOM_PREFIX, default_gguf

    if source in PRESETS or source.startswith(RANDOM_PREFIX):
        return preset(source.removeprefix(RANDOM_PREFIX))
    path = Path(default_gguf() if source == DEFAULT_MODEL else source).expanduser()
    if path.is_dir():
        return read_config(path)
    if path.name == "config.json" and path.is_file():
        return read_config(path.parent)
    if path.is_file():
        return gguf_config(open_gguf(path), path)
    try:
        from huggingface_hub import hf_hub_download

        return read_config(Path(hf_hub_download(source, "config.json")).parent)
    except Exception as err:  # offline, unknown repo, gated model
        raise MoaError(f"model {source!r}: cannot read its config.json ({type(err).__name__}); run `moa "
                       f"prepare-model` first (where the hub is reachable), or give `moa plan` the shapes with "
                       f"--model-config PRESET|config.json (presets: {', '.join(PRESETS)})") from err


# --- the jobs of a config ----------------------------------------------------------------------------

TRAINING_STEPS = ("train_lora", "train_mixed", "train_router", "learn_merge")


@dataclass(frozen=True)
class JobPlan:
    job: str  # the step, with its composition where that matters ("evaluate:moa")
    memory: Memory
    on_device: bool  # its tensors live on the accelerator (False: a host-only job, e.g. a merge)
    choice: str = ""  # what it was planned at, in words ("micro-batch 4 x 2048, checkpointing")
    micro_rows: int | None = None  # training: rows per forward/backward
    checkpointing: bool = False


@dataclass(frozen=True)
class Setting:
    """Where a config runs: the device's memory (None: the job's tensors live on the host)."""

    device_bytes: int | None
    host_bytes: int

    @classmethod
    def here(cls) -> Setting:
        from moa.model.prepared import device

        dev = device()
        return cls(device_limit(dev) if dev.type == "cuda" else None, host_limit())

    def fits(self, plan: JobPlan) -> bool:
        on_gpu = self.device_bytes is not None and plan.on_device
        return plan.memory.host <= self.host_bytes and (not on_gpu or plan.memory.device <= self.device_bytes)


def shapes_of(config: dict) -> ModelConfig:
    """The model's shapes: those of the prepared model/ when it exists, else of model.source."""
    from moa.layout import ExperimentPaths

    prepared = ExperimentPaths.of(config).model / "config.json"
    return model_config_of(str(prepared if prepared.is_file() else config["model"]["source"]))


def largest_module(shapes: ModelConfig) -> int:
    """Elements of the model's largest block linear [out, in] (the MLP's, or the attention's query projection)."""
    return max(shapes.intermediate_size, shapes.num_attention_heads * shapes.dim_per_head) * shapes.hidden_size


def _lora(config: dict, experts: int = 1) -> LoraShape:
    lora = config["lora"]
    targets = lora["target_modules"]
    return LoraShape(tuple([targets] if isinstance(targets, str) else targets), lora["rank"], lora["dropout"], experts)


def _host(config: dict, weights: int, on_device: bool, device_total: int) -> int:
    """Host RAM: the process, plus the largest checkpoint shard while loading (bench_load measures 0.02-0.55x;
    capped at 5 GB: the loader reads one tensor at a time), plus the whole job when it runs on the host."""
    from moa.layout import ExperimentPaths

    shard = min(shards_of(ExperimentPaths.of(config).model) or SHARD_BYTES, SHARD_BYTES, weights)
    return HOST_BASELINE + int(LOAD_FACTOR * shard) + (0 if on_device else device_total)


def training_plan(config: dict, shapes: ModelConfig, step: str, micro_rows: int, checkpointing: bool,
                  on_device: bool) -> JobPlan:
    settings = TrainSettings.from_config(config["training"])
    n_tasks = len(config["tasks"])
    # learn_merge: every task LoRA attached, gradients through them (counted as trainable: a bound for cat's few
    # scalars and for lorahub, which runs without gradients).
    experts, trainable = {"train_router": (n_tasks, n_tasks if config["router"]["mode"] == "joint" else 0),
                          "learn_merge": (n_tasks, n_tasks)}.get(step, (1, 1))
    dtype = DTYPES[config["model"]["dtype"]]
    autocast = torch.bfloat16 if settings.precision == "bf16" or (settings.precision == "auto" and on_device) \
        else None
    tokens = micro_rows * settings.seq_len
    if trainable:
        memory = training_memory(shapes, _lora(config, experts), dtype, Training(tokens, tokens, checkpointing,
                                                                                 autocast), trainable)
    else:  # routers mode: one pass without gradients over packed prompts, the routers fitted on their features
        memory = inference_memory(shapes, _lora(config, experts), autocast or dtype, tokens)
        memory = replace(memory, weights=weight_bytes(shapes, dtype))
        checkpointing = False
    choice = f"micro-batch {micro_rows} x {settings.seq_len}" + (", checkpointing" if checkpointing else "")
    memory = replace(memory, host=_host(config, memory.weights, on_device, memory.device))
    return JobPlan(step, memory, on_device, choice, micro_rows, checkpointing)


def training_choice(config: dict, shapes: ModelConfig, step: str, where: Setting) -> JobPlan:
    """The configured micro-batch and checkpointing, `auto` turning it on only where needed to fit."""
    settings = TrainSettings.from_config(config["training"])
    on_device = where.device_bytes is not None
    plan = training_plan(config, shapes, step, settings.micro_rows, settings.gradient_checkpointing is True, on_device)
    if where.fits(plan) or settings.gradient_checkpointing != "auto":
        return plan
    return training_plan(config, shapes, step, settings.micro_rows, True, on_device)


def training_fit(config: dict, shapes: ModelConfig, step: str, where: Setting) -> JobPlan:
    """The largest micro-batch (halving the configured one) that fits with checkpointing, or 1."""
    rows = TrainSettings.from_config(config["training"]).micro_rows
    while True:
        plan = training_plan(config, shapes, step, rows, True, where.device_bytes is not None)
        if where.fits(plan) or rows == 1:
            return plan
        rows //= 2


def evaluation_plan(config: dict, shapes: ModelConfig, method: str, on_device: bool) -> JobPlan:
    from moa.data.tasks import get_task

    tasks = [get_task(config, name) for name in config["tasks"]]
    data, evaluation = config["data"], config["evaluation"]
    new = max([evaluation["max_new_tokens"] or t.max_new_tokens for t in tasks if not t.scored] or [0])
    scored = any(t.scored for t in tasks)
    reach = data["max_prompt_tokens"] + max(new, data["max_target_tokens"] + 1 if scored else 0)
    slots = evaluation["batch_size"]
    return serving_plan(config, shapes, method, on_device, "evaluate", slots, reach,
                        max(PREFILL_TOKENS, data["max_prompt_tokens"]), PREFILL_TOKENS if scored else slots)


def harness_plan(config: dict, shapes: ModelConfig, method: str, on_device: bool) -> JobPlan:
    """The lm-eval step: moa's engine serving the composition, each request up to lm_eval.max_length tokens (the
    harness's contexts are its tasks', not bounded by the config's data limits), and its scoring."""
    settings = config["evaluation"]["lm_eval"]
    reach = settings["max_length"] or shapes.max_position_embeddings
    slots = settings["batch_size"] or config["evaluation"]["batch_size"]
    return serving_plan(config, shapes, method, on_device, "lm_eval", slots, reach, max(PREFILL_TOKENS, reach),
                        PREFILL_TOKENS)


def serving_plan(config: dict, shapes: ModelConfig, method: str, on_device: bool, step: str, slots: int, reach: int,
                 tokens: int, logits_rows: int) -> JobPlan:
    """A composition served: `slots` sequences of up to `reach` tokens in the KV cache, forwards of `tokens` tokens
    with `logits_rows` rows of logits, every task's LoRA beside the weights (but for base), and a merge folded."""
    from moa.config import method_params
    from moa.gates import GateKind
    from moa.roles import BASE

    params = method_params(config, method)
    experts = 0 if params["method"] == BASE else len(config["tasks"])
    memory = inference_memory(shapes, _lora(config, experts) if experts else None,
                              DTYPES[config["evaluation"]["dtype"]], tokens, slots, reach, logits_rows,
                              2 if params["method"] == GateKind.XLORA else 1)
    fold = 2 * 4 * largest_module(shapes)  # one module's fp32 delta and sum while a merge is folded
    memory = replace(memory, workspace=memory.workspace + fold)
    memory = replace(memory, host=_host(config, memory.weights, on_device, memory.device)
                     + dense_merge_bytes(config, shapes, method))
    return JobPlan(f"{step}:{method}", memory, on_device, f"{slots} sequences x {reach} tokens")


def dense_merge_bytes(config: dict, shapes: ModelConfig, method: str) -> int:
    """Host memory of an untruncated element-wise merge, formed from the task adapters each time the composition is
    loaded (or a tuning candidate built), one module at a time: every task's fp32 update, the pruned ones and their
    sum; 0 for any other composition."""
    from moa.compose.merge import MERGES, Update
    from moa.config import method_params

    params = method_params(config, method)
    merge = MERGES.get(params["method"])
    if merge is None or merge.update != Update.DENSE or params.get("k"):
        return 0
    return _dense_merge(len(config["tasks"]), shapes)


def _dense_merge(n_tasks: int, shapes: ModelConfig) -> int:
    """Peak bytes of an element-wise merge of the largest module: n fp32 updates, n pruned, n weighted and their
    temporaries (4 n + 4 module-sizes bounds the measured peak: tests/test_plan.py)."""
    return (4 * n_tasks + 4) * 4 * largest_module(shapes)


def composition_plan(config: dict, shapes: ModelConfig, method: str, on_device: bool) -> JobPlan:
    """A composition that reads prompts through the model (centroid) runs it like routers mode; a merge is
    matrix work over the adapters on the host: all tasks' factors and a few dense [out, in] fp32 deltas."""
    from moa.compose.registry import Need, needs_of
    from moa.config import method_params

    if Need.TASK_PROMPTS in needs_of(method_params(config, method)):  # pooled features, or tuning's scoring
        memory = inference_memory(shapes, None, DTYPES[config["evaluation"]["dtype"]], POOL_TOKENS)
        memory = replace(memory, host=_host(config, memory.weights, on_device, memory.device)
                         + dense_merge_bytes(config, shapes, method))
        return JobPlan(f"compose:{method}", memory, on_device, f"rows of {POOL_TOKENS} prompt tokens")
    n = len(config["tasks"])
    memory = Memory(lora=4 * lora_numel(shapes, _lora(config, n)), workspace=_dense_merge(n, shapes))
    memory = replace(memory, host=HOST_BASELINE + memory.device)
    return JobPlan(f"compose:{method}", memory, False)


def plan_config(config: dict, shapes: ModelConfig, where: Setting) -> list[JobPlan]:
    """Every model-reading job of `config`, as it would run `where`."""
    on_device = where.device_bytes is not None
    dtype = DTYPES[config["model"]["dtype"]]
    weights = weight_bytes(shapes, dtype)
    prepare = JobPlan("prepare_model", Memory(host=HOST_BASELINE + 2 * weights), False)
    from moa.compose.registry import LEARNED
    from moa.config import method_params

    learned = any(method_params(config, m)["method"] in LEARNED for m in config["methods"])
    steps = ["train_lora", "train_mixed", "train_router", *(["learn_merge"] if learned else [])]
    harness = config["evaluation"].get("lm_eval") is not None
    return [prepare, *(training_choice(config, shapes, s, where) for s in steps),
            *(composition_plan(config, shapes, m, on_device) for m in config["methods"]),
            *(evaluation_plan(config, shapes, m, on_device) for m in config["methods"]),
            *(harness_plan(config, shapes, m, on_device) for m in config["methods"] if harness)]


def job_plan(config: dict, shapes: ModelConfig, step: str, where: Setting, method: str | None = None) -> JobPlan | None:
    """The plan of one step's job (None: a step that loads no model)."""
    on_device = where.device_bytes is not None
    if step in TRAINING_STEPS:
        return training_choice(config, shapes, step, where)
    if step == "compose" and method:
        return composition_plan(config, shapes, method, on_device)
    if step == "evaluate" and method:
        return evaluation_plan(config, shapes, method, on_device)
    if step == "lm_eval" and method and config["evaluation"].get("lm_eval"):
        return harness_plan(config, shapes, method, on_device)
    return None


def preflight(config: dict, step: str, method: str | None = None) -> JobPlan | None:
    """Before a step loads anything: its plan against the device and host it got, or one line naming what fits."""
    from moa.layout import ExperimentPaths
    from moa.model.prepared import loads_offline

    prepared = ExperimentPaths.of(config).model / "config.json"
    if not prepared.is_file() and not loads_offline(config["model"]["source"]):
        return None  # no shapes without the network, which jobs never use: base_model says to run prepare-model
    where = Setting.here()
    plan = job_plan(config, shapes_of(config), step, where, method)
    if plan is None:
        return None
    if not where.fits(plan):
        memory, limit = plan.memory, where.device_bytes
        device = (f"{gib(memory.device)} GiB of {gib(limit)} GiB on the GPU" if limit is not None and plan.on_device
                  else f"{gib(memory.host)} GiB of {gib(where.host_bytes)} GiB of host memory")
        raise MoaError(f"{plan.job} at {plan.choice or 'its settings'} needs {device} ({describe(memory)}); "
                       f"{advice(config, plan, where)}")
    return plan


def describe(memory: Memory) -> str:
    parts = {"weights": memory.weights, "LoRA+optimizer": memory.lora, "activations": memory.activations,
             "KV cache": memory.kv_cache, "workspace": memory.workspace}
    return ", ".join(f"{name} {gib(n)}" for name, n in parts.items() if n)


def advice(config: dict, plan: JobPlan, where: Setting) -> str:
    """What to change so that `plan`'s job fits `where`, in one clause."""
    if plan.job in TRAINING_STEPS:
        fit = training_fit(config, shapes_of(config), plan.job, where)
        if where.fits(fit):
            return (f"set training.micro_batch_size: {fit.micro_rows} and training.gradient_checkpointing: true "
                    f"(the same update; {gib(fit.memory.device if fit.on_device else fit.memory.host)} GiB)")
        return "even micro-batch 1 with checkpointing does not fit: use model.dtype: bfloat16 or a larger device"
    if plan.job.startswith("evaluate"):
        return "lower evaluation.batch_size (KV-cache slots) or use evaluation.dtype: bfloat16"
    if plan.job.startswith("lm_eval"):
        return ("lower evaluation.lm_eval.batch_size or evaluation.lm_eval.max_length, or use evaluation.dtype: "
                "bfloat16")
    return "run it on a machine with more memory (`moa plan` lists every job's needs)"


def with_checkpointing(settings: TrainSettings, config: dict, shapes: ModelConfig, step: str) -> TrainSettings:
    """`settings` with gradient_checkpointing decided: as configured, or for `auto` as the step's plan here says."""
    if settings.gradient_checkpointing != "auto":
        return settings
    return replace(settings, gradient_checkpointing=training_choice(config, shapes, step, Setting.here()).checkpointing)


def table(plans: list[JobPlan], where: Setting) -> str:
    """The plan as a text table, one job a row, in GiB."""
    head = ["job", "runs on", "weights", "LoRA+opt", "activations", "KV cache", "workspace", "device peak",
            "host peak", "fits", "setting"]
    rows = []
    for plan in plans:
        m = plan.memory
        on = "GPU" if plan.on_device and where.device_bytes is not None else "host"
        rows.append([plan.job, on, gib(m.weights), gib(m.lora), gib(m.activations), gib(m.kv_cache),
                     gib(m.workspace), gib(m.device), gib(m.host),
                     "yes" if where.fits(plan) else "NO", plan.choice])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i in (0, 1, 10) else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]]
    return "\n".join(lines)
