"""Hand-made held-out errors for the tests of the cocktail's statistics and chapter 6's words."""

import numpy as np

from cxr_lib.methods.mae import HeldoutErrors

NOISE = np.random.default_rng(0).normal(0, 0.05, 100)  # [100] per-image spread
BLANK = np.full(100, 0.98)  # [100] the zero prediction's loss, image by image


def errors(model: np.ndarray) -> HeldoutErrors:
    """The model's per-image losses beside the blank prediction's (the other fields unused)."""
    return HeldoutErrors(model, model, BLANK, BLANK, float("nan"))


def heldout(loss: float, jitter: float = 0.0) -> HeldoutErrors:
    """Per-image losses around `loss`; `jitter` adds noise of its own to each image."""
    own = np.random.default_rng(int(loss * 1e4)).normal(0, jitter, 100)
    return errors(loss + NOISE + own - (NOISE + own).mean())
