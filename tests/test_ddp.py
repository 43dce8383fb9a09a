"""`fit` under torchrun: two CPU processes (gloo) train one model with DistributedDataParallel.

The ranks start from different weights (DDP must broadcast rank 0's), read different shards,
and must end with identical weights; the validation AUC is gathered from both shards. Run by
torchrun, this file is the training process (`__main__` below).
"""

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _data, _model, _to_float
from torchrun import run_ranks

from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import ValidAUC, masked_bce_loss, mean_auc

WORLD, PER_RANK = 2, 4
CONFIG = TrainConfig(epochs=2, batch_size=WORLD * PER_RANK, base_lr=2.0, warmup_epochs=0.5,
                     checkpoint_every=3)


class ShardedBatches:
    """The loader interface `fit` expects under DDP: len, set_epoch, shard(rank, world_size).

    The order depends only on (seed, epoch); rank r of w takes every w-th batch of it. Without
    drop_last the short last batch is kept, so the ranks may get different numbers of batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 drop_last: bool = True) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.drop_last = drop_last
        self.epoch, self.rank, self.world = 0, 0, 1

    def shard(self, rank: int, world_size: int) -> "ShardedBatches":
        out = copy.copy(self)
        out.rank, out.world = rank, world_size
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        batches = n // b if self.drop_last else -(-n // b)
        return len(range(self.rank, batches, self.world))  # batches i * world + rank

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            start = (i * self.world + self.rank) * self.batch_size
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]  # [b, 1, 6, 6] uint8, [b, 3]


def _splits(n_valid: int = 18):
    """32 training images; the validation batches of 4 reach rank 0 three times and rank 1
    twice (4, 4, 2 rows and 4, 4) with the default 18."""
    x, y = _data(32 + n_valid)
    return (x[:32], y[:32]), (x[32:], y[32:])


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = _model(seed=rank)  # different weights on each rank: DDP must make them rank 0's
    init = copy.deepcopy(model.state_dict())
    (xt, yt), (xv, yv) = _splits()
    train = ShardedBatches(xt, yt, PER_RANK, True)
    valid = ShardedBatches(xv, yv, PER_RANK, False, drop_last=False)
    res = fit(model, train, valid, CONFIG, out / "runs", "ddp", loss_func=masked_bce_loss,
              batch_tfm=_to_float, valid_tfm=_to_float, cbs=[ValidAUC()], progress=False)
    torch.save({"init": init, "final": model.state_dict(), "history": res.history.to_dict("list"),
                "metrics": res.metrics, "path": str(res.path)}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_end_with_identical_weights(tmp_path):
    run_ranks(__file__, WORLD, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    assert not all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    for name, weights in r0["final"].items():
        assert torch.equal(weights, r1["final"][name]), name
        assert not torch.equal(weights, r0["init"][name]), name  # it trained
    timing = ("images_per_s", "elapsed_s")  # each rank's own clock
    for col in r0["history"].keys() - set(timing):
        assert r0["history"][col] == r1["history"][col], col
    assert r0["history"]["step"] == [4, 8]  # 32 images / (2 ranks x 4) = 4 steps an epoch
    assert r0["metrics"]["world_size"] == WORLD

    run = Path(r0["path"])
    assert runs.is_finished(run) and len(runs.read_history(run)) == 2
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == WORLD  # each rank's RNG, for an exact resume
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])

    # The AUC in the history covers both validation shards (3 batches and 2): recompute it on
    # the whole set.
    model = _model()
    model.load_state_dict(r0["final"])
    model.eval()
    _, (xv, yv) = _splits()
    with torch.no_grad():
        scores = model(_to_float(xv)).numpy()
    auc, _ = mean_auc(scores, yv.numpy())
    assert auc == pytest.approx(r0["history"]["valid_auc"][-1], abs=1e-6)
    assert r0["history"]["valid_loss"][-1] == pytest.approx(
        masked_bce_loss(torch.from_numpy(scores), yv).item(), rel=1e-5)
    assert np.isfinite(r0["history"]["train_loss"]).all()


def _edge_worker(out: Path) -> None:
    """A validation set that leaves rank 1 no batch, then training batches that differ in
    number by rank (which would hang DDP's all-reduce): each rank saves what it saw."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    (xt, yt), (xv, yv) = _splits(n_valid=3)  # one batch of 3, on rank 0 alone
    config = TrainConfig(epochs=1, batch_size=WORLD * PER_RANK, base_lr=2.0, warmup_epochs=0)
    model = _model()
    res = fit(model, ShardedBatches(xt, yt, PER_RANK, True),
              ShardedBatches(xv, yv, PER_RANK, False, drop_last=False), config, out / "runs",
              "edge", loss_func=masked_bce_loss, batch_tfm=_to_float, valid_tfm=_to_float,
              cbs=[ValidAUC()], progress=False)
    uneven = ShardedBatches(xt[:20], yt[:20], PER_RANK, True, drop_last=False)  # 3 and 2
    try:
        fit(_model(), uneven, None, config, out / "runs", "uneven", loss_func=masked_bce_loss,
            batch_tfm=_to_float, progress=False)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    torch.save({"history": res.history.to_dict("list"), "final": model.state_dict(),
                "refusal": refusal}, out / f"edge{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_rank_without_validation_batches_and_uneven_training_batches(tmp_path):
    run_ranks(__file__, WORLD, str(tmp_path), "edge")
    r0, r1 = (torch.load(tmp_path / f"edge{r}.pt", weights_only=False) for r in range(WORLD))

    assert r0["history"]["valid_auc"] == r1["history"]["valid_auc"]
    model = _model()
    model.load_state_dict(r0["final"])
    model.eval()
    _, (xv, yv) = _splits(n_valid=3)
    with torch.no_grad():
        scores = model(_to_float(xv)).numpy()
    auc, _ = mean_auc(scores, yv.numpy())  # rank 0's three images alone
    assert np.isfinite(auc) and auc == pytest.approx(r0["history"]["valid_auc"][0], abs=1e-6)
    assert r0["history"]["valid_loss"][0] == pytest.approx(
        masked_bce_loss(torch.from_numpy(scores), yv).item(), rel=1e-5)

    for r in (r0, r1):  # refused on every rank before the first step, not hung
        assert r["refusal"] is not None and "[3, 2]" in r["refusal"], r["refusal"]


if __name__ == "__main__":  # one rank, started by torchrun
    if sys.argv[2:] == ["edge"]:
        _edge_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]))
