"""The SLURM pre-flight check on partitions the single-node test cluster cannot have: GPU nodes, nodes of
different sizes, and the per-GPU and per-CPU requests of snakemake-executor-plugin-slurm (the check on the
real cluster is in test_slurm_workflow.py)."""

from __future__ import annotations

import pytest

from moa.errors import MoaError
from moa.slurm import CPUS, GPUS, MEMORY, Node, check_fits, gpu_count, job_asks

NODES = [Node("cpu01", {CPUS: 64, MEMORY: 256000, GPUS: 0}), Node("gpu01", {CPUS: 16, MEMORY: 128000, GPUS: 4})]


@pytest.mark.parametrize(("gres", "gpus"), [
    ("(null)", 0), ("gpu", 1), ("gpu:2", 2), ("gpu:a100:4(S:0-1),mps:400", 4), ("gpu:a100:2(S:0,1),gpu:v100:1", 3),
])
def test_gpu_count_reads_job_and_sinfo_gres(gres: str, gpus: int) -> None:
    assert gpu_count(gres) == gpus


@pytest.mark.parametrize(("threads", "resources"), [
    (64, {"mem_mb": 256000}),  # the CPU node, all of it
    (16, {"gpu": 4, "mem_mb": 128000}),  # the GPU node, all of it
    (99, {"cpus_per_task": 8, "gres": "gpu:a100:2"}),  # cpus_per_task wins over threads
    (99, {"cpus_per_task": -1, "gpu": 1}),  # no CPU request (the plugin leaves --cpus-per-task out)
])
def test_a_job_one_node_can_hold_passes(threads: int, resources: dict) -> None:
    check_fits("train_lora", job_asks("train_lora", threads, resources), "main", NODES)


@pytest.mark.parametrize(("threads", "resources", "message"), [
    (65, {"mem_mb": 16000},
     ("asks for 65 CPUs, 16000 MB per job, but the largest node of SLURM partition 'main' (cpu01) has 64 CPUs, "
      "256000 MB, so the job could never start; lower the request with --set-threads train_lora=64")),
    (32, {"gpu": 1, "mem_mb": 300000},  # cpu01 lacks GPUs and memory, gpu01 CPUs and memory: a GPU job, gpu01
     ("asks for 32 CPUs, 300000 MB, 1 GPU per job, but the largest node of SLURM partition 'main' (gpu01) has "
      "16 CPUs, 128000 MB, 4 GPUs, so the job could never start; lower the request with "
      "--set-threads train_lora=16 --set-resources train_lora:mem_mb=128000")),
    (1, {"gres": "gpu:2", "cpus_per_gpu": 12},
     ("asks for 24 CPUs, 2 GPUs per job, but the largest node of SLURM partition 'main' (gpu01) has 16 CPUs, "
      "4 GPUs, so the job could never start; lower the request with --set-resources train_lora:cpus_per_gpu=8")),
    (16, {"gres": "gpu:8", "mem_mb_per_cpu": 10000},
     ("asks for 16 CPUs, 160000 MB, 8 GPUs per job, but the largest node of SLURM partition 'main' (gpu01) has "
      "16 CPUs, 128000 MB, 4 GPUs, so the job could never start; lower the request with "
      "--set-resources train_lora:mem_mb_per_cpu=8000 train_lora:gres=gpu:4")),
])
def test_a_job_no_node_can_hold_is_one_line_with_the_fix(threads: int, resources: dict, message: str) -> None:
    with pytest.raises(MoaError) as err:
        check_fits("train_lora", job_asks("train_lora", threads, resources), "main", NODES)
    assert str(err.value) == f"rule train_lora {message} (on the command line or in the profile)"


def test_a_partition_without_nodes_names_it() -> None:
    with pytest.raises(MoaError, match=r"rule evaluate goes to SLURM partition 'gpu', which has no nodes"):
        check_fits("evaluate", job_asks("evaluate", 1, {}), "gpu", [])
