"""DeiT (Touvron et al. 2021): timm's VisionTransformer / VisionTransformerDistilled on deit_fast
layers. Attribute names, state_dict keys and outputs are timm's, so timm and official DeiT
checkpoints load with strict=True.
"""
from typing import Optional

import torch
from timm.layers import PatchEmbed, calculate_drop_path_rates, global_pool_nlc, trunc_normal_
from timm.models import checkpoint_seq
from torch import Tensor, nn

from deit_fast.layers import Block, LayerNorm, run_blocks

from ._common import ClassifierMixin, head, init_linears

__all__ = ["VisionTransformer", "VisionTransformerDistilled"]


class VisionTransformer(ClassifierMixin, nn.Module):
    """DeiT: tokens [cls, patches] + learned pos_embed over all of them, 12 pre-norm blocks."""

    distilled = False

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True,
                 fc_norm: Optional[bool] = None, drop_rate=0., pos_drop_rate=0., proj_drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0.):
        super().__init__()
        if global_pool not in (("token",) if self.distilled else ("", "token", "avg")):
            raise ValueError(f"global_pool {global_pool!r} is not supported by {type(self).__name__}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm  # timm's rule
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 2 if self.distilled else 1
        self.grad_checkpointing = False
        self.distilled_training = False  # only read by the distilled head

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        if self.distilled:  # registered after pos_embed: timm's state_dict key order
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr)
            for dpr in calculate_drop_path_rates(drop_path_rate, depth)])  # linear decay rule
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = head(embed_dim, num_classes)
        if self.distilled:
            self.head_dist = head(embed_dim, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ViT init: trunc-normal(.02) Linears and pos_embed, a tiny cls_token."""
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.distilled:
            trunc_normal_(self.dist_token, std=.02)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):  # for timm's layer-wise lr decay
        return dict(stem=r"^cls_token|pos_embed|patch_embed|dist_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _prefix_tokens(self, B: int):
        return [self.cls_token.expand(B, -1, -1)]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat(self._prefix_tokens(x.shape[0]) + [x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return self.norm(checkpoint_seq(self.blocks, x))
        return run_blocks(self.blocks, x, self.norm)[1]  # the final norm fused into the last block

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor):
        return self.forward_head(self.forward_features(x))


class VisionTransformerDistilled(VisionTransformer):
    """DeiT with a distillation token: tokens [cls, dist, patches], heads head and head_dist.

    Training with distillation (set_distilled_training(True), train mode) returns
    (head(cls), head_dist(dist)) for the two losses; otherwise their mean, as timm."""

    distilled = True

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError("the distilled head reads the class and distillation tokens")
        super().reset_classifier(num_classes)
        self.head_dist = head(self.embed_dim, num_classes).to(self.cls_token)
        self.head_dist.train(self.training)

    def _prefix_tokens(self, B: int):
        return [self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1)]

    def forward_head(self, x: Tensor, pre_logits: bool = False):
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2
