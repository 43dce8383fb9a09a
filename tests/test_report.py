import pytest
from IPython.display import Markdown

from cxr_lib.chapters import sentences as report


def test_glue_text_glues_markdown_without_displaying(monkeypatch):
    calls = []
    monkeypatch.setattr(report, "glue",
                        lambda name, obj, display: calls.append((name, obj, display)))
    report.glue_text("auc", "**0.81** mean AUC")
    [(name, obj, display)] = calls
    assert name == "auc" and display is False
    assert isinstance(obj, Markdown) and obj.data == "**0.81** mean AUC"


def test_sweep_sentence_names_the_best_and_the_marked_choices():
    text = report.sweep_sentence("mask ratio", [0.5, 0.75, 0.9], [0.61, 0.70, 0.66],
                                 {"the paper's choice": 0.9, "the ImageNet default": 0.75})
    assert text.startswith("the best probe AUC (0.700) came at mask ratio 0.75")
    assert "the paper's choice (0.9) reached 0.660, 0.040 below the best" in text
    assert "the ImageNet default (0.75) reached 0.700, the best" in text
    assert text.endswith("All settings lie within 0.090 of each other.")


def test_sweep_sentence_handles_tuples_and_refuses_unknown_marks():
    scales = [(0.2, 1.0), (0.5, 1.0)]
    text = report.sweep_sentence("crop scale", scales, [0.5, 0.6], {"the paper": (0.5, 1.0)})
    assert "came at crop scale (0.5, 1.0)" in text
    assert "the paper ((0.5, 1.0)) reached 0.600" in text
    with pytest.raises(ValueError, match="not among the values"):
        report.sweep_sentence("crop scale", scales, [0.5, 0.6], {"x": (0.8, 1.0)})


def test_floor_sentence_counts_the_settings_below_the_floor():
    assert (report.floor_sentence([0.58, 0.62, 0.59], 0.601, "the untrained encoder")
            == "2 of the 3 settings fell below the untrained encoder (0.601).")
    assert report.floor_sentence([0.62, 0.7], 0.6, "it") == "Every setting cleared it (0.600)."
    assert report.floor_sentence([0.5, 0.55], 0.6, "it") == "No setting cleared it (0.600)."


def test_check_sentence_says_whether_the_test_split_agrees():
    values = [0.55, 0.75, 1.0]
    same = report.check_sentence("layer decay", values, [0.60, 0.64, 0.61], [0.50, 0.53, 0.52])
    assert same == "On the test split the best was the same, layer decay 0.75 (0.530)."
    other = report.check_sentence("layer decay", values, [0.60, 0.64, 0.61],
                                  [0.56, 0.53, 0.52])
    assert other == ("On the test split the best was layer decay 0.55 (0.560), not 0.75 "
                     "(0.530): the two splits disagree, so this sweep has not settled the "
                     "setting.")
    tie = report.check_sentence("drop path", [0.0, 0.2], [0.5, 0.6], [0.51, 0.51])
    assert tie.startswith("On the test split the best was the same, drop path 0.2")
    with pytest.raises(ValueError, match="aligned"):
        report.check_sentence("x", [1, 2], [0.5, 0.6], [0.5])


def test_span_and_names_read_as_prose():
    assert report.span([0.731, 0.5]) == "0.50 to 0.73"
    assert report.span([0.331, 0.334], ".0%") == "33%"  # both ends round alike
    assert [report.names(x) for x in (["A"], ["A", "B"], ["A", "B", "C"])] == [
        "A", "A and B", "A, B and C"]


def test_glue_all_glues_every_text_under_its_name_in_order(monkeypatch):
    glued = []
    monkeypatch.setattr(report, "glue_text", lambda name, text: glued.append((name, text)))
    report.glue_all({"b": "two", "a": "one"})
    assert glued == [("b", "two"), ("a", "one")]


def test_duration_reads_as_people_say_it():
    assert report.duration(4.24) == "4.2 s"
    assert report.duration(123) == "2 min 03 s"
    assert report.duration(3900) == "1 h 05 min"
    assert report.duration(0) == "0.0 s"
