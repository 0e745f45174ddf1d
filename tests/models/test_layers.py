"""The attention modules' unfused attention-map path, and mixed precision through the layers."""
import pytest
import torch

from deit_fast.layers import Attention, ClassAttn, TalkingHeadAttn

from .common import assert_close_scaled, perturb, tiny


@pytest.mark.parametrize("cls", [Attention, TalkingHeadAttn, ClassAttn])
def test_attention_map_reproduces_the_fused_output(cls):
    m = perturb(cls(96, num_heads=2, qkv_bias=True, attn_drop=0.5)).eval()  # eval: dropout off, fused
    x = torch.randn(2, 17, 96)
    probs = m.forward_attn_map(x)
    assert probs.shape == (2, 2, 1 if cls is ClassAttn else 17, 17)
    if cls is not TalkingHeadAttn:  # talking heads mixes probabilities across heads after softmax
        assert_close_scaled(probs.sum(-1), torch.ones(probs.shape[:-1]))
    v = (m.v(x) if cls is ClassAttn else m.qkv(x)[..., 192:]).reshape(2, 17, 2, 48).transpose(1, 2)
    assert_close_scaled(m._merge(probs @ v), m(x))


@pytest.mark.parametrize("cls", [Attention, TalkingHeadAttn, ClassAttn])
def test_attention_dropout_runs_unfused_in_training(cls):
    m = cls(64, num_heads=2, attn_drop=0.5).train()
    x = torch.randn(2, 9, 64)
    assert not torch.equal(m(x), m.eval()(x))


@pytest.mark.parametrize("kind", ["deit", "cait"])
def test_bf16_autocast(kind):
    model = perturb(tiny(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert_close_scaled(low, model(x), rel=5e-2)
