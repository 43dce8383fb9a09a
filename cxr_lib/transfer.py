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

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> Tensor:
    """`t.to(device, dtype)`, queued without a host sync when `t` is on the CPU and `device`
    is a GPU (through pinned memory); any other move is a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device, dtype)
    return t.contiguous().pin_memory().to(device, dtype, non_blocking=True)
