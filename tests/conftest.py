import pytest
import torch
from fastai.torch_core import defaults


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP threads spinning
    against other processes (10x slower under load), and runs compared bit for bit with a
    one-thread subprocess need it too; the count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fastai_device():
    """resolve_device("cpu") pins fastai's engine to the CPU for the whole process; each test
    gets the choice it found back, so that on a GPU machine later tests train where they
    would alone."""
    before = defaults.use_cuda
    yield
    defaults.use_cuda = before
