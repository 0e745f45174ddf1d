"""The teacher is frozen, in eval mode and channels-last, and sees exactly the mixed batch the
student sees (the official semantics)."""
import torch

from deit_fast.train import run, train

from .common import tiny_args


def test_teacher_eval_channels_last_and_same_mixed_batch(tmp_path, digits, teacher_path, monkeypatch):
    seen = {"mixed": [], "student": [], "teacher": []}
    build_teacher, build_model, build_mixup = run.build_teacher, run.build_model, run.build_mixup

    def teacher_hook(module, inputs, output):
        x = inputs[0]
        seen["teacher"].append(x.detach().clone())
        assert not module.training and not output.requires_grad
        assert x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] == 3
        assert all(not p.requires_grad for p in module.parameters())
        assert module.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)

    def spy_teacher(*a, **k):
        teacher = build_teacher(*a, **k)
        teacher.register_forward_hook(teacher_hook)
        return teacher

    def spy_model(*a, **k):
        model = build_model(*a, **k)
        model.register_forward_pre_hook(
            lambda m, inputs: seen["student"].append(inputs[0].detach().clone()) if m.training else None)
        return model

    def spy_mixup(*a, **k):
        mixup = build_mixup(*a, **k)

        def mix(x, y):
            clean = x.clone()
            x, y = mixup(x, y)
            assert not torch.equal(x, clean) and y.is_floating_point()  # really mixed, soft targets
            seen["mixed"].append(x.detach().clone())
            return x, y
        return mix

    monkeypatch.setattr(run, "build_teacher", spy_teacher)
    monkeypatch.setattr(run, "build_model", spy_model)
    monkeypatch.setattr(run, "build_mixup", spy_mixup)
    train(tiny_args(tmp_path, digits, "deit_tiny_distilled_patch16_224", "--distillation-type", "hard",
                    "--teacher-path", teacher_path, "--mixup-switch-prob", "0"))  # mixup, not cutmix

    assert len(seen["teacher"]) == len(seen["student"]) == len(seen["mixed"]) == 3
    for mixed, student, teacher in zip(seen["mixed"], seen["student"], seen["teacher"]):
        assert torch.equal(mixed, student) and torch.equal(student, teacher)


def test_teacher_runs_nchw_when_asked(tmp_path, digits, teacher_path, monkeypatch):
    build_teacher = run.build_teacher
    layouts = []

    def spy_teacher(*a, **k):
        teacher = build_teacher(*a, **k)
        teacher.register_forward_pre_hook(lambda m, inputs: layouts.append(inputs[0].is_contiguous()))
        return teacher

    monkeypatch.setattr(run, "build_teacher", spy_teacher)
    train(tiny_args(tmp_path, digits, "deit_tiny_distilled_patch16_224", "--distillation-type", "soft",
                    "--teacher-path", teacher_path, "--no-channels-last-teacher"))
    assert layouts == [True] * 3


def test_compiled_teacher_folds_its_batchnorms_and_trains_alike(tmp_path, digits, teacher_path,
                                                                monkeypatch):
    """--compile-teacher: the teacher alone under torch.compile with inductor's freezing (the
    student stays eager). Its BatchNorms fold into the convolutions: no batch-norm op is left in
    the generated code. Training gives the eager teacher's losses but for rounding."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from deit_fast.train.teacher import CompiledTeacher
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    conv[1].running_var.uniform_(0.5, 2.0)
    conv.eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, code = run_and_get_code(CompiledTeacher(conv), x)
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert "batch_norm" not in "".join(code) and not inductor_config.freezing  # patched per call

    compiled = []
    monkeypatch.setattr(run, "CompiledTeacher",
                        lambda *a: compiled.append(a) or CompiledTeacher(*a))
    argv = ("deit_tiny_distilled_patch16_224", "--distillation-type", "soft", "--teacher-path",
            teacher_path)
    eager = train(tiny_args(tmp_path / "eager", digits, *argv))
    frozen = train(tiny_args(tmp_path / "frozen", digits, *argv, "--compile-teacher"))
    assert len(compiled) == 1
    torch.testing.assert_close(frozen["step_losses"], eager["step_losses"], rtol=1e-4, atol=1e-5)
