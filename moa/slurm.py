"""Does every SLURM job fit a node of its partition? Asked of `sinfo` before the workflow submits anything.

A job asking more CPUs than any node of its partition has sits in the queue forever with reason
`PartitionConfig` while Snakemake waits without a word, and one asking too much memory is refused by
sbatch only when Snakemake submits it, perhaps hours into the run. A job's requests are read as
snakemake-executor-plugin-slurm turns its threads and resources into sbatch options: --cpus-per-task is
cpus_per_task or else threads (GPU jobs: cpus_per_gpu per GPU, when set), --mem is mem_mb (or
mem_mb_per_cpu per CPU), --gpus is gpu (or gres gpu:N).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from moa.errors import MoaError

CPUS, MEMORY, GPUS = "CPUs", "MB", "GPUs"  # what a node has: sinfo's %c, %m and the GPUs of %G
CLUSTER_KEYS = ("cluster", "clusters", "slurm_cluster")  # a job for another cluster (sbatch --clusters)


@dataclass(frozen=True)
class Ask:
    """`amount` of `what` on one node, lowered by `{flag} {setting}` (setting's {} is the new value: the
    node's amount divided by `per`, e.g. by the CPUs for memory per CPU)."""

    what: str
    amount: int
    flag: Literal["--set-threads", "--set-resources"]
    setting: str
    per: int = 1


@dataclass(frozen=True)
class Node:
    name: str
    sizes: dict[str, int]  # what -> amount


def gpu_count(gres: str) -> int:
    """The GPUs in a GRES string: a job's gpu, gpu:2 or gpu:a100:2; a node's gpu:a100:4(S:0-1),mps:400."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        name, *rest = item.split(":")
        if name == "gpu":
            total += int(rest[-1]) if rest and rest[-1].isdigit() else 1
    return total


def _number(resources: Mapping[str, Any], key: str) -> int | None:
    """A numeric resource; anything else (unset, or a size Snakemake knows only once the inputs exist) is None."""
    value = resources.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_asks(rule: str, threads: int, resources: Mapping[str, Any]) -> list[Ask]:
    """What one job of `rule` asks of a node: CPUs, memory (when it sets any) and GPUs."""
    if resources.get("gpu"):
        gpus = Ask(GPUS, int(resources["gpu"]), "--set-resources", f"{rule}:gpu={{}}")
    else:
        gpus = Ask(GPUS, gpu_count(str(resources.get("gres") or "")), "--set-resources", f"{rule}:gres=gpu:{{}}")
    per_task, per_gpu = _number(resources, "cpus_per_task"), _number(resources, "cpus_per_gpu")
    if per_task:  # a negative one: no --cpus-per-task, so SLURM's default of one CPU
        cpus = Ask(CPUS, max(per_task, 1), "--set-resources", f"{rule}:cpus_per_task={{}}")
    elif gpus.amount and per_gpu:
        cpus = Ask(CPUS, max(per_gpu * gpus.amount, 1), "--set-resources", f"{rule}:cpus_per_gpu={{}}",
                   per=gpus.amount)
    else:
        cpus = Ask(CPUS, threads, "--set-threads", f"{rule}={{}}")
    per_cpu, mem_mb = _number(resources, "mem_mb_per_cpu"), _number(resources, "mem_mb")
    if per_cpu:
        memory = [Ask(MEMORY, per_cpu * cpus.amount, "--set-resources", f"{rule}:mem_mb_per_cpu={{}}", per=cpus.amount)]
    elif mem_mb:
        memory = [Ask(MEMORY, mem_mb, "--set-resources", f"{rule}:mem_mb={{}}")]
    else:
        memory = []
    return [cpus, *memory, gpus]


def _sinfo(*args: str) -> list[list[str]]:
    """`sinfo -h args`, one list of |-separated fields per line."""
    command = ["sinfo", "-h", *args]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    except FileNotFoundError:
        raise MoaError("sinfo is not installed: the slurm executor needs SLURM's commands; run snakemake on a "
                       "login node of the cluster") from None
    except subprocess.TimeoutExpired:
        why = "no answer in 60 s"
    except subprocess.CalledProcessError as err:
        why = " ".join(err.stderr.split()) or f"exit status {err.returncode}"
    else:
        return [line.split("|") for line in out.splitlines() if line.strip()]
    raise MoaError(f"`{' '.join(command)}` failed ({why}); check that SLURM answers (`scontrol ping`)")


def default_partition() -> str:
    """The partition sbatch uses when a job names none (sinfo marks it with *)."""
    default = [name.removesuffix("*") for (name,) in _sinfo("-o", "%P") if name.endswith("*")]
    if not default:
        raise MoaError("the SLURM cluster has no default partition (sinfo marks none with *); set slurm_partition "
                       "under default-resources in the profile")
    return default[0]


def partition_nodes(partition: str) -> list[Node]:
    """Every node of `partition` with its CPUs, memory (MB) and GPUs, as slurm.conf configures them."""
    return [Node(name, {CPUS: int(cpus), MEMORY: int(mem.rstrip("+")), GPUS: gpu_count(gres)})
            for name, cpus, mem, gres in _sinfo("-N", "-p", partition, "-o", "%N|%c|%m|%G")]


def _amount(what: str, n: int) -> str:
    return f"{n} {what}" if what == MEMORY or n != 1 else f"1 {what.removesuffix('s')}"


def check_fits(rule: str, asks: list[Ask], partition: str, nodes: list[Node]) -> None:
    """Raise one line naming the rule, its request, the partition's largest node and how to lower the
    request, unless some node of `partition` has all that the job asks."""
    if not nodes:
        raise MoaError(f"rule {rule} goes to SLURM partition {partition!r}, which has no nodes "
                       f"(`sinfo -p {partition}`); set slurm_partition to one that `sinfo -s` lists")
    if any(all(a.amount <= node.sizes[a.what] for a in asks) for node in nodes):
        return
    # The largest node: the one that has the most of the request (each resource's share of it, at most 1),
    # so that a GPU job is pointed at a GPU node, not told to do without GPUs.
    largest = max(nodes, key=lambda n: sum(min(n.sizes[a.what] / a.amount, 1) for a in asks if a.amount))
    lacking = [a for a in asks if a.amount > largest.sizes[a.what]]
    shown = [a for a in asks if a.what != GPUS or a.amount]  # GPUs only where the job asks for some
    asked = ", ".join(_amount(a.what, a.amount) for a in shown)
    has = ", ".join(_amount(a.what, largest.sizes[a.what]) for a in shown)
    settings: dict[str, list[str]] = {}
    for ask in lacking:
        settings.setdefault(ask.flag, []).append(ask.setting.format(largest.sizes[ask.what] // ask.per))
    fix = " ".join(f"{flag} {' '.join(values)}" for flag, values in settings.items())
    raise MoaError(f"rule {rule} asks for {asked} per job, but the largest node of SLURM partition {partition!r} "
                   f"({largest.name}) has {has}, so the job could never start; lower the request with {fix} "
                   f"(on the command line or in the profile)")


def check_jobs(jobs: Iterable[tuple[str, int, Mapping[str, Any]]]) -> None:
    """Check each (rule, threads, resources) job against the nodes of the partition it goes to: its
    slurm_partition, or else the cluster's default."""
    nodes: dict[str, list[Node]] = {}
    default = None
    for rule, threads, resources in jobs:
        if any(resources.get(key) for key in CLUSTER_KEYS):
            continue  # another cluster's nodes, which this cluster's sinfo does not list
        partition = str(resources.get("slurm_partition") or "")
        if not partition:
            default = partition = default or default_partition()
        if partition not in nodes:
            nodes[partition] = partition_nodes(partition)
        check_fits(rule, job_asks(rule, threads, resources), partition, nodes[partition])
