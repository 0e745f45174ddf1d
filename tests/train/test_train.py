"""Short CPU runs of `deit-fast train` / `deit-fast eval` on the bundled digits: DeiT and CaiT,
every distillation type, the precisions, synthetic data, YAML config, safetensors export."""
import json
import math
import os

import pytest
import torch

from deit_fast.train import evaluate_checkpoint, parse_args, train
from deit_fast.train.checkpoint import load

from .common import KWARGS, SIZE, tiny_args

MODELS = {"deit": "deit_tiny_distilled_patch16_224", "cait": "cait_xxs24_224"}


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
@pytest.mark.parametrize("arch", ["deit", "cait"])
def test_train_then_eval(tmp_path, digits, teacher_path, arch, kind):
    args = tiny_args(tmp_path, digits, MODELS[arch], "--distillation-type", kind,
                     "--teacher-path", teacher_path, "--model-ema", "--model-ema-decay", "0.5")
    record = train(args)
    assert len(record["step_losses"]) == 3 and all(math.isfinite(x) for x in record["step_losses"])
    assert record["val_images"] == 360 and 0 <= record["val_top1"] <= record["val_top5"] <= 100
    if kind == "none":
        assert record["train_loss_distill"] == 0
    else:
        assert record["train_loss_distill"] > 0
    assert record["backends"]["distillation_loss"] == "torch"  # "auto" on CPU tensors
    expected = {"checkpoint.pth", "log.jsonl", "model.safetensors", "model_ema.safetensors"}
    assert expected <= set(os.listdir(tmp_path))
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(logged) == 1 and logged[0]["val_top1"] == record["val_top1"]

    # deit-fast eval rebuilds the model from the args stored in the checkpoint.
    stats = evaluate_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert stats["val_top1"] == pytest.approx(record["val_top1"])
    assert stats["val_images"] == 360
    ema = evaluate_checkpoint(str(tmp_path / "checkpoint.pth"), ema=True)
    assert ema["val_top1"] == pytest.approx(record["val_top1_ema"])

    # The safetensors export holds the final weights of the checkpoint.
    from safetensors.torch import load_file
    exported, ckpt = load_file(str(tmp_path / "model.safetensors")), load(str(tmp_path / "checkpoint.pth"))
    assert exported.keys() == ckpt["model"].keys()
    assert all(torch.equal(exported[k], ckpt["model"][k]) for k in exported)


def test_eval_flag_and_cli(tmp_path, digits, capsys):
    from deit_fast.cli import main
    train(tiny_args(tmp_path, digits))
    ckpt = str(tmp_path / "checkpoint.pth")
    stats = train(tiny_args(tmp_path, digits, "deit_tiny_patch16_224", "--eval", "--resume", ckpt))
    main(["eval", ckpt])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["val_top1"] == pytest.approx(stats["val_top1"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions(tmp_path, digits, teacher_path, precision):
    """bf16 autocast (the default) and fp16 with GradScaler run on CPU too."""
    record = train(tiny_args(tmp_path, digits, "deit_tiny_distilled_patch16_224", "--precision", precision,
                             "--distillation-type", "hard", "--teacher-path", teacher_path,
                             "--steps-per-epoch", "2"))
    assert all(math.isfinite(x) for x in record["step_losses"])
    ckpt = load(str(tmp_path / "checkpoint.pth"))
    assert ckpt["scaler"]["scale"] > 0 if precision == "fp16" else True


def test_synthetic_with_clip_and_random_teacher(tmp_path):
    args = parse_args(["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs",
                       json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}),
                       "--input-size", "32", "--synthetic", "--steps-per-epoch", "2", "--epochs", "2",
                       "--batch-size", "4", "--precision", "fp32", "--distillation-type", "soft",
                       "--kl-reduction", "batchmean", "--teacher-model", "resnet10t", "--teacher-kwargs",
                       json.dumps({"channels": [8, 8, 8, 8], "stem_width": 8}), "--nb-classes", "7",
                       "--clip-grad", "1.0", "--output_dir", str(tmp_path)])
    record = train(args)
    assert record["epoch"] == 1 and record["global_step"] == 4 and "val_top1" not in record


@pytest.mark.parametrize("flag, during", [(None, True), ("--no-cudnn-benchmark", False)])
def test_cudnn_benchmark_set_for_the_run_only(monkeypatch, flag, during):
    """On by default (the official main.py sets it); the process-wide flag is restored after."""
    from deit_fast.train import run
    seen = []
    monkeypatch.setattr(run, "_train", lambda *a: seen.append(torch.backends.cudnn.benchmark) or {})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not during)
    train(parse_args(["--synthetic", "--device", "cpu"] + ([flag] if flag else [])))
    assert seen == [during] and torch.backends.cudnn.benchmark is (not during)


def test_yaml_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: cait_xxs24_224\nlr: 5e-4\nbatch-size: 32\nrepeated_aug: false\n"
                   "model_kwargs: {depth: 2}\ndistillation-type: soft\n")
    args = parse_args(["--config", str(cfg), "--batch-size", "8"])
    assert (args.model, args.lr, args.batch_size, args.repeated_aug) == ("cait_xxs24_224", 5e-4, 8, False)
    assert args.model_kwargs == {"depth": 2} and args.distillation_type == "soft"
    assert args.smoothing == 0.1 and args.model_ema_decay == 0.99996  # DESIGN.md section 5 defaults
    cfg.write_text("lerning_rate: 1\n")
    with pytest.raises(SystemExit, match="unknown keys lerning_rate"):
        parse_args(["--config", str(cfg)])
    # Values of the wrong type are refused by key, not taken ("false" is a truthy string).
    for text, key in (("model-ema: 'false'", "model-ema"), ("epochs: 2.5", "epochs"),
                      ("clip-grad: true", "clip-grad")):
        cfg.write_text(text + "\n")
        with pytest.raises(SystemExit, match=f"{key}="):
            parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("argv,flag", [
    (["--clip-grad", "-1"], "--clip-grad"),  # clip_grad_norm_ would flip the gradient
    (["--model-ema-decay", "1.5"], "--model-ema-decay"),
    (["--smoothing", "1.5"], "--smoothing"),  # with mixup on too (the default)
    (["--eval-crop-ratio", "0"], "--eval-crop-ratio"),
    (["--eval-crop-ratio", "1.2"], "--eval-crop-ratio"),
    (["--distillation-alpha", "2"], "--distillation-alpha"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch"),
    (["--save-every-steps", "-1"], "--save-every-steps"),
    (["--print-freq", "0"], "--print-freq"),
    (["--eval"], "--resume or --finetune"),
])
def test_out_of_range_flags_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert flag in capsys.readouterr().err


def test_val_classes_must_match_train(tmp_path, digits):
    """ImageFolder numbers each split on its own: a class folder missing from val/ would shift
    the labels after it. Refused, naming the folder."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(os.path.join(digits, f"{SIZE}px"), root)
    shutil.rmtree(root / "val" / sorted(os.listdir(root / "val"))[3])
    with pytest.raises(ValueError, match="same class folders; in one only: 3"):
        train(tiny_args(tmp_path, str(root), "deit_tiny_patch16_224", "--data-set", "FOLDER"))


def test_teacher_checkpoint_that_does_not_fit(tmp_path, digits):
    import timm
    bad = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=3).state_dict()}, bad)
    with pytest.raises(ValueError, match=r"does not fit[\s\S]*missing keys|shape mismatches"):
        train(tiny_args(tmp_path / "out", digits, "deit_tiny_distilled_patch16_224",
                        "--distillation-type", "hard", "--teacher-path", str(bad)))
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        train(tiny_args(tmp_path / "out", digits, "deit_tiny_distilled_patch16_224",
                        "--distillation-type", "hard", "--teacher-path", str(bad)))



def test_randaugment_posterize_at_full_magnitude():
    """timm's "inc" policies posterize to 0 bits at magnitude 10, which Pillow >= 12 rejects."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from deit_fast.train.data import build_transform
    t = build_transform(True, parse_args(["--input-size", "16", "--aa", "rand-m10-mstd0-inc1"]))
    rand_augment = next(x for x in t.transforms if isinstance(x, RandAugment))
    op = next(o for o in rand_augment.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert op(Image.new("RGB", (16, 16), (200, 100, 50))).getextrema() == ((0, 0),) * 3


def test_compiled_training_matches_eager(tmp_path, digits):
    """--compile (the student and the eval model under torch.compile; our ops stay opaque custom
    ops in the graph) trains to the same losses as eager. --compile-mode passes through."""
    run = ("deit_tiny_patch16_224", "--steps-per-epoch", "2", "--backend", "triton")
    eager = train(tiny_args(tmp_path / "eager", digits, *run))
    compiled = train(tiny_args(tmp_path / "compiled", digits, *run, "--compile", "--compile-mode",
                               "max-autotune-no-cudagraphs"))
    torch.testing.assert_close(compiled["step_losses"], eager["step_losses"], rtol=1e-4, atol=1e-5)
    assert compiled["val_top1"] == eager["val_top1"]
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, digits, "deit_tiny_patch16_224", "--compile-mode", "fastest")


def test_finetune_from_another_resolution_and_head(tmp_path, capsys):
    """--finetune's loader: a DDP-prefixed file at 32 px with a 1000-class head into a 16 px,
    10-class model: pos_embed resampled to 4x4 patches, both heads dropped and left fresh, every
    other weight taken as is."""
    from deit_fast.models import create_model
    from deit_fast.train.run import load_finetune
    name, kw = "deit_tiny_distilled_patch16_224", KWARGS["deit_tiny_distilled_patch16_224"]
    src = create_model(name, img_size=32, **kw)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = create_model(name, img_size=SIZE, num_classes=10, **kw)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_finetune(model, str(path))
    printed = capsys.readouterr().out
    got, want = model.state_dict(), src.state_dict()
    assert got["pos_embed"].shape == (1, 2 + 16, 32) and want["pos_embed"].shape == (1, 2 + 64, 32)
    torch.testing.assert_close(got["pos_embed"][:, :2], want["pos_embed"][:, :2])  # cls, dist kept
    for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        assert torch.equal(got[k], fresh[k]) and f"dropping {k}" in printed
    assert all(torch.equal(got[k], want[k]) for k in want if k != "pos_embed" and not k.startswith("head"))


def test_eval_of_finetune_weights_matches_the_run(tmp_path, digits):
    """`--eval --finetune <checkpoint>` evaluates the checkpoint's weights: the run's accuracy."""
    record = train(tiny_args(tmp_path / "a", digits))
    stats = train(tiny_args(tmp_path / "b", digits, "deit_tiny_patch16_224", "--eval", "--finetune",
                            str(tmp_path / "a" / "checkpoint.pth")))
    assert stats["val_top1"] == pytest.approx(record["val_top1"])


# ---- the step's arithmetic, checked directly (a short run's finite losses cannot tell) ---------

def test_param_groups_decay_no_norms_biases_or_tokens():
    """timm's rule: weight decay on the matrices only, never on norms, biases, pos_embed,
    cls_token or dist_token (decaying the tokens towards 0 is a silent accuracy loss)."""
    from deit_fast.models import create_model
    from deit_fast.train.run import param_groups
    name = "deit_tiny_distilled_patch16_224"
    model = create_model(name, **KWARGS[name])
    no_decay, decay = param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    tokens = ("pos_embed", "cls_token", "dist_token")
    assert {*tokens, "norm.weight", "norm.bias", "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in tokens}


def test_lr_is_scaled_by_the_total_batch_over_512(tmp_path, digits):
    """The linear scaling rule of the official main.py: lr x batch_size x world / 512, unless
    --unscale-lr; the schedule's base lr is the scaled one."""
    for extra, lr in (((), 4e-3 * 16 / 512), (("--unscale-lr",), 4e-3)):
        out = tmp_path / str(len(extra))
        train(tiny_args(out, digits, "deit_tiny_patch16_224", "--stop-after-steps", "1",
                        "--save-every-steps", "1", "--steps-per-epoch", "2", *extra))
        ckpt = load(str(out / "checkpoint.pth"))
        assert ckpt["args"]["lr_scaled"] == pytest.approx(lr)
        assert ckpt["lr_scheduler"]["base_values"] == pytest.approx([lr, lr])


def test_clipping_sees_the_unscaled_gradients():
    """fp16: the GradScaler's scaled grads are unscaled before --clip-grad measures their norm,
    else the clip shrinks every step to ~1/scale of its size."""
    from types import SimpleNamespace

    from deit_fast.train.engine import optimizer_step
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    s = SimpleNamespace(args=SimpleNamespace(clip_grad=1.0), optimizer=opt,
                        raw_model=SimpleNamespace(parameters=lambda: [w]),
                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    optimizer_step(s, (w * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum())  # grad norm 5, clipped to 1
    torch.testing.assert_close(w.detach(), torch.tensor([-0.6, -0.8, 0.0, 0.0]))


def test_loss_takes_each_head_alpha_and_tau_where_they_belong():
    """compute_loss: the class head against the labels, the distillation head against the
    teacher, (1 - alpha) and alpha, at temperature tau: exactly ops.distillation_loss of them."""
    from types import SimpleNamespace

    from deit_fast import ops
    from deit_fast.train.engine import compute_loss
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(4, 10, generator=g) for _ in range(3))
    x, y = torch.randn(4, 3, 2, 2, generator=g), torch.tensor([1, 2, 3, 4])
    args = SimpleNamespace(distillation_type="soft", precision="fp32", cuda_graph=False,
                           channels_last_teacher=False, smoothing=0.1, distillation_alpha=0.3,
                           distillation_tau=3.0, kl_reduction="batchmean")
    got = compute_loss(lambda _: (cls, dist), lambda _: teacher, x, y, args, torch.device("cpu"))
    want = ops.distillation_loss(cls, dist, y, teacher, "soft", 0.3, 3.0, 0.1, "batchmean",
                                 return_components=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_evaluate_counts_top1_and_top5():
    """evaluate: top-5 counts a target anywhere in the 5 largest logits, top-1 only the largest."""
    from deit_fast.train.engine import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.arange(10.0).expand(len(x), 10)  # ranks: 9, 8, 7, 6, 5, then the rest
    batch = (torch.zeros(4, 1), torch.tensor([9, 5, 4, 7]))  # top-1: one; top-5: three
    stats = evaluate(Fixed(), [batch], torch.device("cpu"), "fp32")
    assert (stats["val_images"], stats["val_top1"], stats["val_top5"]) == (4, 25.0, 75.0)


def test_logged_losses_are_the_mean_over_ranks(monkeypatch):
    """Each rank's window rows are all-reduced (summed) then divided by the world size: the
    logged loss is the mean over ranks, not their sum."""
    from types import SimpleNamespace

    from deit_fast.train import distributed, engine
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t.mul_(2))  # two ranks, equal rows
    s = SimpleNamespace(dist=distributed.Dist(rank=0, world=2), global_step=2, last_checkpoint="",
                        meters={"loss": 0.0, "base": 0.0, "distill": 0.0, "steps": 0},
                        step_losses=[])
    window = [torch.tensor([1.5, 1.0, 2.0]), torch.tensor([0.5, 0.25, 0.75])]
    assert engine._check_and_log(s, window, epoch=0) == 0.5
    assert s.step_losses == [1.5, 0.5]
    assert s.meters == {"loss": 2.0, "base": 1.25, "distill": 2.75, "steps": 2}


def test_per_step_draws_are_the_steps_and_the_ranks():
    """Each step reseeds from (seed, rank, step): a rerun draws the same drop-path masks and mixup,
    and two ranks draw different ones (the official seed + rank), not copies of each other."""
    from types import SimpleNamespace

    from deit_fast.train import distributed, engine

    class Loader(list):
        batch_sampler = SimpleNamespace(set_epoch=lambda *a: None)

    def draws(rank):
        step = lambda x, y: (torch.rand(()),) * 3  # noqa: E731  (what the step's RNG gives)
        args = SimpleNamespace(seed=0, save_every_steps=0, stop_after_steps=0, print_freq=9)
        s = SimpleNamespace(args=args,
                            device=torch.device("cpu"), dist=distributed.Dist(rank=rank, world=1),
                            model=torch.nn.Identity(), mixup=None, graphed=step, global_step=0,
                            scheduler=SimpleNamespace(step_update=lambda num_updates: None),
                            model_ema=None, steps_per_epoch=3,
                            meters=dict(loss=0.0, base=0.0, distill=0.0, steps=0),
                            step_losses=[], last_checkpoint="")
        batches = Loader([(torch.zeros(2, 1), torch.zeros(2))] * 3)
        engine.train_one_epoch(s, batches, 0, 0, lambda k: None)
        return s.step_losses
    first = draws(0)
    assert draws(0) == first and len(set(first)) == 3
    assert not set(draws(1)) & set(first)


def test_lr_warms_up_over_warmup_epochs_of_iterations(tmp_path, digits):
    """The schedule runs per iteration: --warmup-epochs 1 at 2 steps an epoch is 2 warmup steps,
    and the lr set after global step t is the schedule's value at t (halfway after the first)."""
    train(tiny_args(tmp_path, digits, "deit_tiny_patch16_224", "--epochs", "2",
                    "--steps-per-epoch", "2", "--warmup-epochs", "1", "--warmup-lr", "0",
                    "--stop-after-steps", "1", "--save-every-steps", "1"))
    ckpt = load(str(tmp_path / "checkpoint.pth"))
    base = 4e-3 * 16 / 512
    assert ckpt["global_step"] == 1 and ckpt["lr_scheduler"]["warmup_t"] == 2
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([base / 2] * 2)
