"""rflow: rectified-flow diffusion transformers on one GPU.

``load`` and ``Pipeline`` are imported on first use, so importing the package (and running
``rflow --help``) does not pull in torch.
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Pipeline", "load"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rflow' has no attribute {name!r}")
