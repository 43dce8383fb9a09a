"""Fine-tuning through the engine: layer-wise LR decay, one test pass, reload, label shares."""

import argparse
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from fastai.callback.core import Callback

from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.cli import main
from cxr_lib.data.cache import prepare_cache
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.data.splits import label_subset
from cxr_lib.engine import runs
from cxr_lib.engine.metrics import mean_auc
from cxr_lib.engine.runs import weights_digest
from cxr_lib.engine.schedule import schedule_at
from cxr_lib.methods import finetune as ft
from cxr_lib.methods.finetune import (
    PAPER_EVAL_CROP,
    PAPER_NORMALISE,
    TEST_SCORES,
    FinetuneRecipe,
    MultiLabelMixup,
    evaluate_weights,
    finetune,
    finetune_augment,
    paper_config,
)
from cxr_lib.methods.mae import cache_identity
from cxr_lib.models import classifier
from cxr_lib.models.classifier import WeightsUnavailable

RECIPE = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8, layer_decay=0.5,
                        drop_path=0.1, randaug_magnitude=6.0)
CONFIG = paper_config(epochs=2, warmup_epochs=1, batch_size=16, base_lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return chapter_cache(work, phantom_dataset(60, size=32, seed=2), 32)


class GroupLrs(Callback):
    """Records, at every training step, the learning rate each named parameter trains with."""

    order = 2  # after the engine's schedule (1) has set this step's rates

    def before_fit(self) -> None:
        self.steps, self.rows = len(self.learn.dls.train), []
        self.names = {id(p): n for n, p in self.learn.model.named_parameters()}

    def before_batch(self) -> None:
        if not self.learn.training:
            return
        lrs = {self.names[id(p)]: g["lr"] for g in self.learn.opt.opt.param_groups
               for p in g["params"]}
        self.rows.append((self.learn.train_iter, lrs))


def layer_of(name: str, depth: int) -> int:
    """timm's layer index for decay: embeddings 0, block i at i + 1, the rest (norms, head)
    at depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_each_layer_trains_at_decay_to_the_depth_minus_i_times_the_schedule(cache, tmp_path):
    probe = GroupLrs()
    result = finetune(cache, RECIPE, CONFIG, tmp_path, progress=False, cbs=[probe])
    depth = len(result.model.blocks)
    assert len(probe.rows) == CONFIG.epochs * probe.steps > 2
    for step, lrs in probe.rows[1:]:
        scheduled, _ = schedule_at(result.config, step, probe.steps)
        for name, lr in lrs.items():
            expected = scheduled * RECIPE.layer_decay ** (depth + 1 - layer_of(name, depth))
            assert lr == pytest.approx(expected, rel=1e-9), (step, name)
    assert {layer_of(n, depth) for n in probe.rows[0][1]} == set(range(depth + 2))


def test_the_test_split_is_scored_once_and_a_finished_run_reloads_its_numbers(
        cache, tmp_path, monkeypatch):
    calls = []
    score = ft.evaluate_split

    def counted(*args, **kwargs):
        calls.append(args[2])
        return score(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate_split", counted)
    first = finetune(cache, RECIPE, CONFIG, tmp_path, progress=False)
    assert calls == ["test"] and not first.run.loaded_from_cache
    assert 0 <= first.test_auc <= 1 and 0 <= first.valid_auc <= 1
    assert first.valid_auc == first.run.history["valid_auc"].max()
    stored = json.loads((first.run.path / "metrics.json").read_text())
    assert stored["test_auc"] == first.test_auc
    assert stored["test_images"] == len(cache.split_indices("test"))
    scores = pd.read_parquet(first.run.path / TEST_SCORES)
    test_rows = cache.split_indices("test")
    assert scores["id"].tolist() == cache.index["id"].iloc[test_rows].tolist()
    assert list(scores.columns[2:]) == cache.findings
    assert mean_auc(scores[cache.findings].to_numpy(), cache.labels[test_rows])[0] == pytest.approx(
        first.test_auc)

    again = finetune(cache, RECIPE, CONFIG, tmp_path, progress=False)
    assert calls == ["test"] and again.run.loaded_from_cache
    assert again.run.path == first.run.path and again.test_auc == first.test_auc
    assert list(again.test_per_finding) == list(first.test_per_finding) == cache.findings
    np.testing.assert_equal(list(again.test_per_finding.values()),
                            list(first.test_per_finding.values()))
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a.cpu(), b.cpu())  # the best epoch's weights, both times


def test_label_shares_are_seeded_nested_and_whole_patients(cache):
    train = cache.split_indices("train")
    small, large = label_subset(cache, 0.1, 0), label_subset(cache, 0.5, 0)
    assert set(small) < set(large) < set(train)
    assert np.array_equal(small, label_subset(cache, 0.1, 0))
    assert not np.array_equal(large, label_subset(cache, 0.5, 1))
    patients = cache.index["patient"].to_numpy()
    chosen = set(patients[large])
    assert set(train[np.isin(patients[train], list(chosen))]) == set(large)
    assert len(label_subset(cache, 0.001, 0)) >= 1  # at least one patient


def test_a_label_share_trains_as_many_steps_as_the_whole_split(cache, tmp_path):
    recipe = dataclasses.replace(RECIPE, train_fraction=0.1, randaug_magnitude=None,
                                 layer_decay=None, mixup=0.8, cutmix=1.0)
    config = dataclasses.replace(CONFIG, epochs=1)
    result = finetune(cache, recipe, config, tmp_path, progress=False)
    share, split = len(label_subset(cache, 0.1, config.seed)), len(cache.split_indices("train"))
    assert result.train_images == share < config.batch_size < split  # a share below one batch
    assert result.config.batch_size == config.batch_size  # the whole split's batch and rate
    assert result.run.history["step"].tolist() == [split // config.batch_size]
    stored = json.loads((result.run.path / "config.json").read_text())
    assert stored["extra"]["train_images"] == share
    assert stored["extra"]["draws_per_epoch"] == split
    assert stored["extra"]["recipe"]["mixup"] == 0.8
    assert np.isfinite(result.run.history["train_loss"]).all()
    whole = finetune(cache, dataclasses.replace(recipe, train_fraction=1.0), config, tmp_path,
                     progress=False)
    assert "draws_per_epoch" not in json.loads((whole.run.path / "config.json").read_text())[
        "extra"]
    assert whole.run.history["step"].tolist() == result.run.history["step"].tolist()


def test_mixup_mixes_images_and_labels_with_one_lambda_and_keeps_unknowns_unknown():
    np.random.seed(0)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, float("nan")], [0.0, 0.0]])
    cb = MultiLabelMixup(mixup=1.0, cutmix=0.0, num_classes=2)
    cb.learn = SimpleNamespace(xb=(x.clone(),), yb=(y,))
    cb.before_batch()
    mixed_x, mixed_y = cb.learn.xb[0], cb.learn.yb[0]
    lam = ((mixed_x - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x.flip(0))
    expected = lam * y + (1 - lam) * y.flip(0)
    assert torch.equal(torch.isnan(mixed_y), torch.isnan(expected))
    torch.testing.assert_close(mixed_y.nan_to_num(), expected.nan_to_num())
    assert 0 < lam < 1


def test_weights_identity_follows_the_file_content_not_its_path(tmp_path):
    a, b, c = tmp_path / "a.pt", tmp_path / "moved.pt", tmp_path / "c.pt"
    torch.save({"model": {"w": torch.ones(3)}}, a)
    b.write_bytes(a.read_bytes())
    torch.save({"model": {"w": torch.zeros(3)}}, c)
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    assert weights_digest(None) is None


def test_an_unavailable_imagenet_start_fails_before_training(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(classifier, "try_to_load_from_cache", lambda repo, filename: None)
    with pytest.raises(WeightsUnavailable, match="skipped"):
        finetune(cache, dataclasses.replace(RECIPE, init="imagenet"), CONFIG, tmp_path,
                 progress=False)
    assert not list(tmp_path.iterdir())  # no run folder was made


def test_recipes_that_cannot_train_as_asked_are_refused():
    with pytest.raises(ValueError, match="layer_decay groups the blocks of a ViT or Hiera"):
        FinetuneRecipe(model="densenet121", drop_path=0.0).check()
    FinetuneRecipe(model="hiera_tiny", layer_decay=0.65).check()  # Hiera has blocks to decay
    with pytest.raises(ValueError, match="rotation must be >= 0"):
        FinetuneRecipe(rotation=-30).check()
    with pytest.raises(ValueError, match="train_fraction"):
        dataclasses.replace(RECIPE, train_fraction=0.0).check()
    with pytest.raises(ValueError, match="unknown classifier"):
        FinetuneRecipe(model="vit_giant").check()
    config = paper_config()
    assert (config.epochs, config.warmup_epochs, config.batch_size, config.base_lr) == (
        75, 5, 1024, 2.5e-4)
    assert FinetuneRecipe().layer_decay == 0.55 and FinetuneRecipe().drop_path == 0.2


def test_a_finished_run_loads_its_best_classifier_without_training(cache, tmp_path):
    result = finetune(cache, RECIPE, CONFIG, tmp_path, progress=False)
    model, augment = ft.load_finetuned(result.run.path, cache)
    assert not model.training and augment.mean == result.augment.mean
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    scores, rows = ft.split_scores(result.run.path, cache)  # the validation split, again
    assert rows.tolist() == cache.split_indices("val").tolist()
    assert mean_auc(scores, cache.labels[rows])[0] == pytest.approx(result.valid_auc)



def test_a_cache_remade_with_other_test_labels_trains_its_own_run(tmp_path, capsys):
    """Same pixels, three test labels changed: `cxr finetune` used to print "loaded the finished
    run" and the old cache's test AUC."""
    datasets = [phantom_dataset(60, size=32, seed=2) for _ in range(2)]
    test = np.flatnonzero(datasets[1].meta["split"] == "test")[:3]
    datasets[1].labels[test, 0] = 1 - datasets[1].labels[test, 0]
    old, new = (prepare_cache(ds, tmp_path / name, size=32, workers=1, progress=False)
                for ds, name in zip(datasets, ("old", "new"), strict=True))
    assert old.images.tobytes() == new.images.tobytes()
    assert cache_identity(old) != cache_identity(new)
    command = ["finetune", "--profile", "smoke", "--runs", str(tmp_path / "runs"), "--data"]
    for cache, state in ((old, "trained"), (new, "trained"), (old, "loaded the finished run")):
        main([*command, str(cache.path)])
        assert f"{state} {tmp_path / 'runs'}" in capsys.readouterr().out


def test_the_papers_rgb_input_and_view_are_options_the_run_hash_names(cache):
    assert RECIPE.identity(None) == {**dataclasses.asdict(RECIPE), "weights": None}
    theirs = dataclasses.replace(RECIPE, in_chans=3, eval_crop=PAPER_EVAL_CROP)
    assert theirs.identity(None)["in_chans"] == 3 and theirs.identity(None)["eval_crop"] == 0.875
    assert runs.config_hash(theirs.identity(None)) != runs.config_hash(RECIPE.identity(None))
    x = torch.from_numpy(np.array(cache.images[:4]))[:, None]  # [4, 1, 32, 32] uint8
    augment = finetune_augment(cache, theirs)
    view = augment(x, torch.Generator().manual_seed(0))
    assert view.shape == (4, 3, 32, 32) and torch.equal(view[:, 0], view[:, 2])
    plain = augment.plain(x)  # the central 28 of 32 px (224 of 256), resized to 32
    whole = finetune_augment(cache, RECIPE).plain(x)
    assert plain.shape == (4, 3, 32, 32) and not torch.allclose(plain[:, :1], whole)


def released_vit_file(path, img_size: int) -> torch.nn.Module:
    """A fine-tuned ViT-tiny in Xiao et al.'s released layout (see tests/test_classifier.py),
    random weights."""
    torch.manual_seed(6)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=14,
                            in_chans=3, global_pool="avg", img_size=img_size, patch_size=8)
    torch.save({"model": net.state_dict(), "epoch": 74,
                "args": argparse.Namespace(nb_classes=14)}, path)
    return net.eval()


def test_a_released_classifier_is_scored_per_finding_with_the_papers_evaluation(tmp_path,
                                                                                 capsys):
    """Their evaluation, from its description: the gray PNG as RGB, Resize(256) and
    CenterCrop(224) (on a 64-px cache: the central 56 px), their mean and std, the logits of
    the released model's 14 outputs in ChestX-ray14's order."""
    cache64 = chapter_cache(tmp_path, phantom_dataset(60, size=64, seed=2), 64)
    theirs = released_vit_file(tmp_path / "vit_finetuned.pth", 56)
    table, report = evaluate_weights(cache64, "vit_tiny_patch16", tmp_path / "vit_finetuned.pth",
                                     image_size=56, patch_size=8, batch_size=8)
    assert report.missing == [] and report.unexpected == []
    rows = cache64.split_indices("test")
    x = torch.from_numpy(np.array(cache64.images[rows]))[:, None, 4:60, 4:60].float() / 255
    mean, std = PAPER_NORMALISE
    with torch.no_grad():
        scores = theirs(((x - mean) / std).expand(-1, 3, -1, -1)).numpy()
    expected_mean, expected = mean_auc(scores, cache64.labels[rows])
    assert table["finding"].tolist() == [*cache64.findings, "mean"]
    assert np.allclose(table["AUC (%)"][:14], 100 * expected, equal_nan=True)
    assert table["AUC (%)"].iloc[-1] == pytest.approx(100 * expected_mean)
    assert table.attrs == {"images": len(rows), "split": "test"}
    main(["evaluate", "--data", str(cache64.path), "--model", "vit_tiny_patch16", "--weights",
          str(tmp_path / "vit_finetuned.pth"), "--image-size", "56", "--patch-size", "8"])
    out = capsys.readouterr().out
    assert f"test AUC (%) on {len(rows)} images" in out and "Hernia" in out
    assert f"{100 * expected_mean:.2f}" in out.splitlines()[-1]


def test_a_three_channel_run_trains_and_reloads_with_its_stem(cache, tmp_path):
    result = finetune(cache, dataclasses.replace(RECIPE, in_chans=3), CONFIG, tmp_path,
                      progress=False)
    assert result.model.patch_embed.proj.weight.shape[1] == 3
    model, augment = ft.load_finetuned(result.run.path, cache)
    assert augment.channels == 3 and model.patch_embed.proj.weight.shape[1] == 3
    scores, rows = ft.split_scores(result.run.path, cache)
    assert mean_auc(scores, cache.labels[rows])[0] == pytest.approx(result.valid_auc)
