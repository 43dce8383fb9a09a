"""The rendered book in a real browser: headless Chromium, driven by Playwright.

`check_book_in_browser` serves a built site on 127.0.0.1 and opens every page of it: no console
error, no failed request (a request to any host but 127.0.0.1 counts as failed: the book must
not depend on a CDN), every image decoded with a non-zero natural size, every chapter reachable
from the table of contents, and a full-page screenshot of each chapter saved beside the HTML
(<site>/_build/screenshots/). Here it checks a tiny book rendered with the real configuration and
prose pages; tests/test_chapters.py calls it on the book of the smoke run.

Debian's chromium is used (`.ci/run` installs it), never a browser downloaded by Playwright.
Without Chromium or Playwright the tests are skipped with a message saying what to install.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import nbformat
import pytest

from cxr_lib.book.profiles import repo_root
from cxr_lib.book.runner import render_site, stage_site

LOOPBACK = "127.0.0.1"
# Flags for a closed network: without the background-networking ones Chromium keeps trying to
# reach Google's services at start.
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The sidebar table of contents of sphinx-book-theme, on every page of the book.
TOC_LINKS = "nav.bd-docs-nav a.reference.internal"
HTML_CHAPTERS = "book/chapters"
TIMEOUT_MS = 30_000
# Images lazily loaded would never load in a page nobody scrolls: load them all, wait for each
# to decode (or fail), and list those the browser could not draw.
BROKEN_IMAGES_JS = """async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  return {count: images.length,
          broken: images.filter(img => !img.naturalWidth || !img.naturalHeight)
                        .map(img => img.currentSrc || img.src || img.outerHTML)};
}"""
# The formulas MyST parsed, and how many of them the browser drew as MathML (with a size):
# raw TeX left on a page is a problem.
MATH_JS = """() => {
  const formulas = [...document.querySelectorAll(".math.notranslate")];
  const drawn = formulas.filter(f => {
    const math = f.querySelector("math");
    const box = math && math.getBoundingClientRect();
    return box && box.width > 0 && box.height > 0;
  });
  return {raw: formulas.length, typeset: drawn.length};
}"""


@dataclass
class BrowserReport:
    """What the browser saw: problems (each naming its page), images per page, screenshots."""

    problems: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)
    formulas: dict[str, int] = field(default_factory=dict)  # typeset, per page
    screenshots: dict[str, Path] = field(default_factory=dict)


def find_chromium() -> str | None:
    """Chromium from $CXR_CHROMIUM or the PATH."""
    candidates = [os.environ.get("CXR_CHROMIUM", ""), *CHROMIUM_NAMES]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


def chromium_or_skip() -> str:
    """The Chromium to drive; skips the calling test, saying what to install, when Playwright
    or Chromium is missing, so that a machine without a browser never passes silently."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser test skipped: the Python package playwright is not installed "
                    "(pip install -e '.[dev]')")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("browser test skipped: no Chromium found (looked for $CXR_CHROMIUM and "
                    f"{', '.join(CHROMIUM_NAMES)} on PATH); install Debian's package as root "
                    "with `apt-get install chromium`, as .ci/run does")
    return chromium


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files without a log line per request; a stalled client is dropped after 10 s."""

    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve a folder on 127.0.0.1 (an ephemeral port, loopback only) while the block runs;
    yields the base URL."""
    handler = partial(_QuietHandler, directory=str(folder))
    with ThreadingHTTPServer((LOOPBACK, 0), handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://{LOOPBACK}:{server.server_port}/"
        finally:
            server.shutdown()
            thread.join(timeout=10)


@contextmanager
def chromium_context(chromium: str) -> Iterator[Any]:
    """A headless Chromium with a fresh, temporary profile, whose requests to any host but
    127.0.0.1 are blocked (each then shows up as a failed request)."""
    from playwright.sync_api import sync_playwright

    with (tempfile.TemporaryDirectory(prefix="cxr-chromium-", ignore_cleanup_errors=True)
          as profile, sync_playwright() as playwright):
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": 1280, "height": 900})
        try:
            context.set_default_timeout(TIMEOUT_MS)
            context.route("**/*", _loopback_only)
            yield context
        finally:
            context.close()


def _loopback_only(route: Any) -> None:
    if urlsplit(route.request.url).hostname == LOOPBACK:
        route.continue_()
    else:
        route.abort("blockedbyclient")


def _watch(page: Any, problems: list[str]) -> None:
    """Record the page's console errors, uncaught script errors and failed requests."""
    def on_console(message: Any) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_failed(request: Any) -> None:
        if urlsplit(request.url).hostname != LOOPBACK:
            problems.append(f"request to a host other than {LOOPBACK}: {request.url}")
        else:
            problems.append(f"request failed ({request.failure}): {request.url}")

    def on_response(response: Any) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("requestfailed", on_failed)
    page.on("response", on_response)


@dataclass
class PageVisit:
    """One page in the browser: its problems, its table-of-contents links (absolute, without
    fragments) and how many images it has."""

    problems: list[str]
    toc: list[str]
    images: int
    formulas: int = 0  # typeset by MathJax


def visit(context: Any, url: str, screenshot: Path | None = None) -> PageVisit:
    """Open one page until its network is idle, check its images, optionally screenshot it."""
    page = context.new_page()
    problems: list[str] = []
    _watch(page, problems)
    try:
        response = page.goto(url, wait_until="load")
        if response is None or not response.ok:
            problems.append(f"the page did not load ({response.status if response else 'none'})")
        # index.html only redirects: the table of contents appears on the page it leads to.
        page.wait_for_selector(TOC_LINKS, state="attached")
        page.wait_for_load_state("networkidle")
        images = page.evaluate(BROKEN_IMAGES_JS)
        problems += [f"image with no natural size: {src}" for src in images["broken"]]
        math = page.evaluate(MATH_JS)
        if math["typeset"] < math["raw"]:
            problems.append(f"{math['raw'] - math['typeset']} of {math['raw']} formulas not "
                            "typeset (no MathML drawn)")
        links = page.eval_on_selector_all(TOC_LINKS, "links => links.map(a => a.href)")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
    except Exception as err:  # a timeout or a crash is a finding about this page, not the end
        problems.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
        return PageVisit(problems, [], 0)
    finally:
        page.close()
    toc = list(dict.fromkeys(urldefrag(link).url for link in links))
    return PageVisit(problems, toc, images["count"], math["typeset"])


def browse_book(index: Path, chapters: Sequence[str] | None = None, *, context: Any = None
                ) -> BrowserReport:
    """Open every HTML page of a built book (the folder of index.html) in headless Chromium (in
    `context`, a `chromium_context`, or else one started here).

    `chapters` are the stems expected under book/chapters/ (by default, every chapter page that
    was built); each must be linked from the table of contents, show at least one image, and
    gets a full-page screenshot in <html>/../screenshots/<stem>.png.
    """
    browser = nullcontext(context) if context else chromium_context(chromium_or_skip())
    html = index.parent
    pages = sorted(str(path.relative_to(html)) for path in html.rglob("*.html")
                   if path.relative_to(html).parts[0] not in ("_static", "_sources", "_images"))
    chapters = list(chapters if chapters is not None
                    else sorted(p.stem for p in (html / HTML_CHAPTERS).glob("*.html")))
    shots = html.parent / "screenshots"
    report = BrowserReport()
    toc: list[str] = []
    with serve(html) as base, browser as context:
        for name in pages:
            stem = Path(name).stem if Path(name).parent.as_posix() == HTML_CHAPTERS else None
            shot = shots / f"{stem}.png" if stem in chapters else None
            seen = visit(context, base + name, shot)
            report.problems += [f"{name}: {problem}" for problem in seen.problems]
            report.images[name] = seen.images
            report.formulas[name] = seen.formulas
            toc = seen.toc if name == index.name else toc
            if shot is not None:
                report.screenshots[stem] = shot
    report.problems += _toc_problems(toc, chapters, base, report.images)
    return report


def _toc_problems(toc: list[str], chapters: Sequence[str], base: str, images: dict[str, int]
                  ) -> list[str]:
    """The table of contents of the landing page: every link to a built page of the book, and
    one to each chapter, which shows at least one image."""
    linked = {link.removeprefix(base) for link in toc}
    problems = [f"table of contents: link to no page of the book: {link}" for link in toc
                if link.removeprefix(base) not in images]
    for stem in chapters:
        page = f"{HTML_CHAPTERS}/{stem}.html"
        if page not in linked:
            problems.append(f"table of contents: no link to chapter {stem} ({page})")
        if page not in images:
            problems.append(f"{page}: chapter {stem} was not built")
        elif images[page] == 0:
            problems.append(f"{page}: the chapter shows no image")
    return problems


def check_book_in_browser(index: Path, chapters: Sequence[str] | None = None, *,
                          context: Any = None) -> BrowserReport:
    """`browse_book`, failing the test with every problem found; skipped without a browser."""
    report = browse_book(index, chapters, context=context)
    assert not report.problems, "the book in Chromium:\n  " + "\n  ".join(report.problems)
    return report


# --- a tiny book with the real configuration and prose pages -------------------------------

def _png(seed: int) -> str:
    """A small matplotlib figure as base64 PNG, as a notebook stores it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2), dpi=60)
    figure.subplots().plot([0, 1, 2], [seed, 2 * seed, seed])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _executed_chapter(path: Path, title: str, seed: int, prose: str = "") -> None:
    """A chapter as papermill would leave it: prose, and a code cell that drew a figure."""
    figure = nbformat.v4.new_output("display_data", data={"image/png": _png(seed),
                                                          "text/plain": "<Figure>"})
    cell = nbformat.v4.new_code_cell("plot()", execution_count=1, outputs=[figure])
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(f"# {title}\n\nA tiny chapter with one figure.{prose}"),
        cell])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, path)


CHAPTERS = ("01_data_curation", "02_mae_pretraining")
FORMULAS = ("\n\nThe loss is $\\mathcal{L}$, the mean over the hidden patches:\n\n"
            "$$\\mathcal{L} = \\frac{1}{|M|} \\sum_{p \\in M} \\lVert \\hat{x}_p - x_p "
            "\\rVert_2^2$$\n")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the tests of this file (starting it takes seconds)."""
    with chromium_context(chromium_or_skip()) as context:
        yield context


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory, browser) -> Path:
    """index.html of a book: the repo's _config.yml, _toc.yml and prose pages, two chapters."""
    root = tmp_path_factory.mktemp("browser")
    (root / "chapters").mkdir()
    for seed, stem in enumerate(CHAPTERS, start=1):
        _executed_chapter(root / "chapters" / f"{stem}.ipynb", f"Chapter {seed}", seed,
                          FORMULAS if seed == 2 else "")
    stage_site(repo_root(), root / "chapters", root / "site")
    return render_site(root / "site")


def test_every_page_of_the_book_loads_cleanly_in_chromium(tiny_book, browser):
    report = check_book_in_browser(tiny_book, CHAPTERS, context=browser)
    assert {"index.html", "search.html", "genindex.html", "book/intro.html",
            "book/setup.html"} <= set(report.images)
    assert all(report.images[f"{HTML_CHAPTERS}/{stem}.html"] == 1 for stem in CHAPTERS)
    # both formulas of chapter 2 drawn as MathML (no MathJax: no CDN is reachable)
    assert report.formulas[f"{HTML_CHAPTERS}/{CHAPTERS[1]}.html"] == 2
    assert report.formulas[f"{HTML_CHAPTERS}/{CHAPTERS[0]}.html"] == 0
    shots = tiny_book.parent.parent / "screenshots"
    assert report.screenshots == {stem: shots / f"{stem}.png" for stem in CHAPTERS}
    for shot in report.screenshots.values():
        header = shot.read_bytes()[:24]
        width, height = (int.from_bytes(header[i:i + 4], "big") for i in (16, 20))
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and width == 1280 and height >= 900


def _page(title: str, toc: str, body: str) -> str:
    return (f"<!doctype html><html><head><title>{title}</title></head><body>"
            f'<nav class="bd-docs-nav">{toc}</nav>{body}</body></html>')


def test_the_checker_reports_what_a_broken_book_does(tmp_path, browser):
    """A hand-made site with one of each fault: each must be reported against its page."""
    toc = ('<a class="reference internal" href="/book/chapters/01_a.html">1</a>'
           '<a class="reference internal" href="/book/gone.html#part">gone</a>')
    pixel = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
             "2mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    pages = {
        "index.html": _page("home", toc, f'<img src="{pixel}">'),
        "book/chapters/01_a.html": _page("a", toc, '<img src="../../_images/missing.png">'
                                         '<script src="https://cdn.example.org/x.js"></script>'
                                         '<script>throw new Error("boom")</script>'),
        "book/chapters/02_b.html": _page("b", toc, '<p>no figure, and TeX that nothing '
                                         'typesets: <span class="math notranslate">'
                                         '\\(x^2\\)</span></p>'),
    }
    html = tmp_path / "html"
    for name, text in pages.items():
        (html / name).parent.mkdir(parents=True, exist_ok=True)
        (html / name).write_text(text, encoding="utf-8")
    report = browse_book(html / "index.html", context=browser)
    problems = "\n".join(report.problems)
    assert report.images == {"index.html": 1, "book/chapters/01_a.html": 1,
                             "book/chapters/02_b.html": 0}
    assert "book/chapters/01_a.html: HTTP 404: http://127.0.0.1:" in problems
    assert "01_a.html: image with no natural size: http://127.0.0.1:" in problems
    assert ("01_a.html: request to a host other than 127.0.0.1: https://cdn.example.org/x.js"
            in problems)
    assert "01_a.html: script error: boom" in problems
    assert "table of contents: no link to chapter 02_b" in problems
    assert "table of contents: link to no page of the book: http://127.0.0.1:" in problems
    assert "/book/gone.html\n" in problems
    assert "book/chapters/02_b.html: the chapter shows no image" in problems
    assert "02_b.html: 1 of 1 formulas not typeset (no MathML drawn)" in problems
    assert not [p for p in report.problems if p.startswith("index.html")]
    assert report.screenshots == {stem: tmp_path / "screenshots" / f"{stem}.png"
                                  for stem in ("01_a", "02_b")}
    assert all(shot.is_file() for shot in report.screenshots.values())
