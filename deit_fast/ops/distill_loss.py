"""Token-distillation loss (DeiT): cross-entropy on the class head + hard or soft KD on the
distillation head."""
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks, reference

KINDS = ("none", "hard", "soft")
KL_REDUCTIONS = ("numel", "batchmean")


def distillation_loss(logits: Tensor, dist_logits: Tensor, target: Tensor,
                      teacher_logits: Optional[Tensor] = None, kind: str = "hard",
                      alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0,
                      kl_reduction: str = "numel") -> Tensor:
    """(1 - alpha) * CE(logits, target) + alpha * KD(dist_logits, teacher_logits); a scalar.

    logits, dist_logits, teacher_logits: (B, C). target: int64 (B,) classes or float (B, C) soft
    targets (mixup/cutmix). kind: "none" | "hard" | "soft"; kl_reduction: "numel" (official DeiT,
    KL sum / (B*C)) | "batchmean" (timm, KL sum / B). See reference.distillation_loss.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    _checks.tensor("logits", logits, dims=(2,))
    batch, classes = logits.shape
    if kind != "none":
        _checks.tensor("dist_logits", dist_logits, dims=(2,))
        _checks.shape("dist_logits", dist_logits, logits.shape, " (same as logits)")
        if teacher_logits is None:
            raise ValueError(f"teacher_logits is required for kind={kind!r}")
        _checks.tensor("teacher_logits", teacher_logits, dims=(2,))
        _checks.shape("teacher_logits", teacher_logits, logits.shape, " (same as logits)")
    if target.is_floating_point():
        _checks.shape("target", target, logits.shape, " (soft targets, same as logits)")
    else:
        if target.dtype != torch.int64:
            raise ValueError(f"target must be int64 class indices or float soft targets, got {target.dtype}")
        _checks.shape("target", target, (batch,), " (one class index per row)")
        if target.numel() and (target.min() < 0 or target.max() >= classes):
            raise ValueError(f"target holds class indices outside [0, {classes}): "
                             f"min {int(target.min())}, max {int(target.max())}")
    _checks.same_device(logits=logits, dist_logits=dist_logits if kind != "none" else None,
                        target=target, teacher_logits=teacher_logits if kind != "none" else None)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    _backend.resolve("distillation_loss", logits.device)
    return reference.distillation_loss(logits, dist_logits, target, teacher_logits, kind, alpha, tau,
                                       label_smoothing, kl_reduction)
