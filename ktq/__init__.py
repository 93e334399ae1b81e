"""ktq: convert Mixture-of-Experts checkpoints for KTransformers (CPU experts and GPU experts)."""

__version__ = "0.1.0"
