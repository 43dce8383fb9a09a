"""Paired comparisons over seeds (cxr_lib.chapters.paired): the verdict table, the verdict,
its sentence and its figure, on hand-made tables."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from cxr_lib.analysis.stats import seed_interval
from cxr_lib.chapters import paired
from cxr_lib.methods.probe import SHARE_COMPARISON

NAMED = paired.Compared("the paper's arm", "the default arm", "the paper's setting",
                        "the paper's is better", "the default is better")


def comparison(diffs_by_group: dict[str, list[float]]) -> pd.DataFrame:
    """Rows of SHARE_COMPARISON with the given differences, each seed's bootstrap interval
    +-0.01 around it."""
    rows = [{"share": group, "seed": seed, "labelled images": 50 + seed,
             "auc_a": 0.8, "auc_b": 0.8 + d, "diff": d, "lower": d - 0.01, "upper": d + 0.01}
            for group, diffs in diffs_by_group.items() for seed, d in enumerate(diffs)]
    return pd.DataFrame(rows, columns=SHARE_COMPARISON)


def test_verdicts_count_the_seeds_and_carry_the_interval_over_them():
    table = comparison({"x": [0.03, 0.05, 0.04], "y": [0.02, -0.02, np.nan]})
    verdicts = paired.paired_verdicts(table, "share", "default", "paper").set_index("share")
    assert list(verdicts.columns[2:4]) == ["default AUC", "paper AUC"]
    x, y = verdicts.loc["x"], verdicts.loc["y"]
    assert x["seeds"] == 3 and y["seeds"] == 2  # the NaN seed is not scored
    assert x["labelled images"] == 51 and x["paper AUC"] == pytest.approx(0.84)
    assert (x["difference"], x["seed lower"], x["seed upper"]) == seed_interval([0.03, 0.05, 0.04])
    assert (x["seeds ahead"], x["bootstrap excludes 0"]) == (3, 3)
    assert (y["seeds ahead"], y["bootstrap excludes 0"]) == (1, 2)


def test_decided_needs_the_interval_over_seeds_and_one_direction():
    assert paired.decided(0.01, 0.05, 10, 10) == paired.B_AHEAD
    assert paired.decided(-0.05, -0.01, 3, 0) == paired.A_AHEAD
    assert paired.decided(0.01, 0.05, 10, 9) == paired.UNDECIDED  # one seed the other way
    assert paired.decided(-0.01, 0.03, 10, 10) == paired.UNDECIDED
    assert paired.decided(math.nan, math.nan, 1, 1) == paired.UNDECIDED
    assert paired.decided(math.nan, math.nan, 0, 0) == paired.UNDECIDED


def test_the_sentence_reads_both_verdicts_one_seed_none_and_a_tie():
    won = paired.paired_sentence(NAMED, "at 10%", 3, 0.80, 0.85, 0.05, 0.02, 0.08, 3, 2)
    assert won == ("at 10% the paper's arm reached a test AUC of 0.850 against 0.800 for the "
                   "default arm, a paired difference of +0.050 (95% interval over 3 seeds "
                   "[+0.020, +0.080]); the paper's setting was ahead in 3 of 3 seeds, and the "
                   "paired bootstrap over test patients excluded zero in 2 of 3: decided: the "
                   "paper's is better")
    lost = paired.paired_sentence(NAMED, "here", 3, 0.85, 0.80, -0.05, -0.08, -0.02, 0, 3)
    assert lost.endswith("ahead in 0 of 3 seeds, and the paired bootstrap over test patients "
                         "excluded zero in 3 of 3: decided: the default is better")
    one = paired.paired_sentence(NAMED, "here", 1, 0.9, 0.93, 0.03, math.nan, math.nan, 1, 1)
    assert "one seed, so no interval over seeds" in one and "ahead in its one seed" in one
    assert one.endswith("not decided at this scale")
    nan = math.nan
    none = paired.paired_sentence(NAMED, "at 10%", 0, nan, nan, nan, nan, nan, 0, 0)
    assert none == ("at 10% no seed could be scored (labelled images of one class only leave "
                    "nothing to fit)")
    tie = paired.paired_sentence(NAMED, "here", 10, 0.95, 0.95, 0.0, -0.01, 0.01, 5, 0)
    assert "[-0.010, +0.010]" in tie and "ahead in 5 of 10 seeds" in tie
    assert tie.endswith("not decided at this scale")


def test_the_figure_draws_one_panel_a_group_and_says_why_there_is_none():
    table = comparison({"x": [0.03, 0.05, 0.04], "y": [0.02, -0.02, 0.0]})
    fig = paired.seeds_figure(table, "share", {"x": "panel x", "y": "panel y"}, "Title",
                              "b - a", "not run")
    assert [ax.get_title() for ax in fig.axes] == ["panel x", "panel y"]
    assert fig.axes[0].get_ylabel() == "b - a"
    assert fig._suptitle.get_text() == "Title: paired differences by seed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend would warn the reader
        empty = paired.seeds_figure(table.iloc[:0], "share", {}, "Title", "b - a", "not run")
    assert empty.axes[0].texts[0].get_text() == "not run"


def test_seeds_figure_wraps_many_panels_into_rows_and_hides_the_empty_places():
    table = comparison({g: [0.01, 0.02] for g in "abcd"})
    fig = paired.seeds_figure(table, "share", {g: f"panel {g}" for g in "abcd"}, "Title",
                              "b - a", "not run")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["panel a", "panel b", "panel c", "panel d"]
    assert len(fig.axes) == 6 and fig.get_size_inches() == pytest.approx((12.6, 6.8))
    assert [ax.get_ylabel() for ax in shown] == ["b - a", "", "", "b - a"]
