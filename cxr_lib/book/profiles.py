"""Profiles: one YAML file of papermill parameters per scale of the study (smoke ... paper).

A profile is the only thing that differs between a two-minute smoke run and the paper's
recipes: the same notebooks receive different parameters. The file has two sections,

    shared:    parameters every chapter receives (seed, device, data roots, image size)
    chapters:  one mapping per chapter stem (e.g. 01_data_curation) with its own parameters

and a chapter's parameters are shared ∪ its section (the chapter wins), plus `profile` and
`work_dir`, which the runner fills in. String values may use `${VARIABLE}` to read the
environment, so a profile can point at data whose location differs between machines;
`${CXR_SAMPLE_DATA}` defaults to the real samples shipped with the package.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cxr_lib.data.core import DataError
from cxr_lib.data.samples import samples_root

TOP_LEVEL_KEYS: tuple[str, ...] = ("shared", "chapters")
# Filled in by the runner for every chapter; a profile may not set them.
RESERVED_KEYS: tuple[str, ...] = ("profile", "work_dir")
# Shared keys that hold data set folders: given on the command line as --data-root etc.
ROOT_KEYS: tuple[str, ...] = ("data_root", "pediatric_root")

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Variables with a value when the environment has none
DEFAULTS = {"CXR_SAMPLE_DATA": lambda: str(samples_root())}


class ProfileError(DataError):
    """A profile (or a path given to the runner) is wrong. The message names the file and key.

    A DataError, so the `cxr` command line reports it in one line instead of a traceback.
    """


@dataclass(frozen=True)
class Profile:
    """A loaded profile: shared parameters, per-chapter parameters, and the file they came from."""

    name: str
    shared: dict[str, Any]
    chapters: dict[str, dict[str, Any]]
    path: Path

    def parameters(self, notebook: str | Path, work_dir: str | Path) -> dict[str, Any]:
        """The papermill parameters of one chapter notebook: shared ∪ its section, plus `profile`
        and `work_dir`. Papermill runs the notebook from its own folder, so `work_dir` is given
        relative to that folder (e.g. ../build/cpu): an executed chapter names no machine's path."""
        notebook = Path(notebook)
        params = {**self.shared, **self.chapters.get(notebook.stem, {})}
        where = os.path.relpath(Path(work_dir).resolve(), notebook.parent.resolve())
        params.update(profile=self.name, work_dir=Path(where).as_posix())
        # a data root inside the project (the shipped samples) is named from the notebook's
        # folder too, so that the edition shows ../cxr_lib/data/samples/..., not this machine
        project = notebook.parent.resolve().parent
        for key, value in params.items():
            if key.endswith("_root") and isinstance(value, str) and Path(value).is_absolute():
                if Path(value).resolve().is_relative_to(project):
                    params[key] = Path(os.path.relpath(Path(value).resolve(),
                                                       notebook.parent.resolve())).as_posix()
        return params


def repo_root() -> Path:
    """The project checkout this package was installed from (editable install): the nearest
    folder above this file that holds both pyproject.toml and profiles/."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file() and (folder / "profiles").is_dir():
            return folder
    raise ProfileError(
        f"cannot find the project checkout (a folder with pyproject.toml and profiles/) above "
        f"{here}: install the project with `pip install -e .` from its checkout"
    )


def available_profiles(repo: Path | None = None) -> list[str]:
    """Names of the profiles shipped in the repo's profiles/ folder."""
    folder = (repo or repo_root()) / "profiles"
    return sorted(path.stem for path in folder.glob("*.yaml"))


def load_profile(
    name_or_path: str | Path,
    *,
    repo: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Profile:
    """Load and validate a profile by name (profiles/<name>.yaml of the repo) or by YAML path.

    `overrides` replace shared values before `${VARIABLE}`s are expanded, so a value given on
    the command line (e.g. data_root) wins over, and does not need, the profile's variable.
    """
    repo = Path(repo).resolve() if repo is not None else repo_root()
    path = _profile_path(name_or_path, repo)
    raw = _read_yaml(path)
    shared = dict(_section(raw, "shared", path))
    shared.update({key: value for key, value in (overrides or {}).items() if value is not None})
    sections = _section(raw, "chapters", path)
    chapters = {str(stem): dict(_section(sections, stem, path, prefix="chapters."))
                for stem in sections}
    _check_names(path, "shared", shared)
    for stem, params in chapters.items():
        _check_names(path, f"chapters.{stem}", params)
    _check_chapters_exist(path, chapters, repo / "notebooks")
    shared = {key: _expand(value, path, f"shared.{key}") for key, value in shared.items()}
    chapters = {stem: {key: _expand(value, path, f"chapters.{stem}.{key}")
                       for key, value in params.items()}
                for stem, params in chapters.items()}
    shared.update(_absolute_roots(shared, path, given=overrides or {}))
    return Profile(name=path.stem, shared=shared, chapters=chapters, path=path)


def _profile_path(name_or_path: str | Path, repo: Path) -> Path:
    """A bare name means profiles/<name>.yaml of the repo; anything with a suffix or a slash is a
    path to a YAML file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(name_or_path).expanduser().resolve()
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return path
    path = repo / "profiles" / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(repo)) or "none"
        raise ProfileError(f"no profile named {text!r} ({path} does not exist); known: {known}")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    """Parse the file and check its top level: a mapping with only `shared` and `chapters`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: the top level must be a mapping with keys "
                           f"{', '.join(TOP_LEVEL_KEYS)}")
    unknown = sorted(str(key) for key in raw if key not in TOP_LEVEL_KEYS)
    if unknown:
        raise ProfileError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
                           f"expected only {', '.join(TOP_LEVEL_KEYS)}")
    return raw


def _section(raw: Mapping[str, Any], key: str, path: Path, prefix: str = "") -> Mapping[str, Any]:
    """One mapping of parameters (missing or empty means none)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"{path}: {prefix}{key} must be a mapping of parameter names to "
                           f"values, not {type(value).__name__}")
    return value


def _check_names(path: Path, where: str, params: Mapping[str, Any]) -> None:
    """Parameter names become Python variables in the notebook, so they must be identifiers."""
    for key in params:
        if not isinstance(key, str) or not key.isidentifier():
            raise ProfileError(f"{path}: {where}: parameter name {key!r} is not a valid Python "
                               f"identifier")
        if key in RESERVED_KEYS:
            raise ProfileError(f"{path}: {where}.{key}: {key!r} is set by the runner, not by a "
                               f"profile")


def _check_chapters_exist(path: Path, chapters: Mapping[str, Any], notebooks: Path) -> None:
    """A section for a chapter that does not exist is a typo that would silently do nothing."""
    present = sorted(nb.stem for nb in notebooks.glob("*.ipynb"))
    for stem in chapters:
        if stem not in present:
            raise ProfileError(f"{path}: chapters.{stem}: there is no notebook "
                               f"{notebooks / (stem + '.ipynb')}; chapters: "
                               f"{', '.join(present) or 'none'}")


def _expand(value: Any, path: Path, where: str) -> Any:
    """Replace ${VARIABLE} in strings (recursively in lists and mappings) from the environment;
    an unset variable without a default is an error that says how to set it or what to pass
    instead."""
    if isinstance(value, dict):
        return {key: _expand(item, path, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, path, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    for variable in _VARIABLE.findall(value):
        if variable not in os.environ and variable not in DEFAULTS:
            key = where.rsplit(".", 1)[-1]
            option = f" or pass --{key.replace('_', '-')}" if key in ROOT_KEYS else ""
            raise ProfileError(f"{path}: {where} = {value!r} uses ${{{variable}}}, which is not "
                               f"set: set {variable}{option}")
    return _VARIABLE.sub(lambda match: _variable(match.group(1)), value)


def _variable(name: str) -> str:
    return os.environ[name] if name in os.environ else DEFAULTS[name]()


def _absolute_roots(shared: Mapping[str, Any], path: Path,
                    given: Mapping[str, Any]) -> dict[str, str]:
    """Data roots as absolute paths: notebooks run from notebooks/, so a relative path would
    point somewhere else. Relative roots in the profile are relative to the profile's folder;
    roots given as overrides (the command line) are relative to the current directory."""
    roots = {}
    for key in ROOT_KEYS:
        value = shared.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, Path)):
            raise ProfileError(f"{path}: shared.{key} must be a path or null, not {value!r}")
        base = Path.cwd() if given.get(key) is not None else path.parent
        roots[key] = str((base / Path(value).expanduser()).resolve())
    return roots
