"""Augmentation on the device: crops and flips, RandAugment, and the views of every recipe:
MAE's and fine-tuning's (crops.py: MaeAugment, FinetuneAugment), MoCo's two (views.py)."""
