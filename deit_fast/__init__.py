"""deit_fast: DeiT and CaiT on fused Triton / CUDA kernels, timm-compatible."""
from . import ops

__version__ = "0.1.0"
