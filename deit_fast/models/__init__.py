"""DeiT and CaiT with timm's names and weights layout; create_model / list_models by timm name.

Importing this registers every model in timm's registry as deit_fast_* (see registry.timm_name).
"""
from .cait import Cait
from .checkpoint import load_checkpoint
from .convert import from_timm
from .deit import VisionTransformer, VisionTransformerDistilled
from .registry import create_model, list_models, timm_name

__all__ = ["Cait", "VisionTransformer", "VisionTransformerDistilled", "create_model", "from_timm",
           "list_models", "load_checkpoint", "timm_name"]
