"""What DeiT and CaiT share: timm's classifier-head methods, and attention_maps."""
from typing import List, Optional

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from deit_fast.layers import Attention, ClassAttn


def init_linears(model: nn.Module) -> None:
    """timm's Linear init for ViTs: trunc-normal(.02) weights, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def head(dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierMixin:
    """get_classifier / reset_classifier / set_grad_checkpointing as timm models offer them, and
    attention_maps. Subclasses have embed_dim, cls_token, head, global_pool, grad_checkpointing
    and forward_features."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ValueError(f"global_pool {global_pool!r} is not supported")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = head(self.embed_dim, num_classes).to(self.cls_token).train(self.training)

    def attention_maps(self, x: Tensor) -> List[Tensor]:
        """The attention probabilities of every attention layer for images x, in forward order:
        (B, H, N, N) per self-attention block (CaiT's: the mixed probabilities of its talking
        heads, over the patches), then (B, H, 1, N + 1) per CaiT class-attention block. The
        model runs its usual fused forward once; each layer's maps are then recomputed from its
        input by the layer's unfused forward_attn_map (the fused kernels never hold them)."""
        inputs = []
        layers = [m for m in self.modules() if isinstance(m, (Attention, ClassAttn))]
        hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
                 for m in layers]
        try:
            self.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [layer.forward_attn_map(h) for layer, h in inputs]
