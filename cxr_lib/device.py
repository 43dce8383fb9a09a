"""Host-to-GPU copies that do not stall the host.

The augmentations draw their random numbers on the CPU (from a `torch.Generator`, so a resumed
run replays them exactly) and the loaders pick batch rows there, then move these small tensors to
the device. A plain `.to("cuda")` of pageable memory is a synchronising copy: the host waits for
every kernel already queued, so it can never run ahead of the GPU, and a step with a dozen such
copies (RandAugment's per-op draws) leaves the GPU idle between them. Copied from pinned memory
with `non_blocking=True` the copy is queued like a kernel instead; torch's pinned-memory cache
keeps the host buffer alive until the copy has run. The pinned copy is made contiguous first:
torch would otherwise gather a strided source into a new, pageable buffer before copying it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from fastai.torch_core import default_device, num_distrib
from torch import Tensor


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes the GPU when there is one; 'cpu' keeps fastai's engine off the GPU too;
    'cuda:1' makes GPU 1 the current one, which fastai's Learner and the loaders train on.

    fastai keeps the choice process-wide, so each call sets it afresh ('auto' after 'cpu' takes
    the GPU again). Under torchrun each process takes the GPU of its LOCAL_RANK, before any
    batch is placed.
    """
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if name == "auto":
        return default_device(None)
    device = torch.device(name)
    if device.type != "cuda":
        default_device(False)
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA GPU")
    if device.index is not None:
        torch.cuda.set_device(device)
    return default_device(True)


def default_threads() -> int:
    """CPU threads for torch when none are asked for: one core fewer than the machine has, at
    least one. torch's own default takes every core, and on a busy machine its threads spin
    against the other processes: on a loaded 2-core machine 2 threads ran 25 times slower than
    1 thread."""
    return max(1, (os.cpu_count() or 1) - 1)


def use_threads(n: int | None = None) -> int:
    """Run torch's CPU work on `n` threads (default `default_threads()`); returns the count.

    The inter-op pool is set too where torch still allows it (only before its first parallel
    work; later calls keep the pool it has)."""
    n = default_threads() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {n!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # the pool has started: torch refuses a second setting
        pass
    return n


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> Tensor:
    """`t.to(device, dtype)`, queued without a host sync when `t` is on the CPU and `device`
    is a GPU (through pinned memory); any other move is a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device, dtype)
    return t.contiguous().pin_memory().to(device, dtype, non_blocking=True)


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group `torchrun` describes in the environment."""
    if num_distrib() <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_ddp() -> bool:
    """Whether this process is one of several in a process group."""
    return world_size() > 1


def world_size() -> int:
    """How many processes train together (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if is_ddp():
        dist.barrier()


def gather(obj: Any) -> list:
    """`obj` from every rank, in rank order ([obj] without DDP)."""
    if not is_ddp():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_ranks(*values: float) -> list[float]:
    """Each value summed over ranks (one collective for all of them)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_ddp():
        t = t.to(default_device())
        dist.all_reduce(t)
    return t.tolist()
