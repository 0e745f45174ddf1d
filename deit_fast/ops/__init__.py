"""The public functional API: one function per fused op (DESIGN.md section 3).

Each validates its inputs (ValueError naming the argument), then runs on the backend chosen by
set_backend / use_backend ("auto", "torch", "triton", "cuda"); backend_report() tells which.
`reference` holds the pure PyTorch specification every kernel is tested against.
"""
from . import reference
from ._backend import backend_report, get_backend, set_backend, use_backend
from .attention import attention, attention_qkv
from .class_attention import class_attention
from .distill_loss import distillation_loss
from .layerscale import layer_norm, layerscale_residual, layerscale_residual_layernorm
from .talking_heads import talking_heads_attention, talking_heads_attention_qkv

__all__ = [
    "attention", "attention_qkv", "class_attention", "talking_heads_attention",
    "talking_heads_attention_qkv", "layerscale_residual",
    "layerscale_residual_layernorm", "layer_norm", "distillation_loss", "set_backend", "get_backend",
    "use_backend", "backend_report", "reference",
]
