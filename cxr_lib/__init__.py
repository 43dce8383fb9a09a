"""cxr_lib: the library behind the chest X-ray self-supervised pre-training study."""

import warnings

__version__ = "0.1.0"

# Third-party noise that would otherwise open every executed chapter of the book: fastai's layers
# call `torch.jit.script` at import, which torch deprecates, and `tqdm.auto` (imported by the
# Hugging Face hub and TorchXRayVision) asks for ipywidgets, which the static book does not use.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"IProgress not found")
