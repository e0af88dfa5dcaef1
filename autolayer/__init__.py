"""autolayer: find which transformer layers to train during RL post-training, then train them."""

__version__ = "0.1.0"
