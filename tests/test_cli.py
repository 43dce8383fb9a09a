"""The `cxr data` commands on the real samples, and their one-line errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from samples import sample

from cxr_lib.cli import main
from cxr_lib.data.cache import open_cache
from cxr_lib.data.nih import read_chestxray14


def test_prepare_the_nih_sample_finds_every_image_in_its_official_split(tmp_path, capsys):
    root = sample("nih-cxr14-sample")
    out = tmp_path / "nih-32"
    main(["data", "prepare", "--source", "chestxray14", "--root", str(root), "--size", "32",
          "--out", str(out), "--workers", "2"])
    assert "621 images" in capsys.readouterr().out
    cache = open_cache(out)
    splits = cache.index["split"].value_counts()
    assert len(cache) == 621 and splits["test"] == 75 and splits["train"] + splits["val"] == 546
    assert cache.index.groupby("patient")["split"].nunique().max() == 1
    expected = read_chestxray14(root)  # the labels test_nih checks against torchxrayvision
    order = expected.meta.set_index("id").index.get_indexer(cache.index["id"])
    np.testing.assert_array_equal(cache.labels, expected.labels[order])
    main(["data", "check", str(out)])
    assert "621 images" in capsys.readouterr().out


def test_full_resolution_images_take_the_same_path(tmp_path):
    root = sample("nih-cxr14-fullres")
    out = tmp_path / "fullres"
    main(["data", "prepare", "--source", "chestxray14", "--root", str(root), "--size", "64",
          "--out", str(out), "--workers", "2"])
    cache = open_cache(out)
    assert len(cache) == 16 and cache.images.shape == (16, 64, 64)
    assert set(cache.index["orig_width"]) == {1024}
    rgba = cache.index["id"].isin(["00000100_000.png", "00001369_000.png", "00002578_000.png",
                                   "00004934_000.png", "00005224_000.png", "00005813_000.png"])
    assert rgba.sum() == 2  # the two RGBA files of the full-resolution sample
    assert all(cache.images[i].std() > 10 for i in np.flatnonzero(rgba))  # real content


def test_phantoms_need_no_root(tmp_path, capsys):
    main(["data", "prepare", "--source", "phantom", "--count", "12", "--size", "32", "--out",
          str(tmp_path / "ph"), "--workers", "1"])
    assert "12 images of 32x32 uint8" in capsys.readouterr().out
    cache = open_cache(tmp_path / "ph")
    assert len(cache) == 12 and cache.images.shape == (12, 32, 32)
    assert len({bytes(image) for image in cache.images}) == 12  # twelve different phantoms


def test_bad_input_ends_with_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^cxr: error: .*label file"):
        main(["data", "prepare", "--source", "chestxray14", "--root", str(tmp_path), "--out",
              str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^cxr: error: "):
        main(["data", "check", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^cxr: error: .*typo: no such folder"):
        main(["data", "prepare", "--source", "chestxray14", "--root", str(tmp_path / "typo"),
              "--out", str(tmp_path / "out")])


def test_a_setting_the_library_refuses_is_a_one_line_error_naming_where(tmp_path):
    """ValueErrors of the library are messages for the user; the line says where it was
    raised, for a bug report, instead of printing the traceback."""
    with pytest.raises(SystemExit, match=r"^cxr: error: --axis 'foo': write NAME=V1,V2 .*"
                                         r"\(ValueError at cli\.py:\d+\)$"):
        main(["grid", "--data", str(tmp_path), "--axis", "foo"])


def _finetune_recipe(*options: str):
    from cxr_lib.cli import _recipe_and_config, build_parser

    args = build_parser().parse_args(["finetune", "--data", "unused", *options])
    _, recipe, config = _recipe_and_config(args)
    return recipe, config


def test_finetune_options_left_out_come_from_the_profile_and_none_turns_a_setting_off():
    from cxr_lib.book.profiles import load_profile

    section = load_profile("cpu").chapters["04_finetuning_ablations"]
    recipe, config = _finetune_recipe()
    assert (recipe.model, recipe.image_size, config.epochs) == (
        section["vit_model"], section["image_size"], section["epochs"])
    assert recipe.layer_decay == 0.55 and recipe.randaug_magnitude == 6.0  # the paper's
    off, _ = _finetune_recipe("--layer-decay", "none", "--randaug", "off", "--epochs", "3")
    assert off.layer_decay is None and off.randaug_magnitude is None
    assert _finetune_recipe("--randaug", "3")[0].randaug_magnitude == 3.0
    assert _finetune_recipe("--epochs", "3")[1].epochs == 3


def test_one_resolver_gives_the_flag_then_the_profile_then_the_default():
    from types import SimpleNamespace

    from cxr_lib.book.profiles import ProfileError
    from cxr_lib.cli import _Settings

    profile = SimpleNamespace(path="p.yaml", chapters={"sec": {"a": 2, "b": None, "m": [7, 8]}})
    given = _Settings(SimpleNamespace(a=1, b=5, c=None), profile, "sec")
    assert (given("a", default=3), given("b", default=3), given("c", default=3)) == (1, 5, None)
    left_out = _Settings(SimpleNamespace(), profile, "sec")
    assert (left_out("a", default=3), left_out("z", default=3), left_out("z", "a")) == (2, 3, 2)
    assert left_out("b", default=3) is None  # a profile's null is its value, as a flag's none
    assert left_out("model", "m", first=True) == 7 and left_out("z", first=True) is None
    left_out("z", required=True)
    left_out("y", "a", required=True)  # found in the profile: not missing
    with pytest.raises(ProfileError, match=r"^p.yaml: the sec section does not set z; add "
                                           r"them there or pass --z$"):
        left_out.check()


def _profile_with(tmp_path, section: str, **values) -> str:
    import yaml

    from cxr_lib.book.profiles import load_profile

    data = yaml.safe_load(load_profile("cpu").path.read_text())
    data["chapters"][section].update(values)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _mae_recipe(*options: str):
    from cxr_lib.cli import _mae_recipe_and_config, build_parser

    args = build_parser().parse_args(["pretrain", "mae", "--data", "unused", *options])
    return _mae_recipe_and_config(args)[1:]


def test_mae_mask_ratio_and_crop_scale_follow_flag_then_profile_then_paper(tmp_path):
    from cxr_lib.augment.crops import PAPER_MAE_CROP_SCALE
    from cxr_lib.book.profiles import load_profile
    from cxr_lib.models.mae import PAPER_MASK_RATIO

    section = load_profile("cpu").chapters["02_mae_pretraining"]
    recipe, config = _mae_recipe()  # cpu.yaml sets neither
    assert (recipe.mask_ratio, recipe.crop_scale) == (PAPER_MASK_RATIO, PAPER_MAE_CROP_SCALE)
    assert (PAPER_MASK_RATIO, PAPER_MAE_CROP_SCALE) == (0.9, (0.5, 1.0))
    assert (recipe.model, recipe.patch_size, config.epochs) == (
        section["model"], section["patch_size"], section["epochs"])
    assert (section["model"], section["patch_size"]) == ("vit_tiny_patch16", 8)
    profile = _profile_with(tmp_path, "02_mae_pretraining", mask_ratio=0.75,
                            crop_scale=[0.2, 1.0], epochs=2)
    recipe, config = _mae_recipe("--profile", profile)
    assert (recipe.mask_ratio, recipe.crop_scale, config.epochs) == (0.75, (0.2, 1.0), 2)
    recipe, config = _mae_recipe("--profile", profile, "--mask-ratio", "0.5", "--crop-scale",
                                 "0.3", "0.9", "--epochs", "4")
    assert (recipe.mask_ratio, recipe.crop_scale, config.epochs) == (0.5, (0.3, 0.9), 4)


def test_moco_options_follow_the_same_resolver_and_name_what_is_missing(tmp_path):
    from cxr_lib.book.profiles import ProfileError, load_profile
    from cxr_lib.cli import _moco_recipe_and_config, build_parser

    def moco(*options):
        args = build_parser().parse_args(["pretrain", "moco", "--data", "unused", *options])
        return _moco_recipe_and_config(args)[1:]

    section = load_profile("cpu").chapters["03_moco_baselines"]
    recipe, config, _ = moco()
    assert (recipe.model, recipe.image_size, config.epochs) == (
        section["models"][0], section["image_size"], section["epochs"])
    recipe, config, knn = moco("--model", "resnet50", "--epochs", "1", "--knn-k", "3")
    assert (recipe.model, config.epochs, knn.k) == ("resnet50", 1, 3)
    bare = _profile_with(tmp_path, "03_moco_baselines", models=[], epochs=None)
    with pytest.raises(ProfileError, match=r"does not set epochs, model; add them there or "
                                           r"pass --epochs, --model$"):
        moco("--profile", bare)


@pytest.mark.parametrize(("options", "message"), [
    (["--size", "0"], "size must be a whole number >= 1, got 0"),
    (["--size", "-8"], "size must be a whole number >= 1, got -8"),
    (["--size", "8"], "phantom size must be at least 16 pixels, got 8"),
    (["--count", "0"], "count must be a whole number >= 1, got 0"),
    (["--workers", "0"], "workers must be a whole number >= 1, got 0"),
    (["--workers", "-2"], "workers must be a whole number >= 1, got -2"),
    (["--val-fraction", "1.5"], r"val_fraction must be in \[0, 1\), got 1.5"),
    (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
])
def test_a_prepare_option_out_of_range_is_refused_before_anything_is_made(
        tmp_path, options, message):
    with pytest.raises(SystemExit, match=f"^cxr: error: {message} \\(ValueError at "):
        main(["data", "prepare", "--source", "phantom", "--count", "4", "--out",
              str(tmp_path / "out"), *options])
    assert list(tmp_path.iterdir()) == []  # no cache, no .partial folder, no lock file


def test_a_size_of_zero_for_real_images_is_refused_before_anything_is_made(tmp_path):
    """It used to decode into a .partial folder and end in a ZeroDivisionError."""
    with pytest.raises(SystemExit, match="^cxr: error: size must be a whole number >= 1, got 0"):
        main(["data", "prepare", "--source", "chestxray14", "--root",
              str(sample("nih-cxr14-fullres")), "--size", "0", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def copy_pediatric(root: Path, per_class: int = 3) -> Path:
    """A few real pediatric images in the folder-per-class layout, under `root`."""
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((sample("pediatric-pneumonia-sample") / "train" / cls).iterdir())
        (root / "train" / cls).mkdir(parents=True)
        for file in files[:per_class]:
            shutil.copy(file, root / "train" / cls / file.name)
    return root


@pytest.mark.parametrize("spelling", ["peds", "peds/", "./peds", "../work/peds",
                                      "peds/train/.."])
def test_the_same_root_spelt_another_way_is_the_same_request(tmp_path, monkeypatch, capsys,
                                                             spelling):
    """The plan table keeps each image's path: one root given absolute, then relative (with
    `..`, `.` or a trailing slash), must name the same files, so the cache is reused."""
    root = copy_pediatric(tmp_path / "work" / "peds")
    out = tmp_path / "cache"
    prepare = ["data", "prepare", "--source", "folder", "--size", "16", "--out", str(out),
               "--workers", "1", "--root"]
    main([*prepare, str(root)])
    monkeypatch.chdir(root.parent)
    main([*prepare, spelling])
    assert "6 images of 16x16" in capsys.readouterr().out
    assert set(open_cache(out).index["path"]) == {str(p) for p in root.rglob("*.jpeg")}


def test_another_root_with_the_same_files_is_still_another_request(tmp_path):
    first = copy_pediatric(tmp_path / "a" / "peds")
    other = tmp_path / "b" / "peds"
    shutil.copytree(first, other)  # same ids (source "peds"), other files
    out = tmp_path / "cache"
    prepare = ["data", "prepare", "--source", "folder", "--size", "16", "--out", str(out),
               "--workers", "1", "--root"]
    main([*prepare, str(first)])
    with pytest.raises(SystemExit, match=f"different request \\(path at row 0 is "
                                         f"'{first}/.*', requested '{other}/"):
        main([*prepare, str(other)])


def test_seed_follows_the_flag_then_the_profiles_shared_seed_then_zero(tmp_path):
    import yaml

    from cxr_lib.book.profiles import load_profile
    from cxr_lib.cli import _moco_recipe_and_config, build_parser

    data = yaml.safe_load(load_profile("cpu").path.read_text())
    data["shared"]["seed"] = 7
    seven = tmp_path / "seven.yaml"
    seven.write_text(yaml.safe_dump(data))
    del data["shared"]["seed"]
    none = tmp_path / "none.yaml"
    none.write_text(yaml.safe_dump(data))
    for profile, flag, expected in ((seven, [], 7), (seven, ["--seed", "2"], 2), (none, [], 0)):
        options = ["--profile", str(profile), *flag]
        assert _mae_recipe(*options)[1].seed == expected
        assert _finetune_recipe(*options)[1].seed == expected
        args = build_parser().parse_args(["pretrain", "moco", "--data", "unused", *options])
        assert _moco_recipe_and_config(args)[2].seed == expected
    with pytest.raises(SystemExit, match=r"^cxr: error: seed must be a whole number >= 0, "
                                         r"got -1 \(ValueError at "):
        main(["pretrain", "mae", "--data", str(tmp_path), "--seed", "-1", "--threads", "1"])


def test_threads_default_to_a_core_fewer_and_are_set_before_any_work(tmp_path, capsys,
                                                                    monkeypatch):
    import torch

    from cxr_lib.device import default_threads

    before = torch.get_num_threads()
    try:
        for cores, expected in ((2, 1), (1, 1), (None, 1), (16, 15)):
            monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
            assert default_threads() == expected
        monkeypatch.setattr("os.cpu_count", lambda: 2)  # the shared 2-core machine
        with pytest.raises(SystemExit, match="^cxr: error: "):  # no cache there
            main(["evaluate", "--data", str(tmp_path / "absent"), "--weights", "w.pt",
                  "--model", "densenet121"])
        assert capsys.readouterr().out.splitlines()[0] == "threads: 1"
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit, match=r"^cxr: error: threads must be a whole number "
                                             r">= 1, got 0 \(ValueError at device\.py:\d+\)$"):
            main(["finetune", "--data", str(tmp_path), "--threads", "0"])
    finally:
        torch.set_num_threads(before)


def test_several_sources_go_into_one_cache_each_image_keeping_its_source(tmp_path, capsys):
    from cxr_lib.data.core import FINDINGS
    from cxr_lib.data.folder import read_class_folders

    nih_root, ped_root = sample("nih-cxr14-sample"), sample("pediatric-pneumonia-sample")
    out = tmp_path / "both"
    main(["data", "prepare", "--source", "chestxray14", "--root", str(nih_root),
          "--source", "folder", "--root", str(ped_root), "--test-fraction", "0.25",
          "--size", "32", "--out", str(out), "--workers", "2"])
    assert f"{621 + 806} images of 32x32" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.name == "chestxray14+pediatric-pneumonia-sample"
    counts = cache.index.groupby(["source", "split"]).size()
    nih = counts["chestxray14"]
    assert nih.sum() == 621 and nih["test"] == 75  # the official test list, untouched
    expected = read_class_folders(ped_root, test_fraction=0.25).meta["split"].value_counts()
    ped = counts["pediatric-pneumonia-sample"]
    assert ped.sum() == 806 and ped.to_dict() == expected.to_dict()
    assert cache.index.groupby(["source", "patient"])["split"].nunique().max() == 1
    assert cache.findings == list(FINDINGS)  # the pediatric Pneumonia joins NIH's column
    is_ped = (cache.index["source"] == "pediatric-pneumonia-sample").to_numpy()
    pneumonia = cache.labels[:, FINDINGS.index("Pneumonia")]
    assert pneumonia[is_ped].sum() == 403 and pneumonia[~is_ped].sum() == 32
    assert np.isnan(np.delete(cache.labels[is_ped], FINDINGS.index("Pneumonia"), 1)).all()


def test_several_sources_pair_roots_in_order_and_phantoms_take_none(tmp_path):
    peds = copy_pediatric(tmp_path / "peds")
    out = tmp_path / "mix"
    main(["data", "prepare", "--source", "phantom", "--source", "folder", "--root", str(peds),
          "--count", "10", "--size", "16", "--out", str(out), "--workers", "1"])
    cache = open_cache(out)
    assert cache.index["source"].value_counts().to_dict() == {"phantom": 10, "peds": 6}
    assert cache.name == "phantom+peds"


@pytest.mark.parametrize(("options", "message"), [
    (["--source", "folder", "--source", "phantom"],
     r"sources folder, phantom read 1 root\(s\) \(folder\), 0 given: give one --root"),
    (["--source", "chestxray14", "--root", "A", "--source", "folder"],
     r"sources chestxray14, folder read 2 root\(s\) \(chestxray14, folder\), 1 given"),
    (["--source", "phantom", "--source", "phantom"], r"sources phantom given twice"),
    (["--source", "phantom", "--test-fraction", "1"], r"test_fraction must be in \[0, 1\)"),
])
def test_sources_that_do_not_pair_are_a_one_line_error(tmp_path, options, message):
    with pytest.raises(SystemExit, match=f"^cxr: error: {message}"):
        main(["data", "prepare", *options, "--count", "4", "--size", "16",
              "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_test_images_gets_a_patient_disjoint_test_split(tmp_path, capsys):
    root = sample("pediatric-pneumonia-sample")
    prepare = ["data", "prepare", "--source", "folder", "--root", str(root), "--size", "16",
               "--workers", "2", "--out"]
    main([*prepare, str(tmp_path / "a"), "--test-fraction", "0.3", "--seed", "1"])
    main([*prepare, str(tmp_path / "b"), "--test-fraction", "0.3", "--seed", "1"])
    main([*prepare, str(tmp_path / "c")])  # the reader's default share, 0.2
    a, b, c = (open_cache(tmp_path / name) for name in "abc")
    np.testing.assert_array_equal(a.index["split"], b.index["split"])  # the same seed
    for cache, fraction in ((a, 0.3), (c, 0.2)):
        patients = cache.index.groupby("split")["patient"].nunique()
        assert patients["test"] == round(fraction * cache.index["patient"].nunique())
        assert cache.index.groupby("patient")["split"].nunique().max() == 1
    assert "test" in capsys.readouterr().out  # the summary's split columns
