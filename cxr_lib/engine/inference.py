"""Running a model as at test time, wherever the library scores, probes or draws with one.

Torch only, so that the plotting and localisation modules stay light to import (chapter 1 draws
with them without loading the training engine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off and batch norm on running statistics, as at test time; the model's mode
    (training or not) is given back afterwards, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
