"""MoCo under torchrun: two CPU processes (gloo) share one queue.

Each rank computes keys for its own share of every batch; the queue must receive the keys of
both ranks, in rank order, so that the queues (and the key encoders) stay identical on every
rank. Run by torchrun, this file is the training process (`__main__` below).
"""

import os
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback
from torch import nn
from torchrun import run_ranks

from cxr_lib.augment.views import MocoAugment
from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.data.cache import open_cache
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import model_loss
from cxr_lib.methods.moco import MomentumQueue, moco_config
from cxr_lib.models.moco import MoCo, shuffle_batch

WORLD, PER_RANK, QUEUE = 2, 4, 128


class _KeepKeys(Callback):
    """Test-only: this rank's keys of every step, as the queue callback (order 60) sees them."""

    order = 50

    def before_fit(self) -> None:
        self.keys = []

    def after_batch(self) -> None:
        if self.learn.training:
            self.keys.append(self.learn.pred[2].detach().clone())  # [PER_RANK, D]


def _moco() -> MoCo:
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc.num_features = 4
    return MoCo(enc, dim=8, hidden_dim=16, queue_size=QUEUE, momentum=0.9, bn_splits=2)


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # different weights and queues: DDP must make them rank 0's
    moco = _moco()
    cache = open_cache(out / "cache" / "phantom-32")
    batches = CacheBatches(cache, "train", WORLD * PER_RANK, shuffle=True, drop_last=True)
    keep = _KeepKeys()
    res = fit(moco, batches, None, moco_config(2, WORLD * PER_RANK, base_lr=0.5), out / "runs",
              "moco", loss_func=model_loss, batch_tfm=MocoAugment(24, mean=0.5, std=0.25),
              cbs=[keep, MomentumQueue()], progress=False)
    x = (rank * PER_RANK + torch.arange(PER_RANK, dtype=torch.float32))[:, None]  # [B, 1]
    shuffled, restore = shuffle_batch(x)
    torch.save({"state": moco.state_dict(), "keys": keep.keys, "steps": res.metrics["steps"],
                "splits": moco.rank_splits(), "x": x, "shuffled": shuffled,
                "restored": restore(10 * shuffled)}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_the_queue_gathers_the_keys_of_every_rank(tmp_path):
    chapter_cache(tmp_path, phantom_dataset(40, size=32, seed=1), 32)  # cache/phantom-32
    run_ranks(__file__, WORLD, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    for name, value in r0["state"].items():  # key encoder, queue and pointer included
        if "running_" not in name:  # batch-norm statistics of the last step are each rank's
            assert torch.equal(value, r1["state"][name]), name
    steps = r0["steps"]
    assert steps == len(r0["keys"]) == len(r1["keys"]) > 1
    assert int(r0["state"]["queue_ptr"]) == steps * WORLD * PER_RANK < QUEUE
    expected = torch.cat([torch.cat([k0, k1]) for k0, k1 in zip(r0["keys"], r1["keys"],
                                                               strict=True)])
    assert torch.equal(r0["state"]["queue"][:len(expected)], expected)
    assert not torch.equal(r0["keys"][0], r1["keys"][0])  # each rank keyed its own images

    # bn_splits=2 groups of the global batch: one per rank, with the keys shuffled across ranks
    assert r0["splits"] == r1["splits"] == 1
    drawn = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten()
    assert sorted(drawn.tolist()) == list(range(WORLD * PER_RANK))  # every image once
    assert (r0["shuffled"] >= PER_RANK).any()  # rank 0 computes some of rank 1's images
    for r in (r0, r1):  # rows computed elsewhere come back to the rank and place they left
        assert torch.equal(r["restored"], 10 * r["x"])


if __name__ == "__main__":  # one rank, started by torchrun
    _worker(Path(sys.argv[1]))
