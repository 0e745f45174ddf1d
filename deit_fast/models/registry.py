"""Model names (timm's DeiT-1 and CaiT names), create_model, list_models, and timm registration.

Every model is also registered in timm's registry as deit_fast_<name without "deit_">
(deit_tiny_patch16_224 -> deit_fast_tiny_patch16_224, cait_s24_224 -> deit_fast_cait_s24_224),
so timm.create_model and timm's train script can build them once deit_fast is imported.
"""
import fnmatch
import sys
from typing import Dict, List, Optional, Tuple

from timm.models import get_pretrained_cfg, register_model
from torch import nn

from .cait import Cait
from .checkpoint import load_checkpoint
from .deit import VisionTransformer, VisionTransformerDistilled

__all__ = ["create_model", "list_models", "timm_name"]  # register_model appends the entrypoints


def _deit(dim, heads, img=224, distilled=False):
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls, dict(img_size=img, patch_size=16, embed_dim=dim, depth=12, num_heads=heads)


def _cait(dim, depth, heads, init_values, img):
    return Cait, dict(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                      init_values=init_values)


# The architectures of timm's entrypoints of the same names (img_size comes from timm's
# pretrained cfg there, so it is spelled out here).
MODELS: Dict[str, Tuple[type, dict]] = {
    "deit_tiny_patch16_224": _deit(192, 3),
    "deit_small_patch16_224": _deit(384, 6),
    "deit_base_patch16_224": _deit(768, 12),
    "deit_base_patch16_384": _deit(768, 12, img=384),
    "deit_tiny_distilled_patch16_224": _deit(192, 3, distilled=True),
    "deit_small_distilled_patch16_224": _deit(384, 6, distilled=True),
    "deit_base_distilled_patch16_224": _deit(768, 12, distilled=True),
    "deit_base_distilled_patch16_384": _deit(768, 12, img=384, distilled=True),
    "cait_xxs24_224": _cait(192, 24, 4, 1e-5, 224),
    "cait_xxs24_384": _cait(192, 24, 4, 1e-5, 384),
    "cait_xxs36_224": _cait(192, 36, 4, 1e-5, 224),
    "cait_xxs36_384": _cait(192, 36, 4, 1e-5, 384),
    "cait_xs24_384": _cait(288, 24, 6, 1e-5, 384),
    "cait_s24_224": _cait(384, 24, 8, 1e-5, 224),
    "cait_s24_384": _cait(384, 24, 8, 1e-5, 384),
    "cait_s36_384": _cait(384, 36, 8, 1e-6, 384),
    "cait_m36_384": _cait(768, 36, 16, 1e-6, 384),
    "cait_m48_448": _cait(768, 48, 16, 1e-6, 448),
}


def timm_name(name: str) -> str:
    """The name a model has in timm's registry: deit_tiny_patch16_224 -> deit_fast_tiny_patch16_224."""
    return "deit_fast_" + (name[len("deit_"):] if name.startswith("deit_") else name)


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Model names, sorted, optionally filtered by an fnmatch pattern ("cait_*", "*distilled*")."""
    return sorted(n for n in MODELS if pattern is None or fnmatch.fnmatch(n, pattern))


def _pretrained_cfg(name: str) -> dict:
    """timm's data config of the model (input size, mean/std, crop_pct, interpolation), so
    timm.data.resolve_model_data_config works on our models too."""
    cfg = get_pretrained_cfg(name)
    return dict(cfg.to_dict() if cfg is not None else {}, architecture=name)


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
                 new_head: bool = False, **kwargs) -> nn.Module:
    """Build a model by timm name; kwargs override its constructor arguments (num_classes,
    drop_path_rate, img_size, ...). Weights come from checkpoint_path (official DeiT/CaiT,
    timm or deit_fast files): there is no download. The file must fit the model exactly, unless
    new_head: then a classifier of another size (or num_classes=0) is left fresh, as timm does
    (what timm.create_model("deit_fast_...", pretrained=True, num_classes=...) gets)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; deit_fast.list_models() gives the known ones")
    if pretrained and checkpoint_path is None:
        raise RuntimeError(f"pretrained=True: deit_fast does not download weights. Download the "
                           f"checkpoint of {name} yourself and pass checkpoint_path=<file> "
                           f"(official DeiT/CaiT .pth files and timm state_dicts both load).")
    cls, defaults = MODELS[name]
    model = cls(**{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(name)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, new_head=new_head)
    return model


def _timm_entrypoint(name: str):
    """An entrypoint for timm.create_model, named deit_fast_... and living in this module."""

    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                   **kwargs):
        # timm's way of pointing at local weights: pretrained_cfg(_overlay)={'file': path}.
        cfg = dict(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else
                   pretrained_cfg if isinstance(pretrained_cfg, dict) else {})
        cfg.update(pretrained_cfg_overlay or {})
        path = cfg.get("file") if pretrained else None
        model = create_model(name, pretrained=pretrained, checkpoint_path=path, new_head=True, **kwargs)
        model.pretrained_cfg.update({k: v for k, v in cfg.items() if v is not None},
                                    architecture=timm_name(name))
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(name)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"deit_fast's {name} (timm: {name})."
    return entrypoint


for _name in MODELS:
    _fn = _timm_entrypoint(_name)
    setattr(sys.modules[__name__], _fn.__name__, _fn)  # importable: deit_fast.models.registry.<name>
    register_model(_fn)
del _name, _fn
