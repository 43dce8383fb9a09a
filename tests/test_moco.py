"""MoCo v2: the momentum update, the queue, InfoNCE, batch-norm isolation between the views, the
two-view augmentation, the kNN monitor, exact resume, the run cache, the saved backbone and the
command line. Tiny encoders and 32-px phantoms keep it fast on a CPU."""

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch
import yaml
from fastai.callback.core import Callback
from torch import nn

from cxr_lib.augment.crops import split_stats
from cxr_lib.augment.views import MocoAugment, brightness_contrast, gaussian_blur
from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.cli import main
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.engine import runs
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import model_loss
from cxr_lib.engine.schedule import schedule_at
from cxr_lib.methods.moco import (
    KnnMonitor,
    KnnSettings,
    MocoRecipe,
    MomentumQueue,
    NeighbourShare,
    gathering_table,
    key_similarity,
    knn_auc,
    knn_evaluate,
    knn_scores,
    load_backbone,
    moco_augment,
    moco_config,
    neighbour_share,
    pretrain_moco,
    save_backbone,
    untrained_backbone,
)
from cxr_lib.models.moco import MoCo, build_moco, info_nce, split_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RECIPE = MocoRecipe(model="resnet10t", image_size=32, dim=16, hidden_dim=32, queue_size=64,
                    bn_splits=2)
KNN = KnnSettings(k=5, batch_size=64)


def tiny_encoder() -> nn.Module:
    """Conv, batch norm, pooled: the shape of a timm backbone with num_classes=0."""
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc.num_features = 4
    return enc


def tiny_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    kwargs = {"dim": 8, "hidden_dim": 16, "queue_size": 10, "bn_splits": 1, **kwargs}
    return MoCo(tiny_encoder(), **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return chapter_cache(work, phantom_dataset(64, size=32, seed=3), 32)


# ----------------------------------------------------------------------------- the model

def test_momentum_update_moves_each_key_weight_to_m_k_plus_one_minus_m_q():
    moco = tiny_moco(momentum=0.9)
    with torch.no_grad():
        for p in [*moco.encoder_q.parameters(), *moco.head_q.parameters()]:
            p.add_(torch.randn_like(p))  # the query side has trained away from the keys
    q = {n: p.clone() for n, p in moco.named_parameters() if n.split(".")[0].endswith("_q")}
    k = {n: p.clone() for n, p in moco.named_parameters() if n.split(".")[0].endswith("_k")}
    moco.momentum_update()
    after = dict(moco.named_parameters())
    assert len(k) == len(q) > 0
    for name, old in k.items():
        partner = q[name.replace("encoder_k", "encoder_q").replace("head_k", "head_q")]
        expected = old * 0.9 + partner * (1 - 0.9)  # exact up to float rounding
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.allclose(after[name], old)  # and it did move
        assert not after[name].requires_grad
    for name, old in q.items():
        assert torch.equal(after[name], old) and after[name].requires_grad, name


def test_queue_writes_over_the_oldest_keys_and_wraps_around():
    moco = tiny_moco(queue_size=5, dim=2)
    first, second = torch.arange(6.0).view(3, 2), 10 + torch.arange(6.0).view(3, 2)
    moco.enqueue(first)
    assert torch.equal(moco.queue[:3], first) and int(moco.queue_ptr) == 3
    old_tail = moco.queue[3:].clone()
    moco.enqueue(second)  # rows 3, 4, then 0
    assert torch.equal(moco.queue[3:], second[:2]) and torch.equal(moco.queue[0], second[2])
    assert torch.equal(moco.queue[1:3], first[1:]) and int(moco.queue_ptr) == 1
    assert not torch.equal(moco.queue[3:], old_tail)
    state = moco.state_dict()  # the queue and its pointer travel with the checkpoint
    assert torch.equal(state["queue"], moco.queue) and int(state["queue_ptr"]) == 1
    with pytest.raises(ValueError, match="cannot enqueue 6 keys into a queue of 5"):
        moco.enqueue(torch.zeros(6, 2))


def test_info_nce_matches_a_hand_computed_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss, logits = info_nce(q, k, queue, temperature=0.5)
    # row 0: positive 1, negatives 0 and -1; row 1: positive 0.8, negatives 1 and 0; / 0.5
    expected = torch.tensor([[2.0, 0.0, -2.0], [1.6, 2.0, 0.0]])
    assert torch.allclose(logits, expected)
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(2) + 1))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_forward_returns_loss_logits_and_keys_and_refuses_a_single_view():
    moco = tiny_moco(bn_splits=2)
    views = torch.randn(2, 8, 1, 6, 6)
    loss, logits, keys = moco(views)
    assert loss.ndim == 0 and logits.shape == (8, 11) and keys.shape == (8, 8)
    assert torch.allclose(keys.norm(dim=1), torch.ones(8)) and not keys.requires_grad
    loss.backward()
    assert moco.encoder_q[0].weight.grad is not None and moco.encoder_k[0].weight.grad is None
    with pytest.raises(ValueError, match=r"two stacked views \[2, B, C, H, W\]"):
        moco(torch.randn(8, 1, 6, 6))
    with pytest.raises(ValueError, match="cannot be split into 2 batch-norm groups"):
        split_forward(moco.encoder_q, torch.randn(3, 1, 6, 6), 2)


def test_batch_norm_groups_keep_a_query_and_its_key_among_different_images():
    moco = tiny_moco(bn_splits=2)
    moco.train()
    x = torch.randn(8, 1, 6, 6)

    def changed(side, image: int) -> torch.Tensor:
        """Which outputs move when one input image changes (same key shuffle)."""
        y = x.clone()
        y[image] += 3.0
        torch.manual_seed(1)
        before = side(x)
        torch.manual_seed(1)
        return (side(y) - before).abs().sum(dim=1) > 1e-6  # [8]

    # Queries: batch norm over images 0-3 and 4-7, as on two devices.
    assert changed(moco.embed_query, 7).tolist() == [False] * 4 + [True] * 4
    # Keys: the same groups after the shuffle that seed 1 draws.
    torch.manual_seed(1)
    perm = torch.randperm(8)
    key_groups = [set(perm[:4].tolist()), set(perm[4:].tolist())]
    for group in key_groups:
        moved = changed(moco.embed_key, min(group))
        assert {i for i in range(8) if moved[i]} == group
    assert {0, 1, 2, 3} not in key_groups  # the keys are normalised among other images


# ----------------------------------------------------------------------------- augmentation

def test_two_views_differ_and_the_plain_view_is_deterministic():
    x = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8)
    aug = MocoAugment(24, mean=0.5, std=0.25)
    views = aug(x, torch.Generator().manual_seed(0))
    assert views.shape == (2, 4, 1, 24, 24) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)  # a seed gives the same views
    assert torch.equal(aug.plain(x), aug.plain(x))
    assert aug.plain(x).min() >= -2.0 and aug.plain(x).max() <= 2.0  # (0..1 - 0.5) / 0.25


def test_jitter_and_blur_leave_images_alone_at_probability_zero_and_act_at_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=g)
    assert torch.equal(brightness_contrast(x, p=0.0), x)
    assert torch.allclose(gaussian_blur(x, (1.0, 1.0), p=0.0), x)
    jittered = brightness_contrast(x, p=1.0, generator=g)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x)
    blurred = gaussian_blur(x, (1.0, 1.0), p=1.0)
    assert blurred.std() < 0.7 * x.std()  # smoothing removes pixel noise
    assert blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.01)


def test_recipe_augmentation_uses_mocos_crop_scale_and_the_cache_statistics(cache):
    aug = moco_augment(cache, RECIPE)
    assert aug.scale == (0.2, 1.0) and aug.size == RECIPE.image_size
    assert (aug.mean, aug.std) == split_stats(cache) != (0.5, 0.25)


# ----------------------------------------------------------------------------- kNN monitor

def test_knn_scores_are_similarity_weighted_shares_of_known_positives():
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([[1.0, 1.0], [0.0, np.nan], [1.0, 0.0]])
    scores = knn_scores(train, labels, np.array([[2.0, 0.0]]), k=2)
    # neighbours 0 (similarity 1) and 1 (0.6); finding 1 of neighbour 1 is not stated
    assert scores[0] == pytest.approx([1.0 / 1.6, 1.0])


def test_knn_auc_is_perfect_on_planted_clusters_and_near_chance_on_noise():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[[0, 1]]  # two directions in feature space
    group = rng.integers(0, 2, 200)
    feats = centres[group] + 0.1 * rng.normal(size=(200, 8))
    labels = np.stack([group, rng.integers(0, 2, 200)], axis=1).astype(float)
    labels[:10, 1] = np.nan
    perfect = knn_auc(feats[:150], labels[:150, :1], feats[150:], labels[150:, :1], k=10)
    assert perfect == 1.0
    noise = knn_auc(feats[:150], labels[:150, 1:], feats[150:], labels[150:, 1:], k=10)
    assert 0.3 < noise < 0.7


# ----------------------------------------------------------------------------- embeddings

def test_key_similarity_takes_the_diagonal_the_other_images_and_the_queue_apart():
    sims = np.array([[0.9, 0.1, 0.2, 0.0, 0.5],
                     [0.3, 0.8, 0.4, 0.1, 0.5],
                     [0.5, 0.6, 0.7, 0.2, 0.5]])  # 3 queries: 3 keys of their images, 2 queue
    s = key_similarity(sims)
    assert s.positive == pytest.approx(0.8)
    assert s.other == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 6)
    assert s.queue == pytest.approx(1.8 / 6)
    with pytest.raises(ValueError, match="n \\+ m"):
        key_similarity(sims[:, :3])  # no queue keys


def test_neighbour_share_against_chance_on_a_hand_case():
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [5.0, 5.0]])
    labels = np.array([1.0, 1.0, 0.0, 0.0, np.nan])  # the last image's label is unknown
    r = neighbour_share(feats, labels, k=1, shuffles=3000)
    assert (r.images, r.share, r.chance) == (2, 1.0, pytest.approx(1 / 3))
    # 2 of the 6 placements of two positives among 4 pair them up: p near 1/3
    assert r.p_value == pytest.approx(1 / 3, abs=0.03)
    lone = neighbour_share(feats, np.array([1.0, 0.0, 0.0, 0.0, 0.0]), k=1)
    assert lone.images == 1 and math.isnan(lone.share) and math.isnan(lone.p_value)


def test_neighbour_share_finds_a_planted_group_and_not_noise():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 8))
    labels = np.zeros(100)
    labels[:20] = 1
    planted = feats.copy()
    planted[:20] += 10 * np.eye(8)[0]  # the 20 positives share a direction
    found = neighbour_share(planted, labels, k=5)
    assert found.share == 1.0 and found.chance == pytest.approx(19 / 99)
    assert found.p_value == pytest.approx(1 / 1001)  # no relabelling gathers as well
    noise = [neighbour_share(rng.normal(size=(100, 8)), labels, k=5, shuffles=200, seed=i)
             for i in range(20)]  # 20 feature spaces that know nothing of the labels
    assert abs(np.mean([r.share - r.chance for r in noise])) < 0.03
    p_values = [r.p_value for r in noise]
    assert sum(p < 0.05 for p in p_values) <= 3 and 0.3 < np.mean(p_values) < 0.7


def test_gathering_table_adjusts_p_by_holm():
    results = {"A": NeighbourShare(10, 0.5, 0.1, 0.001), "B": NeighbourShare(8, 0.2, 0.1, 0.04),
               "C": NeighbourShare(9, 0.12, 0.1, 0.5),
               "D": NeighbourShare(1, math.nan, math.nan, math.nan)}
    table = gathering_table(results)
    assert list(table.index) == ["A", "B", "C", "D"]
    assert table["p (Holm)"].iloc[:3].tolist() == pytest.approx([0.003, 0.08, 0.5])


# ----------------------------------------------------------------------------- training

class _Crash(Exception):
    pass


class _CrashAt(Callback):
    order = 95

    def __init__(self, step: int) -> None:
        self.step = step

    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.step:
            raise _Crash(f"crash after step {self.step}")


def _fit_tiny(cache, root, cbs=()):
    """3 epochs x 5 steps of a tiny MoCo through the engine with both callbacks."""
    moco = tiny_moco(queue_size=20, bn_splits=2)
    aug = MocoAugment(24, mean=0.5, std=0.25)
    config = moco_config(3, 8, base_lr=0.5, checkpoint_every=2)
    batches = CacheBatches(cache, "train", 8, shuffle=True, drop_last=True)
    knn = KnnSettings(k=3, every=2)
    result = fit(moco, batches, None, config, root, "moco", loss_func=model_loss, batch_tfm=aug,
                 cbs=[MomentumQueue(), KnnMonitor(cache, aug.plain, knn), *cbs], progress=False)
    return moco, result


def test_a_crashed_run_resumes_to_the_same_queue_and_key_encoder(cache, tmp_path):
    ref_model, ref = _fit_tiny(cache, tmp_path / "ref")
    # its loss rises from the random queue's easy start, far above the first step's, but stays
    # under the chance level log(21) of its 20 keys: a run that worked, not one that diverged
    assert ref_model.chance_loss == pytest.approx(math.log(21))
    assert ref.metrics["status"] == "done" and "diverged" not in ref.metrics
    assert int(ref_model.queue_ptr) == (ref.metrics["steps"] * 8) % 20
    assert ref.history["knn_auc"].isna().tolist() == [True, False, False]  # every 2, and last
    with pytest.raises(_Crash):  # in epoch 1, after the checkpoint of step 6
        _fit_tiny(cache, tmp_path / "crash", [_CrashAt(7)])
    model, res = _fit_tiny(cache, tmp_path / "crash")
    assert res.resumed_from_step == 6  # epoch 0 is skipped, epoch 1 re-entered
    for name, weights in ref_model.state_dict().items():  # queue, pointer, key encoder too
        assert torch.equal(model.state_dict()[name], weights), name
    assert np.allclose(res.history["knn_auc"], ref.history["knn_auc"], equal_nan=True)


def test_pretraining_trains_then_loads_the_finished_run(cache, tmp_path):
    config = moco_config(2, 16, base_lr=0.3)
    first = pretrain_moco(cache, RECIPE, config, tmp_path, knn=KNN, progress=False)
    assert not first.run.loaded_from_cache and len(first.run.history) == 2
    assert first.run.history["train_loss"].notna().all()
    assert first.run.path.name.startswith("moco-") and 0 <= first.knn_start <= 1
    assert int(first.moco.queue_ptr) == first.run.metrics["steps"] * 16 % RECIPE.queue_size
    assert first.knn_end == first.run.history["knn_auc"].iloc[-1]
    again = pretrain_moco(cache, RECIPE, config, tmp_path, knn=KNN, progress=False)
    assert again.run.loaded_from_cache and again.run.path == first.run.path
    for name, weights in first.moco.state_dict().items():
        assert torch.equal(again.moco.state_dict()[name], weights), name
    assert again.knn_start == first.knn_start and again.knn_end == first.knn_end

    path = save_backbone(first, tmp_path / "encoders" / "moco_resnet10t.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["backbone"] == "resnet10t" and saved["run"] == first.run.path.name
    net = timm.create_model("resnet10t", num_classes=14, in_chans=1)
    missing, unexpected = net.load_state_dict(saved["model"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(net.conv1[0].weight, first.moco.encoder_q.conv1[0].weight)


def test_a_pool_pretrains_while_another_cache_s_labels_are_monitored(cache, tmp_path):
    """The chapter 3 set-up: the pool trains, one labelled source is monitored; a monitor that
    is the training cache itself is the run without a monitor."""
    monitored = chapter_cache(tmp_path / "work", phantom_dataset(40, size=32, seed=9), 32)
    config = moco_config(1, 16, base_lr=0.3)
    plain = pretrain_moco(cache, RECIPE, config, tmp_path, knn=KNN, progress=False)
    same = pretrain_moco(cache, RECIPE, config, tmp_path, knn=KNN, monitor=cache, progress=False)
    assert same.run.loaded_from_cache and same.run.path == plain.run.path
    pooled = pretrain_moco(cache, RECIPE, config, tmp_path, knn=KNN, monitor=monitored,
                           progress=False)
    assert not pooled.run.loaded_from_cache and pooled.run.path != plain.run.path
    saved = json.loads((pooled.run.path / "config.json").read_text())
    assert saved["extra"]["monitor"]["content"] == monitored.digest
    for name, weights in plain.moco.state_dict().items():  # the monitor does not train
        assert torch.equal(pooled.moco.state_dict()[name], weights), name
    torch.manual_seed(config.seed)
    start = knn_evaluate(RECIPE.build().encoder_q, monitored, pooled.augment.plain, KNN)
    assert pooled.knn_start == pytest.approx(start)
    assert pooled.knn_end == pytest.approx(knn_evaluate(pooled.moco.encoder_q, monitored,
                                                        pooled.augment.plain, KNN))
    assert pooled.knn_end != pytest.approx(plain.knn_end)


def test_an_untrained_backbone_has_the_saved_view_and_seeded_weights(cache, tmp_path):
    first = pretrain_moco(cache, RECIPE, moco_config(1, 16, base_lr=0.3), tmp_path, knn=KNN,
                          progress=False)
    path = save_backbone(first, tmp_path / "moco.pt")
    trained, view = load_backbone(path)
    a, view_a = untrained_backbone(path, 0)
    b, _ = untrained_backbone(path, 0)
    c, _ = untrained_backbone(path, 1)
    assert (view_a.size, view_a.mean, view_a.std) == (view.size, view.mean, view.std) == (
        32, first.augment.mean, first.augment.std)
    x = torch.rand(2, 1, 32, 32)
    for net in (trained, a, b, c):
        net.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
        assert not torch.equal(a(x), trained(x))
    with pytest.raises(ValueError, match="not a backbone file of `save_backbone`"):
        torch.save({"model": {}}, tmp_path / "other.pt")
        untrained_backbone(tmp_path / "other.pt", 0)


def test_pretraining_refuses_a_batch_larger_than_the_split_or_the_queue(cache, tmp_path):
    with pytest.raises(ValueError, match=r"phantom-32: split 'train' has \d+ images, fewer"):
        pretrain_moco(cache, RECIPE, moco_config(1, 512), tmp_path, progress=False)
    with pytest.raises(ValueError, match="queue_size 16 is smaller than the batch of 32"):
        pretrain_moco(cache, dataclasses.replace(RECIPE, queue_size=16), moco_config(1, 32),
                      tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # nothing was started


def test_a_densenet_backbone_keeps_timms_names():
    moco = build_moco("densenet121", queue_size=16, hidden_dim=32)
    assert moco.head_q[0].in_features == 1024
    net = timm.create_model("densenet121", num_classes=14, in_chans=1)
    missing, unexpected = net.load_state_dict(moco.encoder_q.state_dict(), strict=False)
    assert sorted(missing) == ["classifier.bias", "classifier.weight"] and unexpected == []


@pytest.mark.parametrize("backbone, width", [("densenet121", 1024), ("resnet50", 2048)])
def test_the_default_head_is_as_wide_as_the_backbones_features_as_in_mocos_code(backbone, width):
    """MoCo's builder widens the backbone's own classifier into Linear(d, d), ReLU, Linear(d,
    128), d the classifier's input width: 1024 for DenseNet-121, 2048 for ResNet-50."""
    moco = dataclasses.replace(MocoRecipe(model=backbone), queue_size=16).build()
    assert [tuple(m.weight.shape) for m in moco.head_q if isinstance(m, nn.Linear)] == [
        (width, width), (128, width)]
    assert moco.encoder_q.num_features == width


def test_rgb_input_is_an_option_the_run_hash_names():
    recipe = MocoRecipe(model="resnet10t", hidden_dim=32, queue_size=16)
    assert recipe.identity() == dataclasses.asdict(recipe) and recipe.identity()["in_chans"] == 1
    rgb = dataclasses.replace(recipe, in_chans=3)
    assert rgb.identity()["in_chans"] == 3
    assert runs.config_hash(rgb.identity()) != runs.config_hash(recipe.identity())
    assert rgb.build().encoder_q.conv1[0].weight.shape[1] == 3


def test_the_per_step_cosine_stays_within_pi_over_2_epochs_of_mocos_per_epoch_one():
    """MoCo's code sets lr = peak x 0.5 (1 + cos(pi x epoch / epochs)) at each epoch's start;
    the engine moves it every step. At 200 epochs they are at most 0.8% of the peak apart."""
    epochs, steps = 200, 50
    config = moco_config(epochs, 256)
    gaps = [abs(schedule_at(config, e * steps + s, steps)[0]
                - config.lr * 0.5 * (1 + math.cos(math.pi * e / epochs))) / config.lr
            for e in range(epochs) for s in range(steps)]
    assert max(gaps) <= math.pi / (2 * epochs) and max(gaps) > 0.0075
    assert gaps[::steps] == pytest.approx([0.0] * epochs, abs=1e-12)  # equal at epoch starts


def test_command_line_pretrains_with_profile_defaults_and_saves(cache, tmp_path, capsys):
    section = {"models": ["resnet10t"], "image_size": 32, "epochs": 1, "warmup_epochs": 0,
               "batch_size": 16, "base_lr": 0.3, "queue_size": 64, "momentum": 0.99,
               "temperature": 0.2, "hidden_dim": 32, "bn_splits": 2, "knn_k": 5}
    profile = tmp_path / "mine.yaml"
    profile.write_text(yaml.safe_dump({"shared": {"seed": 0, "device": "cpu"},
                                       "chapters": {"03_moco_baselines": section}}))
    args = ["pretrain", "moco", "--profile", str(profile), "--data", str(cache.path), "--runs",
            str(tmp_path / "runs"), "--save", str(tmp_path / "enc.pt")]
    main(args)
    out = capsys.readouterr().out
    assert "trained" in out and "kNN AUC" in out and (tmp_path / "enc.pt").is_file()
    assert torch.load(tmp_path / "enc.pt", weights_only=True)["recipe"]["momentum"] == 0.99
    run, = (tmp_path / "runs").iterdir()
    # knn_every and knn_images are not in the section: the monitor's own defaults fill them
    config = json.loads((run / runs.CONFIG).read_text())
    assert config["extra"]["knn"] == dataclasses.asdict(KnnSettings(k=5))
    main(args)
    assert "loaded the finished run" in capsys.readouterr().out
    monitored = chapter_cache(tmp_path / "work", phantom_dataset(40, size=32, seed=9), 32)
    main([*args, "--monitor-data", str(monitored.path)])  # a pool trains, these labels monitor
    assert "trained" in capsys.readouterr().out
    pooled, = set((tmp_path / "runs").iterdir()) - {run}
    config = json.loads((pooled / runs.CONFIG).read_text())
    assert config["extra"]["monitor"]["content"] == monitored.digest


def test_command_line_names_what_is_missing_without_a_chapter_section(cache, tmp_path):
    profile = tmp_path / "bare.yaml"
    profile.write_text("shared: {seed: 0}\n")
    with pytest.raises(SystemExit, match="03_moco_baselines.*--image-size"):
        main(["pretrain", "moco", "--profile", str(profile), "--data", str(cache.path)])
