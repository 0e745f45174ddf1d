"""Every DeiT-1 and CaiT name in timm: same parameters, keys, shapes and outputs as timm's model.

Structure is checked at full size on the meta device (no memory, no init time); outputs with real,
perturbed weights at full size, batch 1. The heavy models (marked slow) compare eval outputs only:
train mode with zero drop rates runs the same math, and the light models check it.
"""
import pytest
import timm
import torch

import deit_fast

from .common import assert_close_scaled, perturb, seeded_train_outputs

# DESIGN.md section 4 and the CaiT paper.
PARAMS = {"deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664,
          "deit_base_patch16_224": 86_567_656, "cait_xxs24_224": 11_956_264,
          "cait_m48_448": 356_460_520}
HEAVY = {"cait_m36_384", "cait_m48_448", "cait_s36_384", "deit_base_patch16_384",
         "deit_base_distilled_patch16_384"}
TIMM_NAMES = [n for n in timm.list_models("deit_*") + timm.list_models("cait_*")
              if not n.startswith(("deit3_", "deit_fast_"))]  # ours are registered there too


def _param(name, slow=False):
    return pytest.param(name, marks=[pytest.mark.slow] if slow and name in HEAVY else [], id=name)


def test_every_timm_name_is_ours():
    assert sorted(TIMM_NAMES) == deit_fast.list_models()
    assert len(TIMM_NAMES) == 18


@pytest.mark.parametrize("name", [_param(n) for n in TIMM_NAMES])
def test_structure_matches_timm(name):
    theirs = timm.create_model(name, device="meta")
    with torch.device("meta"):
        ours = deit_fast.create_model(name)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == PARAMS.get(name, count)
    sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(theirs_sd)  # same keys, same order
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    ours.load_state_dict(theirs_sd, strict=True, assign=True)
    assert ours.no_weight_decay() >= {"pos_embed", "cls_token"}


@pytest.mark.parametrize("name", [_param(n, slow=True) for n in TIMM_NAMES])
def test_outputs_match_timm(name):
    theirs = perturb(timm.create_model(name))
    with torch.device("meta"):  # ours gets timm's tensors: no second init of a big model
        ours = deit_fast.create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    size = theirs.pretrained_cfg["input_size"][-1]
    x = torch.randn(1, 3, size, size)
    for train in (False,) if name in HEAVY else (False, True):  # drop rates 0: same numbers
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            assert_close_scaled(ours(x), theirs(x))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "cait_xxs24_224"])
def test_seeded_dropout_matches_timm(name):
    """With every dropout on, a seeded train-mode forward drops the same elements as timm's: CaiT
    added pos_embed first (for the kernels' layout), and Dropout draws its mask in memory order,
    so its pos_drop hit other elements than timm's."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
              pos_drop_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_rate=0.1)
    outs = seeded_train_outputs(name, kw, torch.randn(2, 3, 32, 32), 0)[2]
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in outs)):
        assert_close_scaled(a, b)
