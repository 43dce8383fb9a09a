"""Augmentation on the device: crops and flips, RandAugment, MoCo's two views."""
