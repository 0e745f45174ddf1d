"""CaiT (Touvron et al. 2021, "Going deeper with Image Transformers") on deit_fast layers.

Self-attention blocks (talking heads, LayerScale) run on the patch tokens only; pos_embed has no
class slot. Then depth_token_only class-attention blocks update the class token alone. Names,
state_dict keys and outputs are timm's Cait, so timm and official (module.-stripped) checkpoints
load with strict=True.
"""

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import checkpoint_seq
from torch import Tensor, nn

from deit_fast.layers import LayerNorm, LayerScaleBlock, LayerScaleBlockClassAttn, run_blocks

from ._common import ClassifierMixin, head, init_linears

__all__ = ["Cait"]


class Cait(ClassifierMixin, nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0.,
                 pos_drop_rate=0., proj_drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 init_values=1e-4, depth_token_only=2, mlp_ratio_token_only=4.):
        super().__init__()
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"global_pool {global_pool!r} is not supported by Cait")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # of the output sequence; pos_embed itself has none
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # CaiT uses one drop-path rate for every block (no linear decay), as the official code.
        self.blocks = nn.Sequential(*[
            LayerScaleBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop=proj_drop_rate,
                            attn_drop=attn_drop_rate, drop_path=drop_path_rate, init_values=init_values)
            for _ in range(depth)])
        self.blocks_token_only = nn.ModuleList([
            LayerScaleBlockClassAttn(embed_dim, num_heads, mlp_ratio_token_only, qkv_bias,
                                     init_values=init_values)
            for _ in range(depth_token_only)])
        self.norm = LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = head(embed_dim, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's CaiT init: trunc-normal(.02) tokens and Linears, zero biases."""
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):  # for timm's layer-wise lr decay, as timm's Cait
        def matcher(name):
            if name.startswith(("cls_token", "pos_embed", "patch_embed")):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            if name.startswith("blocks_token_only."):  # overlaps the last self-attention blocks
                return int(name.split(".")[1]) + len(self.blocks) - len(self.blocks_token_only) + 1
            return len(self.blocks) if name.startswith("norm.") else float("inf")
        return matcher

    def forward_cls(self, x: Tensor) -> Tensor:
        """Class-attention stage: returns cat(cls, patches) with only cls updated."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = blk(x, cls)
        return torch.cat((cls, x), dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        # pos_embed first: the sum takes its token-major layout, not the conv's transposed
        # (B, C, N) one, so the blocks' kernels read it without a copy (and the result is the same).
        # Not while pos_drop is active: Dropout draws its mask in memory order, and timm's
        # (B, C, N)-laid sum is what a seeded run must drop the same elements of.
        x = self.patch_embed(x)
        if self.training and self.pos_drop.p > 0:
            x = self.pos_drop(x + self.pos_embed)
        else:
            x = self.pos_embed + x
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = run_blocks(self.blocks, x, None)[0]
        return self.norm(self.forward_cls(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
