"""to_device: the same tensor as `.to`, without a host sync on a GPU."""

import pytest
import torch

from cxr_lib.device import to_device


def test_on_the_cpu_it_is_a_plain_move_and_converts_the_dtype():
    t = torch.arange(6, dtype=torch.int64).view(2, 3)
    out = to_device(t, "cpu", torch.float32)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, t.float())
    assert to_device(t, torch.device("cpu")) is t  # nothing to move, nothing copied


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_copy_is_queued_without_a_host_sync():
    t = torch.rand(64, 3, 3, dtype=torch.float64)[:, :2]  # strided, like RandAugment's maps
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = to_device(t, "cuda", torch.float16)
        with pytest.raises(RuntimeError, match="synchroniz"):
            t.to("cuda")  # the copy it replaces does sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.cpu(), t.half())
