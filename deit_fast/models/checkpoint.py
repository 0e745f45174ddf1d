"""Loading official DeiT/CaiT and timm checkpoints into deit_fast models (same key names)."""
import argparse
import math
from typing import Dict

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

__all__ = ["load_checkpoint", "adapt_state_dict", "read_file", "check_fits", "drop_unfit_heads"]

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def read_file(path: str):
    """torch.load(path) of a file from elsewhere: weights_only=True (no pickled code runs), with
    argparse.Namespace allowed, which the official DeiT main.py saves as 'args' in its training
    checkpoints (refused as an unpickling error otherwise)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _weights(ckpt) -> Dict[str, Tensor]:
    """Official files keep weights under 'model' (and EMA under 'model_ema'); Lightning-style
    files under 'state_dict'; timm and torch.save(model.state_dict()) files are the dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, not a state_dict")
    return ckpt


def adapt_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Strip DDP's `module.` prefix and resample pos_embed (bicubic, as timm) to model's grid."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    pos, ours = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is not None and ours is not None and pos.shape != ours.shape and pos.dim() == 3:
        # Prefix slots in pos_embed: 2 distilled DeiT, 1 DeiT, 0 CaiT (pos_embed has no cls slot).
        prefix = ours.shape[1] - model.patch_embed.num_patches
        side = math.isqrt(max(pos.shape[1] - prefix, 0))
        if side > 0 and side * side == pos.shape[1] - prefix and pos.shape[2] == ours.shape[2]:
            sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                     old_size=[side, side], num_prefix_tokens=prefix)
    return sd


def drop_unfit_heads(model: nn.Module, sd: Dict[str, Tensor], why: str = "") -> Dict[str, Tensor]:
    """sd without its classifier weights (head, head_dist) that model lacks or shapes otherwise
    (another number of classes): those stay fresh, as in timm's pretrained loading and the
    official main.py's finetuning. why: printed for each one dropped, when given."""
    own = model.state_dict()
    keep = {}
    for k, v in sd.items():
        if k in HEAD_KEYS and not (k in own and v.shape == own[k].shape):
            if why:
                print(f"{why}: dropping {k} (shape {tuple(v.shape)}, model "
                      f"{tuple(own[k].shape) if k in own else 'none'})")
            continue
        keep[k] = v
    return keep


def check_fits(model: nn.Module, sd: Dict[str, Tensor], what: str, skip=(), hint: str = "") -> None:
    """Raise ValueError listing the keys of model missing from sd (except `skip`), the keys of sd
    model lacks, and the shapes that differ, if there are any."""
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(sd) if k not in skip)
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if k in sd and sd[k].shape != v.shape)
    if missing or unexpected or mismatched:
        lines = [f"{what} does not fit {type(model).__name__}{hint}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))


def load_checkpoint(model: nn.Module, path: str, new_head: bool = False) -> nn.Module:
    """Load an official DeiT/CaiT, timm or deit_fast checkpoint file into model, strictly.

    new_head: classifier weights (head, head_dist) that do not fit model (another number of
    classes, or none: num_classes=0) are left out and the model keeps its fresh head, as timm's
    pretrained loading does; every other key must still fit.
    Raises ValueError listing missing, unexpected and shape-mismatched keys."""
    sd = adapt_state_dict(model, _weights(read_file(path)))
    if new_head:
        sd = drop_unfit_heads(model, sd)
    check_fits(model, sd, f"checkpoint {path}", skip=HEAD_KEYS if new_head else ())
    model.load_state_dict(sd, strict=not new_head)
    return model
