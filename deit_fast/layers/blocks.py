"""Transformer blocks with timm's parameter names, their residuals on deit_fast.ops.

Every residual goes through ops.layerscale_residual (x + gamma * y * DropPath mask, one pass).
Where the block's second LayerNorm follows a residual directly, the fused
ops.layerscale_residual_layernorm returns both, saving a read of the residual stream.
"""
from typing import Optional, Tuple

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from deit_fast import ops

from .attention import Attention, ClassAttn, TalkingHeadAttn


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (eps 1e-6, as DeiT and CaiT) on ops.layer_norm; same parameters."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _keep_mask(y: Tensor, drop_prob: float, training: bool) -> Tuple[Optional[Tensor], float]:
    """timm's drop_path draw: one Bernoulli(1 - p) per sample from y, the same RNG call as timm
    (so seeded runs drop the same samples). The 1 / keep_prob rescale happens inside the op."""
    if not training or drop_prob == 0.:
        return None, 1.0
    keep_prob = 1. - drop_prob
    mask = y.new_empty(y.shape[0]).bernoulli_(keep_prob)
    return mask, keep_prob if keep_prob > 0. else 1.0  # p == 1: all dropped, no rescale (timm)


def residual(x: Tensor, y: Tensor, gamma: Optional[Tensor], drop_prob: float, training: bool) -> Tensor:
    """x + drop_path(gamma * y); gamma None means no LayerScale."""
    return ops.layerscale_residual(x, y, gamma, *_keep_mask(y, drop_prob, training))


def residual_norm(x: Tensor, y: Tensor, gamma: Optional[Tensor], norm: nn.Module, drop_prob: float,
                  training: bool) -> Tuple[Tensor, Tensor]:
    """(x + drop_path(gamma * y), norm(of that)), fused when norm is our LayerNorm."""
    mask, keep_prob = _keep_mask(y, drop_prob, training)
    if isinstance(norm, LayerNorm):
        return ops.layerscale_residual_layernorm(x, y, gamma, norm.weight, norm.bias, norm.eps,
                                                 mask, keep_prob)
    x = ops.layerscale_residual(x, y, gamma, mask, keep_prob)
    return x, norm(x)


class Block(nn.Module):
    """DeiT block: x + attn(norm1(x)), then + mlp(norm2(x)); DropPath per sample, no LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=LayerNorm, attn_block=Attention, mlp_block=Mlp):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_block(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                               proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_block(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop)
        self.drop_path = drop_path  # a rate, not a module: the draw happens in _keep_mask

    def _gammas(self):
        return None, None

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_fused(x, self.norm1(x), None)[0]

    def forward_fused(self, x: Tensor, h: Tensor, next_norm: Optional[nn.Module]):
        """The block on x given h = norm1(x); the MLP residual is fused with `next_norm` (the
        next block's norm1, or the model's final norm): returns (x_out, next_norm(x_out)), or
        (x_out, None) without a next norm."""
        g1, g2 = self._gammas()
        x, h = residual_norm(x, self.attn(h), g1, self.norm2, self.drop_path, self.training)
        if next_norm is None:
            return residual(x, self.mlp(h), g2, self.drop_path, self.training), None
        return residual_norm(x, self.mlp(h), g2, next_norm, self.drop_path, self.training)


def run_blocks(blocks: nn.Sequential, x: Tensor, final_norm: Optional[nn.Module]):
    """x through the blocks, each block's last residual fused with the LayerNorm that opens the
    next one (final_norm after the last): the residual stream is read and written once per
    sub-block. Returns (x, final_norm(x)), or (x, None) without a final norm."""
    if len(blocks) == 0:
        return x, final_norm(x) if final_norm is not None else None
    h = blocks[0].norm1(x)
    for i, block in enumerate(blocks):
        x, h = block.forward_fused(x, h, blocks[i + 1].norm1 if i + 1 < len(blocks) else final_norm)
    return x, h


class LayerScaleBlock(Block):
    """CaiT self-attention block: Block with per-channel LayerScale gamma_1 / gamma_2 and
    talking-heads attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=LayerNorm, attn_block=TalkingHeadAttn, mlp_block=Mlp,
                 init_values: float = 1e-4):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path,
                         act_layer, norm_layer, attn_block, mlp_block)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def _gammas(self):
        return self.gamma_1, self.gamma_2


class LayerScaleBlockClassAttn(LayerScaleBlock):
    """CaiT class-attention block: the class token attends to cat(cls, patches); only it is
    updated, forward(x, x_cls) returns the new x_cls (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer=nn.GELU, norm_layer=LayerNorm, attn_block=ClassAttn, mlp_block=Mlp,
                 init_values: float = 1e-4):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path,
                         act_layer, norm_layer, attn_block, mlp_block, init_values)

    def forward(self, x: Tensor, x_cls: Tensor) -> Tensor:
        u = torch.cat((x_cls, x), dim=1)
        x_cls, h = residual_norm(x_cls, self.attn(self.norm1(u)), self.gamma_1, self.norm2,
                                 self.drop_path, self.training)
        return residual(x_cls, self.mlp(h), self.gamma_2, self.drop_path, self.training)
