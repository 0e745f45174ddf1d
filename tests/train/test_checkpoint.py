"""Checkpoints: an interrupted and resumed run equals the uninterrupted one, a killed run leaves
a loadable checkpoint, a corrupt file is reported and never overwritten silently, a non-finite
loss stops the run before anything corrupted is saved."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deit_fast.train import CheckpointError, NonFiniteLossError, train
from deit_fast.train.checkpoint import load

from .common import state_dicts_equal, tiny_args, tiny_argv

# All the randomness of the recipe on: RandAugment, random erasing, mixup/cutmix, repeated
# augmentation, drop path; an EMA; two epochs of 4 steps.
RANDOM = ["--epochs", "2", "--steps-per-epoch", "4", "--drop-path", "0.2", "--model-ema",
          "--model-ema-decay", "0.9", "--save-every-steps", "1", "--warmup-epochs", "1"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, digits, teacher_path):
    extra = RANDOM + ["--distillation-type", "soft", "--teacher-path", teacher_path]
    model = "deit_tiny_distilled_patch16_224"
    full = train(tiny_args(tmp_path / "full", digits, model, *extra))
    # Stopped after step 6 (epoch 1, step 2 of 4), resumed with a different number of loader
    # workers: the batches do not depend on who loads them.
    first = train(tiny_args(tmp_path / "cut", digits, model, *extra, "--stop-after-steps", "6"))
    assert first["stopped"] and len(first["step_losses"]) == 6
    ckpt = str(tmp_path / "cut" / "checkpoint.pth")
    assert (load(ckpt)["epoch"], load(ckpt)["step_in_epoch"]) == (1, 2)
    rest = train(tiny_args(tmp_path / "cut", digits, model, *extra, "--resume", ckpt, "--num_workers", "1"))

    assert first["step_losses"] + rest["step_losses"] == full["step_losses"]  # bitwise equal
    assert rest["train_loss"] == full["train_loss"] and rest["val_top1"] == full["val_top1"]
    a, b = load(str(tmp_path / "full" / "checkpoint.pth")), load(ckpt)
    for key in ("model", "model_ema"):
        assert state_dicts_equal(a[key], b[key]), key
    assert a["global_step"] == b["global_step"] == 8


def test_killed_mid_epoch_leaves_a_loadable_checkpoint(tmp_path, digits):
    out = tmp_path / "run"
    argv = tiny_argv(out, digits, "deit_tiny_patch16_224", "--epochs", "1000", "--save-every-steps", "1",
                     "--steps-per-epoch", "5")
    proc = subprocess.Popen([sys.executable, "-m", "deit_fast.train", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pth"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and load(str(ckpt))["global_step"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # no cleanup, wherever it was (maybe mid-write)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load(str(ckpt))  # weights_only=True, and whole
    step = state["global_step"]
    assert step >= 3
    resumed = train(tiny_args(out, digits, "deit_tiny_patch16_224", "--epochs", "1000", "--steps-per-epoch",
                              "5", "--resume", str(ckpt), "--stop-after-steps", str(step + 2)))
    assert resumed["global_step"] == step + 2 and len(resumed["step_losses"]) == 2


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, digits):
    out = tmp_path / "run"
    train(tiny_args(out, digits))
    ckpt = out / "checkpoint.pth"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a truncated write, as a full disk leaves it
    broken = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="unreadable"):
        train(tiny_args(out, digits, "deit_tiny_patch16_224", "--resume", str(ckpt)))
    with pytest.raises(CheckpointError, match="already holds an unreadable checkpoint"):
        train(tiny_args(out, digits))  # a fresh run into the same directory
    assert ckpt.read_bytes() == broken
    # A readable one is not replaced by a fresh run either, unless asked to.
    train(tiny_args(out, digits, "deit_tiny_patch16_224", "--overwrite"))
    good = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint of an earlier run"):
        train(tiny_args(out, digits))
    assert ckpt.read_bytes() == good
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: checkpoint .* is unreadable"):
        from deit_fast.cli import main
        main(["eval", str(ckpt)])


def test_non_finite_loss_stops_without_saving_it(tmp_path, digits):
    out = tmp_path / "run"
    args = tiny_args(out, digits, "deit_tiny_patch16_224", "--lr", "1e30", "--unscale-lr",
                     "--save-every-steps", "1", "--print-freq", "1", "--steps-per-epoch", "6")
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf|-inf) at epoch 0, global step \d"
                                                 r"[\s\S]*the last checkpoint is .*checkpoint.pth"):
        train(args)
    state = load(str(out / "checkpoint.pth"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["global_step"] >= 1
    assert not os.path.exists(out / "model.safetensors")


def test_resume_with_other_settings_is_refused(tmp_path, digits):
    """A resume continues the checkpoint's run: another batch size (its lr schedule is counted in
    the old steps) or seed is refused by name, not trained on silently."""
    out = tmp_path / "run"
    train(tiny_args(out, digits, "deit_tiny_patch16_224", "--stop-after-steps", "2", "--save-every-steps", "1"))
    ckpt = str(out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"total_batch: checkpoint 16, now 8"):
        train(tiny_args(out, digits, "deit_tiny_patch16_224", "--resume", ckpt, "--batch-size", "8"))
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0, now 1.*distillation_type"):
        train(tiny_args(out, digits, "deit_tiny_patch16_224", "--resume", ckpt, "--seed", "1",
                        "--distillation-type", "hard", "--teacher-path", "unused.pth"))


def test_resume_adds_an_ema_of_the_resumed_weights(tmp_path, digits):
    """--model-ema on a resume from a run without one: the EMA starts from the resumed weights,
    not from the initial ones the model was built with (decay 1: it stays there)."""
    out = tmp_path / "run"
    train(tiny_args(out, digits, "deit_tiny_patch16_224", "--stop-after-steps", "2", "--save-every-steps", "1"))
    ckpt = str(out / "checkpoint.pth")
    before = load(ckpt)
    assert before["model_ema"] is None
    train(tiny_args(out, digits, "deit_tiny_patch16_224", "--resume", ckpt, "--model-ema",
                    "--model-ema-decay", "1.0"))  # runs the epoch's last step, then saves
    assert state_dicts_equal(load(ckpt)["model_ema"], before["model"])


def test_resume_restores_the_grad_scaler(tmp_path, digits):
    """fp16: the GradScaler's scale comes back from the checkpoint (a fresh 65536 after a run that
    had backed off would overflow again). A scale the run could not reach on its own (growth takes
    2000 steps) shows that it is the checkpoint's."""
    out = tmp_path / "run"
    argv = ("deit_tiny_patch16_224", "--precision", "fp16", "--steps-per-epoch", "2")
    train(tiny_args(out, digits, *argv, "--stop-after-steps", "1", "--save-every-steps", "1"))
    ckpt = str(out / "checkpoint.pth")
    state = load(ckpt)
    state["scaler"]["scale"] = 8.0
    torch.save(state, ckpt)
    train(tiny_args(out, digits, *argv, "--resume", ckpt))
    assert load(ckpt)["scaler"]["scale"] == 8.0


def test_resume_from_an_epoch_end_checkpoint_starts_the_next_epoch(tmp_path, digits):
    """Stopped after an epoch's checkpoint: the resume trains the next epoch from its first step,
    as the uninterrupted run did, and logs each epoch once (not the finished one again, empty)."""
    run = ("deit_tiny_patch16_224", "--epochs", "2", "--steps-per-epoch", "2")
    full = train(tiny_args(tmp_path / "full", digits, *run))
    first = train(tiny_args(tmp_path / "cut", digits, *run, "--stop-after-steps", "3"))
    ckpt = str(tmp_path / "cut" / "checkpoint.pth")
    assert first["stopped"] and (load(ckpt)["epoch"], load(ckpt)["step_in_epoch"]) == (0, 2)
    rest = train(tiny_args(tmp_path / "cut", digits, *run, "--resume", ckpt))
    assert rest["step_losses"] == full["step_losses"][2:]
    logged = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [r["epoch"] for r in logged] == [0, 1]
