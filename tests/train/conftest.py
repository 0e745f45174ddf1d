"""Fixtures of the trainer tests: the bundled digits at 16 px and a tiny teacher checkpoint."""
import pytest
import torch

from deit_fast.train.data import materialize_digits

from .common import SIZE, TEACHER


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("digits"))
    materialize_digits(root, SIZE)
    return root


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory) -> str:
    """A (random) resnet10t teacher for the 10 digit classes, saved as a training checkpoint
    would hold it: weights under 'model'."""
    import timm
    torch.manual_seed(1)
    model = timm.create_model(TEACHER["teacher_model"], num_classes=10, **TEACHER["kwargs"])
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save({"model": model.state_dict()}, path)
    return path
