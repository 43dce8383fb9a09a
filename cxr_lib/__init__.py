"""cxr_lib: the library behind the chest X-ray self-supervised pre-training study."""

__version__ = "0.1.0"
