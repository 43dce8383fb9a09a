import os

import pytest
import torch
from fastai.torch_core import defaults

# pyproject runs the suite on every core with pytest-xdist, a file to a worker. The two smoke
# studies take most of the time, so they are handed out first, each to its own worker.
LONGEST_FIRST = ("test_chapters_on_samples.py", "test_chapters.py")


def pytest_configure(config):
    """Each xdist worker gets its share of the cores, for torch here and for the processes its
    tests start (chapter kernels, the command line): torch's default takes every core, and two
    workers each spinning every core ran far slower than one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


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
