"""The results page's words and table (cxr_lib.chapters.results), on hand-made executed
chapters and a hand-made table of chapter 4's starts."""

from __future__ import annotations

import math

import nbformat
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cxr_lib.chapters.files import chapter4_table_name, runs_dir
from cxr_lib.chapters.results import (
    NOT_RUN,
    VERDICTS,
    glued_texts,
    sentence,
    starts_beside_papers,
    starts_figure,
    verdict_words,
)


def executed(path, glued: dict[str, str]) -> None:
    """A chapter as papermill leaves it: one code cell whose outputs are myst-nb glue records
    (and one plain output that is not)."""
    outputs = [nbformat.v4.new_output(
        "display_data", data={"application/papermill.record/text/markdown": text,
                              "application/papermill.record/text/plain": "<Markdown>"},
        metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})
        for name, text in glued.items()]
    outputs.append(nbformat.v4.new_output("stream", name="stdout", text="not glued\n"))
    cell = nbformat.v4.new_code_cell("glue_all(...)", execution_count=1, outputs=outputs)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)


def test_glued_texts_reads_every_glued_sentence_by_name(tmp_path):
    executed(tmp_path / "02_mae_pretraining.ipynb", {"mask_sentence": "the best came at 0.9",
                                                     "empty": ""})
    assert glued_texts(tmp_path / "02_mae_pretraining.ipynb") == {
        "mask_sentence": "the best came at 0.9", "empty": ""}


def test_without_executed_chapters_every_verdict_says_its_chapter_did_not_run(tmp_path):
    words = verdict_words(tmp_path)
    assert len(words) == sum(len(names) for names in VERDICTS.values())
    assert words["ch2_mask_sentence"] == NOT_RUN.format(number=2)
    assert words["ch6_ranking"] == (
        "*(chapter 6 was not executed in this edition, so it has no verdict here)*")


def test_one_executed_chapter_gives_its_verdicts_and_a_missing_one_is_said(tmp_path):
    executed(tmp_path / "04_finetuning_ablations.ipynb",
             {"start_sentence": "MAE led by 0.03", "label_verdict": "", "other": "unused"})
    words = verdict_words(tmp_path)
    assert words["ch4_start_sentence"] == "MAE led by 0.03."  # a full stop added
    assert words["ch4_label_verdict"] == NOT_RUN.format(number=4)  # glued, but empty
    assert words["ch4_signal_note"] == NOT_RUN.format(number=4)  # never glued
    assert "ch4_other" not in words and words["ch5_paired_sentence"] == NOT_RUN.format(number=5)


def starts_table(tmp_path, rows: list[tuple[str, str, float]]) -> None:
    runs = runs_dir(tmp_path)
    runs.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["model", "init", "test_auc"]).to_parquet(
        runs / f"{chapter4_table_name('starts')}.parquet")


def test_the_starts_stand_beside_the_papers_numbers_where_the_paper_has_one(tmp_path):
    starts_table(tmp_path, [("vit_tiny_patch16", "random", 0.50), ("vit_tiny_patch16", "mae", 0.54),
                            ("vit_tiny_patch16", "mae", 0.56), ("densenet121", "moco", 0.52)])
    table = starts_beside_papers(tmp_path)
    assert table[["family", "start"]].values.tolist() == [["ViT", "random"], ["ViT", "mae"],
                                                          ["DenseNet", "moco"]]
    assert table["ours"].tolist() == pytest.approx([50.0, 55.0, 52.0])  # mean over seeds
    assert math.isnan(table["theirs"][0])  # Xiao et al. publish no random start
    assert table["theirs"][1:].tolist() == [82.3, 80.6]
    assert table["their model"].tolist() == ["ViT-S/16", "ViT-S/16", "DenseNet-121"]
    figure = starts_figure(table)
    assert isinstance(figure, Figure)
    bars = [p for p in figure.axes[0].patches]
    assert len(bars) == 3 + 2  # ours for every start, theirs where published


def test_without_chapter_4s_starts_the_page_says_to_run_chapter_4(tmp_path):
    with pytest.raises(FileNotFoundError, match="run chapter 4"):
        starts_beside_papers(tmp_path)
    starts_table(tmp_path, [])
    with pytest.raises(ValueError, match="wrote no table of starts"):
        starts_beside_papers(tmp_path)


def test_every_verdict_ends_as_a_sentence():
    assert sentence("this edition cannot rank them") == "this edition cannot rank them."
    assert sentence("the best came at 0.9. ") == "the best came at 0.9."
    assert sentence(NOT_RUN.format(number=3)).endswith("here)*")
