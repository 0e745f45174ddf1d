"""create_model(checkpoint_path=...): official files (weights under 'model', `module.` prefix),
pos_embed resampling to another resolution, and a clear error on a file that does not fit."""
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import deit_fast


def _save(tmp_path, state_dict, wrap=lambda sd: {"model": sd}, prefix="module."):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap({prefix + k: v for k, v in state_dict.items()}), path)
    return str(path)


@pytest.mark.parametrize("wrap", [lambda sd: {"model": sd, "epoch": 3}, lambda sd: {"state_dict": sd},
                                  lambda sd: sd], ids=["model", "state_dict", "bare"])
def test_official_file_loads(tmp_path, wrap):
    src = timm.create_model("deit_tiny_distilled_patch16_224", depth=2)
    model = deit_fast.create_model("deit_tiny_distilled_patch16_224", depth=2,
                                   checkpoint_path=_save(tmp_path, src.state_dict(), wrap))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name, prefix", [("deit_tiny_distilled_patch16_224", 2),
                                          ("deit_tiny_patch16_224", 1), ("cait_xxs24_224", 0)])
def test_pos_embed_is_resampled_to_384(tmp_path, name, prefix):
    kwargs = dict(depth=1)
    src = timm.create_model(name, **kwargs)
    model = deit_fast.create_model(name, img_size=384, checkpoint_path=_save(tmp_path, src.state_dict()),
                                   **kwargs)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(24, 24), num_prefix_tokens=prefix)
    assert model.pos_embed.shape == (1, 576 + prefix, src.embed_dim)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[:, :prefix].detach(), src.pos_embed[:, :prefix].detach())
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_mismatched_file_lists_the_keys(tmp_path):
    sd = deit_fast.create_model("deit_tiny_patch16_224", num_classes=10, depth=1).state_dict()
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    del sd["norm.weight"]
    path = _save(tmp_path, sd)
    with pytest.raises(ValueError) as info:
        deit_fast.create_model("deit_tiny_patch16_224", depth=1, checkpoint_path=path)
    msg = str(info.value)
    assert "missing keys (1): norm.weight" in msg
    assert "unexpected keys (1): blocks.0.attn.extra" in msg
    assert "head.weight: checkpoint (10, 192) vs model (1000, 192)" in msg


def test_pretrained_without_a_file_says_what_to_do():
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        deit_fast.create_model("deit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "cait_xxs24_224"])
@pytest.mark.parametrize("classes", [10, 0])
def test_timm_entrypoint_takes_a_new_head(tmp_path, name, classes):
    """timm.create_model(pretrained=True, num_classes=...) keeps the file's body and a fresh
    head of the new size (or none), as timm's own models do; it raised on the head's shape."""
    src = timm.create_model(name, depth=1)
    path = _save(tmp_path, src.state_dict())
    model = timm.create_model(deit_fast.models.registry.timm_name(name), pretrained=True, depth=1,
                              num_classes=classes, pretrained_cfg_overlay=dict(file=path))
    own = model.state_dict()
    assert not any(k.startswith(("head.", "head_dist.")) and v.shape == src.state_dict()[k].shape
                   for k, v in own.items())
    for k, v in src.state_dict().items():
        if not k.startswith(("head.", "head_dist.")):
            assert torch.equal(own[k], v), k
    assert model.num_classes == classes
    with pytest.raises(ValueError, match="head.weight"):  # create_model itself stays strict
        deit_fast.create_model(name, depth=1, num_classes=classes, checkpoint_path=path)


def test_official_training_checkpoint_with_args_loads(tmp_path):
    """The official main.py saves 'args' (an argparse.Namespace) beside 'model'; weights_only
    loading allows that one class and still runs no pickled code."""
    import argparse
    src = timm.create_model("deit_tiny_patch16_224", depth=1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict(), "epoch": 299, "args": argparse.Namespace(lr=5e-4)}, path)
    model = deit_fast.create_model("deit_tiny_patch16_224", depth=1, checkpoint_path=str(path))
    assert torch.equal(model.head.weight, src.head.weight)
