"""from_timm: a timm DeiT, distilled DeiT or CaiT instance as the deit_fast model of the same
architecture, on the fused ops, holding the very same Parameter objects (no copy).

timm keeps no constructor arguments on a model, so they are read off the instance; then timm's own
class is built from them (on the meta device: nothing allocated) and the two module trees must
match module for module: types, public attributes (Linear widths and biases, LayerNorm eps,
Dropout and DropPath rates, GELU's approximation, patch and image sizes...) and parameter shapes.
Whatever deit_fast does not build (register tokens, qk-norm, LayerScale in a DeiT, a pre-norm,
another activation or norm, dynamic image size, a gated attention...) shows up as a difference
and is refused, naming the module, before anything is changed.
"""
import copy
import math

import torch
from timm.layers import DropPath
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.cait import Cait as TimmCait
from timm.models.deit import VisionTransformerDistilled as TimmDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from .cait import Cait
from .deit import VisionTransformer, VisionTransformerDistilled

__all__ = ["from_timm"]

OURS = {TimmViT: VisionTransformer, TimmDistilled: VisionTransformerDistilled, TimmCait: Cait}
# Attributes that do not change what a module computes: its mode, timm's choice of SDPA or
# eager math (or of its own LayerNorm kernel), checkpointing, feature and pretrained metadata,
# init-only settings.
IGNORED = {"training", "fused_attn", "fast_norm", "grad_checkpointing", "distilled_training",
           "feature_info", "pretrained_cfg", "default_cfg", "pretrained_model_args",
           "weight_init_mode", "fix_init"}
DROP_PATHS = ("drop_path", "drop_path1", "drop_path2")  # a block's DropPath modules in timm


def _kind(module: nn.Module) -> type:
    """The type a module is compared by: timm's LayerNorm computes what torch's does (timm's
    DeiT builds the one, its CaiT the other), its eps and affine are compared as attributes."""
    return nn.LayerNorm if type(module) is TimmLayerNorm else type(module)


def _rate(module: nn.Module) -> float:
    """A Dropout's or DropPath's rate; 0 for timm's Identity in their place."""
    return getattr(module, "p", getattr(module, "drop_prob", 0.0))


def _mlp_ratio(mlp: nn.Module, dim: int) -> float:
    """A ratio whose int(dim * ratio) gives the hidden width back exactly (the blocks round)."""
    hidden = mlp.fc1.out_features
    return hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim


def _arguments(model: nn.Module) -> dict:
    """The constructor arguments of timm's (and our) class that would build `model`."""
    pe = model.patch_embed
    kw = dict(img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels,
              num_classes=model.num_classes, global_pool=model.global_pool,
              embed_dim=model.embed_dim, depth=len(model.blocks), drop_rate=_rate(model.head_drop),
              pos_drop_rate=_rate(model.pos_drop))
    if len(model.blocks):
        first, dim = model.blocks[0], model.embed_dim
        kw.update(num_heads=first.attn.num_heads, mlp_ratio=_mlp_ratio(first.mlp, dim),
                  qkv_bias=first.attn.qkv.bias is not None,
                  proj_drop_rate=_rate(first.attn.proj_drop),
                  attn_drop_rate=_rate(first.attn.attn_drop))
    if isinstance(model, TimmCait):
        kw.update(depth_token_only=len(model.blocks_token_only))
        if len(model.blocks_token_only):
            token_mlp = model.blocks_token_only[0].mlp
            kw.update(mlp_ratio_token_only=_mlp_ratio(token_mlp, model.embed_dim))
            if not len(model.blocks):  # the heads and biases live in the token-only blocks too
                attn = model.blocks_token_only[0].attn
                kw.update(num_heads=attn.num_heads, qkv_bias=attn.q.bias is not None)
    else:
        kw.update(fc_norm=not isinstance(model.fc_norm, nn.Identity))
    return kw


def _drop_paths(model: nn.Module) -> list:
    """Per self-attention block, its drop-path rate (timm's DeiT blocks have one module per
    residual, CaiT's one for both; ours take one rate a block)."""
    rates = []
    for i, block in enumerate(model.blocks):
        mods = [getattr(block, n) for n in DROP_PATHS if hasattr(block, n)]
        for m in mods:
            if isinstance(m, DropPath) and not m.scale_by_keep:
                raise ValueError(f"from_timm: blocks.{i} drops paths without rescaling "
                                 "(scale_by_keep=False); deit_fast's residuals rescale by 1 / keep")
        if len({_rate(m) for m in mods}) > 1:
            raise ValueError(f"from_timm: blocks.{i} has two drop-path rates "
                             f"{[_rate(m) for m in mods]}; deit_fast blocks take one")
        rates.append(_rate(mods[0]) if mods else 0.0)
    return rates


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple, list))


def _difference(theirs: nn.Module, canon: nn.Module):
    """The first way `theirs` differs from `canon` (timm's class rebuilt from _arguments), as a
    message naming the module, or None."""
    # remove_duplicate=False: one module at two names (a shared DropPath) is compared at both
    a = dict(theirs.named_modules(remove_duplicate=False))
    b = dict(canon.named_modules(remove_duplicate=False))
    for name in list(a) + [n for n in b if n not in a]:
        where = f"model.{name}" if name else "model"
        if name not in b:
            return f"{where} ({type(a[name]).__name__}) is not in timm's {type(canon).__name__} " \
                   "as deit_fast builds it"
        if name not in a:
            return f"{where} ({type(b[name]).__name__}) is missing"
        x, y = a[name], b[name]
        if _kind(x) is not _kind(y):
            return f"{where} is {type(x).__name__}, not {type(y).__name__}"
        for key in sorted(set(vars(x)) | set(vars(y))):
            if key.startswith("_") or key in IGNORED:
                continue
            u, v = vars(x).get(key), vars(y).get(key)
            if (u is None) != (v is None):  # a module or tensor here, None there (attn.gate)
                return f"{where}.{key} is {type(u).__name__}, not {type(v).__name__}"
            if (_plain(u) or _plain(v)) and u != v and not (
                    isinstance(u, float) and isinstance(v, float) and math.isclose(u, v)):
                return f"{where}.{key} is {u!r}, not {v!r}"
        for kind in ("_parameters", "_buffers"):
            pu = {k: None if t is None else tuple(t.shape) for k, t in getattr(x, kind).items()}
            pv = {k: None if t is None else tuple(t.shape) for k, t in getattr(y, kind).items()}
            if pu != pv:
                return f"{where} holds {kind[1:]} {pu}, not {pv}"
    return None


def from_timm(model: nn.Module) -> nn.Module:
    """timm's DeiT (VisionTransformer as timm's deit_* models build it, VisionTransformerDistilled)
    or Cait -> deit_fast's model of the same architecture, sharing its Parameter objects: the
    weights, their requires_grad and grads, and an optimizer built on `model.parameters()` all
    carry over, and training the result trains `model` (copy.deepcopy it first to keep both).
    Train/eval mode, grad checkpointing, distilled training and pretrained_cfg carry over too.
    An architecture deit_fast does not build raises ValueError naming the module that differs."""
    cls = OURS.get(type(model))
    if cls is None:
        known = ", ".join(f"{t.__module__}.{t.__name__}" for t in OURS)
        hint = (" (pass the module itself: torch.compile's ._orig_mod, DDP's .module)"
                if hasattr(model, "_orig_mod") or hasattr(model, "module") else "")
        raise TypeError(f"from_timm: model is a {type(model).__module__}.{type(model).__name__}; "
                        f"it takes one of {known}{hint}")
    kwargs, rates = _arguments(model), _drop_paths(model)
    with torch.device("meta"):
        canon = type(model)(**kwargs, drop_path_rate=0.0)
        for block, theirs in zip(canon.blocks, model.blocks):  # per-block rates: any schedule
            for n in DROP_PATHS:
                if hasattr(theirs, n):
                    setattr(block, n, copy.deepcopy(getattr(theirs, n)))
        why = _difference(model, canon)
        if why is not None:
            raise ValueError(f"from_timm: {why} (deit_fast builds timm's DeiT and CaiT as the "
                             "papers define them)")
        try:
            ours = cls(**kwargs)
        except ValueError as e:  # what timm builds and deit_fast does not (global_pool "map")
            raise ValueError(f"from_timm: {e}") from None
    for block, rate in zip(ours.blocks, rates):
        block.drop_path = rate
    timm_modules = dict(model.named_modules(remove_duplicate=False))
    for name, module in ours.named_modules():  # the names match: _difference checked theirs
        for kind in ("_parameters", "_buffers"):
            for key in getattr(module, kind):
                getattr(module, kind)[key] = getattr(timm_modules[name], kind)[key]
    left = [n for n, t in (*ours.named_parameters(), *ours.named_buffers()) if t.is_meta]
    assert not left, f"from_timm left {left} unshared"  # every tensor of ours is one of theirs
    ours.train(model.training)
    ours.grad_checkpointing = model.grad_checkpointing
    if isinstance(model, TimmDistilled):
        ours.distilled_training = model.distilled_training
    if getattr(model, "pretrained_cfg", None) is not None:
        ours.pretrained_cfg = ours.default_cfg = dict(model.pretrained_cfg)
    return ours
