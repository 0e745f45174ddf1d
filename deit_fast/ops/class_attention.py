"""Class-attention (CaiT): one query per (batch, head) against all N tokens."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from . import _backend
from .attention import check_qkv


def class_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """q: (B, H, 1, D); k, v: (B, H, N, D) -> (B, H, 1, D). scale defaults to D ** -0.5."""
    check_qkv(q, k, v, scale)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per head, shape (B, H, 1, D), got {tuple(q.shape)}")
    _backend.resolve("class_attention", q.device)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
