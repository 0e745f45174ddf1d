"""Talking-heads attention (CaiT): logits mixed across heads before the softmax, probabilities after."""
from typing import Optional

from torch import Tensor

from . import _backend, _checks, reference
from .attention import check_qkv


def talking_heads_attention(q: Tensor, k: Tensor, v: Tensor, w_l: Tensor, b_l: Tensor,
                            w_w: Tensor, b_w: Tensor, scale: Optional[float] = None) -> Tensor:
    """q, k, v: (B, H, N, D); w_l, w_w: (H, H) head-mixing weights; b_l, b_w: (H,).

    S' = w_l . (q k^T * scale) + b_l ; P = softmax(S') ; out = (w_w . P + b_w) v.
    """
    check_qkv(q, k, v, scale)
    heads = q.shape[1]
    for name, t, shape in (("w_l", w_l, (heads, heads)), ("b_l", b_l, (heads,)),
                           ("w_w", w_w, (heads, heads)), ("b_w", b_w, (heads,))):
        _checks.tensor(name, t)
        _checks.shape(name, t, shape, f" for H={heads} heads")
    _checks.same_device(q=q, w_l=w_l, b_l=b_l, w_w=w_w, b_w=b_w)
    _backend.resolve("talking_heads_attention", q.device)
    return reference.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w, scale)
