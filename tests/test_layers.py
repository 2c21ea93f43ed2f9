"""The architecture is checked, not hoped for: pyproject.toml's import-linter contracts hold (layers that only
point down, training never imported by inference) and no moa module imports itself through others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_contracts() -> None:
    run = subprocess.run([Path(sys.executable).with_name("lint-imports"), "--no-logo", "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_import_cycle() -> None:
    """Every import counts, those inside functions too (grimp reads them all)."""
    graph = grimp.build_graph("moa", cache_dir=None)
    cyclic = sorted(module for module in graph.modules
                    if any(graph.chain_exists(importer=imported, imported=module)
                           for imported in graph.find_modules_directly_imported_by(module)))
    assert not cyclic, f"modules on an import cycle: {', '.join(cyclic)}"
