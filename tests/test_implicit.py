"""Implicit routing of exact merges: component responses measured in a packed pass equal each sequence's
own, split into prompt and continuation, and the summary's shares, accuracy and top task by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moa.implicit import EVERY_LAYER, component_responses, responses_table, summarize
from moa.lora import lora_layers
from tests.conftest import with_random_experts


@pytest.fixture(scope="module")
def merged(tiny):
    return with_random_experts(tiny[0], seed=2)


def test_packed_responses_equal_each_sequence_alone(merged) -> None:
    gen = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(3, 300, (n,), generator=gen).tolist(), torch.randint(3, 300, (k,), generator=gen).tolist())
                 for n, k in ((7, 3), (20, 5), (4, 1))]
    weights = [1.0, 0.5, 2.0]
    packed = component_responses(merged, weights, sequences)
    assert packed.shape == (3, len(lora_layers(merged)), 2, 3)
    mix = torch.tensor(weights)
    for s, (prompt, continuation) in enumerate(sequences):
        norms = {}
        hooks = [layer.register_forward_hook(lambda m, a, o, name=name: norms.__setitem__(name, m.component_norms(a[0], mix)))
                 for name, layer in lora_layers(merged).items()]
        with torch.no_grad():
            merged(torch.tensor([prompt + continuation]))
        for h in hooks:
            h.remove()
        for m, name in enumerate(lora_layers(merged)):
            np.testing.assert_allclose(packed[s, m, 0], norms[name][:len(prompt)].sum(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(packed[s, m, 1], norms[name][len(prompt):].sum(0), rtol=1e-4, atol=1e-5)


def test_summary_shares_accuracy_and_top_task_by_hand() -> None:
    """Two sequences of task b, one layer with two modules: shares after summing over what is pooled."""
    experts = ["a", "b"]
    responses = {("s1", "q_proj"): [1.0, 3.0], ("s1", "v_proj"): [1.0, 1.0],
                 ("s2", "q_proj"): [3.0, 1.0], ("s2", "v_proj"): [0.0, 4.0]}
    table = pd.DataFrame([{"id": i, "layer": 0, "module": m, "segment": seg, "response": np.array(r)}
                          for (i, m), r in responses.items() for seg in ("prompt", "generated")])
    summary = summarize(table, "concat", "b", experts).set_index(["layer", "module", "segment"])
    q = summary.loc[(0, "q_proj", "prompt")]
    assert q.share_true == pytest.approx((0.75 + 0.25) / 2) and q.accuracy == 0.5 and q.n == 2
    pooled = summary.loc[(0, "all", "prompt")]  # s1: [2, 4] -> b 2/3; s2: [3, 5] -> b 5/8
    assert pooled.share_true == pytest.approx((2 / 3 + 5 / 8) / 2) and pooled.accuracy == 1.0
    assert pooled.top_task == "b" and summary.loc[(EVERY_LAYER, "all", "generated")].share_true == pooled.share_true


def test_responses_table_has_a_row_per_sequence_module_and_segment(merged) -> None:
    modules = list(lora_layers(merged))
    table = responses_table(["x", "y"], modules, np.ones((2, len(modules), 2, 3)))
    assert len(table) == 2 * len(modules) * 2 and set(table.segment) == {"prompt", "generated"}
    assert set(table.layer) == {0, 1} and set(table.module) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"}
