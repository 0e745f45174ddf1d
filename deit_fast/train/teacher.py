"""The distillation teacher: any timm model, frozen, in eval mode, channels-last.

DeiT's teacher (RegNetY-16GF) sees exactly the student's input: the augmented, mixed batch. It
never trains, so it runs under no_grad, in eval mode (BatchNorm uses its running statistics),
under the same autocast as the student. Channels-last is the layout cuDNN's fast convolution
kernels want; the official code ran it NCHW in fp16 (DESIGN.md section 5: measure both).
"""
import torch
from torch import nn


def load_teacher_weights(model: nn.Module, path: str) -> None:
    """Strictly load `path` (a state_dict, or one under 'model' / 'state_dict', DDP prefix
    allowed) with weights_only=True; a file that does not fit raises listing the keys."""
    from deit_fast.models.checkpoint import _weights, adapt_state_dict, check_fits, read_file
    sd = adapt_state_dict(model, _weights(read_file(path)))
    check_fits(model, sd, f"teacher checkpoint {path}",
               hint=" (check --teacher-model, --teacher-kwargs and the number of classes)")
    model.load_state_dict(sd, strict=True)


def build_teacher(args, nb_classes: int, device: torch.device) -> nn.Module:
    import timm

    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=nb_classes,
                                **args.teacher_kwargs)
    if args.teacher_path:
        load_teacher_weights(teacher, args.teacher_path)
    elif not args.synthetic:  # a random teacher only makes sense for throughput runs
        raise ValueError("--distillation-type needs --teacher-path (the teacher's trained weights)")
    teacher.to(device).eval().requires_grad_(False)
    if args.channels_last_teacher:
        teacher.to(memory_format=torch.channels_last)
    return teacher


class CompiledTeacher(nn.Module):
    """torch.compile for a frozen inference model, with inductor's `freezing`: the weights become
    constants, so each BatchNorm folds into the convolution before it (RegNetY-16GF has 59) and
    the weights are laid out once, where eager PyTorch reads and writes every activation again
    for each BatchNorm. Freezing is switched on around the calls only (a compile happens at a
    call): process-wide it would also freeze the weights of a compiled eval model that trains on.
    (torch.compile's options={"freezing": True} did not fold them, torch 2.14.)"""

    def __init__(self, teacher: nn.Module, mode: str = "default"):
        super().__init__()
        self.compiled = torch.compile(teacher, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):
            return self.compiled(x)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, samples: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The teacher's logits for the batch the student sees (called inside the step's autocast)."""
    if channels_last:
        samples = samples.contiguous(memory_format=torch.channels_last)
    return teacher(samples)
