"""Tier 2 for csrc/attention.cu (DESIGN.md section 6), no GPU needed: the flash-attention forward
is in the built deit_fast._C for sm_80 and sm_90 without register spills, and its op checks its
inputs and reports output shapes through the Meta kernel (the same checks as the CUDA one)."""
import importlib
import re

import pytest
import torch

# so_path, cuobjdump, resource_usage and ops are tests/aot/conftest.py's: so_path skips when
# deit_fast._C was not built (test_cuda_extension.py decides whether that is a failure);
# resource_usage parses cuobjdump's per-kernel report.
from tests.aot.extension import (ARCHS, archs_per_source, assert_no_spills, cp_async_use, cubin_listing,
                                 flag_values, named, sass_functions)

pytestmark = pytest.mark.aot
F16, BF16 = torch.float16, torch.bfloat16
KERNEL = "20attention_fwd_kernel"  # as mangled (length-prefixed): not class_attention_fwd_kernel
# Its template arguments after the dtype, as mangled: D, WARPS, STAGES, R (16-row blocks a warp)
TEMPLATE = re.compile(r"attention_fwd_kernelI\w+?Li(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")


def meta(shape, dtype=F16):
    return torch.empty(shape, dtype=dtype, device="meta")


def qkv_views(B, H, N, D, dtype=F16):
    """q, k, v as the models pass them: strided views of one (B, N, 3, H, D) projection."""
    return meta((B, N, 3, H, D), dtype).permute(2, 0, 3, 1, 4).unbind(0)


def test_holds_sm80_and_sm90_cubins(so_path, cuobjdump):
    listing = cubin_listing(so_path, cuobjdump)
    assert ARCHS <= archs_per_source(listing)["attention"], listing


def test_no_register_spills(resource_usage):
    for arch in ARCHS:
        kernels = named(resource_usage[arch], KERNEL)
        # fp16 and bf16 at head dims 48 and 64, 2 to 4 stages, by 16 rows a warp in 4 and 8 warps
        # (block_m 64 and 128) and 32 rows a warp in 4 (block_m 128)
        assert len(kernels) == 36, sorted(resource_usage[arch])
        # Launch bounds: 16 warps per SM at 16 rows a warp need <= 128 registers per thread; at
        # 32, 12 warps (<= 168) at D = 48 and 8 (<= 255) at D = 64 (attention.cu, min_blocks)
        args = {k: TEMPLATE.search(k).groups() for k in kernels}  # (D, warps, stages, row blocks)
        one = {k: u for k, u in kernels.items() if args[k][3] == "1"}
        assert len(one) == 24, sorted(kernels)
        assert_no_spills(one, 128, arch)
        assert_no_spills({k: u for k, u in kernels.items() if args[k][::3] == ("48", "2")}, 168, arch)
        assert_no_spills({k: u for k, u in kernels.items() if args[k][::3] == ("64", "2")}, 255, arch)


def test_pipeline_waits_match_the_stages(so_path, cuobjdump):
    """The k/v ring's commit-group accounting as compiled (sm_90 SASS): a kernel of S stages
    commits q, S - 1 prologue tiles and one tile per loop step (S + 1 LDGDEPBAR), waits for q with
    S - 1 groups still pending and for each tile with S - 2 (DEPBAR.LE SB0), and keeps nothing in
    local memory. An off-by-one there computes on a tile still landing: wrong numbers, no error."""
    seen = set()
    for name, body in sass_functions(so_path, cuobjdump):
        m = TEMPLATE.search(name)
        if KERNEL not in name or not m:
            continue
        D, warps, stages, blocks = map(int, m.groups())
        use = cp_async_use(body)
        # A set: a loop that ptxas peels would repeat a wait, which is harmless.
        assert use["waits"] == {stages - 2, stages - 1}, (name, use["waits"])
        assert use["commits"] == stages + 1, name
        assert not use["local"], name
        seen.add((name.split("attention_fwd_kernelI")[1].split("Li")[0], D, warps, stages, blocks))
    assert len(seen) == 36, sorted(seen)  # 2 dtypes x 2 head dims x 3 warp splits x 3 stage counts


def test_schema(ops):
    assert str(ops.attention_forward.default._schema) == (
        "deit_fast_C::attention_forward(Tensor q, Tensor k, Tensor v, float scale, int block_m=64, "
        "int stages=2, int rows_per_warp=16) -> (Tensor, Tensor)")


def test_cpu_tensors_raise_instead_of_crashing(ops):
    q = torch.randn(1, 2, 7, 48, dtype=F16)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.attention_forward(q, q, q, 0.2)


@pytest.mark.parametrize("shape", [(1, 1, 1, 48), (2, 3, 7, 64), (2, 4, 197, 48), (3, 8, 198, 64),
                                   (1, 1, 1024, 48), (1, 2, 1025, 64)], ids=str)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("tiling", [(64, 2), (128, 3), (128, 4, 32)], ids=str)
def test_output_metadata_and_opcheck(ops, shape, dtype, tiling):
    q, k, v = qkv_views(*shape, dtype)
    o, lse = ops.attention_forward(q, k, v, 0.125, *tiling)
    assert o.shape == shape and o.dtype == dtype and o.transpose(1, 2).is_contiguous()  # token-major
    assert lse.shape == shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    torch.library.opcheck(ops.attention_forward.default, (q, k, v, 0.125, *tiling))
    c = meta(shape, dtype)
    torch.library.opcheck(ops.attention_forward.default, (c, c, c, 1.0, *tiling))


@pytest.mark.parametrize("shape", [(0, 2, 7, 48), (2, 0, 7, 64), (2, 3, 0, 48)], ids=str)
def test_empty_shapes(ops, shape):
    q = meta(shape)
    o, lse = ops.attention_forward(q, q, q, 0.5)
    assert o.shape == shape and lse.shape == shape[:3]


@pytest.mark.parametrize("change,match", [
    (dict(q=meta((2, 7, 48))), "q must be"),
    (dict(k=meta((1, 2, 8, 48))), "k must have"),
    (dict(k=meta((1, 3, 7, 48))), "k must have"),
    (dict(v=meta((1, 2, 7, 64))), "v must have"),
    (dict(q=meta((1, 2, 7, 48), torch.float32), k=meta((1, 2, 7, 48), torch.float32),
          v=meta((1, 2, 7, 48), torch.float32)), "q dtype"),
    (dict(k=meta((1, 2, 7, 48), BF16)), "k dtype"),
    (dict(v=meta((1, 2, 7, 48), torch.float32)), "v dtype"),
    (dict(q=meta((1, 2, 7, 32)), k=meta((1, 2, 7, 32)), v=meta((1, 2, 7, 32))), "head dim"),
    (dict(q=meta((1, 2, 7, 128)), k=meta((1, 2, 7, 128)), v=meta((1, 2, 7, 128))), "head dim"),
    (dict(scale=0.0), "scale must"),
    (dict(scale=-1.0), "scale must"),
    (dict(scale=float("nan")), "scale must"),
    (dict(scale=float("inf")), "scale must"),
    (dict(block_m=32), "block_m .* must be 64 or 128, got 32"),
    (dict(block_m=96), "block_m .* must be 64 or 128, got 96"),
    (dict(stages=5), "stages .* must be 2, 3 or 4, got 5"),
    (dict(stages=1), "stages .* must be 2, 3 or 4, got 1"),
    (dict(rows_per_warp=8), "rows_per_warp .* must be 16 or 32, got 8"),
    (dict(rows_per_warp=64), "rows_per_warp .* must be 16 or 32, got 64"),
    (dict(rows_per_warp=32), "rows_per_warp=32 needs block_m=128 .*, got block_m=64"),
    (dict(k=torch.empty(1, 2, 7, 48, dtype=F16)), "k is on cpu"),
])
def test_bad_input_names_the_argument(ops, change, match):
    args = dict(q=meta((1, 2, 7, 48)), k=meta((1, 2, 7, 48)), v=meta((1, 2, 7, 48)), scale=0.2, block_m=64,
                stages=2, rows_per_warp=16)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.attention_forward(*args.values())


def test_the_op_module_routes_only_what_the_kernel_takes():
    """The cuda backend sends the CUDA forward exactly the inputs its checks accept."""
    attention = importlib.import_module("deit_fast.ops.attention")  # the module, not ops.attention
    for dtype in (F16, BF16):
        for D in (48, 64):
            assert attention.uses_cuda_kernel(meta((2, 3, 1024, D), dtype))
        assert not attention.uses_cuda_kernel(meta((2, 3, 1025, 64), dtype))
        for D in (16, 32, 80, 96, 128):
            assert not attention.uses_cuda_kernel(meta((2, 3, 197, D), dtype))
    assert not attention.uses_cuda_kernel(meta((2, 3, 197, 64), torch.float32))


def test_the_op_module_passes_its_tiling(ops, monkeypatch):
    """CUDA_BLOCK_M, CUDA_STAGES and CUDA_ROWS_PER_WARP of deit_fast.ops.attention are what the
    extension op gets (a bad one is refused by the op's own check, before any launch)."""
    attention = importlib.import_module("deit_fast.ops.attention")
    q = meta((1, 2, 7, 48))
    for name, bad in (("CUDA_BLOCK_M", 96), ("CUDA_STAGES", 5), ("CUDA_ROWS_PER_WARP", 48)):
        with monkeypatch.context() as m:
            m.setattr(attention, name, bad)
            with pytest.raises(RuntimeError, match=f"got {bad}"):
                attention._cuda_forward(q, q, q, 0.2)
    monkeypatch.setattr(attention, "CUDA_BLOCK_M", 128)
    monkeypatch.setattr(attention, "CUDA_STAGES", 4)
    monkeypatch.setattr(attention, "CUDA_ROWS_PER_WARP", 32)
    assert [v for _, v in flag_values("rows_per_warp", lambda: attention._cuda_forward(q, q, q, 0.2))] == [32]
    o, lse = attention._cuda_forward(q, q, q, 0.2)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
