"""Numbers and sentences that the book's prose quotes, passed from code to text by myst-nb glue.

Prose never types a result by hand: a notebook computes it, glues it under a name, and the
markdown refers to it with {glue:md}`name`.
"""

from __future__ import annotations

from IPython.display import Markdown
from myst_nb import glue


def glue_text(name: str, text: str) -> None:
    """Glue `text` as Markdown (so it renders without quotes) and show nothing in place."""
    glue(name, Markdown(text), display=False)
