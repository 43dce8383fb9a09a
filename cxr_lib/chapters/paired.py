"""Paired comparisons over seeds, for chapters 2 and 4: the verdict table, the verdict, its
sentence and its figure.

A comparison holds two arms, a and b, scored on the same test images once per seed, each row a
(group, seed) with the columns of `methods.probe.SHARE_COMPARISON`: both mean AUCs, the
difference b - a and its paired patient-bootstrap 95% interval. Two intervals answer two
questions: the bootstrap says what other test images could move one seed's difference; the
Student-t interval over seeds (`seed_interval`) says what another seed could move. A
comparison is decided only when the interval over seeds excludes zero and every seed points
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from cxr_lib.analysis.stats import seed_interval

B_AHEAD, A_AHEAD, UNDECIDED = "b ahead", "a ahead", "not decided"


@dataclass(frozen=True)
class Compared:
    """How the words name one paired comparison: arm b (`ours`) against arm a (`rival`), b's
    short name for the count of seeds it led, and the verdict each way."""

    ours: str
    rival: str
    ours_name: str
    ours_better: str
    rival_better: str


def paired_verdicts(table: pd.DataFrame, by: str, a: str, b: str) -> pd.DataFrame:
    """Per group (`by`): the seeds scored, the labelled images, both mean AUCs (columns
    "<a> AUC" and "<b> AUC"), the mean difference b - a with its 95% interval over seeds, the
    seeds b was ahead in, and the seeds whose paired bootstrap interval excluded zero."""
    rows = []
    for group, part in table.groupby(by, sort=True):
        scored = part.dropna(subset=["diff"])
        mean, lower, upper = seed_interval(scored["diff"])
        rows.append({by: group, "seeds": len(scored),
                     "labelled images": float(part["labelled images"].mean()),
                     f"{a} AUC": scored["auc_a"].mean(), f"{b} AUC": scored["auc_b"].mean(),
                     "difference": mean, "seed lower": lower, "seed upper": upper,
                     "seeds ahead": int((scored["diff"] > 0).sum()),
                     "bootstrap excludes 0": int(((scored["lower"] > 0)
                                                  | (scored["upper"] < 0)).sum())})
    return pd.DataFrame(rows)


def decided(lower: float, upper: float, seeds: int, ahead: int) -> str:
    """The verdict: `B_AHEAD` or `A_AHEAD` when the interval over seeds excludes zero and every
    seed points the same way (b ahead in all of them, or in none), else `UNDECIDED`."""
    if not (seeds >= 2 and math.isfinite(lower) and math.isfinite(upper)):
        return UNDECIDED
    one_way = ahead in (0, seeds)
    if lower > 0 and one_way:
        return B_AHEAD
    if upper < 0 and one_way:
        return A_AHEAD
    return UNDECIDED


def paired_sentence(compared: Compared, where: str, seeds: int, auc_a: float, auc_b: float,
                    difference: float, lower: float, upper: float, ahead: int,
                    excluded: int) -> str:
    """One group's comparison in words, `where` its setting ("with 10% of the training
    labels"), with its verdict."""
    if seeds == 0 or not math.isfinite(difference):
        return (f"{where} no seed could be scored (labelled images of one class only leave "
                "nothing to fit)")
    spread = (f"95% interval over {seeds} seeds [{lower:+.3f}, {upper:+.3f}]" if seeds > 1
              else "one seed, so no interval over seeds")
    told = {B_AHEAD: f"decided: {compared.ours_better}",
            A_AHEAD: f"decided: {compared.rival_better}",
            UNDECIDED: "not decided at this scale"}[decided(lower, upper, seeds, ahead)]
    lead = (f"ahead in {ahead} of {seeds} seeds" if seeds > 1 else
            "ahead in its one seed" if ahead else "not ahead in its one seed")
    return (f"{where} {compared.ours} reached a test AUC of {auc_b:.3f} against {auc_a:.3f} "
            f"for {compared.rival}, a paired difference of {difference:+.3f} ({spread}); "
            f"{compared.ours_name} was {lead}, and the paired bootstrap over test patients "
            f"excluded zero in {excluded} of {seeds}: {told}")


def seeds_figure(table: pd.DataFrame, by: str, panel_titles: Mapping, title: str, ylabel: str,
                 missing: str, per_row: int = 3) -> Figure:
    """Each seed's paired difference with its bootstrap interval, one panel a group (`by`,
    titled by `panel_titles`, in its order, at most `per_row` panels a row), the interval over
    seeds shaded; `missing` says why a table without rows has no panel."""
    present = set(table[by])
    groups = [group for group in panel_titles if group in present]
    cols = min(per_row, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True,
                             squeeze=False)
    for ax in axes.flat[max(1, len(groups)):]:
        ax.set_visible(False)  # the empty places of the last row
    for ax, group in zip(axes.flat, groups, strict=False):
        part = table[table[by] == group].dropna(subset=["diff"])
        _, lower, upper = seed_interval(part["diff"])
        ax.axhspan(lower, upper, color="#c44e52", alpha=0.15, label="95% interval over seeds")
        ax.errorbar(part["seed"], part["diff"], yerr=[part["diff"] - part["lower"],
                                                      part["upper"] - part["diff"]],
                    fmt="o", color="#c44e52", capsize=3, label="one seed (bootstrap 95%)")
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.set(title=panel_titles[group], xlabel="seed", xticks=part["seed"].to_numpy())
    for row in axes:
        row[0].set_ylabel(ylabel)
    if groups:
        axes[0][0].legend(fontsize=7, loc="lower left")
    else:
        axes[0][0].text(0.5, 0.5, missing, ha="center", va="center",
                        transform=axes[0][0].transAxes)
    fig.suptitle(f"{title}: paired differences by seed", fontsize=10)
    fig.tight_layout()
    return fig
