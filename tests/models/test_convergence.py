"""Convergence (Liger-style): a tiny distilled DeiT and a tiny CaiT train for a few dozen AdamW
steps from the same seed on every op backend, fused loss included; the loss curves agree and
the loss falls. On CPU the triton backend runs in the interpreter; on a GPU the real kernels."""
import pytest
import torch

from deit_fast import ops

from .common import tiny

STEPS = 24


def train(kind: str, backend: str, device: str, steps: int = STEPS, dtype=None):
    torch.manual_seed(0)
    model = tiny(kind, drop_path_rate=0.1).to(device).train()
    if kind == "deit":
        model.set_distilled_training(True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator(device="cpu").manual_seed(1)
    # A fixed small task: 4 batches of 8 images with random labels and random teacher logits.
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g),
             torch.randn(8, 10, generator=g) * 3) for _ in range(4)]
    losses = []
    with ops.use_backend(backend):
        for step in range(steps):
            x, y, teacher = (t.to(device) for t in data[step % len(data)])
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            cls, dist = out if kind == "deit" else (out, out)
            loss = ops.distillation_loss(cls.float(), dist.float(), y, teacher,
                                         kind="hard" if kind == "deit" else "none",
                                         label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("kind", ["deit", "cait"])
def test_triton_and_torch_backends_train_alike(kind):
    ref, fused = train(kind, "torch", "cpu"), train(kind, "triton", "cpu")
    assert fused[-4:].mean() < 0.8 * fused[:4].mean(), f"loss did not fall: {fused.tolist()}"
    torch.testing.assert_close(fused, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["deit", "cait"])
def test_gpu_bf16_training_agrees(kind):
    ref = train(kind, "torch", "cuda", dtype=torch.bfloat16)
    for backend in ("triton", "auto"):
        losses = train(kind, backend, "cuda", dtype=torch.bfloat16)
        assert losses[-4:].mean() < 0.8 * losses[:4].mean()
        torch.testing.assert_close(losses, ref, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "cait_xxs24_224"])
def test_gpu_full_size_training_step_matches_torch(name):
    """One bf16 training step of the real DeiT-S / CaiT-XXS24 at batch 32: loss and every
    grad of the triton backend, and of auto (cuda kernels first where measured faster), within
    bf16 tolerance of the torch backend."""
    import deit_fast
    torch.manual_seed(0)
    model = deit_fast.create_model(name).cuda().train()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (32,), device="cuda")
    results = []
    for backend in ("torch", "triton", "auto"):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), *fused = results
    for backend, (loss, grads) in zip(("triton", "auto"), fused):
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2, msg=backend)
        for n, g in grads.items():
            scale = ref_grads[n].abs().max().clamp_min(1e-6)
            assert (g - ref_grads[n]).abs().max() <= 5e-2 * scale, (backend, n)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["deit", "cait"])
def test_gpu_raw_pointer_launches_train_alike(kind, monkeypatch):
    """kernels.RAW_POINTERS (the launcher given addresses, not tensors): the same bf16 training
    curve as Triton's own launch path, to rounding. tests/aot/test_model_kernels.py checks on a
    CPU that the launcher gets the same arguments; this runs them."""
    from deit_fast import kernels
    shipped = train(kind, "triton", "cuda", steps=8, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "RAW_POINTERS", not kernels.RAW_POINTERS)
    switched = train(kind, "triton", "cuda", steps=8, dtype=torch.bfloat16)
    torch.testing.assert_close(switched, shipped, rtol=1e-5, atol=1e-5)
