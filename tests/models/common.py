"""Helpers shared by the model tests: tiny configs, weight perturbation, scaled comparison."""
import timm
import torch

import deit_fast

# Tiny configs: head dim 32 (DeiT) and 48 (CaiT, as every real CaiT), 16 patches: cheap enough for
# the Triton interpreter, and every code path of the full models.
TINY_DEIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
TINY_CAIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=10,
                 init_values=0.1)


def tiny(kind: str, **kwargs):
    if kind == "deit":
        return deit_fast.create_model("deit_tiny_distilled_patch16_224", **{**TINY_DEIT, **kwargs})
    return deit_fast.create_model("cait_xxs24_224", **{**TINY_CAIT, **kwargs})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move the parameters off their init values (zero biases, unit norms, LayerScale 1e-5), so
    every parameter visibly shapes the output; the comparison would be blind to them otherwise."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype)  # noqa: E731
    for name, p in model.named_parameters():
        if "gamma" in name:
            p.copy_(0.05 + 0.05 * rand(p).abs())
        elif "norm" in name and name.endswith("weight"):
            p.mul_(1 + 0.1 * rand(p))
        elif name.endswith("bias") or "token" in name:
            p.add_(0.02 * rand(p))
    return model


def assert_close_scaled(actual, expected, rel: float = 2e-5, floor: float = 1e-7):
    """Max abs error within rel x the largest magnitude of expected (+ a floor for tensors that
    are ~0, e.g. the grad of talking heads' pre-softmax bias): fp32 rounding of a deep net."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale + floor, f"max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def seeded_train_outputs(name: str, kwargs: dict, x: torch.Tensor, seed: int):
    """(ours, timm's model, [our output, timm's]): timm's model perturbed, its weights loaded into
    ours, each run in train mode from the same seed (so their dropout and drop-path draws can
    be compared)."""
    theirs = perturb(timm.create_model(name, **kwargs)).train()
    ours = deit_fast.create_model(name, **kwargs).train()
    ours.load_state_dict(theirs.state_dict())
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(seed)
        outs.append(model(x))
    return ours, theirs, outs
