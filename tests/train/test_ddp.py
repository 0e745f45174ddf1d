"""DDP on CPU (gloo), 2 processes started as torchrun would (RANK, WORLD_SIZE, MASTER_* in the
environment): the gradients equal one process's on the combined batch, and a whole training run
reduces its metrics across ranks."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from deit_fast.train import distributed, parse_args, run, train
from deit_fast.train.engine import compute_loss
from deit_fast.train.teacher import build_teacher

from .common import tiny_argv

MODEL = "deit_tiny_distilled_patch16_224"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))


def _grads(argv, batch, rank: int = 0, world: int = 1) -> dict:
    """Gradients of the distillation loss on this rank's share of `batch` (DDP when world > 1)."""
    args = parse_args(argv)
    dist, device = distributed.init("cpu")
    torch.manual_seed(0)
    model = run.build_model(args, 10)
    model.set_distilled_training(True)
    teacher = build_teacher(args, 10, device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    x, y = batch
    share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss, _, _ = compute_loss(wrapped.train(), teacher, x[share], y[share], args, device)
    loss.backward()  # DDP all-reduces (averages) the gradients here
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _grad_worker(rank, world, port, argv, batch, out):
    _as_rank(rank, world, port)
    grads = _grads(argv, batch, rank, world)
    torch.save(grads, f"{out}.{rank}")
    distributed.shutdown()


def test_ddp_gradients_equal_one_process_on_the_combined_batch(tmp_path, digits, teacher_path):
    argv = tiny_argv(tmp_path, digits, MODEL, "--distillation-type", "soft", "--teacher-path", teacher_path,
                     "--drop-path", "0")  # drop path draws differ per rank by design
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.softmax(torch.randn(8, 10, generator=g), -1)  # mixup-style soft targets
    mp.spawn(_grad_worker, args=(2, _free_port(), argv, (x, y), str(tmp_path / "grads")), nprocs=2)
    single = _grads(argv, (x, y))
    for rank in range(2):
        ddp = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert ddp.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=name)


def _train_worker(rank, world, port, argv, out):
    _as_rank(rank, world, port)
    record = train(parse_args(argv))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)


def test_ddp_training_run_reduces_metrics(tmp_path, digits, teacher_path):
    argv = tiny_argv(tmp_path / "out", digits, MODEL, "--distillation-type", "hard",
                     "--teacher-path", teacher_path, "--epochs", "2", "--steps-per-epoch", "2")
    mp.spawn(_train_worker, args=(2, _free_port(), argv, str(tmp_path / "record")), nprocs=2)
    r0, r1 = (json.load(open(tmp_path / f"record.{rank}")) for rank in range(2))
    assert r0["world_size"] == 2 and r0["global_step"] == 4
    # Every metric is the all-reduced one: the same on both ranks, over the whole val set.
    for key in ("step_losses", "train_loss", "val_loss", "val_top1", "val_top5", "val_images"):
        assert r0[key] == r1[key], key
    assert r0["val_images"] == 360
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint.pth", "log.jsonl", "model.safetensors"]


def test_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    """--device cuda:N would put every rank on GPU N (NCCL: duplicate GPU)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:1 under torchrun"):
        distributed.init("cuda:1")
