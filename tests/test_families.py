"""The one registry of model families (cxr_lib.models.families): every model name, one family."""

import re
from pathlib import Path

import pytest

from cxr_lib.models import FAMILIES, HIERA_PRESETS, PRESETS, family, mae_family, timm_name
from cxr_lib.models.classifier import is_vit, supports_layer_decay
from cxr_lib.models.families import CNNS

LIBRARY = Path(timm_name.__code__.co_filename).resolve().parents[1]


@pytest.mark.parametrize(("model", "kind"), [
    ("vit_tiny_patch16", "vit"), ("vit_small_patch16_224", "vit"), ("vit_base_patch16", "vit"),
    ("hiera_tiny", "hiera"), ("hiera_small_224", "hiera"), ("hiera_base", "hiera"),
    ("densenet121", "cnn"), ("resnet50", "cnn")])
def test_every_model_the_library_names_has_one_family(model, kind):
    assert family(model) == kind
    assert is_vit(model) == (kind == "vit") and supports_layer_decay(model) == (kind != "cnn")


def test_the_families_partition_the_known_timm_names_and_the_mae_presets():
    names = [name for members in FAMILIES.values() for name in members]
    assert len(names) == len(set(names)) == len(PRESETS) + len(HIERA_PRESETS) + len(CNNS)
    assert all(family(name) == kind for kind, members in FAMILIES.items() for name in members)
    assert {mae_family(name) for name in PRESETS} == {"vit"}
    assert {mae_family(name) for name in HIERA_PRESETS} == {"hiera"}
    with pytest.raises(ValueError, match="unknown MAE model 'densenet121'"):
        mae_family("densenet121")
    with pytest.raises(ValueError, match="unknown classifier 'vit_huge'"):
        family("vit_huge")


def test_no_other_module_keeps_a_list_of_a_family_or_tests_a_name_by_its_prefix():
    own = {"families.py", "mae.py", "hiera_mae.py"}  # the registry and the two preset tables
    found = []
    for path in LIBRARY.rglob("*.py"):
        if path.parent.name == "models" and path.name in own:
            continue
        text = path.read_text()
        for pattern in (r"\bCNNS\s*=", r"\bVITS\s*=", r"\bHIERAS\s*=", r"in HIERA_PRESETS",
                        r"in PRESETS", r"""startswith\(["'](vit|hiera|densenet|resnet)"""):
            found += [f"{path.relative_to(LIBRARY)}: {m.group(0)}"
                      for m in re.finditer(pattern, text)]
    assert found == []
