"""FlashAttention's tolerance rule (DESIGN.md section 6): a kernel's error against the fp64
reference may be at most twice the error of the plain PyTorch op run in the same dtype, plus a
floor of a few units in the last place (for cases where PyTorch happens to be exact)."""
import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_rule(name: str, ours: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor,
                ulps: float = 4.0) -> None:
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    floor = ulps * torch.finfo(ours.dtype).eps * scale
    ours_err, torch_err = max_err(ours, ref64), max_err(same_dtype, ref64)
    assert ours_err <= 2 * torch_err + floor, (
        f"{name}: error {ours_err:.3g} > 2 x torch's {torch_err:.3g} + floor {floor:.3g}")


def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled (float) or max-filled (int) memory, so a kernel that
    leaves any output element unwritten fails the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)
    monkeypatch.setattr(torch, "empty", empty)
