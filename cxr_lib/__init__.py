"""cxr_lib: the library behind the chest X-ray self-supervised pre-training study.

Its folders follow the data, each a stage that imports only from the stages above it here
(tests/test_house.py checks the directions):

    device.py  the device, the ranks of a multi-GPU run, host-to-GPU copies
    data/      raw files -> XrayDataset -> preprocessing cache -> batches
    augment/   crops and flips, RandAugment, MoCo's two views
    models/    MAE (ViT, Hiera), MoCo, classifiers, loading starting weights
    engine/    fit: the run config, callbacks, schedule, resume, fast path, run folders
    analysis/  AUC and its bootstrap statistics, localisation, curation, published numbers
    methods/   the recipes: MAE and MoCo pre-training, fine-tuning, probes, grids, cocktail
    chapters/  each chapter's arms, tables, verdict sentences and file contracts; figures
    book/      profiles, the chapter runner, Sphinx helpers
    bench/     `cxr bench`
    cli.py     the `cxr` command
"""

import warnings

__version__ = "0.1.0"

# Third-party noise that would otherwise open every executed chapter of the book: fastai's layers
# call `torch.jit.script` at import, which torch deprecates, and `tqdm.auto` (imported by the
# Hugging Face hub and TorchXRayVision) asks for ipywidgets, which the static book does not use.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"IProgress not found")
