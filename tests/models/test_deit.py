"""DeiT model semantics beyond parity: the distillation head, pooling, classifier methods."""
import pytest
import timm
import torch

import deit_fast
from deit_fast.models import VisionTransformer, VisionTransformerDistilled

from .common import TINY_CAIT, TINY_DEIT, assert_close_scaled, perturb


def _pair(name, **kwargs):
    theirs = perturb(timm.create_model(name, **TINY_DEIT, **kwargs))
    ours = deit_fast.create_model(name, **TINY_DEIT, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_distilled_outputs_follow_timm():
    ours, theirs = _pair("deit_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, 32, 32)
    feats = ours.forward_features(x)
    assert feats.shape == (2, 2 + 16, 64)  # [cls, dist, patches]
    assert ours.pos_embed.shape == (1, 18, 64) and ours.num_prefix_tokens == 2
    cls, dist = ours.head(feats[:, 0]), ours.head_dist(feats[:, 1])

    ours.eval(), theirs.eval()
    assert_close_scaled(ours(x), (cls + dist) / 2)  # eval: the mean of the two heads' logits
    assert_close_scaled(ours(x), theirs(x))
    assert_close_scaled(ours.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)

    ours.train(), theirs.train()
    assert_close_scaled(ours(x), theirs(x))  # train, distilled training off: still the mean
    ours.set_distilled_training(True), theirs.set_distilled_training(True)
    out, ref = ours(x), theirs(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert_close_scaled(out[0], cls), assert_close_scaled(out[1], dist)
    for a, b in zip(out, ref):
        assert_close_scaled(a, b)
    ours.eval()
    assert isinstance(ours(x), torch.Tensor)  # eval returns the mean even with distilled training on


def test_distilled_classifier_methods():
    model = deit_fast.create_model("deit_tiny_distilled_patch16_224", **TINY_DEIT)
    assert isinstance(model, VisionTransformerDistilled)
    assert model.get_classifier() == (model.head, model.head_dist)
    assert {"pos_embed", "cls_token", "dist_token"} <= model.no_weight_decay()
    model.reset_classifier(5)
    assert model.head.out_features == model.head_dist.out_features == model.num_classes == 5
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)  # no head: pooled features
    with pytest.raises(ValueError, match="distill"):
        model.reset_classifier(5, global_pool="avg")


def test_plain_deit_pooling_and_head():
    ours, theirs = _pair("deit_tiny_patch16_224", global_pool="avg")  # fc_norm replaces norm, as timm
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 32, 32)
    ours.eval(), theirs.eval()
    assert_close_scaled(ours(x), theirs(x))
    assert_close_scaled(ours.forward_head(ours.forward_features(x), pre_logits=True),
                        theirs.forward_head(theirs.forward_features(x), pre_logits=True))
    model = deit_fast.create_model("deit_tiny_patch16_224", **TINY_DEIT)
    assert isinstance(model, VisionTransformer) and model.get_classifier() is model.head
    model.reset_classifier(3, global_pool="")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 17, 3)  # no pooling: per-token logits


def test_cait_classifier_methods():
    model = deit_fast.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1)
    x = torch.randn(1, 3, 32, 32)
    assert model.forward_features(x).shape == (1, 1 + 16, 192)  # cls prepended after the CA stage
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 192)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(7, global_pool="avg")
    assert model.get_classifier().out_features == 7 and model(x).shape == (1, 7)


def test_cait_avg_pool_follows_timm():
    """CaiT's global_pool="avg" averages the patch tokens only, as timm's: not the class token."""
    theirs = perturb(timm.create_model("cait_xxs24_224", **TINY_CAIT, global_pool="avg")).eval()
    ours = deit_fast.create_model("cait_xxs24_224", **TINY_CAIT, global_pool="avg").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert_close_scaled(ours(x), theirs(x))
    feats = ours.forward_features(x)
    assert_close_scaled(ours.forward_head(feats, pre_logits=True), feats[:, 1:].mean(dim=1))


def test_grad_checkpointing_gives_same_grads():
    model = perturb(deit_fast.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2))
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(), model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert_close_scaled(p.grad, ref[n], rel=1e-5)
