"""nn.Modules built on deit_fast.ops, with timm's parameter names (state_dicts load either way)."""
from .attention import Attention, ClassAttn, TalkingHeadAttn
from .blocks import Block, LayerNorm, LayerScaleBlock, LayerScaleBlockClassAttn, residual, residual_norm, run_blocks

__all__ = ["Attention", "TalkingHeadAttn", "ClassAttn", "Block", "LayerScaleBlock",
           "LayerScaleBlockClassAttn", "LayerNorm", "residual", "residual_norm", "run_blocks"]
