"""Self-attention: softmax(q k^T * scale) v over (B, H, N, D) tensors (DeiT, ViT)."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks


def check_qkv(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    """q (B, H, Nq, D), k and v (B, H, N, D), one device and dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dims=(4,))
    _checks.shape("k", k, (*q.shape[:2], k.shape[2], q.shape[3]), " (B, H, N, D) matching q")
    _checks.shape("v", v, k.shape, " (same as k)")
    _checks.same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] == 0:
        raise ValueError("k must hold at least one key (N >= 1)")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale}")


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v.

    q: (B, H, Nq, D); k, v: (B, H, N, D); strided views (e.g. of the qkv projection) are fine.
    scale defaults to D ** -0.5. Returns (B, H, Nq, D) in q's dtype.
    """
    check_qkv(q, k, v, scale)
    _backend.resolve("attention", q.device)  # torch only for now; raises if another is forced
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
