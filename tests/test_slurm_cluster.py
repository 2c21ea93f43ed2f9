"""workflow/profiles/slurm on a real single-node SLURM cluster: jobs really go through sbatch and
their status comes from squeue (the test cluster has no accounting, so sacct could not answer)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# tests/ has no __init__.py: pytest puts tests/ itself on sys.path, not the repository root, so make
# `tests.slurm` importable however pytest was started (`python -m pytest` already has the root).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.slurm import slurm_cluster  # noqa: F401  (the fixture, used through usefixtures below)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SNAKEFILE = textwrap.dedent(
    """
    rule all:
        input: "a.txt", "b.txt"

    rule a:
        output: "a.txt"
        log: "logs/a.log"
        resources: mem_mb=100, runtime=5
        shell: "echo job=$SLURM_JOB_ID host=$(hostname) > {output}; echo a done > {log}"

    # b reads a's output: the second job sees what the first one wrote.
    rule b:
        input: "a.txt"
        output: "b.txt"
        log: "logs/b.log"
        resources: mem_mb=100, runtime=5
        shell: "cat {input} > {output}; echo job=$SLURM_JOB_ID host=$(hostname) >> {output}; echo b done > {log}"
    """
)


def test_profile_runs_jobs_under_slurm(tmp_path: Path) -> None:
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail("snakemake-executor-plugin-slurm is not installed; the slurm profile needs it")
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--workflow-profile", "none",
        "--snakefile", str(tmp_path / "Snakefile"),
        "--directory", str(tmp_path),
        # Poll every second instead of the plugin's default 40 s.
        "--slurm-init-seconds-before-status-checks", "1",
        "--seconds-between-status-checks", "1",
        "--latency-wait", "5",
        # --verbose makes the plugin log which command it used for status queries.
        "--verbose",
    ]
    run = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    job_ids = []
    for name, lines in (("a.txt", 1), ("b.txt", 2)):
        text = (tmp_path / name).read_text()
        ids = re.findall(r"job=(\d+) host=\S+", text)
        assert len(ids) == lines, f"{name} has no SLURM job id, so it did not run under SLURM:\n{text}"
        job_ids.append(ids[-1])
    assert job_ids[0] != job_ids[1], "a and b ran in one SLURM job"
    assert (tmp_path / "logs" / "b.log").read_text().strip() == "b done"

    # Status came from squeue, never from sacct (no accounting on this cluster).
    assert "command=squeue" in log, log[-6000:]
    assert "Falling back to 'sacct'" not in log
    queue = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs", ",".join(job_ids)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert sorted(queue.split()) == sorted(f"{j}|COMPLETED" for j in job_ids)
