"""The pure PyTorch specification of every fused op (DESIGN.md section 3).

Every kernel backend is tested against these functions run in float64. They are written for
clarity, not speed: the N x N matrices are materialised and every step is a separate op.
Shapes: attention tensors are (B, H, N, D); row ops take (..., C).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v; scale defaults to D**-0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    return s.softmax(dim=-1) @ v


def class_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """One query per (batch, head): q (B, H, 1, D), k and v (B, H, N, D) -> (B, H, 1, D)."""
    return attention(q, k, v, scale)


def talking_heads_attention(q: Tensor, k: Tensor, v: Tensor, w_l: Tensor, b_l: Tensor,
                            w_w: Tensor, b_w: Tensor, scale: Optional[float] = None) -> Tensor:
    """Attention whose logits and probabilities are mixed across heads (CaiT).

    S = q k^T * scale; S'[g] = sum_h w_l[g, h] S[h] + b_l[g]; P = softmax over keys of S';
    P'[g] = sum_h w_w[g, h] P[h] + b_w[g]; out[g] = P'[g] v[g].  w_*: (H, H), b_*: (H,).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    s = _mix_heads(s, w_l, b_l)
    p = _mix_heads(s.softmax(dim=-1), w_w, b_w)
    return p @ v


def _mix_heads(s: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """out[:, g] = sum_h w[g, h] s[:, h] + b[g]; the weights follow s's dtype (autocast)."""
    return torch.einsum("gh,bhij->bgij", w.to(s.dtype), s) + b.to(s.dtype)[None, :, None, None]


def drop_path_scale(x: Tensor, keep_mask: Optional[Tensor], keep_prob: float) -> Optional[Tensor]:
    """Per-sample DropPath factor keep_mask[b] / keep_prob, shaped to broadcast over x's rows."""
    if keep_mask is None:
        return None
    return (keep_mask.to(torch.float32) / keep_prob).reshape((-1,) + (1,) * (x.dim() - 1))


def layerscale_residual(x: Tensor, y: Tensor, gamma: Optional[Tensor],
                        keep_mask: Optional[Tensor] = None, keep_prob: float = 1.0) -> Tensor:
    """x + gamma * y * (keep_mask[b] / keep_prob).

    gamma=None means no LayerScale (plain DeiT blocks). The result dtype is the promotion of
    x, y and gamma, as in timm's eager `x + drop_path(ls(y))`.
    """
    if gamma is not None:
        y = gamma * y
    scale = drop_path_scale(x, keep_mask, keep_prob)
    if scale is not None:
        y = y * scale.to(y.dtype)
    return x + y


def layerscale_residual_layernorm(x: Tensor, y: Tensor, gamma: Optional[Tensor], weight: Tensor,
                                  bias: Tensor, eps: float = 1e-6, keep_mask: Optional[Tensor] = None,
                                  keep_prob: float = 1.0):
    """(out, layer_norm(out)): a block's residual output and the next LayerNorm."""
    out = layerscale_residual(x, y, gamma, keep_mask, keep_prob)
    return out, layer_norm(out, weight, bias, eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim, in x's dtype. Half activations with fp32 parameters (the
    op contract) are normalised in fp32: CUDA's layer_norm refuses mixed dtypes (CPU's accepts
    them and computes in fp32 all the same)."""
    if weight.dtype == x.dtype and bias.dtype == x.dtype:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    dt = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    return F.layer_norm(x.to(dt), (x.shape[-1],), weight.to(dt), bias.to(dt), eps).to(x.dtype)


def _at_least_fp32(t: Tensor) -> Tensor:
    # Losses are computed in fp32 under autocast, and in fp64 when the spec is run in fp64.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def distillation_loss(logits: Tensor, dist_logits: Tensor, target: Tensor,
                      teacher_logits: Optional[Tensor] = None, kind: str = "hard",
                      alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0,
                      kl_reduction: str = "numel") -> Tensor:
    """(1 - alpha) * base + alpha * distill, as DeiT's DistillationLoss.

    base: cross-entropy of `logits` against `target`, an int64 (B,) class index (label smoothing
    applies) or a float (B, C) soft target (mixup/cutmix; smoothing already inside it).
    kind "hard": CE(dist_logits, argmax(teacher_logits)) without smoothing.
    kind "soft": KL(teacher/tau || dist/tau) * tau^2, summed then divided by B*C ("numel",
    the official DeiT code) or by B ("batchmean", timm's TokenDistillationTask).
    kind "none": base only (alpha ignored).
    """
    logits = _at_least_fp32(logits)
    if target.is_floating_point():
        base = torch.sum(-_at_least_fp32(target) * F.log_softmax(logits, dim=-1), dim=-1).mean()
    else:
        base = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if kind == "none":
        return base
    dist_logits, teacher_logits = _at_least_fp32(dist_logits), _at_least_fp32(teacher_logits)
    if kind == "hard":
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    else:
        kl = F.kl_div(F.log_softmax(dist_logits / tau, dim=-1),
                      F.log_softmax(teacher_logits / tau, dim=-1),
                      reduction="sum", log_target=True)
        denom = dist_logits.numel() if kl_reduction == "numel" else dist_logits.shape[0]
        distill = kl * (tau * tau) / denom
    return (1 - alpha) * base + alpha * distill
