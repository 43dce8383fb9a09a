"""`cxr bench`: the training engine against a plain PyTorch loop, figures side by side."""
