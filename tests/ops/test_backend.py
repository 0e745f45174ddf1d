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


def _as_on_a_gpu(monkeypatch, unavailable=None):
    """auto decides for CPU tensors as for CUDA ones: triton can run (the interpreter), cuda not
    unless `unavailable` says otherwise."""
    resolve = _backend.resolve
    monkeypatch.setattr(_backend, "resolve",
                        lambda op, device, width=None: resolve(op, torch.device("cuda"), width))
    monkeypatch.setattr(_backend, "_availability", {("triton", "cuda"): None,
                                                    ("cuda", "cuda"): "no CUDA device"})
    if unavailable is not None:
        monkeypatch.setattr(_backend, "unavailable", unavailable)
    monkeypatch.setattr(_backend, "_warned", set())


def test_auto_takes_the_next_backend_whose_kernels_take_the_inputs(monkeypatch):
    _as_on_a_gpu(monkeypatch, unavailable=lambda op, backend, device_type: None)
    cpu = torch.device("cpu")

    def refuses(*names):
        def check(backend):
            if backend in names:
                raise ValueError(f"{backend} refuses")
        return check
    assert _backend.fit("class_attention", cpu, refuses()) == "cuda"
    assert _backend.fit("class_attention", cpu, refuses("cuda")) == "triton"
    with pytest.warns(UserWarning, match="torch .*cuda: cuda refuses; triton: triton refuses"):
        assert _backend.fit("class_attention", cpu, refuses("cuda", "triton")) == "torch"
    for explicit in ("cuda", "triton"):  # set explicitly: the refusal is the answer
        with ops.use_backend(explicit), pytest.raises(ValueError, match=f"{explicit} refuses"):
            _backend.fit("class_attention", cpu, refuses("cuda", "triton"))


def test_auto_runs_inputs_the_kernels_refuse_on_torch(monkeypatch):
    """A custom width (head dim 24, which no kernel takes) ran under auto on a GPU only until an
    op refused it: ValueError in forward. Now torch runs those ops, with one warning per op and
    reason; explicit backends still refuse."""
    _as_on_a_gpu(monkeypatch)
    import warnings

    import deit_fast
    model = deit_fast.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                   embed_dim=48, num_heads=2, depth=1, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="attention runs on the torch backend .*D=24"):
        out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and reason
        assert torch.equal(model(x), out)
    with ops.use_backend("torch"):
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="head dim D=24"):
        model(x)
    q = torch.randn(1, 2, 5, 32, requires_grad=True)  # D = 32: the kernels take it
    assert "deit_fast" in type(ops.attention(q, q, q).grad_fn).__name__
    with pytest.warns(UserWarning, match="class_attention runs on the torch backend .*float64"):
        ops.class_attention(q[:, :, :1].double(), q.double(), q.double())


def test_auto_fallback_traces_in_one_graph(monkeypatch):
    """The fallback's warning is skipped while torch.compile traces (it broke fullgraph)."""
    _as_on_a_gpu(monkeypatch)
    q = torch.randn(1, 2, 5, 24)
    compiled = torch.compile(lambda t: ops.attention(t, t, t), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
