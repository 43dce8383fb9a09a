"""environment.yml (conda) installs exactly the dependencies pyproject.toml declares."""

from __future__ import annotations

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from cxr_lib.book.profiles import repo_root

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")


def requirements(lines: list[str]) -> dict[str, SpecifierSet]:
    """Normalised name -> version specifiers, so `PyYAML>=6` and `pyyaml >= 6` compare equal."""
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(req.name): req.specifier for req in parsed}


def pyproject() -> dict:
    return tomllib.loads((repo_root() / "pyproject.toml").read_text(encoding="utf-8"))


def conda_environment() -> dict:
    return yaml.safe_load((repo_root() / "environment.yml").read_text(encoding="utf-8"))


def pip_section(env: dict) -> list[str]:
    sections = [item["pip"] for item in env["dependencies"] if isinstance(item, dict)]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_environment_lists_the_same_dependencies_and_versions_as_pyproject():
    project = pyproject()["project"]
    declared = requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    listed = requirements([line for line in pip_section(conda_environment())
                           if not line.startswith("-e")])
    assert listed == declared


def test_environment_installs_the_project_itself_with_its_dev_extra():
    assert "-e .[dev]" in pip_section(conda_environment())


def test_environment_python_satisfies_requires_python():
    conda = [item for item in conda_environment()["dependencies"] if isinstance(item, str)]
    python = [item.split("=", 1)[1] for item in conda if item.startswith("python=")]
    assert python, "environment.yml pins no python version"
    assert "pip" in conda
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python[0] + ".0")
