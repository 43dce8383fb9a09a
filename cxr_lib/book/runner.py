"""Execute the chapters with papermill, then render them with Jupyter Book.

`run_book` runs notebooks/NN_*.ipynb in reading order with one profile's parameters and writes
the executed notebooks to build/<profile>/chapters/. `build_book` stages those notebooks (or the
published edition in book/chapters/) with the prose pages into a site folder and renders it with
jupyter-book, warnings as errors. The book is never executed by jupyter-book itself: what the
reader sees is exactly what papermill ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from cxr_lib.book.profiles import ROOT_KEYS, Profile, ProfileError, load_profile, repo_root
from cxr_lib.chapters.sentences import duration

CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
# Where the executed chapters sit inside the book (and so inside _toc.yml).
CHAPTERS_DIR = "book/chapters"


class BookError(RuntimeError):
    """Running or rendering the book failed."""


class ChapterError(BookError):
    """A chapter raised while executing; the message names the chapter and the failing cell."""


class BuildError(BookError):
    """jupyter-book failed (a warning counts); the message carries the tail of its output."""


def chapter_notebooks(folder: Path) -> list[Path]:
    """The chapter notebooks of a folder in reading order. Names with an extra dot, such as
    the runner's <stem>.failed.ipynb, are not chapters."""
    return sorted(nb for nb in Path(folder).glob(CHAPTER_GLOB) if "." not in nb.stem)


def select_chapters(notebooks: Sequence[Path], selectors: Iterable[int | str] | None
                    ) -> list[Path]:
    """The notebooks picked by chapter numbers (1, "01") or stems ("01_data_curation"), kept in
    reading order; None or empty picks all. A string may hold several, comma-separated ("1,2"),
    as users write them on the command line."""
    selectors = [part.strip() for selector in selectors or []
                 for part in str(selector).split(",")]
    if not selectors:
        return list(notebooks)
    chosen: set[Path] = set()
    for selector in selectors:
        matches = [nb for nb in notebooks if _matches(nb.stem, selector)]
        if not matches:
            known = ", ".join(nb.stem for nb in notebooks) or "none"
            raise ProfileError(f"no chapter {selector!r}; chapters: {known}")
        chosen.update(matches)
    return [nb for nb in notebooks if nb in chosen]


def _matches(stem: str, selector: int | str) -> bool:
    text = Path(str(selector)).stem
    if text.isdigit():
        return int(text) == int(stem.split("_", 1)[0])
    return text == stem


def run_book(
    profile: str | Path,
    *,
    data_root: str | Path | None = None,
    pediatric_root: str | Path | None = None,
    chapters: Iterable[int | str] | None = None,
    publish: bool = False,
    repo: Path | None = None,
) -> list[Path]:
    """Execute the chosen chapters in order into build/<profile>/chapters/ and return their
    paths. A failing chapter stops the run with a ChapterError; chapters executed before it are
    kept. With `publish`, the executed notebooks are also copied to book/chapters/ (the
    published edition), and only when every chosen chapter succeeded."""
    repo = Path(repo).resolve() if repo is not None else repo_root()
    given = {"data_root": data_root, "pediatric_root": pediatric_root}
    loaded = load_profile(profile, repo=repo, overrides=given)
    _check_roots(loaded, given)
    notebooks = select_chapters(chapter_notebooks(repo / "notebooks"), chapters)
    if not notebooks:
        raise ProfileError(f"no chapter notebooks ({CHAPTER_GLOB}) in {repo / 'notebooks'}")
    work_dir = repo / "build" / loaded.name
    out_dir = work_dir / "chapters"
    print(f"profile {loaded.name} ({loaded.path}): {len(notebooks)} chapter(s) -> {out_dir}",
          flush=True)
    executed = []
    for number, notebook in enumerate(notebooks, start=1):
        print(f"[{number}/{len(notebooks)}] {notebook.stem} ...", flush=True)
        start = time.perf_counter()
        try:
            executed.append(run_chapter(notebook, loaded.parameters(notebook, work_dir),
                                        out_dir))
        finally:
            outcome = "done" if len(executed) == number else "failed"
            print(f"[{number}/{len(notebooks)}] {notebook.stem} {outcome} after "
                  f"{duration(time.perf_counter() - start)}", flush=True)
    if publish:
        _publish(executed, repo)
    return executed


def _check_roots(profile: Profile, given: dict[str, Any]) -> None:
    """Fail before any chapter runs when a data folder is missing, naming where it came from."""
    for key in ROOT_KEYS:
        value = profile.shared.get(key)
        if value is None or Path(value).is_dir():
            continue
        source = (f"--{key.replace('_', '-')}" if given.get(key) is not None
                  else f"{profile.path}: shared.{key}")
        raise ProfileError(f"{source}: the folder {value} does not exist")


def run_chapter(notebook: Path, parameters: dict[str, Any], out_dir: Path) -> Path:
    """Execute one notebook into out_dir/<stem>.ipynb.

    Papermill saves the notebook after every cell, so it writes <stem>.running.ipynb (open it to
    watch a long chapter) and the result is renamed into place only when every cell succeeded.
    A failure renames it to <stem>.failed.ipynb, beside any earlier good <stem>.ipynb, and
    `stage_site` refuses the folder until a run of the chapter succeeds and deletes it.
    """
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    running = out_dir / f"{notebook.stem}.running.ipynb"
    failed = out_dir / f"{notebook.stem}.failed.ipynb"
    try:
        papermill.execute_notebook(notebook, running, parameters=parameters, progress_bar=True,
                                   cwd=notebook.parent, kernel_name="python3")
    except Exception as err:
        if running.exists():
            os.replace(running, failed)
        raise ChapterError(_failure_message(notebook.stem, err, failed)) from err
    failed.unlink(missing_ok=True)
    _tidy_streams(running)
    final = out_dir / f"{notebook.stem}.ipynb"
    os.replace(running, final)
    return final


def _tidy_streams(path: Path) -> None:
    """Show each cell's text output as a notebook front end would: consecutive pieces of one
    stream merged, a progress bar's carriage-return updates reduced to their last state, and
    pieces left blank dropped. Papermill keeps every flush as its own output, which the book
    drew as a stack of boxes, one per update of a progress bar."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    content = nbformat.read(path, as_version=4)
    CoalesceStreamsPreprocessor().preprocess(content, {})
    for cell in content.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if o.output_type != "stream" or o.text.strip()]
    nbformat.write(content, path)


def _failure_message(stem: str, err: Exception, failed: Path) -> str:
    """Chapter, cell (index in the executed notebook, its In [n] and first line) and error."""
    from papermill import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        first_line = next(iter(err.source.strip().splitlines()), "")
        where = f"cell {err.cell_index} (In [{err.exec_count}]: {first_line})"
        what = f"{err.ename}: {err.evalue}"
    else:
        where, what = "execution", f"{type(err).__name__}: {err}"
    kept = f"\n  the notebook as far as it ran: {failed}" if failed.exists() else ""
    return f"chapter {stem} failed in {where}: {what}{kept}"


def _publish(executed: Iterable[Path], repo: Path) -> None:
    """Copy executed notebooks into book/chapters/, each by write-then-rename. Papermill's record
    of the input and output paths is made relative to the project, so that, like `work_dir`,
    the published edition names no machine's folders."""
    import nbformat

    book_chapters = repo / CHAPTERS_DIR
    book_chapters.mkdir(parents=True, exist_ok=True)
    for notebook in executed:
        content = nbformat.read(notebook, as_version=4)
        record = content.metadata.get("papermill", {})
        for key in ("input_path", "output_path"):
            if record.get(key) and Path(record[key]).is_relative_to(repo):
                record[key] = Path(record[key]).relative_to(repo).as_posix()
        partial = book_chapters / f"{notebook.name}.partial"
        nbformat.write(content, partial)
        os.replace(partial, book_chapters / notebook.name)
    print(f"published to {book_chapters}", flush=True)


def build_book(profile: str | Path, *, published: bool = False, repo: Path | None = None
               ) -> Path:
    """Render the executed chapters of a profile (or, with `published`, the edition in
    book/chapters/) to HTML; returns the path of index.html.

    Only the profile's name is needed (build/<name>/), so building does not read the profile
    and needs none of its data or environment variables.
    """
    repo = Path(repo).resolve() if repo is not None else repo_root()
    if published:
        chapters, site = repo / CHAPTERS_DIR, repo / "build" / "published" / "site"
        how = "cxr book run --profile gpu-sample --publish"
    else:
        name = profile_name(profile)
        chapters, site = repo / "build" / name / "chapters", repo / "build" / name / "site"
        how = f"cxr book run --profile {name}"
    stage_site(repo, chapters, site, how_to_run=how)
    return render_site(site)


def profile_name(profile: str | Path) -> str:
    """A profile's name from a name or a path to its YAML file."""
    text = str(profile)
    return Path(text).stem if text.endswith((".yaml", ".yml")) else Path(text).name


def stage_site(repo: Path, chapters: Path, site: Path, *, how_to_run: str = "cxr book run"
               ) -> list[str]:
    """Assemble a fresh site folder: _config.yml, the prose pages of book/, the executed
    notebooks into book/chapters/, and a _toc.yml listing only the chapters present. Returns the
    stems of the staged chapters. A chapter whose last run failed is refused, not shown stale.

    The site is rebuilt from scratch each time: Sphinx only reports warnings for pages it
    re-reads, so an incremental build could hide a warning.
    """
    _refuse_failed(chapters, how_to_run)
    present = {nb.stem for nb in chapter_notebooks(chapters)} if chapters.is_dir() else set()
    toc = filter_toc(read_toc(repo / "_toc.yml"), present)
    staged = toc_chapters(toc)
    if not staged:
        raise BookError(f"no executed chapters listed in {repo / '_toc.yml'} are in {chapters}: "
                        f"run `{how_to_run}` first")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    shutil.copy2(repo / "_config.yml", site / "_config.yml")
    book = repo / "book"
    shutil.copytree(book, site / "book",
                    ignore=lambda folder, names: ["chapters"] if Path(folder) == book else [])
    (site / CHAPTERS_DIR).mkdir(parents=True)
    for stem in staged:
        shutil.copy2(chapters / f"{stem}.ipynb", site / CHAPTERS_DIR / f"{stem}.ipynb")
    (site / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    return staged


def _refuse_failed(chapters: Path, how_to_run: str) -> None:
    """Refuse to render a folder holding a <stem>.failed.ipynb or <stem>.running.ipynb: the
    chapter's last run failed, or was killed (or is still running), so the book would show its
    older good run as current (or silently leave it out). A run that succeeds deletes the
    .failed copy and renames the .running one into place (`run_chapter`), which lifts it."""
    for state, said in (("failed", "failed"), ("running", "did not finish (killed, or still "
                                                          "running)")):
        left = sorted(chapters.glob(CHAPTER_GLOB.replace(".ipynb", f".{state}.ipynb")))
        if left:
            stems = ",".join(path.name.removesuffix(f".{state}.ipynb") for path in left)
            raise BookError(f"the last run of chapter {stems} {said} "
                            f"({', '.join(map(str, left))}): fix it and run `{how_to_run} "
                            f"--chapters {stems}`, or delete the .{state} notebook to build "
                            "the book without that run")


def read_toc(path: Path) -> dict[str, Any]:
    """The Jupyter Book table of contents as a mapping."""
    toc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(toc, dict) or "root" not in toc:
        raise BookError(f"{path}: not a Jupyter Book table of contents (no `root`)")
    return toc


def filter_toc(toc: dict[str, Any], present: set[str]) -> dict[str, Any]:
    """The toc without chapter entries (files under book/chapters/) whose stem is not in
    `present`, and without parts left empty. The repo's toc lists planned chapters too."""
    def keep(entry: dict[str, Any]) -> bool:
        file = str(entry.get("file", ""))
        return not file.startswith(CHAPTERS_DIR + "/") or Path(file).stem in present

    def walk(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = []
        for entry in filter(keep, entries):
            entry = dict(entry)
            for key in ("chapters", "sections"):
                if key in entry:
                    entry[key] = walk(entry[key])
                    if not entry[key]:
                        del entry[key]
            kept.append(entry)
        return kept

    filtered = dict(toc)
    if "parts" in filtered:
        parts = [{**part, "chapters": walk(part.get("chapters", []))} for part in toc["parts"]]
        filtered["parts"] = [part for part in parts if part["chapters"]]
    for key in ("chapters", "sections"):
        if key in filtered:
            filtered[key] = walk(filtered[key])
    return filtered


def toc_chapters(toc: dict[str, Any]) -> list[str]:
    """Stems of the chapter entries (files under book/chapters/) of a toc, in order."""
    stems = []

    def walk(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            file = str(entry.get("file", ""))
            if file.startswith(CHAPTERS_DIR + "/"):
                stems.append(Path(file).stem)
            walk(entry.get("chapters", []) + entry.get("sections", []))

    walk(toc.get("parts", []) + toc.get("chapters", []) + toc.get("sections", []))
    return stems


def render_site(site: Path) -> Path:
    """Run jupyter-book on a staged site with warnings as errors (--keep-going reports all of
    them at once; --all re-reads every page, so none of its warnings is skipped) and return the
    path of index.html."""
    command = [_jupyter_book(), "build", str(site), "--warningiserror", "--keep-going", "--all"]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    index = site / "_build" / "html" / "index.html"
    if result.returncode != 0 or not index.is_file():
        raise BuildError(f"jupyter-book build {site} failed (exit {result.returncode}):\n"
                         f"{_summarise(result.stdout)}")
    return index


def _summarise(output: str, warnings: int = 30, tail: int = 10) -> str:
    """The warnings and errors of a Sphinx log (wherever they are in it), then its last lines,
    without terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines()
    problems = [line for line in lines if re.search(r"WARNING|ERROR|Error|Exception", line)]
    return "\n".join([*problems[-warnings:], "...", *lines[-tail:]])


def _jupyter_book() -> str:
    """The jupyter-book of this interpreter's environment, so the book renders with the same
    versions the tests used."""
    found = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    found = found or shutil.which("jupyter-book")
    if found is None:
        raise BuildError(f"jupyter-book is not installed beside {sys.executable}: install the "
                         f"project with `pip install -e .`")
    return found
