"""The pure PyTorch spec (deit_fast.ops.reference) against independent implementations: SDPA,
timm's CaiT attention modules, timm's losses and the official DeiT distillation formula."""
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.cait import ClassAttn, TalkingHeadAttn

from deit_fast import ops
from deit_fast.ops import reference

D64 = torch.float64


def qkv(B=2, H=3, N=7, D=16, Nq=None):
    return (torch.randn(B, H, Nq or N, D, dtype=D64), torch.randn(B, H, N, D, dtype=D64),
            torch.randn(B, H, N, D, dtype=D64))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_is_sdpa(scale):
    q, k, v = qkv()
    torch.testing.assert_close(reference.attention(q, k, v, scale),
                               F.scaled_dot_product_attention(q, k, v, scale=scale))
    torch.testing.assert_close(ops.attention(q, k, v, scale), reference.attention(q, k, v, scale))


def test_talking_heads_is_timm_talking_head_attn():
    B, N, H, D = 2, 9, 4, 8
    timm_attn = TalkingHeadAttn(H * D, num_heads=H, qkv_bias=True).double()
    x = torch.randn(B, N, H * D, dtype=D64)
    q, k, v = timm_attn.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    out = reference.talking_heads_attention(q, k, v, timm_attn.proj_l.weight, timm_attn.proj_l.bias,
                                            timm_attn.proj_w.weight, timm_attn.proj_w.bias,
                                            timm_attn.scale)
    out = timm_attn.proj(out.transpose(1, 2).reshape(B, N, H * D))
    torch.testing.assert_close(out, timm_attn(x))


def test_class_attention_is_timm_class_attn():
    B, N, H, D = 2, 9, 4, 8
    timm_attn = ClassAttn(H * D, num_heads=H, qkv_bias=True).double()
    timm_attn.fused_attn = False
    x = torch.randn(B, N, H * D, dtype=D64)
    heads = lambda t: t.reshape(B, -1, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = heads(timm_attn.q(x[:, :1])), heads(timm_attn.k(x)), heads(timm_attn.v(x))
    out = reference.class_attention(q, k, v, timm_attn.scale).transpose(1, 2).reshape(B, 1, H * D)
    torch.testing.assert_close(timm_attn.proj(out), timm_attn(x))


def test_layerscale_residual_layernorm():
    x, y = torch.randn(2, 5, 12, dtype=D64), torch.randn(2, 5, 12, dtype=D64)
    g, w, b = (torch.randn(12, dtype=D64) for _ in range(3))
    mask = torch.tensor([True, False])
    out, normed = reference.layerscale_residual_layernorm(x, y, g, w, b, 1e-6, mask, 0.5)
    expected = x + g * y * torch.tensor([2.0, 0.0], dtype=D64)[:, None, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normed, F.layer_norm(expected, (12,), w, b, 1e-6))
    ours = ops.layerscale_residual_layernorm(x, y, g, w, b, 1e-6, mask, 0.5)
    torch.testing.assert_close(ours[1], normed)


def official_deit_loss(outputs, outputs_kd, labels, teacher, kind, alpha, tau, base_criterion):
    """facebookresearch/deit losses.py DistillationLoss.forward, restated."""
    base = base_criterion(outputs, labels)
    if kind == "none":
        return base
    if kind == "soft":
        distill = F.kl_div(F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                           reduction="sum", log_target=True) * (tau * tau) / outputs_kd.numel()
    else:
        distill = F.cross_entropy(outputs_kd, teacher.argmax(dim=1))
    return base * (1 - alpha) + distill * alpha


@pytest.mark.parametrize("kind", ["none", "hard", "soft"])
@pytest.mark.parametrize("soft_target", [False, True])
def test_distillation_loss_is_official_deit(kind, soft_target):
    B, C = 6, 10
    s, d, t = (torch.randn(B, C, dtype=D64) * 3 for _ in range(3))
    if soft_target:  # a mixup target, as timm's Mixup makes it
        target = torch.softmax(torch.randn(B, C, dtype=D64), -1)
        criterion, smoothing = SoftTargetCrossEntropy(), 0.0
    else:
        target = torch.randint(0, C, (B,))
        criterion, smoothing = LabelSmoothingCrossEntropy(0.1), 0.1
    expected = official_deit_loss(s, d, target, t, kind, 0.3, 2.0, criterion)
    got = ops.distillation_loss(s, d, target, t, kind, alpha=0.3, tau=2.0, label_smoothing=smoothing)
    torch.testing.assert_close(got, expected)


def test_kl_reductions_differ_by_the_class_count():
    B, C = 4, 1000
    s, d, t = (torch.randn(B, C, dtype=D64) for _ in range(3))
    y = torch.randint(0, C, (B,))
    numel = ops.distillation_loss(s, d, y, t, "soft", alpha=1.0, kl_reduction="numel")
    batchmean = ops.distillation_loss(s, d, y, t, "soft", alpha=1.0, kl_reduction="batchmean")
    torch.testing.assert_close(batchmean, numel * C)


def test_reference_losses_run_in_fp32_under_half_inputs():
    s = torch.randn(3, 5).half()
    loss = ops.distillation_loss(s, s, torch.tensor([0, 1, 4]), s, "soft")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
