import pytest
from IPython.display import Markdown

from cxr_lib import report


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
