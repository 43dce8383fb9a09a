"""MoCo v2 (He et al., CVPR 2020; Chen et al., 2020) over any timm backbone.

Two copies of one backbone with a 2-layer MLP projection head each: the *query* encoder learns
by gradient descent, the *key* encoder trails it as a moving average (k <- m k + (1 - m) q) and
is never trained directly. A batch brings two augmented views of each image; the query of view
one must pick its own image's key (view two) out of that key plus a queue of keys from earlier
batches, the negatives: InfoNCE, a softmax cross-entropy over 1 + K cosine similarities divided
by a temperature.

The model computes its own loss: `forward(views [2, B, C, H, W]) -> (loss, logits, keys)`, so it
trains through the study's engine with `model_loss`. The moving-average step and the queue update
belong to the optimisation loop rather than the forward pass; the engine's callbacks call
`momentum_update()` after each optimizer step and `enqueue(gather_keys(keys))` after each batch
(`cxr_lib.methods.moco.MomentumQueue`). The queue, its pointer and the key encoder are buffers and
submodules, so a checkpoint holds them and a resumed run continues exactly.

Batch norm. A batch-norm layer normalises each image with statistics of the batch it sits in. If
a query and its positive key were normalised with statistics of the same images, the network
could tell the positive from the queue's negatives by that batch signature instead of by content.
MoCo spreads a batch over 8 GPUs (BN per GPU) and shuffles the keys across GPUs ("shuffle BN").
This module does the same on one device: both encoders see the batch in `bn_splits` sub-batches,
each normalised on its own as if on its own GPU, and the key batch is shuffled before it is split
and unshuffled after, so a query and its key are normalised among different images. Under
torchrun `bn_splits` still counts the groups of the global batch: each of `world` ranks splits
its share into bn_splits / world groups (at least one), and the key images are shuffled across
the ranks, as MoCo's `_batch_shuffle_ddp` does, so that the groups stay MoCo's size and a rank
holding a single group still normalises a query and its key among different images.

Pooled backbone features come from `timm.create_model(name, num_classes=0)`; the query encoder
keeps timm's parameter names, so its `state_dict()` loads into a timm classifier of the same name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cxr_lib.device import world_size


def projection_head(in_dim: int, hidden_dim: int | None = None, out_dim: int = 128
                    ) -> nn.Sequential:
    """MoCo v2's MLP head: Linear, ReLU, Linear, `hidden_dim` wide (None: `in_dim`, as MoCo's
    code makes it, the width of the backbone's features). Only pre-training uses it."""
    hidden = in_dim if hidden_dim is None else hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE of queries against their positive keys and the queue of negatives.

    q, k: [B, D] and queue: [K, D], all L2-normalised. Returns the mean cross-entropy and the
    logits [B, 1 + K] (column 0 is the positive), computed in float32 outside any autocast.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
        l_neg = q @ queue.T  # [B, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [B, 1 + K]
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive: column 0
        return F.cross_entropy(logits, labels), logits


def split_forward(encoder: nn.Module, x: Tensor, splits: int) -> Tensor:
    """`encoder` over `splits` sub-batches of x [B, ...], concatenated: batch norm normalises
    each sub-batch with its own statistics, as data parallelism over `splits` devices would.
    In eval mode batch norm uses its running statistics, so the batch goes whole."""
    if splits == 1 or not encoder.training:
        return encoder(x)
    if len(x) < 2 * splits:
        raise ValueError(f"a batch of {len(x)} images cannot be split into {splits} batch-norm "
                         f"groups of at least 2: lower bn_splits or raise the batch size")
    return torch.cat([encoder(part) for part in x.chunk(splits)])


def gather_keys(keys: Tensor) -> Tensor:
    """The rows of every rank, in rank order (all ranks must hold as many); `keys` alone when
    not distributed: the keys for the queue, and the key images for the shuffle. No
    gradient flows through: both belong to the key encoder's side."""
    if world_size() == 1:
        return keys
    out = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(out, keys.contiguous())
    return torch.cat(out)  # [world x B, D]


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The rows of x [B, ...] in a random order, and the function that puts rows computed from
    them back in the order of x. Under torchrun the order is drawn over the global batch (rank
    0's draw, broadcast) and each rank gets B rows that mostly come from other ranks."""
    if world_size() == 1:
        perm = torch.randperm(len(x), device=x.device)  # [B]
        return x[perm], lambda rows: rows[torch.argsort(perm)]
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone = gather_keys(x)  # [world x B, ...]
    perm = torch.randperm(len(everyone), device=x.device)  # [world x B]
    dist.broadcast(perm, src=0)
    mine = perm.view(world, -1)[rank]  # [B] rows of `everyone` this rank computes

    def restore(rows: Tensor) -> Tensor:  # [B, D] for `mine` -> [B, D] for this rank's x
        in_perm_order = gather_keys(rows)  # [world x B, D]
        return in_perm_order[torch.argsort(perm)].view(world, len(x), -1)[rank]

    return everyone[mine], restore


class MoCo(nn.Module):
    """MoCo v2: query and momentum key encoders with projection heads and a queue of keys.

    `encoder` is any module mapping images [B, C, H, W] to pooled features [B, num_features]
    (a timm model with num_classes=0); the key encoder starts as its copy.
    """

    def __init__(self, encoder: nn.Module, *, dim: int = 128, hidden_dim: int | None = None,
                 queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
                 bn_splits: int = 8) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not temperature > 0 or queue_size < 1 or bn_splits < 1:
            raise ValueError(f"temperature, queue_size and bn_splits must be positive, got "
                             f"{temperature}, {queue_size}, {bn_splits}")
        self.momentum, self.temperature, self.bn_splits = momentum, temperature, bn_splits
        self.encoder_q = encoder
        self.head_q = projection_head(encoder.num_features, hidden_dim, dim)
        self.encoder_k = copy.deepcopy(encoder)
        self.head_k = copy.deepcopy(self.head_q)
        for p in self._key_parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to write

    @property
    def chance_loss(self) -> float:
        """InfoNCE's loss when a query cannot tell its key from the K queued ones: log(K + 1).
        The first steps score below it, since the queue starts as random vectors that no query
        resembles; the engine judges a rise of the loss from here (`train.DIVERGED_RISE`)."""
        return math.log(self.queue.shape[0] + 1)

    def _query_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder_q.parameters(), *self.head_q.parameters()]

    def _key_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder_k.parameters(), *self.head_k.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k <- m k + (1 - m) q for every key parameter (buffers such as BN statistics keep
        their own running averages, as in MoCo)."""
        keys = self._key_parameters()
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, self._query_parameters(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write keys [N, D] over the oldest entries, wrapping around the end of the queue."""
        size = len(self.queue)
        if len(keys) > size:
            raise ValueError(f"cannot enqueue {len(keys)} keys into a queue of {size}: the queue "
                             "must hold at least one global batch")
        rows = (self.queue_ptr + torch.arange(len(keys), device=self.queue.device)) % size  # [N]
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def rank_splits(self) -> int:
        """Batch-norm groups of this rank's share: `bn_splits` over the global batch."""
        return max(1, self.bn_splits // world_size())

    def embed_query(self, x: Tensor) -> Tensor:
        """Normalised projections [B, D] of images x [B, C, H, W] by the query side."""
        feats = split_forward(self.encoder_q, x, self.rank_splits())  # [B, F]
        return F.normalize(self.head_q(feats).float(), dim=1)  # [B, D]

    @torch.no_grad()
    def embed_key(self, x: Tensor) -> Tensor:
        """Normalised projections [B, D] by the key side, with shuffled batch-norm groups."""
        shuffled, restore = shuffle_batch(x)
        feats = split_forward(self.encoder_k, shuffled, self.rank_splits())  # [B, F]
        return restore(F.normalize(self.head_k(feats).float(), dim=1))  # [B, D], order of x

    def forward(self, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """views [2, B, C, H, W] (two augmentations of the same B images) -> (InfoNCE loss,
        logits [B, 1 + K], keys [B, D] for the queue)."""
        if views.ndim != 5 or views.shape[0] != 2:
            raise ValueError(f"MoCo expects two stacked views [2, B, C, H, W], got "
                             f"{tuple(views.shape)}: pass MocoAugment as the batch transform")
        q = self.embed_query(views[0])  # [B, D]
        k = self.embed_key(views[1])  # [B, D]
        loss, logits = info_nce(q, k, self.queue, self.temperature)
        return loss, logits, k


def build_backbone(backbone: str, *, in_chans: int = 1) -> nn.Module:
    """A randomly initialised timm backbone giving pooled features [B, D] (no classifier)."""
    return timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans)


def build_moco(backbone: str, *, in_chans: int = 1, **moco_kwargs) -> MoCo:
    """MoCo v2 over a randomly initialised timm backbone (e.g. densenet121, resnet50);
    `moco_kwargs` go to `MoCo` (dim, hidden_dim, queue_size, momentum, temperature, bn_splits)."""
    return MoCo(build_backbone(backbone, in_chans=in_chans), **moco_kwargs)
