"""Loaders over the cache: batch contents, deterministic order, resident mode, fastai."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cxr_lib.data.cache import prepare_cache
from cxr_lib.data.core import DataError, XrayDataset
from cxr_lib.data.loaders import CacheBatches, CacheDataset

SIZE = 12
FINDINGS = ["A", "B", "C"]
SPLIT_OF_PATIENT = ("train", "train", "train", "val", "test")


def draw_image(row: pd.Series) -> np.ndarray:
    rng = np.random.default_rng(int(row["seed"]))
    return rng.integers(1, 256, size=(SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """30 images: 18 train, 6 val, 6 test; finding C is NaN on every fourth image."""
    n = 30
    patient = np.arange(n) // 2
    meta = pd.DataFrame({
        "id": [f"img{i:03d}" for i in range(n)],
        "patient": [f"p{p}" for p in patient],
        "split": [SPLIT_OF_PATIENT[p % 5] for p in patient],
        "source": "drawn",
        "path": "",
        "seed": np.arange(n),
    })
    labels = np.stack([np.arange(n) % 2, np.arange(n) % 3 == 0,
                       np.where(np.arange(n) % 4 == 0, np.nan, 1.0)], axis=1)
    ds = XrayDataset("toy", FINDINGS, labels, meta, {"drawn": draw_image})
    out = tmp_path_factory.mktemp("cache") / "c"
    return prepare_cache(ds, out, size=SIZE, workers=1, progress=False)


def test_cache_dataset_items_are_cache_rows(cache):
    ds = CacheDataset(cache, "val")
    assert len(ds) == 6
    x, y = ds[2]
    row = cache.split_indices("val")[2]
    assert x.dtype == torch.uint8 and x.shape == (1, SIZE, SIZE)
    assert y.dtype == torch.float32 and y.shape == (3,)
    np.testing.assert_array_equal(x[0].numpy(), cache.images[row])
    np.testing.assert_array_equal(y.numpy(), cache.labels[row])
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 1, SIZE, SIZE) and yb.shape == (4, 3)


@pytest.mark.parametrize("resident", [False, True])
def test_batches_hold_the_rows_they_name(cache, resident):
    batches = CacheBatches(cache, "train", 5, shuffle=True, seed=3, resident=resident)
    rows = batches.batch_indices()
    got = list(batches)
    assert len(got) == len(batches) == len(rows) == 4
    for (x, y), r in zip(got, rows, strict=True):
        assert x.dtype == torch.uint8 and x.shape == (len(r), 1, SIZE, SIZE)
        assert y.dtype == torch.float32 and y.shape == (len(r), 3)
        np.testing.assert_array_equal(x.numpy()[:, 0], cache.images[r])
        np.testing.assert_array_equal(y.numpy(), cache.labels[r])  # NaN kept
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), cache.split_indices("train"))
    assert [len(r) for r in rows] == [5, 5, 5, 3]


def test_resident_and_streamed_batches_are_identical(cache):
    streamed = CacheBatches(cache, None, 7, shuffle=True, seed=1)
    resident = CacheBatches(cache, None, 7, shuffle=True, seed=1, resident=True)
    for (xs, ys), (xr, yr) in zip(streamed, resident, strict=True):
        assert torch.equal(xs, xr) and torch.equal(ys.nan_to_num(-1), yr.nan_to_num(-1))


def test_order_depends_only_on_seed_and_epoch(cache):
    a = CacheBatches(cache, "train", 4, shuffle=True, seed=7)
    b = CacheBatches(cache, "train", 4, shuffle=True, seed=7)
    c = CacheBatches(cache, "train", 4, shuffle=True, seed=8)

    def flat(batches, epoch):
        return np.concatenate(batches.batch_indices(epoch)).tolist()

    assert flat(a, 0) == flat(b, 0) and flat(a, 1) == flat(b, 1)
    assert flat(a, 0) != flat(a, 1) and flat(a, 0) != flat(c, 0)
    first = [y for _, y in a]  # each pass advances the epoch, as fastai's fit needs
    second = [y for _, y in a]
    assert a.epoch == 2
    assert not all(torch.equal(p.nan_to_num(-1), q.nan_to_num(-1))
                   for p, q in zip(first, second, strict=True))
    a.set_epoch(1)  # a resumed run replays epoch 1
    assert [r.tolist() for r in a.batch_indices()] == [r.tolist() for r in b.batch_indices(1)]
    plain = CacheBatches(cache, "val", 4)
    assert np.concatenate(plain.batch_indices(5)).tolist() == cache.split_indices("val").tolist()


def test_drop_last_and_new(cache):
    batches = CacheBatches(cache, "train", 4, shuffle=True, drop_last=True, resident=True)
    assert len(batches) == 4 and all(len(r) == 4 for r in batches.batch_indices())
    full = batches.new(shuffle=False, drop_last=False)
    assert len(full) == 5 and len(batches) == 4
    assert full._resident is batches._resident  # shared, not uploaded again
    assert full.to("cpu") is full and full.device == torch.device("cpu")
    with pytest.raises(TypeError, match="unknown settings"):
        batches.new(num_workers=2)


def test_bad_selections_are_refused(cache):
    with pytest.raises(DataError, match=r"must lie in \[0, 30\)"):
        CacheBatches(cache, [0, 30], 4)
    with pytest.raises(DataError, match="duplicate row numbers"):
        CacheBatches(cache, [1, 2, 2], 4)
    with pytest.raises(DataError, match="split 'holdout' is empty"):
        CacheDataset(cache, "holdout")


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255  # [B, 1, S, S]


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(y)  # [B, F]
    return F.binary_cross_entropy_with_logits(logits[known], y[known])


def test_fastai_learner_fits_and_predicts(cache):
    from fastai.callback.progress import ProgressCallback  # also adds Learner.no_bar
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    torch.manual_seed(0)
    train = CacheBatches(cache, "train", 6, shuffle=True, drop_last=True)
    valid = CacheBatches(cache, "val", 4)
    dls = DataLoaders(train, valid)
    assert dls.device == torch.device("cpu")
    model = nn.Sequential(Scale(), nn.Flatten(), nn.Linear(SIZE * SIZE, len(FINDINGS)))
    learn = Learner(dls, model, loss_func=masked_bce)
    assert any(isinstance(cb, ProgressCallback) for cb in learn.cbs)  # it needs len(dl)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)
        (train_loss, valid_loss), = learn.recorder.values
        preds, targs = learn.get_preds()
    assert np.isfinite(train_loss) and np.isfinite(valid_loss)
    assert preds.shape == (6, 3)
    np.testing.assert_array_equal(targs.numpy(), cache.labels[cache.split_indices("val")])
    assert train.epoch == 1  # fit's single pass advanced the order


def test_shards_split_every_batch_between_the_ranks(cache):
    whole = CacheBatches(cache, None, 4, shuffle=True, seed=3, drop_last=True)
    shards = [whole.shard(rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [len(whole)] * 2
    for epoch in range(2):
        parts = [s.batch_indices(epoch) for s in shards]
        for full, first, second in zip(whole.batch_indices(epoch), *parts, strict=True):
            assert len(first) == len(second) == 2
            assert sorted([*first, *second]) == sorted(full)
    with pytest.raises(ValueError, match="divide evenly"):
        whole.shard(0, 3)


def test_a_short_last_batch_reaches_only_the_ranks_it_has_rows_for(cache):
    whole = CacheBatches(cache, np.arange(9), 4)  # batches of 4, 4 and 1 rows
    shards = [whole.shard(rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 2]
    parts = [s.batch_indices() for s in shards]
    assert [len(b) for b in parts[0]] == [2, 2, 1] and [len(b) for b in parts[1]] == [2, 2]
    assert sorted(np.concatenate(parts[0] + parts[1])) == list(range(9))  # each row once
    assert [len(list(s)) for s in shards] == [3, 2]  # iteration yields what len() says
    dropped = whole.new(drop_last=True)
    assert [len(dropped.shard(rank, 2)) for rank in range(2)] == [2, 2]
