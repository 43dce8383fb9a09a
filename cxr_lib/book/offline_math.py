"""A Sphinx extension that writes the book's formulas as MathML, which browsers draw natively.

Sphinx and Jupyter Book typeset formulas with MathJax loaded from a CDN, so a book read offline
(or served where the network is closed, as tests/test_browser.py serves it) would show raw TeX.
Here each formula MyST parsed ($...$, $$...$$) is converted to MathML when the page is written
(latex2mathml): no script, no font download, and the page prints as it shows. A formula that
cannot be converted stops the build with its TeX, rather than reaching the reader raw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.errors import ExtensionError


def mathml(tex: str, display: str) -> str:
    """`tex` as a MathML element (display "inline" or "block")."""
    try:
        return convert(tex.strip(), display=display)
    except Exception as err:  # latex2mathml raises its own errors, and some builtins
        raise ExtensionError(f"the formula {tex.strip()!r} cannot be written as MathML: "
                             f"{err}") from err


def visit_math(self: Any, node: nodes.math) -> None:
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(mathml(node.astext(), "inline"))
    self.body.append("</span>")
    raise nodes.SkipNode


def visit_displaymath(self: Any, node: nodes.math_block) -> None:
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node.get("number"):
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    self.body.append(mathml(node.astext(), "block"))
    self.body.append("</div>\n")
    raise nodes.SkipNode


STATIC = Path(__file__).parent / "static"  # mathml.css


def add_style(app: Any) -> None:
    app.config.html_static_path.append(str(STATIC))
    app.add_css_file("mathml.css")


def setup(app: Any) -> dict[str, bool]:
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    app.connect("builder-inited", add_style)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
