"""Backend selection: explicit choices, the context manager, auto's decision and the report."""
import pytest
import torch

from deit_fast import ops
from deit_fast.ops import _backend


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("cudnn")


def test_use_backend_restores_on_error():
    ops.set_backend("torch")
    with pytest.raises(KeyError), ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        raise KeyError
    assert ops.get_backend() == "torch"


def test_auto_runs_torch_on_cpu_and_interpreter_only_when_asked():
    assert _backend.resolve("layerscale_residual", torch.device("cpu")) == "torch"
    with ops.use_backend("triton"):  # the suite runs with TRITON_INTERPRET=1 on CPU
        assert _backend.resolve("layerscale_residual", torch.device("cpu")) == "triton"


def test_forcing_a_backend_that_cannot_run_says_why(monkeypatch):
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run layerscale_residual on cpu"):
        ops.layerscale_residual(torch.randn(2, 4), torch.randn(2, 4), None)
    monkeypatch.setitem(_backend.KERNELS, "attention", ())  # as for an op with no kernel yet
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="no triton kernel for attention"):
        ops.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)))


def test_report_covers_every_op_and_gives_reasons():
    report = ops.backend_report()
    assert set(report) == set(_backend.KERNELS)
    cpu = report["layerscale_residual"]["cpu"]
    assert cpu["runs"] == "torch"
    assert "cuda" in cpu["unavailable"] and "triton" not in cpu["unavailable"]
    assert report["layerscale_residual"]["cpu"]["unavailable"]["cuda"].startswith("the CUDA extension")


def test_report_says_what_the_auto_order_rests_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # report a CUDA device too
    monkeypatch.setitem(_backend._availability, ("cuda", "cuda"), "no CUDA device")
    monkeypatch.setitem(_backend._availability, ("triton", "cuda"), None)
    cuda = ops.backend_report()["class_attention"]["cuda"]
    # cuda first (measured faster), but it cannot run here: auto falls through to triton.
    assert cuda["runs"] == "triton" and cuda["order"] == ("cuda", "triton")
    assert "bench/results/" in cuda["why"] and "no CUDA device" in cuda["unavailable"]["cuda"]
    assert ops.backend_report()["layer_norm"]["cuda"]["why"].startswith("unmeasured")
    assert "why" not in ops.backend_report()["talking_heads_attention"]["cuda"]  # one kernel backend


def test_auto_order_can_change_with_the_row_width(monkeypatch):
    """WIDE_ORDER: the residual+LayerNorm runs triton from DeiT-B's width on, cuda below."""
    for backend in ("cuda", "triton"):
        monkeypatch.setitem(_backend._availability, (backend, "cuda"), None)
    op, gpu = "layerscale_residual_layernorm", torch.device("cuda")
    assert _backend.resolve(op, gpu, width=384) == "cuda" and _backend.resolve(op, gpu) == "cuda"
    assert _backend.resolve(op, gpu, width=768) == "triton" and _backend.resolve(op, gpu, width=1024) == "triton"
    assert _backend.resolve("layerscale_residual", gpu, width=768) == "cuda"  # no width rule
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ops.backend_report()[op]["cuda"]["order_from_width"] == {768: ("triton", "cuda")}


def test_the_residual_layernorm_asks_with_its_width(monkeypatch):
    asked = []
    monkeypatch.setattr(_backend, "resolve", lambda op, device, width=None: asked.append((op, width)) or "torch")
    ops.layerscale_residual_layernorm(torch.randn(2, 3, 12), torch.randn(2, 3, 12), None,
                                      torch.ones(12), torch.zeros(12))
    assert asked == [("layerscale_residual_layernorm", 12)]


@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0", (9, 0), True), ("8.0;9.0", (8, 6), True), ("8.0;9.0", (8, 9), True),
    ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False), ("8.0;9.0", (7, 5), False),
    ("9.0a", (9, 0), True), ("8.0+PTX", (10, 0), True), ("9.0+PTX", (8, 6), False),
])
def test_cuda_extension_runs_only_on_the_archs_it_was_built_for(archs, capability, runs):
    assert _backend.arch_supported(archs, *capability) is runs


def test_auto_skips_the_extension_on_a_gpu_it_has_no_code_for(monkeypatch):
    """A Blackwell GPU (sm_100) and an sm_80/sm_90 build: every op would fail with 'no kernel
    image'; auto takes Triton instead and the report says why."""
    pytest.importorskip("deit_fast._C")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    monkeypatch.setattr("deit_fast._build_info.CUDA_ARCHS", "8.0;9.0")
    monkeypatch.setattr(_backend, "_availability", {("triton", "cuda"): None})
    assert "sm_100" in _backend.unavailable("class_attention", "cuda", "cuda")
    assert _backend.resolve("class_attention", torch.device("cuda")) == "triton"


def test_cuda_attention_needs_triton_too(monkeypatch):
    """The CUDA backend's attention runs Triton's backward: without Triton it is unavailable."""
    monkeypatch.setattr(_backend, "_availability", {("cuda", "cuda"): None,
                                                    ("triton", "cuda"): "triton does not import"})
    assert _backend.unavailable("attention", "cuda", "cuda") == "triton does not import"
    assert _backend.unavailable("class_attention", "cuda", "cuda") is None
