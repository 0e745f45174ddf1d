"""deit_fast.create_model / list_models, and the deit_fast_* names in timm's registry."""
import importlib

import pytest
import timm
import torch

import deit_fast
from deit_fast.models import Cait, VisionTransformer, VisionTransformerDistilled, timm_name


def test_list_models_patterns():
    assert len(deit_fast.list_models()) == 18
    assert deit_fast.list_models("cait_*") == sorted(timm.list_models("cait_*"))
    assert deit_fast.list_models("*distilled*") == [
        "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384",
        "deit_small_distilled_patch16_224", "deit_tiny_distilled_patch16_224"]


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="list_models"):
        deit_fast.create_model("vit_base_patch16_224")


def test_timm_names():
    assert timm_name("deit_tiny_patch16_224") == "deit_fast_tiny_patch16_224"
    assert timm_name("cait_xxs24_224") == "deit_fast_cait_xxs24_224"
    assert sorted(timm.list_models("deit_fast_*")) == sorted(map(timm_name, deit_fast.list_models()))


@pytest.mark.parametrize("name, cls", [("deit_fast_tiny_patch16_224", VisionTransformer),
                                       ("deit_fast_tiny_distilled_patch16_224", VisionTransformerDistilled),
                                       ("deit_fast_cait_xxs24_224", Cait)])
def test_timm_create_model_builds_ours(name, cls):
    model = timm.create_model(name, num_classes=7, img_size=32, patch_size=8, depth=1)
    assert type(model) is cls and model.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    fn = timm.models.model_entrypoint(name)
    assert fn.__name__ == name and getattr(importlib.import_module(fn.__module__), name) is fn
    assert model.pretrained_cfg["architecture"] == name


def test_timm_pretrained_cfg():
    model = timm.create_model("deit_fast_cait_xxs24_384", depth=1)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 384, 384)
    assert model.pretrained_cfg["interpolation"] == "bicubic"


def test_timm_pretrained_from_a_local_file(tmp_path):
    src = deit_fast.create_model("deit_tiny_patch16_224", depth=1)
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    model = timm.create_model("deit_fast_tiny_patch16_224", pretrained=True, depth=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.pos_embed, src.pos_embed)
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        timm.create_model("deit_fast_tiny_patch16_224", pretrained=True, depth=1)
