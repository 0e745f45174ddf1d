"""Inference as users run it: under torch.inference_mode, with the weights cast to fp16 (no
autocast), and through torch.export, on the torch and triton backends."""
import pytest
import torch

from deit_fast import ops
from tests.models.common import perturb, tiny

KINDS = ["deit", "cait"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_gives_the_no_grad_outputs(kind, backend):
    model = perturb(tiny(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    with ops.use_backend(backend):
        with torch.no_grad():
            want = model(x)
        with torch.inference_mode():  # no autograd graph may be recorded on inference tensors
            got = model(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_weights_without_autocast(kind, backend):
    """model.half(): fp16 parameters (LayerNorm and LayerScale too) reach the fused ops, which
    compute in fp32 inside; the logits stay within fp16 rounding of the fp32 model's."""
    model = perturb(tiny(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    with ops.use_backend(backend), torch.no_grad():
        want = model(x)
        got = model.half()(x.half())
    assert got.dtype == torch.float16
    scale = want.abs().max()
    assert (got.float() - want).abs().max() <= 5e-3 * scale


@pytest.mark.parametrize("kind", KINDS)
def test_torch_export_keeps_the_fused_ops(kind):
    model = perturb(tiny(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    with ops.use_backend("triton"):
        program = torch.export.export(model, (x,))
        want = model(x)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("deit_fast" in t for t in targets), sorted(targets)
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-6)
