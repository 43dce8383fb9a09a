"""The papers' numbers, and the published edition committed in book/chapters/."""

import json
import shutil
from pathlib import Path

import pytest
from test_browser import check_book_in_browser
from test_chapters import CHAPTERS, ROOT, assert_reads_cleanly

from cxr_lib.analysis.published import (
    medtransformer_per_label,
    published_chestxray14,
    published_for,
)
from cxr_lib.book.runner import build_book

EDITION = ROOT / "book" / "chapters"


def test_published_table_holds_the_papers_headline_numbers():
    table = published_chestxray14()
    xiao = table[table["source"] == "Xiao et al. 2023"].set_index(["model", "pre-training"])
    assert xiao.loc[("ViT-S/16", "X-ray MAE"), "mean AUC (%)"] == 82.3
    assert xiao.loc[("DenseNet-121", "X-ray MoCo v2"), "mean AUC (%)"] == 80.6
    assert len(table) == 8 and table["mean AUC (%)"].between(70, 90).all()
    over = table.set_index("source")["averaged over"]
    assert set(over["Xiao et al. 2023"]) == {"the 14 findings"}
    assert over["Deutch and Levin (MedTransformer)"].startswith("15 labels")
    tested = table.set_index("source")["tested on"]
    assert set(tested["Xiao et al. 2023"]) == {"the official test split (25,596 images)"}
    assert "last third" in tested["Deutch and Levin (MedTransformer)"]


def test_medtransformers_per_label_table_averages_to_its_headline():
    per_label = medtransformer_per_label()
    assert len(per_label) == 15 and per_label["No Finding"] == 79.14
    assert per_label.mean() == pytest.approx(81.68, abs=0.005)  # its 81.6, No Finding in
    assert per_label.drop("No Finding").mean() == pytest.approx(81.86, abs=0.005)


def test_a_models_published_rows_are_found_by_this_projects_name():
    vit = published_for("vit_small_patch16")
    assert set(vit["pre-training"]) == {"ImageNet, supervised", "ImageNet, MAE", "X-ray MAE"}
    assert set(published_for("densenet121")["mean AUC (%)"]) == {82.2, 80.6, 81.2}
    assert published_for("vit_tiny_patch16").empty


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_is_published_executed_cleanly_under_the_profile_the_intro_names(chapter):
    nb = json.loads((EDITION / f"{chapter}.ipynb").read_text())
    profile = nb["metadata"]["papermill"]["parameters"]["profile"]
    intro = (ROOT / "book" / "intro.md").read_text()
    assert f"executed with the `{profile}` profile" in intro
    assert_reads_cleanly(nb)
    source = json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())
    assert _written(source) == _written(nb), (
        "the published chapter differs from notebooks/: publish the chapter again")
    record = nb["metadata"]["papermill"]
    paths = record["input_path"], record["output_path"], record["parameters"]["work_dir"]
    assert not any(Path(p).is_absolute() for p in paths), (
        f"the edition names the build machine's folders {paths}: publish the chapter again")


def _written(notebook: dict) -> list[tuple[str, str]]:
    """A notebook's cells as written (type, source), without papermill's injected cell."""
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.fixture(scope="module")
def published_book(tmp_path_factory) -> Path:
    """index.html of the committed edition, rendered in a copy (warnings are errors)."""
    repo = tmp_path_factory.mktemp("published")
    shutil.copytree(ROOT / "book", repo / "book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, repo / name)
    return build_book("published", published=True, repo=repo)


def test_the_published_edition_renders_and_loads_cleanly_in_a_browser(published_book):
    check_book_in_browser(published_book, CHAPTERS)
