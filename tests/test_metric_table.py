"""The metric table against what evaluation writes: every metric name of a task's metrics.parquet has its record,
every record is written by some task, and the figures of the whole stream carry the stream's n."""

from types import SimpleNamespace

import pandas as pd
import pytest

from moa.data.tasks import BUILTIN, get_task
from moa.evaluate import task_scores
from moa.generate import Served
from moa.metrics import METRICS, STREAM_COSTS, Score

CONFIG = {"tasks": dict.fromkeys(BUILTIN)}
REFERENCES = {"summarization": "Two men were arrested. Police said so.", "translation": "Der Hund schläft.",
              "qa": "two men", "sentiment": "positive", "dialogue": "Hello there.", "math": "42"}
N, STREAM = 3, 7  # a task's examples, the whole mixed-task stream's sequences


def written(task: str) -> list[Score]:
    """What evaluate records for a built-in task served by a routed composition."""
    spec, reference = get_task(CONFIG, task), REFERENCES[task]
    predictions = pd.DataFrame({"prediction": [None if spec.scored else f"{reference} #### 42"] * N,
                                "references": [[reference]] * N, "latency_s": [0.5] * N, "expert": [task] * N})
    served = None if spec.scored else Served([None] * STREAM, prompt_tokens=90, new_tokens=30, reused_tokens=10,
                                             prefill_s=0.1, decode_s=0.2)
    scores = [(2.0, 4)] * N if spec.scored else None
    metas = [{"context": f"the {reference} passage"}] * N
    results, _, _ = task_scores(spec, predictions, metas, SimpleNamespace(router=object()), served, scores)
    return results


@pytest.mark.parametrize("task", BUILTIN)
def test_what_a_task_writes_is_in_the_table(task: str) -> None:
    results = written(task)
    names = [s.metric for s in results]
    assert len(names) == len(set(names)) and set(names) <= METRICS.keys()
    assert set(get_task(CONFIG, task).evaluated_metrics) <= set(names)
    per_stream = {s.metric for s in results if s.n == STREAM}
    assert per_stream == (set() if get_task(CONFIG, task).scored else set(STREAM_COSTS))


def test_every_record_is_written_by_a_task() -> None:
    assert {s.metric for task in BUILTIN for s in written(task)} == METRICS.keys()
