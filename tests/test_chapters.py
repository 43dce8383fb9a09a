"""Every chapter executes under the `smoke` profile, and the book renders from the result.

The chapters run in a copy of the project (notebooks, profiles, book pages) inside a temporary
folder, so each test session trains from scratch instead of loading earlier runs.
"""

import json
import shutil
from pathlib import Path

import pytest
from test_browser import check_book_in_browser

from cxr_lib.book import build_book, run_book
from cxr_lib.profiles import repo_root

ROOT = repo_root()
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("study")
    for folder in ("notebooks", "profiles", "book"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("chapters"))
    for name in ("_config.yml", "_toc.yml", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    run_book("smoke", repo=repo)
    return repo


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
    outputs = assert_reads_cleanly(nb)
    glued = {o["metadata"]["scrapbook"]["name"] for o in outputs
             if "scrapbook" in o.get("metadata", {})}
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
