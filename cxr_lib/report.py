"""Numbers and sentences that the book's prose quotes, passed from code to text by myst-nb glue.

Prose never types a result by hand: a notebook computes it, glues it under a name, and the
markdown refers to it with {glue:md}`name`.
"""

from __future__ import annotations

from collections.abc import Sequence

from IPython.display import Markdown
from myst_nb import glue


def glue_text(name: str, text: str) -> None:
    """Glue `text` as Markdown (so it renders without quotes) and show nothing in place."""
    glue(name, Markdown(text), display=False)


def sweep_sentence(setting: str, values: Sequence, scores: Sequence[float],
                   marks: dict[str, object], metric: str = "probe AUC") -> str:
    """One plain sentence on a one-seed sweep: the best value, and where the marked choices
    (e.g. {"the paper's choice": 0.9, "the ImageNet default": 0.75}) stand against it.

    Values are compared by their string form, so tuples such as crop scales work too.
    """
    if len(values) != len(scores) or not len(values):
        raise ValueError("sweep_sentence: values and scores must be non-empty and aligned")
    by_value = {str(v): s for v, s in zip(values, scores, strict=True)}
    best = max(range(len(values)), key=lambda i: scores[i])
    parts = [f"the best {metric} ({scores[best]:.3f}) came at {setting} {values[best]}"]
    for label, value in marks.items():
        score = by_value.get(str(value))
        if score is None:
            raise ValueError(f"sweep_sentence: {label} {value} is not among the values")
        gap = scores[best] - score
        where = "the best" if gap == 0 else f"{gap:.3f} below the best"
        parts.append(f"{label} ({value}) reached {score:.3f}, {where}")
    spread = max(scores) - min(scores)
    return "; ".join(parts) + f". All settings lie within {spread:.3f} of each other."
