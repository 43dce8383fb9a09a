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
