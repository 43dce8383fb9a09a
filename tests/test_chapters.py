"""Every chapter executes under the `smoke` profile on phantoms (the no-data path), and the
book renders from the result; tests/test_chapters_on_samples.py runs them on the real samples.

The chapters run in a copy of the project (notebooks, profiles, book pages) inside a temporary
folder, so each test session trains from scratch instead of loading earlier runs.
"""

import json
import shutil
from pathlib import Path

import pytest
from test_browser import check_book_in_browser

from cxr_lib.book.profiles import repo_root
from cxr_lib.book.runner import build_book, run_book

ROOT = repo_root()
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute_study(repo: Path, **roots: Path) -> Path:
    """Every chapter under `smoke` in a copy of the project at `repo` (phantoms unless the
    data roots are given)."""
    for folder in ("notebooks", "profiles", "book"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("chapters"))
    for name in ("_config.yml", "_toc.yml", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    run_book("smoke", repo=repo, **roots)
    return repo


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    return execute_study(tmp_path_factory.mktemp("study"))


def glued_text(outputs: list[dict]) -> dict[str, str]:
    """The values the chapter glued for its prose, by name."""
    return {o["metadata"]["scrapbook"]["name"]:
            o["data"].get("application/papermill.record/text/markdown", "")
            for o in outputs if "scrapbook" in o.get("metadata", {})}


def assert_reads_cleanly(nb: dict) -> list[dict]:
    """An executed chapter shows no error and no warning, and draws a figure; its outputs."""
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    stderr = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stderr")
    assert "Warning:" not in stderr, f"a warning reaches the reader: {stderr[:300]}"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the chapter draws no figure"
    return outputs


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executes_under_smoke_without_errors(executed, chapter):
    nb = json.loads((executed / "build" / "smoke" / "chapters" / f"{chapter}.ipynb").read_text())
    glued = set(glued_text(assert_reads_cleanly(nb)))
    markdown = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    quoted = {part.split("`")[1] for part in markdown.split("{glue:md}")[1:]}
    assert quoted <= glued, f"prose quotes values no cell glued: {quoted - glued}"


@pytest.fixture(scope="module")
def book(executed) -> Path:
    """index.html of the book rendered from the smoke run, built once for the tests below."""
    return build_book("smoke", repo=executed)


def test_book_renders_every_executed_chapter(book):
    html = book.parent
    assert book.is_file()
    for chapter in CHAPTERS:
        page = (html / "book" / "chapters" / f"{chapter}.html").read_text()
        assert "<img" in page and "Traceback" not in page


def test_book_loads_cleanly_in_a_browser(book):
    check_book_in_browser(book, CHAPTERS)
