"""deit_fast: DeiT and CaiT on fused Triton / CUDA kernels, timm-compatible."""
from . import ops
from .models import create_model, from_timm, list_models, load_checkpoint

__version__ = "0.1.0"
