"""Training checkpoints: written atomically, read with weights_only=True, never clobbered blindly.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (the args too), so
torch.load(path, weights_only=True) reads it without trusting pickled code:
    model, model_ema, optimizer, scaler, lr_scheduler: state_dicts (None where not used)
    epoch, step_in_epoch, global_step: where training stands (step_in_epoch == steps of the
        epoch once the epoch is finished and evaluated)
    meters: the running sums of the current epoch (so its logged mean survives a resume)
    max_accuracy, rng (torch, cuda, numpy, python), args
"""
import os
import random
from typing import Optional

import numpy as np
import torch

FORMAT = "deit_fast.train/1"
REQUIRED = ("model", "optimizer", "lr_scheduler", "epoch", "step_in_epoch", "global_step",
            "meters", "args")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that must not be overwritten."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor.
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary file beside `path`, fsync it, os.replace, then fsync the
    directory (the rename itself survives a power loss): a reader or a crash sees the old file
    or the new one, never half of one, and no temporary file is left behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(obj: dict, path: str) -> None:
    """torch.save, atomically (_atomic_write)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str) -> dict:
    """Read a training checkpoint, or raise CheckpointError saying what is wrong with the file
    (which is left as it is)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled code ... all mean unusable
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"It was left untouched: move it away, or resume from another file.") from e
    missing = [k for k in REQUIRED if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise CheckpointError(f"{path} is not a deit_fast training checkpoint: missing "
                              f"{', '.join(missing)} (plain weights go to --finetune)")
    return ckpt


def guard_output(path: str, resume: str, overwrite: bool) -> None:
    """Refuse to start a run that would replace `path` (output_dir/checkpoint.pth) unless it is
    the checkpoint being resumed or --overwrite says so; an unreadable file is named as such."""
    if not os.path.exists(path) or overwrite:
        return
    if resume and os.path.exists(resume) and os.path.samefile(path, resume):
        return
    try:
        load(path)
        what = "a checkpoint of an earlier run"
    except CheckpointError as e:
        what = f"an unreadable checkpoint ({e})"
    raise CheckpointError(f"{path} already holds {what}; this run would overwrite it. Pass "
                          f"--resume {path} to continue it, --overwrite to replace it, or another "
                          f"--output_dir.")


def export_safetensors(state_dict: dict, path: str, metadata: Optional[dict] = None) -> None:
    """The final weights as safetensors (no pickle at all), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in
                                                                      (metadata or {}).items()}))
