"""Training-time behaviour on tiny models: DropPath draws as timm's, torch.compile(fullgraph=True)
traces forward and backward, and the Triton backend (interpreted on CPU) matches the torch one."""
import pytest
import torch

from deit_fast import ops

from .common import (TINY_CAIT, TINY_DEIT, assert_close_scaled, perturb, seeded_train_outputs,
                     tiny)


@pytest.mark.parametrize("name, kwargs", [("deit_tiny_distilled_patch16_224", TINY_DEIT),
                                          ("cait_xxs24_224", TINY_CAIT)], ids=["deit", "cait"])
def test_drop_path_matches_timm(name, kwargs):
    x = torch.randn(8, 3, 32, 32)
    ours, _, outs = seeded_train_outputs(name, dict(kwargs, drop_path_rate=0.5), x, 123)
    assert_close_scaled(*outs)
    torch.manual_seed(123)
    assert not torch.allclose(ours.eval()(x), outs[0])  # the masks did drop something


def _loss(out):
    return sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("kind", ["deit", "cait"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend, kind):
    torch._dynamo.reset()
    model = perturb(tiny(kind, drop_path_rate=0.1))
    if kind == "deit":
        model.set_distilled_training(True)
    x = torch.randn(2, 3, 32, 32)
    with ops.use_backend(backend):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        model.train()
        out = compiled(x)
        assert isinstance(out, tuple) == (kind == "deit")
        _loss(out).backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            assert_close_scaled(compiled(x), model(x), rel=1e-5)
    torch._dynamo.reset()


# CaiT at 8 heads: two row blocks share the tensor-core talking-heads kernels' 16 slots (4 at 4 heads)
@pytest.mark.parametrize("kind, kwargs", [("deit", {}), ("cait", {}), ("cait", dict(num_heads=8, embed_dim=256))],
                         ids=["deit", "cait", "cait_8_heads"])
def test_triton_matches_torch(kind, kwargs):
    model = perturb(tiny(kind, drop_path_rate=0.2, **kwargs)).train()
    x = torch.randn(2, 3, 32, 32)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        torch.manual_seed(7)  # the same DropPath masks on both backends
        with ops.use_backend(backend):
            out = model(x)
            _loss(out).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert_close_scaled(a, b, rel=1e-4)
    for n, g in grads.items():
        assert_close_scaled(g, ref_grads[n], rel=1e-3)


@pytest.mark.parametrize("block", ["Block", "LayerScaleBlock"])
def test_drop_path_one_drops_every_branch(block):
    """drop_path 1 (the last block's rate at --drop-path 1, linear decay): every sample's branches
    are dropped and the block passes x through, as timm's DropPath does (no 1 / keep_prob)."""
    from deit_fast import layers
    blk = perturb(getattr(layers, block)(64, num_heads=2, drop_path=1.0)).train()
    x = torch.randn(2, 5, 64)
    assert torch.equal(blk(x), x)
