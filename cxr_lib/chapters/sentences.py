"""Numbers and sentences that the book's prose quotes, passed from code to text by myst-nb glue.

Prose never types a result by hand: a notebook computes it, glues it under a name, and the
markdown refers to it with {glue:md}`name`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from IPython.display import Markdown
from myst_nb import glue


def glue_text(name: str, text: str) -> None:
    """Glue `text` as Markdown (so it renders without quotes) and show nothing in place."""
    glue(name, Markdown(text), display=False)


def glue_all(texts: Mapping[str, str]) -> None:
    """Glue each text under its name (`glue_text`), in order: a chapter module builds the words
    for a section, and its notebook glues them in one call."""
    for name, text in texts.items():
        glue_text(name, text)


def span(values: Sequence[float], spec: str = ".2f") -> str:
    """A range of values in format `spec` ("0.50 to 0.73"), one number when both ends round
    alike."""
    lo, hi = f"{min(values):{spec}}", f"{max(values):{spec}}"
    return lo if lo == hi else f"{lo} to {hi}"


def names(labels: Sequence[str]) -> str:
    """Labels as prose lists them: "A", "A and B", "A, B and C"."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


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


def floor_sentence(scores: Sequence[float], floor: float, what: str) -> str:
    """How many of a sweep's scores clear a floor, e.g. the probe AUC of an untrained encoder
    (`what`: "the untrained encoder"): a setting below it learnt nothing worth having."""
    below = sum(score < floor for score in scores)
    if below == 0:
        return f"Every setting cleared {what} ({floor:.3f})."
    if below == len(scores):
        return f"No setting cleared {what} ({floor:.3f})."
    return f"{below} of the {len(scores)} settings fell below {what} ({floor:.3f})."


def check_sentence(setting: str, values: Sequence, judged: Sequence[float],
                   checked: Sequence[float], split: str = "the test split") -> str:
    """Whether another split (`checked` scores, aligned with `values`) puts the best value where
    the split the sweep was judged on (`judged`) does; when it does not, the sweep has not
    settled the setting."""
    if not len(values) == len(judged) == len(checked) or not len(values):
        raise ValueError("check_sentence: values and both scores must be non-empty and aligned")
    best = max(range(len(values)), key=lambda i: judged[i])
    other = max(range(len(values)), key=lambda i: checked[i])
    if checked[other] == checked[best]:
        return f"On {split} the best was the same, {setting} {values[best]} ({checked[best]:.3f})."
    return (f"On {split} the best was {setting} {values[other]} ({checked[other]:.3f}), not "
            f"{values[best]} ({checked[best]:.3f}): the two splits disagree, so this sweep has "
            "not settled the setting.")


def duration(seconds: float) -> str:
    """A time as people read it: "4.2 s", "2 min 03 s", "1 h 05 min"."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
