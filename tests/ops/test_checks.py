"""Bad input to every op raises ValueError naming the offending argument."""
import pytest
import torch

from deit_fast import ops

q = torch.randn(2, 3, 7, 16)


@pytest.mark.parametrize("args,arg", [
    ((q[0], q, q), "q"),
    ((q, q[:, :2], q), "k"),
    ((q, q, q[..., :8]), "v"),
    ((q, q, q.half()), "dtype"),
    ((q, q, q, -1.0), "scale"),
    ((q, q, q, float("inf")), "scale"),
    ((q, q, q, float("nan")), "scale"),
    ((q, q, q, 1e39), "scale"),  # finite, but inf in fp32 where the kernels take it
    ((q, q, q, True), "scale"),  # float(True) is 1.0
    ((q, q[:, :, :0], q[:, :, :0]), "k"),
])
def test_attention(args, arg):
    with pytest.raises(ValueError, match=arg):
        ops.attention(*args)


def test_class_attention_needs_one_query():
    with pytest.raises(ValueError, match="q must hold one query"):
        ops.class_attention(q, q, q)
    assert ops.class_attention(q[:, :, :1], q, q).shape == (2, 3, 1, 16)


@pytest.mark.parametrize("bad,arg", [(dict(w_l=torch.randn(2, 2)), "w_l"), (dict(b_w=torch.randn(4)), "b_w")])
def test_talking_heads(bad, arg):
    mix = dict(w_l=torch.randn(3, 3), b_l=torch.randn(3), w_w=torch.randn(3, 3), b_w=torch.randn(3))
    mix.update(bad)
    with pytest.raises(ValueError, match=arg):
        ops.talking_heads_attention(q, q, q, **mix)


L = torch.randn(4, 10)
Y = torch.tensor([0, 3, 9, 1])


@pytest.mark.parametrize("kwargs,arg", [
    (dict(target=torch.tensor([0, 3, 10, 1])), "target"),
    (dict(target=torch.tensor([0, -1, 2, 1])), "target"),
    (dict(target=Y.int()), "target"),
    (dict(target=torch.rand(4, 9)), "target"),
    (dict(teacher_logits=None), "teacher_logits"),
    (dict(dist_logits=torch.randn(4, 9)), "dist_logits"),
    (dict(kind="medium"), "kind"),
    (dict(kl_reduction="mean"), "kl_reduction"),
    (dict(alpha=1.5), "alpha"),
    (dict(tau=0.0), "tau"),
    (dict(tau=float("inf")), "tau"),
    (dict(tau=1e-40), "tau"),  # subnormal in fp32: flushed to 0 on the GPU
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(logits=torch.randn(4, 10, 1)), "logits"),
])
def test_distillation_loss(kwargs, arg):
    args = dict(logits=L, dist_logits=L, target=Y, teacher_logits=L)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        ops.distillation_loss(**args)


@pytest.mark.parametrize("kwargs,arg", [(dict(weight=torch.randn(5)), "weight"), (dict(eps=0.0), "eps"),
                                          (dict(eps=float("inf")), "eps"), (dict(eps=1e39), "eps")])
def test_layerscale_residual_layernorm(kwargs, arg):
    x = torch.randn(2, 3, 6)
    args = dict(x=x, y=x, gamma=None, weight=torch.ones(6), bias=torch.zeros(6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        ops.layerscale_residual_layernorm(**args)


@pytest.mark.parametrize("op,arg", [
    (lambda t: ops.attention(t, t, t), "q"),
    (lambda t: ops.attention_qkv(t.transpose(1, 2).unsqueeze(2).expand(-1, -1, 3, -1, -1)), "qkv"),
    (lambda t: ops.talking_heads_attention(t, t, t, *MIX), "q"),
    (lambda t: ops.talking_heads_attention_qkv(t.transpose(1, 2).unsqueeze(2).expand(-1, -1, 3, -1, -1),
                                               *MIX), "qkv"),
])
def test_interpreter_refuses_bf16_matmul_kernels(op, arg):
    """The Triton interpreter multiplies bf16 bit patterns in tl.dot (outputs ~1e9, not an error):
    under it the tl.dot kernels refuse bf16 instead. Nothing to refuse on a GPU."""
    from deit_fast import kernels
    if not kernels.INTERPRETED:
        pytest.skip("only under TRITON_INTERPRET=1")
    ops.set_backend("triton")
    with pytest.raises(ValueError, match=f"{arg} is bfloat16.*interpreter"):
        op(q.bfloat16())
    assert op(q.half()).isfinite().all()  # fp16 runs


MIX = (torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3))
