"""Launch grids of every Triton kernel: only a grid's x axis may grow with the batch, since y and
z stop at 65535 (B * H passes that at DeiT-B's 12 heads from batch 5462 on). Recorded at two
batch sizes through each kernel module's launch(). (A y that grows with the head count alone is
bounded: the chunked talking-heads rows, by its 16 heads and 256 keys.) And on a GPU, the
self-attention kernels at B * H past 65535."""
import pytest
import torch
import torch.nn.functional as F

from deit_fast import kernels, ops
from deit_fast.kernels import (attention, class_attention, distill_loss, layerscale, talking_heads,
                               talking_heads_chunked)
from tests.conftest import DEVICE

MODULES = (attention, class_attention, distill_loss, layerscale, talking_heads, talking_heads_chunked)


def grids(monkeypatch, B, H):
    """{kernel name: [grid of each launch]} of one fwd+bwd of every op at batch B, H heads."""
    seen = {}

    def recording(kernel, grid, *args, **kwargs):
        seen.setdefault(kernel.fn.__name__, []).append(tuple(grid))
        return kernels.launch(kernel, grid, *args, **kwargs)
    for module in MODULES:
        monkeypatch.setattr(module, "launch", recording)
    N, D, C = 7, 32, 16
    leaf = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()  # noqa: E731
    q, k, v = (leaf(B, H, N, D) for _ in range(3))
    w = [leaf(H, H), leaf(H), leaf(H, H), leaf(H)]
    x, y, g, lw, lb = leaf(B, N, C), leaf(B, N, C), leaf(C), leaf(C), leaf(C)
    s, d, t = leaf(B, 10), leaf(B, 10), torch.randn(B, 10, device=DEVICE)
    with ops.use_backend("triton"):
        losses = [ops.attention(q, k, v), ops.class_attention(q[:, :, :1], k, v),
                  ops.layerscale_residual(x, y, g), *ops.layerscale_residual_layernorm(x, y, g, lw, lb),
                  ops.distillation_loss(s, d, torch.arange(B, device=DEVICE) % 10, t, "soft")]
        for strategy in ("fused", "chunked"):
            monkeypatch.setattr(talking_heads, "STRATEGY", strategy)
            losses.append(ops.talking_heads_attention(q.half(), k.half(), v.half(), *w))
            losses.append(ops.talking_heads_attention(q, k, v, *w))  # fp32: the CUDA-core family
        torch.autograd.backward([o.float().sum() for o in losses])
    return seen


def test_only_the_x_axis_grows_with_the_batch(monkeypatch):
    small, large = grids(monkeypatch, 1, 3), grids(monkeypatch, 2, 3)
    assert set(small) == set(large) and len(small) >= 12, sorted(small)
    for name in small:
        assert len(small[name]) == len(large[name]), name
        for a, b in zip(small[name], large[name]):
            assert a[1:] == b[1:], f"{name}: grid {a} at B=1 but {b} at B=2"


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["masked", "split"])
def test_gpu_attention_past_65535_heads(split):
    """B * H = 69632 (batch 5803 of DeiT-B's 12 heads would pass it as well): every head right."""
    B, H, N, D = 17408, 4, 20, 48
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    o, lse = attention.forward(q, k, v, D ** -0.5, split=split)
    do = torch.randn_like(o)
    grads = attention.backward(do, q, k, v, o, lse, D ** -0.5, split=split)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
