"""Session fixture `slurm_cluster`: a real single-node SLURM cluster, started by scripts/slurm-cluster.sh.

Root (as in CI) starts the cluster, installing slurm-wlm and munge with apt-get if they are missing,
and stops it at the end of the session. A cluster that is already up is used as it is and left running.
Without root a cluster that is not up cannot be started, so the tests that need it are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    state_dir: Path


def _script(action: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), action], check=False, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster("debug", Path(os.environ.get("MOA_SLURM_DIR", "/tmp/moa-slurm")))
    if shutil.which("sinfo") and _script("status", 30).returncode == 0:
        yield cluster  # someone else's cluster (or one left running): use it, do not stop it
        return
    if os.geteuid() != 0:
        if not shutil.which("slurmctld"):
            pytest.skip("SLURM is not installed and installing it (apt-get) needs root")
        pytest.skip("no SLURM cluster is up and starting one (scripts/slurm-cluster.sh start) needs root")
    # Generous: a first start may apt-get install slurm-wlm and munge.
    started = _script("start", 900)
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm-cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield cluster
    finally:
        _script("stop", 60)
