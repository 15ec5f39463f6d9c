"""rflow: rectified-flow diffusion transformers on one GPU."""

__version__ = "0.1.0"
