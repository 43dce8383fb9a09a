"""House rules that hold for the whole repository: lint, stripped notebooks, a complete toc."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_lib.book import chapter_notebooks, read_toc, toc_chapters
from cxr_lib.profiles import repo_root

ROOT = repo_root()


def notebooks() -> list[Path]:
    found = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not found:
        pytest.skip("notebooks/ holds no notebook yet")
    return found


def test_ruff_passes_on_the_whole_repository():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_notebooks_are_stripped_of_outputs_and_execution_counts():
    for path in notebooks():
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        dirty = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code"
                 and (cell.get("outputs") or cell.get("execution_count") is not None)]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts"


def test_every_notebook_has_a_cell_tagged_parameters():
    for path in notebooks():
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        tagged = [cell for cell in cells
                  if "parameters" in cell.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged `parameters`, want 1"
        assert tagged[0]["cell_type"] == "code", f"{path.name}: the parameters cell is not code"


def test_the_toc_lists_every_chapter_notebook_in_reading_order():
    listed = toc_chapters(read_toc(ROOT / "_toc.yml"))
    stems = [path.stem for path in chapter_notebooks(ROOT / "notebooks")]
    missing = sorted(set(stems) - set(listed))
    assert not missing, f"_toc.yml does not list {missing}"
    assert [stem for stem in listed if stem in stems] == stems
    assert not [p.name for p in notebooks() if p.stem not in stems], "notebooks not named NN_*"


def test_library_has_no_leftover_markers():
    pattern = re.compile(r"\b(TODO|FIXME|NotImplementedError)\b")
    hits = [f"{path.relative_to(ROOT)}:{number}"
            for path in sorted((ROOT / "cxr_lib").rglob("*.py"))
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, f"leftover markers at {hits}"
