"""Training: dataset layout and sampling, augmentation, the training loop, synthetic data."""
