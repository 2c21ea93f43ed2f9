"""Adapter merges (moa.compose.merge) against dense float64 references and PEFT on a tiny LLaMA.

What PEFT 0.21's ``add_weighted_adapter`` does, read from peft/tuners/lora/model.py and checked below:
- "svd" SVDs the dense sum_i w_i (s_i B_i A_i) (``get_delta_weight`` applies s_i once) and stores
  B = U_k S_k, A = Vh_k. The LoRA scaling is *not* applied twice: for adapters without rsLoRA its result
  is moa's rank-k truncation (up to float32 SVD rounding).
- For every combination_type the merged adapter's config is ``replace(config of the first adapter,
  r=new_rank, lora_alpha=new_rank)``, so it inherits ``use_rslora``. When the first adapter uses rsLoRA the
  merged scaling is new_rank / sqrt(new_rank) = sqrt(new_rank) instead of 1, and the merged update is
  sqrt(new_rank) x the intended one (new_rank = k for svd, sum r_i for cat; checked here for svd). PEFT 0.22
  fixed it (the merged config sets use_rslora=False), so there the svd result is moa's truncation either way.
  moa writes use_rslora=false with lora_alpha = r.
- "linear" puts sqrt(|w_i s_i|) on B_i and sign(w_i) sqrt(|w_i s_i|) on A_i with scaling 1, so for w_i > 0
  and equal scalings it equals moa's linear (A = sum v_i A_i, B = sum v_i B_i, keep s) with v_i = sqrt(w_i).
- "ties" / "dare_*" / "magnitude_prune" (no _svd) prune the A and B factors separately; moa's methods of
  those names are PEFT's "*_svd" variants (prune the dense updates, then a rank-k SVD).

moa's breadcrumbs is checked against mergekit's `breadcrumbs` (mergekit/sparsify.py's magnitude_outliers,
no rescaling, no sign consensus, no normalization: the weighted sum of the pruned updates), restated below.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from peft import __version__ as peft_version
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from moa.compose.merge import (
    MERGES,
    Factors,
    MergeMethod,
    MergeSpec,
    dense_merge,
    dense_report,
    dense_updates,
    is_dense,
    merge_adapters,
    merge_module,
    resolved_weights,
    scale_linear,
)
from moa.errors import MoaError
from moa.lora import AdapterConfig, add_to_weights, load_adapter, peft_key, write_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32x32, 16x32, 32x64
WEIGHTS = (0.5, -1.0, 2.0)
SAME = [(4, 8, False)] * 3  # (r, lora_alpha, use_rslora): linear needs equal ranks and scalings
MIXED = [(2, 4, False), (4, 8, True), (6, 3, True)]  # first without rsLoRA: PEFT's merged scaling is then 1
SPECS = {"same": SAME, "mixed": MIXED}

Adapters = list[tuple[AdapterConfig, dict[str, torch.Tensor]]]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def save_adapters(base: LlamaForCausalLM, root: Path, specs: list[tuple[int, int, bool]]) -> list[Path]:
    """PEFT adapters with random nonzero A and B (init_lora_weights=False), a different seed each."""
    dirs = []
    for i, (r, alpha, rslora) in enumerate(specs):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


@pytest.fixture(scope="module")
def same_dirs(base, tmp_path_factory) -> list[Path]:
    return save_adapters(base, tmp_path_factory.mktemp("same"), SAME)


@pytest.fixture(scope="module")
def mixed_dirs(base, tmp_path_factory) -> list[Path]:
    return save_adapters(base, tmp_path_factory.mktemp("mixed"), MIXED)


def loaded(dirs: list[Path]) -> Adapters:
    return [load_adapter(d) for d in dirs]


def names(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def peft_with(base: LlamaForCausalLM, dirs: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model.eval()


def modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state})


def product(config: AdapterConfig, state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The adapter's dense update s B A on ``module``, float64."""
    return config.spec.scaling * state[peft_key(module, "B")].double() @ state[peft_key(module, "A")].double()


def exact_sum(adapters: Adapters, weights: tuple[float, ...], module: str) -> torch.Tensor:
    return sum(w * product(c, s, module) for (c, s), w in zip(adapters, weights))


def peft_products(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's dense update (its own scaling included) of ``adapter`` per module name."""
    return {name: m.get_delta_weight(adapter).double() for name, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def peft_factors(model: PeftModel, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach())
            for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_truncation(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-k truncation of ``matrix`` and its singular values (float64 reference)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def factors(adapters: Adapters, module: str) -> list[Factors]:
    return [Factors(s[peft_key(module, "A")], s[peft_key(module, "B")], c.spec.scaling) for c, s in adapters]


# -- exact methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("specs", ["same", "mixed"])
def test_concat_equals_peft_cat(base, ids, tmp_path, specs, request):
    dirs = request.getfixturevalue(f"{specs}_dirs")
    config, state, report = merge_adapters(MergeSpec("concat", WEIGHTS), loaded(dirs), names(3))
    peft = peft_with(base, dirs)
    peft.add_weighted_adapter(names(3), list(WEIGHTS), "cat", combination_type="cat")
    for module, (A, B) in peft_factors(peft, "cat").items():
        assert torch.allclose(state[peft_key(module, "A")], A, atol=1e-6)
        assert torch.allclose(state[peft_key(module, "B")], B, atol=1e-6)
    assert (config.r, config.lora_alpha, config.use_rslora) == (sum(r for r, _, _ in SPECS[specs]), config.r, False)
    assert report["relative_error"] == 0.0 and report["rank"] == config.r
    peft.set_adapter("cat")
    written = PeftModel.from_pretrained(copy.deepcopy(base), write_adapter(tmp_path / "m", config, state)).eval()
    assert (logits(written, ids) - logits(peft, ids)).abs().max() <= 1e-5
    assert (logits(written, ids) - logits(base, ids)).abs().max() > 1e-3  # the merge matters


def test_task_arithmetic_is_exact(mixed_dirs):
    adapters = loaded(mixed_dirs)
    config, state, report = merge_adapters(MergeSpec("task_arithmetic"), adapters, names(3))
    assert report["weights"] == [1 / 3] * 3 and report["rank"] == 12 and report["relative_error"] == 0.0
    for module in modules(state):
        assert rel(product(config, state, module), exact_sum(adapters, (1 / 3,) * 3, module)) <= 1e-6


def test_linear_is_the_factor_sum_and_peft_linear_with_squared_weights(base, same_dirs):
    adapters = loaded(same_dirs)
    v = (0.5, 1.0, 2.0)
    config, state, report = merge_adapters(MergeSpec("linear", v), adapters, names(3))
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, False)  # keeps the scaling
    peft = peft_with(base, same_dirs)
    peft.add_weighted_adapter(names(3), [x * x for x in v], "lin", combination_type="linear")
    peft_dw = peft_products(peft, "lin")
    errors, norms = [], []
    for module in modules(state):
        A = sum(w * s[peft_key(module, "A")].double() for (_, s), w in zip(adapters, v))
        B = sum(w * s[peft_key(module, "B")].double() for (_, s), w in zip(adapters, v))
        ours = product(config, state, module)
        assert rel(ours, 2.0 * B @ A) <= 1e-6
        assert rel(peft_dw[module], ours) <= 1e-5
        exact = exact_sum(adapters, v, module)
        errors.append(float((ours - exact).norm()))
        norms.append(float(exact.norm()))
    total = math.sqrt(sum(e * e for e in errors)) / math.sqrt(sum(n * n for n in norms))
    assert report["relative_error"] == pytest.approx(total, rel=1e-6)
    assert report["max_module_relative_error"] == pytest.approx(max(e / n for e, n in zip(errors, norms)), rel=1e-6)
    avg = merge_adapters(MergeSpec("avg"), adapters, names(3))[1]
    lin = merge_adapters(MergeSpec("linear", (1 / 3,) * 3), adapters, names(3))[1]
    assert all(torch.equal(avg[key], lin[key]) for key in avg)


# -- svd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 3, 12])
def test_svd_equals_dense_truncation(mixed_dirs, k):
    adapters = loaded(mixed_dirs)
    config, state, report = merge_adapters(MergeSpec("svd", WEIGHTS, k=k), adapters, names(3))
    k = k or 6  # the largest input rank
    assert (config.r, config.lora_alpha, config.use_rslora, report["k"]) == (k, k, False, k)
    energies = []
    for module in modules(state):
        exact = exact_sum(adapters, WEIGHTS, module)
        truncated, s = dense_truncation(exact, k)
        ours = product(config, state, module)
        assert rel(ours, truncated) <= 1e-5
        merged = merge_module(MergeSpec("svd", WEIGHTS, k=k), factors(adapters, module), 0)
        assert merged.quality.error == pytest.approx(float(s[k:].norm() / s.norm()), abs=1e-7)
        assert merged.quality.norm == pytest.approx(float(exact.norm()), rel=1e-6)
        energies.append(float((s[:k] ** 2).sum() / (s**2).sum()))
        assert merged.quality.energy == pytest.approx(energies[-1], rel=1e-6)
        if k == 12:  # k = sum of ranks: exact
            assert rel(ours, exact) <= 1e-5 and merged.quality.error <= 1e-7
    assert report["retained_energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-6)


def test_svd_pads_rank_beyond_the_numerical_rank():
    f = Factors(torch.randn(2, 8), torch.randn(5, 2), 1.0)
    merged = merge_module(MergeSpec("svd", (1.0, 1.0), k=4), [f, f], 0)  # the sum has rank 2
    assert merged.A.shape == (4, 8) and merged.B.shape == (5, 4) and merged.quality.energy == pytest.approx(1.0)
    assert rel(merged.B.double() @ merged.A.double(), 2 * f.B.double() @ f.A.double()) <= 1e-6


@pytest.mark.parametrize("first_rslora", [False, True])
def test_peft_svd_vs_moa(base, tmp_path, first_rslora):
    """Without rsLoRA on the first adapter PEFT's svd is moa's truncation; with it, sqrt(k) times that before
    PEFT 0.22 (which stopped inheriting use_rslora), the truncation since."""
    specs = MIXED[::-1] if first_rslora else MIXED
    dirs = save_adapters(base, tmp_path, specs)
    adapters = loaded(dirs)
    k = 5
    config, state, _ = merge_adapters(MergeSpec("svd", WEIGHTS, k=k), adapters, names(3))
    peft = peft_with(base, dirs)
    peft.add_weighted_adapter(names(3), list(WEIGHTS), "svd", combination_type="svd", svd_rank=k)
    factor = math.sqrt(k) if first_rslora and Version(peft_version) < Version("0.22") else 1.0
    for module, theirs in peft_products(peft, "svd").items():
        assert rel(theirs, factor * product(config, state, module)) <= 1e-4


# -- ties / dare / magnitude_prune ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "sign", "density"), [
    ("magnitude_prune", "total", 0.3), ("ties", "total", 0.5), ("ties", "frequency", 0.7),
    ("dare_linear", "total", 0.5), ("dare_ties", "total", 0.4), ("dare_ties", "frequency", 0.6),
    ("ties", "total", 1.0), ("dare_linear", "total", 1.0),
])  # fmt: skip
def test_dense_merge_equals_peft_merge_utils(method, sign, density):
    gen = torch.Generator().manual_seed(3)
    updates = [torch.randn(12, 20, generator=gen) for _ in range(3)]
    spec = MergeSpec(method, WEIGHTS, density=density, majority_sign_method=sign, seed=7)
    ours = dense_merge(spec, updates, list(WEIGHTS), module_index=2)
    torch.manual_seed(7 + 2)
    kwargs = {} if method in ("magnitude_prune", "dare_linear") else {"majority_sign_method": sign}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at density 1 PEFT warns that it does not prune
        theirs = getattr(merge_utils, method)(updates, torch.tensor(WEIGHTS), density, **kwargs)
    assert torch.equal(ours, theirs)
    if method.startswith("dare") and density < 1:  # the seed and module index matter
        assert not torch.equal(ours, dense_merge(spec, updates, list(WEIGHTS), module_index=3))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_dense_methods_truncate_the_dense_merge(method):
    gen = torch.Generator().manual_seed(4)
    fs = [Factors(torch.randn(3, 10, generator=gen), torch.randn(8, 3, generator=gen), 0.5) for _ in range(3)]
    updates = [(f.B @ f.A) * f.scaling for f in fs]
    exact = sum(w * u.double() for u, w in zip(updates, WEIGHTS))
    spec = MergeSpec(method, WEIGHTS, density=0.5, seed=1)
    dense = dense_merge(spec, updates, list(WEIGHTS), module_index=5).double()
    for k in (3, 8):  # 8 = min(out, in): the full rank of the pruned matrix
        merged = merge_module(MergeSpec(method, WEIGHTS, k=k, density=0.5, seed=1), fs, 5)
        truncated, s = dense_truncation(dense, k)
        ours = merged.B.double() @ merged.A.double() * merged.scaling
        assert rel(ours, truncated) <= 1e-5
        assert merged.quality.error == pytest.approx(rel(truncated, exact), rel=1e-5)  # against the exact sum
        assert merged.quality.energy == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=1e-6)
        assert merged.quality.truncation == pytest.approx(rel(truncated, dense), rel=1e-5, abs=1e-6)  # vs the merge
    assert rel(ours, dense) <= 1e-5


@pytest.mark.parametrize(("method", "kwargs"), [("ties", {"majority_sign_method": "total"}),
                                                ("dare_ties", {"majority_sign_method": "frequency"}),
                                                ("magnitude_prune", {})])
def test_untruncated_merge_is_peft_dense_primitive_on_every_module(base, same_dirs, method, kwargs):
    """Without k an element-wise merge is the method as defined: on every module, PEFT's dense primitive
    (merge_utils) over PEFT's own delta weights, added to the base weight."""
    spec = MergeSpec(method, WEIGHTS, density=0.4, seed=2, **kwargs)
    assert is_dense(spec) and not is_dense(dataclasses.replace(spec, k=4)) and not is_dense(MergeSpec("svd"))
    peft = peft_with(base, same_dirs)
    deltas = [peft_products(peft, name) for name in names(3)]
    updates = dict(dense_updates(spec, loaded(same_dirs), names(3)))
    folded = copy.deepcopy(base)
    add_to_weights(folded, updates.items())
    assert sorted(updates) == sorted(deltas[0]) and len(updates) == 6
    for index, module in enumerate(sorted(updates)):
        torch.manual_seed(spec.seed + index)  # DARE's draws: PEFT's global generator
        theirs = getattr(merge_utils, method)(torch.stack([d[module].float() for d in deltas]), torch.tensor(WEIGHTS),
                                              0.4, **kwargs)
        torch.testing.assert_close(updates[module], theirs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(folded.get_submodule(module).weight, base.get_submodule(module).weight + theirs)
    report = dense_report(spec, loaded(same_dirs), names(3))
    assert report["rank"] is None and report["truncation_error"] is None and report["retained_energy"] is None
    assert report["relative_error"] > 0.1  # pruning and election move it far from the weighted sum
    with pytest.raises(MoaError, match=f"{method} without k is a dense update"):
        merge_adapters(spec, loaded(same_dirs), names(3))


def test_dense_update_that_fits_no_layer_is_named(base):
    with pytest.raises(MoaError, match=r"update of model.layers.0.mlp.nope \(shape \[2, 2\]\) fits no linear layer"):
        add_to_weights(copy.deepcopy(base), [("model.layers.0.mlp.nope", torch.zeros(2, 2))])


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_dense_methods_equal_peft_svd_variants(base, same_dirs, method):
    """End to end against PEFT's "<method>_svd" (DARE's draws cannot be aligned with PEFT's global generator
    there: PEFT initializes the new adapter's weights from it first)."""
    config, state, report = merge_adapters(MergeSpec(method, WEIGHTS, k=4, density=0.4), loaded(same_dirs), names(3))
    peft = peft_with(base, same_dirs)
    peft.add_weighted_adapter(names(3), list(WEIGHTS), "m", combination_type=f"{method}_svd", svd_rank=4, density=0.4)
    for module, theirs in peft_products(peft, "m").items():
        assert rel(theirs, product(config, state, module)) <= 1e-4
    assert report["density"] == 0.4 and 0 < report["retained_energy"] < 1 and report["relative_error"] > 0


def mergekit_outliers(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers (rescale_norm=None), step for step: sort the magnitudes ascending, drop the
    int(gamma * n) largest and the smallest beyond int(density * n) kept (fewer of the largest where both do not
    fit), as its slice indices[n_bot:-n_top] does."""
    if density >= 1:
        return t
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    indices = torch.sort(t.abs().view(-1).float(), descending=False).indices
    mask = torch.zeros_like(t)
    mask.view(-1)[indices[n_bot:-n_top]] = 1
    return t * mask


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.9, 0.05), (0.3, 0.2), (0.97, 0.1), (1.0, 0.1)])
def test_breadcrumbs_equals_mergekit(density, gamma):
    """Each update pruned as mergekit's magnitude_outliers, then the weighted sum (mergekit's `breadcrumbs`:
    no consensus, normalize and rescale off). (0.97, 0.1): density leaves no room for every outlier dropped."""
    gen = torch.Generator().manual_seed(5)
    updates = [torch.randn(24, 40, generator=gen) for _ in range(3)]
    ours = dense_merge(MergeSpec("breadcrumbs", WEIGHTS, density=density, gamma=gamma), updates, list(WEIGHTS), 0)
    pruned = torch.stack([mergekit_outliers(t, density, gamma) for t in updates])
    theirs = (pruned * torch.tensor(WEIGHTS).view(-1, 1, 1)).sum(dim=0)
    assert torch.equal(ours, theirs)
    assert [int((t != 0).sum()) for t in pruned] == [int(density * 24 * 40)] * 3  # the density kept


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    t = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)  # magnitudes 1..100, signs alternating
    pruned = dense_merge(MergeSpec("breadcrumbs", (1.0,), density=0.5, gamma=0.1), [t], [1.0], 0)
    assert torch.equal(pruned.abs().nonzero().flatten() + 1, torch.arange(41, 91))  # 10 largest, 40 smallest dropped
    no_outliers = MergeSpec("breadcrumbs", (1.0,), density=0.3, gamma=0.0)  # mergekit's slice would keep nothing
    assert torch.equal(dense_merge(no_outliers, [t], [1.0], 0),
                       dense_merge(MergeSpec("magnitude_prune", (1.0,), density=0.3), [t], [1.0], 0))


# -- the written adapter -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "specs"), [("linear", "same"), ("svd", "mixed"), ("dare_ties", "same"),
                                               ("task_arithmetic", "mixed"), ("breadcrumbs", "mixed")])
def test_written_adapter_loads_in_peft(base, ids, tmp_path, method, specs, request):
    """Every low-rank merge is a PEFT adapter: an element-wise merge truncated to rank k too."""
    dirs = request.getfixturevalue(f"{specs}_dirs")
    k = {"svd": 3, "dare_ties": 4, "breadcrumbs": 5}.get(method)
    config, state, report = merge_adapters(MergeSpec(method, k=k), loaded(dirs), names(3))
    json.dumps(report, allow_nan=False)
    assert report["method"] == method and report["adapters"] == names(3) and report["modules"] == 6
    written = PeftModel.from_pretrained(copy.deepcopy(base), write_adapter(tmp_path, config, state)).eval()
    folded = copy.deepcopy(base)
    with torch.no_grad():
        for module in modules(state):
            folded.get_submodule(module).weight += product(config, state, module).float()
    assert (logits(written, ids) - logits(folded, ids)).abs().max() <= 1e-5
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())


def test_report_fields(same_dirs):
    spec = MergeSpec("dare_ties", k=4, density=0.5, majority_sign_method="frequency", seed=3, scale=0.5)
    _, _, report = merge_adapters(spec, loaded(same_dirs), names(3))
    measured = [report.pop(key) for key in ("relative_error", "max_module_relative_error", "retained_energy",
                                            "truncation_error")]
    assert report == {
        "method": "dare_ties", "adapters": names(3), "weights": [0.5] * 3, "scale": 0.5, "k": 4, "rank": 4,
        "input_ranks": [4] * 3, "modules": 6, "density": 0.5, "majority_sign_method": "frequency", "seed": 3,
    }  # fmt: skip
    assert 0 < measured[0] <= measured[1] and 0 < measured[2] < 1 and 0 < measured[3] < 1
    assert resolved_weights(MergeSpec("svd"), 4) == [0.25] * 4 and resolved_weights(MergeSpec("concat"), 2) == [1, 1]
    _, _, report = merge_adapters(MergeSpec("svd", k=2), loaded(same_dirs), names(3))
    assert report["truncation_error"] == pytest.approx(report["relative_error"])  # svd truncates the sum itself
    assert merge_adapters(MergeSpec("concat"), loaded(same_dirs), names(3))[2]["truncation_error"] is None
    report = dense_report(MergeSpec("breadcrumbs", gamma=0.05), loaded(same_dirs), names(3))
    assert (report["k"], report["density"], report["gamma"], report["weights"]) == (None, 0.5, 0.05, [1.0] * 3)
    assert "seed" not in report and "majority_sign_method" not in report


# -- errors ------------------------------------------------------------------------------------------


def edited(adapters: Adapters, **changes) -> Adapters:
    config, state = adapters[1]
    return [adapters[0], (dataclasses.replace(config, **changes), state), *adapters[2:]]


def without(adapter: tuple[AdapterConfig, dict[str, torch.Tensor]], module: str):
    config, state = adapter
    return config, {k: v for k, v in state.items() if module not in k}


def fingerprinted(adapters: Adapters, n_layers: int) -> Adapters:
    return [(dataclasses.replace(c, arch_fingerprint={"n_layers": n_layers}), s) for c, s in adapters]


ERRORS = {
    "no adapters": (lambda same, mixed: merge_adapters(MergeSpec("svd"), [], []), "a merge needs at least one adapter"),
    "base model": (
        lambda same, mixed: merge_adapters(MergeSpec("svd"), edited(same, base_model_name_or_path="x/y"), names(3)),
        r"adapters 'a0' and 'a1' have different base models \(None vs 'x/y'\)",
    ),
    "fingerprint": (
        lambda same, mixed: merge_adapters(MergeSpec("svd"), fingerprinted(same[:1], 2) + fingerprinted(same[1:], 3),
                                           names(3)),
        r"adapters 'a0' and 'a1' were saved for different architectures \(n_layers=2 vs 3\)",
    ),
    "modules": (
        lambda same, mixed: merge_adapters(MergeSpec("svd"), [same[0], without(same[1], "down_proj")], names(2)),
        r"adapters 'a0' and 'a1' adapt different modules \(model\.layers\.0\.mlp\.down_proj, model\.layers\.1",
    ),
    "target_modules": (
        lambda same, mixed: merge_adapters(MergeSpec("svd"), edited(same, target_modules=[*TARGETS, "o_proj"]),
                                           names(3)),
        "adapters 'a0' and 'a1' have different target_modules",
    ),
    "method": (lambda same, mixed: MergeSpec("mean"),
               "unknown merge method 'mean'; use one of: " + ", ".join(MergeMethod)),
    "density 0": (lambda same, mixed: MergeSpec("ties", density=0.0), r"density=0.0 is outside \(0, 1\]"),
    "density 1.5": (lambda same, mixed: MergeSpec("ties", density=1.5), r"density=1.5 is outside \(0, 1\]"),
    "gamma 1": (lambda same, mixed: MergeSpec("breadcrumbs", gamma=1.0), r"gamma=1.0 is outside \[0, 1\)"),
    "sign method": (lambda same, mixed: MergeSpec("ties", majority_sign_method="mean"),
                    "majority_sign_method='mean' is unknown; use 'total' or 'frequency'"),
    "weights": (lambda same, mixed: merge_adapters(MergeSpec("svd", (1.0, 2.0)), same, names(3)),
                "svd merge got 2 weights for 3 adapters"),
    "linear ranks": (lambda same, mixed: merge_adapters(MergeSpec("linear"), mixed, names(3)),
                     r"linear merge needs adapters of equal rank and scaling \(got ranks \[2, 4, 6\]"),
    "svd k": (lambda same, mixed: merge_adapters(MergeSpec("svd", k=13), mixed, names(3)),
              r"svd: k=13 exceeds the sum of the adapters' ranks \(12\); use k <= 12"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_validation_error(same_dirs, mixed_dirs, case):
    call, message = ERRORS[case]
    with pytest.raises(MoaError, match=message):
        call(loaded(same_dirs), loaded(mixed_dirs))


@pytest.mark.parametrize("method", list(MERGES))
def test_scale_multiplies_every_weight(same_dirs, method: str) -> None:
    """The merge at scale lambda is lambda times the merge at scale 1 for every method linear in its weights (what
    tuning serves unfolded instead of merging again), lambda^2 times for the factor sums."""
    def update(scale: float) -> dict[str, torch.Tensor]:
        if is_dense(MergeSpec(method)):
            return dict(dense_updates(MergeSpec(method, scale=scale), loaded(same_dirs), names(3)))
        config, state, _ = merge_adapters(MergeSpec(method, scale=scale), loaded(same_dirs), names(3))
        scaling = config.lora_alpha / config.r
        return {m: scaling * state[peft_key(m, "B")] @ state[peft_key(m, "A")]
                for m in {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in state}}

    once, scaled = update(1.0), update(0.3)
    factor = 0.3 if scale_linear(MergeMethod(method)) else 0.3**2
    for module, delta in once.items():
        torch.testing.assert_close(scaled[module], factor * delta, atol=1e-6, rtol=1e-4)
    with pytest.raises(MoaError, match="scale=0 must be > 0"):
        MergeSpec(method, scale=0)
