"""model.attention_maps(x): every attention layer's probabilities, as timm's unfused math forms
them (the input of its attn_drop), though our forward runs the fused kernels."""
import pytest
import timm
import torch

import deit_fast
from deit_fast import ops
from tests.models.common import TINY_CAIT, TINY_DEIT, perturb

MODELS = {"deit": ("deit_tiny_patch16_224", TINY_DEIT),
          "distilled": ("deit_tiny_distilled_patch16_224", TINY_DEIT),
          "cait": ("cait_xxs24_224", TINY_CAIT)}


def timm_maps(model, x):
    """What each of timm's attention layers hands its attn_drop, with fused attention off."""
    maps = []
    for m in model.modules():
        if hasattr(m, "attn_drop") and hasattr(m, "proj"):
            m.fused_attn = False
            m.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(args[0]))
    model(x)
    return maps


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", MODELS)
def test_maps_are_timms(kind, backend):
    name, kwargs = MODELS[kind]
    theirs = perturb(timm.create_model(name, **kwargs)).eval()
    ours = deit_fast.from_timm(theirs)
    x = torch.randn(2, 3, 32, 32)
    with ops.use_backend(backend):
        maps = ours.attention_maps(x)
    want = timm_maps(theirs, x)
    depth, token_only = kwargs["depth"], 2 if kind == "cait" else 0
    assert len(maps) == len(want) == depth + token_only
    n, heads = 16 + (0 if kind == "cait" else 1 + (kind == "distilled")), kwargs["num_heads"]
    for i, (a, b) in enumerate(zip(maps, want)):
        rows = 1 if i >= depth else n
        assert a.shape == (2, heads, rows, n + (i >= depth)), i
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if kind != "cait":  # plain softmax rows; CaiT's talking heads mix them after the softmax
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, heads, n))


def test_maps_leave_no_hooks_and_take_grads():
    model = deit_fast.create_model("deit_tiny_patch16_224", **TINY_DEIT)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with ops.use_backend("torch"):
        model.attention_maps(x)[-1][..., 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(m._forward_pre_hooks for m in model.modules())
