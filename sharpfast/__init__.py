"""sharpfast: find and prevent memorization in text-to-image diffusion models from the
sharpness of the learned density (Jeon, Kim and No, ICML 2025), with fused kernels."""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
