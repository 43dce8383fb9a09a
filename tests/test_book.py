"""The runner (papermill) and the build (jupyter-book) on tiny throwaway chapters.

The repo's own _config.yml, _toc.yml and prose pages are copied into the throwaway project, so
the one jupyter-book build of this file also proves that the real prose pages and bibliography
render with zero warnings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from cxr_lib.book.profiles import ProfileError, repo_root
from cxr_lib.book.runner import (
    BookError,
    BuildError,
    ChapterError,
    build_book,
    filter_toc,
    read_toc,
    render_site,
    run_book,
    select_chapters,
    stage_site,
    toc_chapters,
)
from cxr_lib.cli import main

PARAMETERS = 'seed = 1\ngreeting = "default"\nprofile = None\nwork_dir = None'
REPORT = ('from pathlib import Path\n'
          'text = f"{seed} {greeting} {profile} {Path.cwd().name}"\n'
          'Path(work_dir, NAME + ".txt").write_text(text)\n'
          'print(text)')
# A progress bar as tqdm draws it: one flush per update, each after a carriage return; the
# cell prints its result, then the bar's closing newline arrives on its own.
PROGRESS = ('import sys, time\n'
            'for k in range(1, 4):\n'
            '    sys.stderr.write(f"\\rbar {k}/3"); sys.stderr.flush(); time.sleep(0.05)\n'
            'print("done", flush=True); time.sleep(0.05)\n'
            'sys.stderr.write("\\n"); sys.stderr.flush()')


def write_notebook(path: Path, title: str, *code: str) -> Path:
    """A chapter: a title, a cell tagged `parameters`, then the given code cells."""
    cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\nA tiny chapter."),
             nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
             *(nbformat.v4.new_code_cell(source) for source in code)]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    return path


def make_repo(root: Path, profile: str) -> Path:
    """A throwaway project: the real book configuration and prose, notebooks/, profiles/."""
    real = repo_root()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(real / name, root / name)
    (root / "book").mkdir()
    for name in ("intro.md", "setup.md", "performance.md", "references.bib"):
        shutil.copy2(real / "book" / name, root / "book" / name)
    (root / "profiles").mkdir()
    (root / "profiles" / "tiny.yaml").write_text(profile, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Two chapters named like the real first two, run once (publishing) for the whole module."""
    repo = make_repo(tmp_path_factory.mktemp("repo"),
                     "shared: {seed: 0, greeting: hello, data_root: null}\n"
                     "chapters:\n  02_mae_pretraining: {greeting: two}\n")
    write_notebook(repo / "notebooks" / "01_data_curation.ipynb", "Chapter one",
                   'NAME = "01"\n' + REPORT, PROGRESS)
    write_notebook(repo / "notebooks" / "02_mae_pretraining.ipynb", "Chapter two",
                   'NAME = "02"\n' + REPORT)
    return repo, run_book("tiny", repo=repo, publish=True)


def test_parameters_arrive_merged_with_profile_work_dir_and_notebooks_as_cwd(executed):
    repo, _ = executed
    work = repo / "build" / "tiny"
    assert (work / "01.txt").read_text() == "0 hello tiny notebooks"
    assert (work / "02.txt").read_text() == "0 two tiny notebooks"


def test_executed_notebooks_land_in_build_and_in_book_when_published(executed):
    repo, paths = executed
    out = repo / "build" / "tiny" / "chapters"
    assert paths == [out / "01_data_curation.ipynb", out / "02_mae_pretraining.ipynb"]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]
    notebook = nbformat.read(paths[1], as_version=4)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert 'greeting = "two"' in injected[0].source
    assert notebook.cells[-1].outputs[0]["text"] == "0 two tiny notebooks\n"
    published = repo / "book" / "chapters"
    assert sorted(p.name for p in published.iterdir()) == [p.name for p in paths]


def test_a_progress_bar_shows_once_in_its_last_state(executed):
    _, paths = executed
    outputs = nbformat.read(paths[0], as_version=4).cells[-1].outputs
    assert [(o.output_type, o.name, o.text) for o in outputs] == [
        ("stream", "stderr", "bar 3/3"), ("stream", "stdout", "done\n")]


def test_published_notebooks_name_paths_relative_to_the_project(executed):
    repo, paths = executed
    notebook = nbformat.read(repo / "book" / "chapters" / paths[1].name, as_version=4)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert 'work_dir = "../build/tiny"' in injected[0].source
    record = notebook.metadata["papermill"]
    assert record["input_path"] == "notebooks/02_mae_pretraining.ipynb"
    assert record["output_path"] == "build/tiny/chapters/02_mae_pretraining.running.ipynb"
    assert str(repo) not in (repo / "book" / "chapters" / paths[1].name).read_text()


def test_failing_chapter_names_chapter_and_cell_and_keeps_good_output(tmp_path, capsys):
    repo = make_repo(tmp_path, "shared: {greeting: hi}\n")
    write_notebook(repo / "notebooks" / "01_ok.ipynb", "OK", 'NAME = "ok"\n' + REPORT)
    flaky = repo / "notebooks" / "02_flaky.ipynb"
    write_notebook(flaky, "Flaky", "value = 1")
    run_book("tiny", repo=repo, chapters=["02_flaky"])
    out = repo / "build" / "tiny" / "chapters"
    good = (out / "02_flaky.ipynb").read_bytes()

    write_notebook(flaky, "Flaky", "value = 1 / 0")
    with pytest.raises(ChapterError) as err:
        run_book("tiny", repo=repo)
    progress = capsys.readouterr().out
    assert "[1/2] 01_ok done after" in progress and "[2/2] 02_flaky failed after" in progress
    message = str(err.value)
    assert "chapter 02_flaky failed in cell 3 (In [3]: value = 1 / 0)" in message
    assert "ZeroDivisionError" in message and "02_flaky.failed.ipynb" in message
    assert (out / "01_ok.ipynb").is_file()
    assert (out / "02_flaky.ipynb").read_bytes() == good
    failed = json.loads((out / "02_flaky.failed.ipynb").read_text())
    assert failed["cells"][-1]["outputs"][0]["ename"] == "ZeroDivisionError"
    assert not list(out.glob("*.running.ipynb"))
    assert not (repo / "book" / "chapters").exists()


def test_build_refuses_a_chapter_whose_last_run_failed_until_it_succeeds(tmp_path, monkeypatch):
    """The older good copy of a chapter that then failed must not be rendered as current, nor
    published."""
    repo = make_repo(tmp_path, "shared: {greeting: hi}\n")
    chapter = repo / "notebooks" / "01_data_curation.ipynb"
    write_notebook(chapter, "One", "value = 1")
    run_book("tiny", repo=repo)
    write_notebook(chapter, "One", "value = 1 / 0")
    with pytest.raises(ChapterError):
        run_book("tiny", repo=repo, publish=True)
    assert not (repo / "book" / "chapters").exists()
    out = repo / "build" / "tiny" / "chapters"
    assert (out / "01_data_curation.ipynb").is_file()  # the older good run, kept to compare
    monkeypatch.setattr("cxr_lib.book.runner.repo_root", lambda: repo)
    with pytest.raises(SystemExit, match=(
            r"^cxr: error: the last run of chapter 01_data_curation failed \(\S*/build/tiny/"
            r"chapters/01_data_curation\.failed\.ipynb\): fix it and run `cxr book run "
            r"--profile tiny --chapters 01_data_curation`.*\(BookError at runner\.py:\d+\)$")):
        main(["book", "build", "--profile", "tiny"])
    write_notebook(chapter, "One", "value = 2")
    run_book("tiny", repo=repo)
    assert not (out / "01_data_curation.failed.ipynb").exists()
    assert stage_site(repo, out, tmp_path / "site") == ["01_data_curation"]


def test_build_refuses_a_chapter_whose_run_was_killed(tmp_path, monkeypatch):
    """kill -9 of `cxr book run` mid-chapter leaves <stem>.running.ipynb: the older good copy
    must not be rendered as current either."""
    repo = make_repo(tmp_path, "shared: {greeting: hi}\n")
    chapter = repo / "notebooks" / "01_data_curation.ipynb"
    write_notebook(chapter, "One", "value = 1")
    run_book("tiny", repo=repo)
    write_notebook(chapter, "One", "import time\ntime.sleep(120)")
    script = f"from cxr_lib.book.runner import run_book; run_book('tiny', repo={str(repo)!r})"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    out = repo / "build" / "tiny" / "chapters"
    running = out / "01_data_curation.running.ipynb"
    deadline = time.monotonic() + 120
    while not running.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its kernel, as a kill -9 of the job
    proc.wait()
    monkeypatch.setattr("cxr_lib.book.runner.repo_root", lambda: repo)
    with pytest.raises(SystemExit, match=r"^cxr: error: the last run of chapter "
                       r"01_data_curation did not finish \(killed, or still running\)"):
        main(["book", "build", "--profile", "tiny"])
    write_notebook(chapter, "One", "value = 2")
    run_book("tiny", repo=repo)
    assert not running.exists()
    assert stage_site(repo, out, tmp_path / "site") == ["01_data_curation"]


def test_missing_data_folder_fails_before_any_chapter_runs(tmp_path):
    repo = make_repo(tmp_path, "shared: {data_root: null}\n")
    write_notebook(repo / "notebooks" / "01_ok.ipynb", "OK", "pass")
    with pytest.raises(ProfileError, match=r"--data-root: the folder .*nowhere does not exist"):
        run_book("tiny", repo=repo, data_root=tmp_path / "nowhere")
    (repo / "profiles" / "tiny.yaml").write_text("shared: {pediatric_root: ../kids}\n")
    with pytest.raises(ProfileError, match=r"tiny\.yaml: shared\.pediatric_root: the folder"):
        run_book("tiny", repo=repo)
    assert not (repo / "build").exists()


def test_chapters_are_picked_by_number_or_name_in_reading_order():
    notebooks = [Path(f"nb/{stem}.ipynb") for stem in ("01_a", "02_b", "10_c")]
    assert select_chapters(notebooks, None) == notebooks
    assert select_chapters(notebooks, ["10_c", 1]) == [notebooks[0], notebooks[2]]
    assert select_chapters(notebooks, ["02", "notebooks/02_b.ipynb"]) == [notebooks[1]]
    with pytest.raises(ProfileError, match=r"no chapter '3'; chapters: 01_a, 02_b, 10_c"):
        select_chapters(notebooks, ["3"])


def test_chapters_may_be_separated_by_commas_as_well_as_spaces(monkeypatch):
    notebooks = [Path(f"nb/{stem}.ipynb") for stem in ("01_a", "02_b", "10_c")]
    assert select_chapters(notebooks, ["1,2"]) == notebooks[:2]
    assert select_chapters(notebooks, ["10_c, 1", "2"]) == notebooks
    with pytest.raises(ProfileError, match=r"no chapter '3'"):
        select_chapters(notebooks, ["1,3"])
    ran = []
    monkeypatch.setattr("cxr_lib.book.runner.run_chapter",
                        lambda nb, parameters, out: ran.append(nb.stem))
    main(["book", "run", "--profile", "smoke", "--chapters", "1,2", "4"])
    assert ran == ["01_data_curation", "02_mae_pretraining", "04_finetuning_ablations"]


def test_toc_filter_keeps_present_chapters_and_drops_empty_parts():
    toc = read_toc(repo_root() / "_toc.yml")
    assert toc_chapters(toc)[:2] == ["01_data_curation", "02_mae_pretraining"]
    some = filter_toc(toc, {"02_mae_pretraining"})
    assert toc_chapters(some) == ["02_mae_pretraining"]
    assert [part["caption"] for part in some["parts"]] == ["Getting started", "Chapters"]
    none = filter_toc(toc, set())
    assert toc_chapters(none) == [] and [p["caption"] for p in none["parts"]] == ["Getting started"]
    assert toc["parts"][1]["chapters"][0] == {"file": "book/chapters/01_data_curation"}


def test_staging_the_published_edition_uses_book_chapters(executed, tmp_path):
    repo, _ = executed
    staged = stage_site(repo, repo / "book" / "chapters", tmp_path / "site")
    assert staged == ["01_data_curation", "02_mae_pretraining"]
    assert sorted(p.name for p in (tmp_path / "site" / "book").iterdir()) == [
        "chapters", "intro.md", "performance.md", "references.bib", "setup.md"]
    assert toc_chapters(yaml.safe_load((tmp_path / "site" / "_toc.yml").read_text())) == staged


def test_building_without_executed_chapters_says_how_to_run_them(executed):
    repo, _ = executed
    with pytest.raises(BookError, match=r"run `cxr book run --profile other` first"):
        build_book("other", repo=repo)


def test_build_renders_only_the_present_chapters_with_zero_warnings(executed):
    repo, _ = executed
    index = build_book("tiny", repo=repo)
    site = repo / "build" / "tiny" / "site"
    assert index == site / "_build" / "html" / "index.html" and index.is_file()
    toc = yaml.safe_load((site / "_toc.yml").read_text())
    assert toc_chapters(toc) == ["01_data_curation", "02_mae_pretraining"]
    html = site / "_build" / "html" / "book"
    assert "0 two tiny notebooks" in (html / "chapters" / "02_mae_pretraining.html").read_text()
    intro = (html / "intro.html").read_text()
    assert "Delving into masked autoencoders" in intro and "chest X-ray database" in intro


def test_a_warning_fails_the_build_and_the_error_shows_it(tmp_path, monkeypatch):
    """jupyter-book itself is run once above; here its failure is faked to check the report."""
    log = ("\x1b[01mreading sources...\x1b[39;49;00m\n"
           "\x1b[91m/site/book/intro.md:3: WARNING: unknown document: 'nope'\x1b[39;49;00m\n"
           + "writing output...\n" * 50 + "build finished with problems, 1 warning.\n")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout=log)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(BuildError) as err:
        render_site(tmp_path)
    message = str(err.value)
    assert "intro.md:3: WARNING: unknown document: 'nope'" in message
    assert "build finished with problems" in message and "\x1b" not in message
    assert {"--warningiserror", "--keep-going", "--all"} <= set(calls[0])
