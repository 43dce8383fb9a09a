"""Every chapter executes under the `smoke` profile on real NIH and pediatric X-rays (the data
branches the published and `gpu-sample` editions take; skipped where the samples are absent),
in a copy of the project as in tests/test_chapters.py. The study reads a quarter of each shipped
sample's patients: the same readers and chapters on 359 images instead of 1,427, because the
whole samples took this study 13 minutes on a 2-core machine (the cpu edition, which
`make book` runs, reads them whole)."""

import json
from pathlib import Path

import pytest
from samples import patient_share
from test_chapters import CHAPTERS, assert_reads_cleanly, execute_study, glued_text


@pytest.fixture(scope="module")
def executed_on_samples(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("samples")
    return execute_study(tmp_path_factory.mktemp("study-samples"),
                         data_root=patient_share("nih-cxr14-sample", "chestxray14",
                                                 data / "nih", every=4),
                         pediatric_root=patient_share("pediatric-pneumonia-sample", "folder",
                                                      data / "pediatric", every=4))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executes_on_the_real_samples_and_says_so(executed_on_samples, chapter):
    path = executed_on_samples / "build" / "smoke" / "chapters" / f"{chapter}.ipynb"
    glued = glued_text(assert_reads_cleanly(json.loads(path.read_text())))
    said = " ".join(glued.values())
    assert "ChestX-ray14" in said and "phantoms (no data root" not in said
    if chapter == "06_cocktail_hiera":
        assert "pediatric" in glued["cocktail_sources"]
