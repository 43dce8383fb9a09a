"""A Sphinx extension that keeps one copy of each script of a page.

Sphinx 7.4 writes every inline script that an extension adds after the builder started twice
(once under the filename None, once under ''; sphinx-doc/sphinx#13402, fixed in Sphinx 8.2,
which jupyter-book 1 cannot use: it needs sphinx~=7.0). sphinx-thebe's `const THEBE_JS_URL`
is one of them, so every page of the book raised "SyntaxError: Identifier 'THEBE_JS_URL' has
already been declared" in the browser (tests/test_browser.py).
"""

from __future__ import annotations

from typing import Any


def unique_scripts(app: Any, pagename: str, templatename: str, context: dict[str, Any],
                   doctree: Any) -> None:
    """Drop the repeats from the page's script list, in place, keeping the first of each."""
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for script in context.get("script_files", []):
        key = (script.filename or "", script.priority, *sorted(script.attributes.items()))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique


def setup(app: Any) -> dict[str, bool]:
    app.connect("html-page-context", unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
