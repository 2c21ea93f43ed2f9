"""environment.yml and pyproject.toml declare the same dependencies; environment.yml installs this checkout."""

from __future__ import annotations

import email.parser
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {_name(r) for r in project["dependencies"] + extras["test"] + extras["lm-eval"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == declared
    assert "python=3.11" in env["dependencies"]


def test_environment_installs_the_checkout_it_lies_in() -> None:
    """conda runs pip in the environment file's folder: `-e .` is the project there, the repository root."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert [r for r in pip if r.startswith("-e")] == ["-e ."]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == "moa"  # what `.` is there


def test_metadata_builds_without_deprecation_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pip install -e .` asks setuptools first; a license as a TOML table warned there (deprecated)."""
    from setuptools import build_meta
    from setuptools.warnings import SetuptoolsDeprecationWarning

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetuptoolsDeprecationWarning)
        dist_info = build_meta.prepare_metadata_for_build_wheel(str(tmp_path))
    metadata = email.parser.Parser().parsestr((tmp_path / dist_info / "METADATA").read_text())
    assert metadata["Name"] == "moa" and metadata["License-Expression"] == "Apache-2.0"
