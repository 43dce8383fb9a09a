"""House rules that hold for the whole repository: lint, stripped notebooks, a complete toc."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from cxr_lib.book.offline_math import mathml
from cxr_lib.book.profiles import repo_root
from cxr_lib.book.runner import chapter_notebooks, read_toc, toc_chapters

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


# The stages of cxr_lib in the order data flows; a module imports only from its own stage or
# from those before it (cxr_lib/__init__.py says what each holds).
STAGES = ("device", "data", "augment", "models", "engine", "analysis", "methods", "chapters",
          "book", "bench", "cli")


def _stage(module: str) -> int:
    """The index in STAGES of a dotted module under cxr_lib."""
    name = module.split(".")[1]
    assert name in STAGES, f"cxr_lib.{name} belongs to no stage of the pipeline"
    return STAGES.index(name)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cxr_lib import in `path`, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "cxr_lib" else [
                f"cxr_lib.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.startswith("cxr_lib.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if alias.name.startswith("cxr_lib.")]
    return found


def test_the_package_has_one_folder_or_module_per_stage():
    top = {p.stem for p in (ROOT / "cxr_lib").iterdir()
           if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("__", "."))}
    assert top == set(STAGES), f"outside the stages: {sorted(top - set(STAGES))}"


def test_no_import_runs_back_up_the_pipeline():
    backwards = []
    for path in sorted((ROOT / "cxr_lib").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module == "cxr_lib.__init__":
            continue
        backwards += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                      for line, name in _imports(path) if _stage(name) > _stage(module)]
    assert not backwards, "imports against the pipeline: " + "; ".join(backwards)


NOTEBOOK_CODE_LINES = 671  # half of the 1,343 lines the notebooks held before chapters/ existed


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
            if c["cell_type"] == "code"]


def test_the_notebooks_hold_little_code():
    lines = {path.stem: sum(len("".join(c["source"]).splitlines()) for c in _code_cells(path))
             for path in notebooks()}
    assert sum(lines.values()) <= NOTEBOOK_CODE_LINES, f"lines of code by chapter: {lines}"


def test_no_notebook_decides_in_its_own_code():
    """A branch, loop or function of its own in a notebook is chapter logic that belongs in
    cxr_lib/chapters/, where its words are unit-tested."""
    deciding = (ast.If, ast.IfExp, ast.For, ast.While, ast.FunctionDef, ast.Lambda, ast.ClassDef)
    found = []
    for path in notebooks():
        for number, cell in enumerate(_code_cells(path)):
            for node in ast.walk(ast.parse("".join(cell["source"]))):
                if isinstance(node, deciding) or (isinstance(node, ast.comprehension)
                                                  and node.ifs):
                    found.append(f"{path.stem} code cell {number}: {ast.unparse(node)[:60]}")
    assert not found, "; ".join(found)


def test_every_notebook_parameter_has_a_type_papermill_shows():
    """`papermill --help-notebook` lists each parameter with its type, not "Unknown type"."""
    untyped = [f"{path.stem}: {name}" for path in notebooks()
               for name, parameter in papermill.inspect_notebook(str(path)).items()
               if parameter["inferred_type_name"] == "None"]
    assert not untyped, f"parameters without a type: {untyped}"


def test_every_cell_that_draws_hides_its_code():
    """Plotting code is collapsed in the book (hide-input), so the text and figures read on."""
    shown = [f"{path.stem} code cell {number}" for path in notebooks()
             for number, cell in enumerate(_code_cells(path))
             if ("plt.show()" in "".join(cell["source"]) or "_figure(" in "".join(cell["source"]))
             and "hide-input" not in cell["metadata"].get("tags", [])]
    assert not shown, f"cells that draw with their code shown: {shown}"


def test_every_formula_of_the_chapters_is_written_as_mathml():
    """The book draws formulas as MathML (cxr_lib.book.offline_math); one latex2mathml cannot
    convert would stop the build, so each is converted here first."""
    found = []
    for path in notebooks():
        prose = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                          if c["cell_type"] == "markdown")
        display = re.findall(r"\$\$(.+?)\$\$", prose, flags=re.S)
        inline = re.findall(r"(?<!\$)\$([^$\n]+)\$(?!\$)", re.sub(r"\$\$.+?\$\$", "", prose,
                                                                   flags=re.S))
        found += [(path.stem, tex, "block") for tex in display]
        found += [(path.stem, tex, "inline") for tex in inline]
    assert len({stem for stem, _, kind in found if kind == "block"}) >= 2, found
    for _stem, tex, kind in found:
        assert mathml(tex, kind).startswith("<math")
