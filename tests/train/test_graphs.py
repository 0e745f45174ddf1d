"""--cuda-graph: what it refuses, and that the replayed step trains exactly as the eager one.

On a CPU the capture is swapped for one whose replay runs the step itself, eagerly: that checks
everything around the graph (the batch copied into the input buffers, the scheduler's lr written
into the tensors AdamW reads, the warm-up, one capture for the whole run). The `gpu` test
captures a real CUDA graph."""
import pytest
import torch

from deit_fast.train import graphs, parse_args, train
from deit_fast.train.checkpoint import load

from .common import tiny_args

RUN = ("deit_tiny_distilled_patch16_224", "--distillation-type", "soft", "--mixup", "0.8",
       "--clip-grad", "1.0", "--model-ema", "--model-ema-decay", "0.5", "--steps-per-epoch", "4",
       "--epochs", "2", "--warmup-epochs", "1")


def test_refusals_name_the_flag(tmp_path, digits):
    with pytest.raises(ValueError, match="--cuda-graph: needs a CUDA device, not cpu"):
        train(tiny_args(tmp_path, digits, "deit_tiny_patch16_224", "--cuda-graph"))
    assert not (tmp_path / "checkpoint.pth").exists()
    args = parse_args(["--cuda-graph", "--precision", "fp16", "--compile"])
    with pytest.raises(ValueError) as e:
        graphs.check(args, torch.device("cuda"), world=2)
    message = str(e.value)
    assert message.startswith("--cuda-graph: ")
    assert all(s in message for s in ("GradScaler", "--compile-mode reduce-overhead", "not 2"))
    graphs.check(parse_args(["--cuda-graph"]), torch.device("cuda"), world=1)  # nothing to refuse


def test_replayed_step_trains_as_the_eager_one(tmp_path, digits, teacher_path, monkeypatch):
    run = (*RUN, "--teacher-path", teacher_path)
    eager = train(tiny_args(tmp_path / "eager", digits, *run))

    captures = []

    def replay_eagerly(fn):
        captures.append(fn)
        return fn  # each replay runs the step on the buffers, as the graph would
    monkeypatch.setattr(graphs, "check", lambda *a: None)
    monkeypatch.setattr(graphs, "capture_cuda_graph", replay_eagerly)
    graphed = train(tiny_args(tmp_path / "graphed", digits, *run, "--cuda-graph"))

    assert len(captures) == 1  # once, after WARMUP_STEPS of the 8 steps, for both epochs
    # Not bitwise: AdamW computes its step size from a float32 lr tensor in fp32, not from the
    # Python float in double (an ulp in a few weights). An lr left at the captured step's
    # value, or a batch not copied into the buffers, is off by orders of magnitude more.
    torch.testing.assert_close(graphed["step_losses"], eager["step_losses"], rtol=1e-6, atol=0)
    a, b = load(str(tmp_path / "eager" / "checkpoint.pth")), load(str(tmp_path / "graphed" / "checkpoint.pth"))
    for key in ("model", "model_ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}.{name}: {m}")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # floats, not tensors


def test_a_batch_of_other_shapes_is_refused():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)

    def step(x, y):
        loss = (w * x).sum() + y.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return (loss,)
    graphed = graphs.GraphedStep(step, opt, warmup=1, capture=lambda fn: fn)
    for _ in range(3):
        graphed(torch.ones(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"--cuda-graph: a batch of \(1, 3\)"):
        graphed(torch.ones(1, 3), torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_graphed_training_matches_eager(tmp_path, digits, teacher_path, backend):
    """A real CUDA graph: bf16, hard distillation from a teacher, mixup, clipping, EMA, the lr
    moving every step, two epochs (one capture). Drop path off: the losses then match the eager
    run's but for rounding (the same kernels, launched by a replay; AdamW's lr as a float32
    tensor: an ulp in some weights, which bf16 casts of the weights may carry into the loss)."""
    run = ("deit_tiny_distilled_patch16_224", "--device", "cuda", "--precision", "bf16",
           "--backend", backend, "--distillation-type", "hard", "--teacher-path", teacher_path,
           "--mixup", "0.8", "--clip-grad", "1.0", "--model-ema", "--steps-per-epoch", "5",
           "--epochs", "2", "--warmup-epochs", "1", "--drop-path", "0")
    eager = train(tiny_args(tmp_path / "eager", digits, *run))
    graphed = train(tiny_args(tmp_path / "graphed", digits, *run, "--cuda-graph"))
    torch.testing.assert_close(graphed["step_losses"], eager["step_losses"], rtol=2e-4, atol=1e-5)
    a, b = load(str(tmp_path / "eager" / "checkpoint.pth")), load(str(tmp_path / "graphed" / "checkpoint.pth"))
    for k in a["model"]:  # an update is ~1e-4 a step: a stale lr would be off by more
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=2e-6, msg=k)
    assert graphed["val_top1"] == pytest.approx(eager["val_top1"], abs=0.6)  # 2 of 360 digits
