"""Flower-free core of fedtune: config, model + LoRA, data, the training loop."""
