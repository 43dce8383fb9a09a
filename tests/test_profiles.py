"""Profiles: loading by name or path, merging, ${VARIABLE} expansion, and clear errors."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import papermill
import pytest

from cxr_lib.book.profiles import ProfileError, available_profiles, load_profile, repo_root
from cxr_lib.data.samples import SHIPPED

SHARED_KEYS = {"seed", "device", "data_root", "pediatric_root", "n_phantoms", "phantom_size",
               "cache_size"}


def notebook_parameters(stem: str) -> set[str]:
    """The names assigned in a chapter's `parameters` cell."""
    nb = nbformat.read(repo_root() / "notebooks" / f"{stem}.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    tree = ast.parse(cell.source)
    return ({t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
            | {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A throwaway project with two (empty) chapter notebooks and a profiles folder."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "profiles").mkdir()
    for stem in ("01_alpha", "02_beta"):
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / "notebooks" / f"{stem}.ipynb")
    return tmp_path


def write_profile(repo: Path, name: str, text: str) -> Path:
    path = repo / "profiles" / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_chapter_section_wins_over_shared_and_runner_adds_profile_and_work_dir(repo, tmp_path):
    write_profile(repo, "p", "shared: {seed: 3, size: 64, data_root: null}\n"
                             "chapters:\n  01_alpha: {size: 32, only_here: true}\n")
    profile = load_profile("p", repo=repo)
    notebooks = repo / "notebooks"
    first = profile.parameters(notebooks / "01_alpha.ipynb", repo / "build" / "p")
    second = profile.parameters(notebooks / "02_beta.ipynb", tmp_path.parent / "elsewhere")
    assert first == {"seed": 3, "size": 32, "only_here": True, "data_root": None,
                     "profile": "p", "work_dir": "../build/p"}
    assert second["size"] == 64 and "only_here" not in second
    # relative to the notebook's folder, where papermill runs it: no machine's path in the book
    assert not Path(second["work_dir"]).is_absolute()
    assert (notebooks / second["work_dir"]).resolve() == (tmp_path.parent / "elsewhere").resolve()


def test_a_profile_loads_by_name_or_by_path(repo):
    path = write_profile(repo, "mine", "shared: {seed: 1}\n")
    by_name, by_path = load_profile("mine", repo=repo), load_profile(path, repo=repo)
    assert by_name == by_path
    assert by_name.name == "mine" and by_name.path == path and by_name.chapters == {}
    assert load_profile(str(path), repo=repo).shared == {"seed": 1}


def test_unknown_profile_name_lists_the_known_ones(repo):
    write_profile(repo, "known", "shared: {}\n")
    with pytest.raises(ProfileError, match=r"no profile named 'nope'.*known: known"):
        load_profile("nope", repo=repo)


def test_unknown_top_level_key_is_an_error_naming_the_file(repo):
    path = write_profile(repo, "bad", "shared: {}\nchapter: {}\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml: unknown top-level key\(s\) chapter"):
        load_profile(path, repo=repo)


def test_section_for_a_missing_notebook_is_an_error_naming_file_and_chapter(repo):
    write_profile(repo, "typo", "chapters:\n  01_alhpa: {n: 1}\n")
    with pytest.raises(ProfileError) as err:
        load_profile("typo", repo=repo)
    message = str(err.value)
    assert "typo.yaml" in message and "chapters.01_alhpa" in message
    assert "01_alpha, 02_beta" in message


@pytest.mark.parametrize("text, expected", [
    ("shared: [1, 2]\n", r"shared must be a mapping"),
    ("chapters:\n  01_alpha: 5\n", r"chapters\.01_alpha must be a mapping"),
    ("shared: {not-a-name: 1}\n", r"'not-a-name' is not a valid Python identifier"),
    ("shared: {work_dir: /tmp}\n", r"shared\.work_dir: 'work_dir' is set by the runner"),
    ("shared: {seed: [1\n", r"not valid YAML"),
    ("- just a list\n", r"the top level must be a mapping"),
    ("shared: {data_root: 5}\n", r"shared\.data_root must be a path or null"),
])
def test_malformed_profiles_are_errors_naming_the_file(repo, text, expected):
    write_profile(repo, "broken", text)
    with pytest.raises(ProfileError, match=r"broken\.yaml: .*" + expected):
        load_profile("broken", repo=repo)


def test_environment_variables_are_expanded_recursively(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CXR_TEST_WORD", "hello")
    write_profile(repo, "env", "shared:\n  data_root: ${CXR_TEST_DATA}/nih\n"
                               "  words: ['${CXR_TEST_WORD}', {deep: 'x${CXR_TEST_WORD}'}]\n"
                               "chapters:\n  01_alpha: {note: '${CXR_TEST_WORD} world'}\n")
    profile = load_profile("env", repo=repo)
    assert profile.shared["data_root"] == str((tmp_path / "data" / "nih").resolve())
    assert profile.shared["words"] == ["hello", {"deep": "xhello"}]
    assert profile.chapters["01_alpha"]["note"] == "hello world"


def test_unset_variable_says_what_to_set_or_pass(repo, monkeypatch):
    monkeypatch.delenv("CXR_TEST_UNSET", raising=False)
    write_profile(repo, "env", "shared: {data_root: '${CXR_TEST_UNSET}/nih'}\n")
    with pytest.raises(ProfileError) as err:
        load_profile("env", repo=repo)
    message = str(err.value)
    assert "env.yaml: shared.data_root" in message
    assert "set CXR_TEST_UNSET or pass --data-root" in message


def test_override_wins_and_makes_the_variable_unneeded(repo, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_TEST_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    write_profile(repo, "env", "shared:\n  data_root: ${CXR_TEST_UNSET}/nih\n  pediatric_root:\n")
    overrides = {"data_root": "mine", "pediatric_root": None}
    profile = load_profile("env", repo=repo, overrides=overrides)
    assert profile.shared["data_root"] == str((tmp_path / "mine").resolve())
    assert profile.shared["pediatric_root"] is None


def test_relative_root_in_a_profile_is_relative_to_the_profile_file(repo):
    write_profile(repo, "rel", "shared: {data_root: ../data, pediatric_root: ~/kids}\n")
    profile = load_profile("rel", repo=repo)
    assert profile.shared["data_root"] == str((repo / "data").resolve())
    assert profile.shared["pediatric_root"] == str((Path.home() / "kids").resolve())


# The shipped profiles.

def test_repo_root_is_the_checkout_with_the_shipped_profiles():
    root = repo_root()
    assert (root / "pyproject.toml").is_file()
    assert available_profiles() == ["cpu", "gpu-sample", "paper", "smoke"]


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu-sample", "paper"])
def test_shipped_profiles_pass_only_parameters_the_chapters_declare(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SAMPLE_DATA", str(tmp_path))
    monkeypatch.setenv("CXR_NIH_ROOT", str(tmp_path / "nih"))
    profile = load_profile(name)
    assert SHARED_KEYS <= set(profile.shared)
    assert {"01_data_curation", "02_mae_pretraining"} <= set(profile.chapters)
    for stem in profile.chapters:
        passed = set(profile.parameters(stem, tmp_path / "work"))
        assert passed <= notebook_parameters(stem), (stem, passed - notebook_parameters(stem))
    params = profile.parameters("01_data_curation", tmp_path / "work")
    assert params["profile"] == name and params["device"] == "auto"


def test_gpu_sample_reads_the_shipped_samples_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_SAMPLE_DATA", raising=False)
    shared = load_profile("gpu-sample").shared
    assert shared["data_root"] == str(SHIPPED / "nih-cxr14-sample")
    assert shared["pediatric_root"] == str(SHIPPED / "pediatric-pneumonia-sample")
    assert len(list(Path(shared["data_root"], "images").glob("*.png"))) == 621
    monkeypatch.setenv("CXR_SAMPLE_DATA", str(tmp_path))
    shared = load_profile("gpu-sample").shared
    assert shared["data_root"] == str(tmp_path / "nih-cxr14-sample")
    assert shared["pediatric_root"] == str(tmp_path / "pediatric-pneumonia-sample")


def test_a_variable_without_a_default_is_explained(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_NIH_ROOT", raising=False)
    with pytest.raises(ProfileError, match=r"uses \$\{CXR_NIH_ROOT\}, which is not set: set "
                       r"CXR_NIH_ROOT or pass --data-root"):
        load_profile("paper")


def test_shipped_profiles_grow_from_smoke_to_paper(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SAMPLE_DATA", str(tmp_path))
    monkeypatch.setenv("CXR_NIH_ROOT", str(tmp_path))
    profiles = [load_profile(name) for name in ("smoke", "cpu", "gpu-sample", "paper")]
    sizes = [p.chapters["02_mae_pretraining"]["image_size"] for p in profiles]
    caches = [p.shared["cache_size"] for p in profiles]
    assert sizes == sorted(sizes) and caches == sorted(caches)
    # only the tests' smoke profile runs on phantoms; the editions read real X-rays
    assert profiles[0].shared["data_root"] is None
    for edition in profiles[1:3]:
        assert edition.shared["data_root"] == str(tmp_path / "nih-cxr14-sample")
        assert edition.shared["pediatric_root"] == str(tmp_path / "pediatric-pneumonia-sample")


NOTEBOOKS = sorted((repo_root() / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("stem", [p.stem for p in NOTEBOOKS])
def test_papermill_parses_every_parameter_a_chapter_declares(stem):
    seen = set(papermill.inspect_notebook(str(repo_root() / "notebooks" / f"{stem}.ipynb")))
    assert seen == notebook_parameters(stem)


def test_the_paper_profile_takes_xiao_et_als_settings_and_the_small_ones_keep_one_channel(
        monkeypatch):
    """Their MAE batch (256 x 8 GPUs), MoCo's head width, their RGB input and evaluation view."""
    monkeypatch.setenv("CXR_NIH_ROOT", "/data/ChestX-ray14")
    paper = load_profile("paper").chapters
    mae = paper["02_mae_pretraining"]
    assert mae["batch_size"] == 2048 and mae["base_lr"] * mae["batch_size"] / 256 == 1.2e-3
    assert paper["03_moco_baselines"]["hidden_dim"] is None  # the backbone's width
    assert paper["04_finetuning_ablations"]["eval_crop"] == 224 / 256
    for chapter in ("02_mae_pretraining", "03_moco_baselines", "04_finetuning_ablations"):
        assert paper[chapter]["in_chans"] == 3
        for small in ("smoke", "cpu"):
            assert "in_chans" not in load_profile(small).chapters[chapter]  # the default, 1


def test_a_data_root_inside_the_project_is_named_from_the_notebooks_folder(repo, tmp_path):
    inside, outside = repo / "cxr_lib" / "data" / "samples" / "nih", tmp_path.parent / "nih"
    write_profile(repo, "p", f"shared: {{data_root: {inside}, pediatric_root: {outside}}}\n")
    params = load_profile("p", repo=repo).parameters(repo / "notebooks" / "01_alpha.ipynb",
                                                     repo / "build" / "p")
    assert params["data_root"] == "../cxr_lib/data/samples/nih"  # no machine's folder
    assert params["pediatric_root"] == str(outside)  # outside the project: as given
