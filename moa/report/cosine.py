"""How alike the task adapters are: the cosine similarity of their full updates, from the LoRA factors alone."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor


def _factors(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A [r, in], B [out, r]) in float64, so near-orthogonal adapters do not round to noise."""
    return {key.removesuffix(".lora_A.weight"): (a.double(), state[key.replace(".lora_A.", ".lora_B.")].double())
            for key, a in state.items() if key.endswith(".lora_A.weight")}


def _inner(x: Mapping[str, tuple[Tensor, Tensor]], y: Mapping[str, tuple[Tensor, Tensor]]) -> float:
    """sum over modules of <B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)): r x r products, no out x in matrix.
    A module only one adapter targets is zero in the other's vector and adds nothing."""
    total = 0.0
    for module in x.keys() & y.keys():
        (a1, b1), (a2, b2) = x[module], y[module]
        total += ((b1.T @ b2) * (a2 @ a1.T).T).sum().item()
    return total


def adapter_cosine(states: Sequence[Mapping[str, Tensor]], scalings: Sequence[float]) -> np.ndarray:
    """Cosine similarity between the adapters' full updates dW_i = s_i B_i A_i, all modules as one vector."""
    factors = [_factors(state) for state in states]
    gram = np.zeros((len(states), len(states)))
    for i, j in itertools.combinations_with_replacement(range(len(states)), 2):
        gram[i, j] = gram[j, i] = scalings[i] * scalings[j] * _inner(factors[i], factors[j])
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero (untrained) adapter has no direction
        return gram / np.outer(norms, norms)
