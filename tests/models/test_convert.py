"""deit_fast.from_timm: a timm model instance as ours, sharing its parameters; architectures
deit_fast does not build refused by name."""
import copy
import functools

import pytest
import timm
import torch
from torch import nn

import deit_fast
from deit_fast import ops
from deit_fast.models import Cait, VisionTransformer, VisionTransformerDistilled
from tests.models.common import perturb

# Off every default: odd grid, no qkv bias, avg pool, a hidden width that is no integer ratio,
# dropouts and drop path on, head dim 32 (DeiT) or 48 (CaiT).
CONFIGS = {
    "deit": ("deit_tiny_patch16_224", VisionTransformer, dict(
        img_size=(24, 40), patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=7,
        mlp_ratio=2.5, qkv_bias=False, global_pool="avg", drop_path_rate=0.3, drop_rate=0.1,
        proj_drop_rate=0.1, attn_drop_rate=0.1, pos_drop_rate=0.1)),
    "distilled": ("deit_tiny_distilled_patch16_224", VisionTransformerDistilled, dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5,
        drop_path_rate=0.2)),
    "cait": ("cait_xxs24_224", Cait, dict(
        img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=10,
        init_values=0.1, drop_path_rate=0.2, depth_token_only=1, mlp_ratio_token_only=2.,
        mlp_ratio=4.5 + 1 / 96, qkv_bias=False, proj_drop_rate=0.1, attn_drop_rate=0.1)),
}


def timm_model(kind, **overrides):
    name, _, kwargs = CONFIGS[kind]
    return perturb(timm.create_model(name, **{**kwargs, **overrides}))


def image(model):
    return torch.randn(2, 3, *model.patch_embed.img_size)


@pytest.mark.parametrize("kind", CONFIGS)
def test_outputs_grads_and_parameters_are_timms(kind):
    theirs = timm_model(kind).eval()
    ours = deit_fast.from_timm(theirs)
    assert type(ours) is CONFIGS[kind][1] and not ours.training
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert all(a is b for a, b in zip(ours.parameters(), theirs.parameters()))  # shared
    x = image(theirs)
    with ops.use_backend("torch"):
        out = ours(x)
    want = theirs(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()  # into timm's own parameters
    grads = [p.grad.clone() for p in theirs.parameters()]
    theirs.zero_grad()
    want.square().sum().backward()
    for name, g, (_, p) in zip([n for n, _ in theirs.named_parameters()], grads,
                               theirs.named_parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", CONFIGS)
def test_train_mode_draws_as_timm(kind):
    """Per-block drop-path rates (DeiT's linear schedule, CaiT's one rate) and every dropout
    carried over: the same seed drops the same samples and elements."""
    theirs = timm_model(kind).train()
    ours = deit_fast.from_timm(theirs)
    assert ours.training
    rates = [getattr(b, "drop_path1", getattr(b, "drop_path", None)) for b in theirs.blocks]
    assert [b.drop_path for b in ours.blocks] == [getattr(r, "drop_prob", 0.0) for r in rates]
    x = image(theirs)
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(3)
        with ops.use_backend("torch"):
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_a_schedule_of_its_own_is_kept():
    theirs = timm_model("deit", drop_path_rate=0.0)
    theirs.blocks[0].drop_path1 = theirs.blocks[0].drop_path2 = timm.layers.DropPath(0.25)
    assert [b.drop_path for b in deit_fast.from_timm(theirs).blocks] == [0.25, 0.0, 0.0]
    theirs.blocks[1].drop_path2 = timm.layers.DropPath(0.5)  # ours take one rate a block
    with pytest.raises(ValueError, match=r"blocks\.1 has two drop-path rates"):
        deit_fast.from_timm(theirs)


def test_triton_backend_runs_the_converted_model():
    theirs = timm_model("cait", drop_path_rate=0.0, proj_drop_rate=0.0,
                        attn_drop_rate=0.0).eval()
    x = image(theirs)
    with ops.use_backend("triton"):
        out = deit_fast.from_timm(theirs)(x)
    torch.testing.assert_close(out, theirs(x), rtol=1e-4, atol=1e-4)


def test_flags_and_metadata_carry_over():
    theirs = timm_model("distilled")
    theirs.set_distilled_training(True)
    theirs.set_grad_checkpointing(True)
    ours = deit_fast.from_timm(theirs)
    assert ours.distilled_training and ours.grad_checkpointing
    assert ours.pretrained_cfg["architecture"] == theirs.pretrained_cfg["architecture"]
    assert isinstance(ours(image(theirs)), tuple)  # the two heads, as timm's in training


def test_an_optimizer_on_timms_parameters_trains_ours():
    theirs = timm_model("distilled").eval()
    before = copy.deepcopy(theirs)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    ours = deit_fast.from_timm(theirs)
    with ops.use_backend("torch"):
        ours(image(theirs)).sum().backward()
    opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(theirs.parameters(), before.parameters())]
    assert all(changed)
    x = image(theirs)
    with ops.use_backend("torch"):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# A timm option deit_fast does not build -> the words the refusal must contain.
REFUSED = [
    (dict(reg_tokens=1), "num_prefix_tokens"),
    (dict(qk_norm=True), r"model\.blocks\.0\.attn\.q_norm is LayerNorm"),
    (dict(init_values=1e-5), r"blocks\.0\.ls1 is LayerScale"),
    (dict(class_token=False, global_pool="avg"), "has_class_token"),
    (dict(no_embed_class=True), "no_embed_class"),
    (dict(pre_norm=True), "patch_embed.proj"),
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(act_layer="gelu_tanh"), "mlp.act is GELUTanh"),
    (dict(final_norm=False), r"model\.norm is Identity"),
    (dict(norm_layer=functools.partial(nn.LayerNorm, eps=1e-5)), r"norm1\.eps is 1e-05"),
    (dict(proj_bias=False), r"attn\.proj holds parameters"),
    (dict(patch_drop_rate=0.1), "patch_drop is PatchDropout"),
    (dict(pool_include_prefix=True), "pool_include_prefix"),
    (dict(global_pool="map"), "global_pool 'map'"),
]


@pytest.mark.parametrize("overrides, words", REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_what_deit_fast_does_not_build_is_refused_by_name(overrides, words):
    theirs = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                               depth=1, num_heads=2, **overrides)
    with pytest.raises(ValueError, match=words):
        deit_fast.from_timm(theirs)


def test_cait_with_another_activation_is_refused():
    theirs = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, embed_dim=96, depth=1,
                               num_heads=2, act_layer=nn.SiLU)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.act is SiLU, not GELU"):
        deit_fast.from_timm(theirs)


def test_other_models_and_wrappers_are_refused_with_a_hint():
    with pytest.raises(TypeError, match="ResNet"):
        deit_fast.from_timm(timm.create_model("resnet10t"))
    ours = deit_fast.create_model("deit_tiny_patch16_224")
    with pytest.raises(TypeError, match="deit_fast.models.deit.VisionTransformer"):
        deit_fast.from_timm(ours)
    wrapped = nn.Module()
    wrapped.module = timm_model("distilled")
    with pytest.raises(TypeError, match=r"DDP's \.module"):
        deit_fast.from_timm(wrapped)


def test_timms_plain_vits_of_deits_architecture_convert():
    """timm's ViT (augreg, DINO, MIIL weights) is DeiT's architecture; DeiT III is not (its
    pos_embed skips the class token, its blocks carry LayerScale)."""
    theirs = timm.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with ops.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(deit_fast.from_timm(theirs)(x), theirs(x))
    with pytest.raises(ValueError, match="no_embed_class"):
        deit_fast.from_timm(timm.create_model("deit3_small_patch16_224"))
