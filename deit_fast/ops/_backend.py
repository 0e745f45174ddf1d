"""Which implementation runs each op: "torch" (reference.py), "triton" (kernels/), "cuda" (csrc/).

The choice is global (set_backend / use_backend) and resolved per op and device at call time.
"auto" takes the first kernel backend in the op's preference order that can run on the device,
else torch. An explicit backend that cannot run raises and says why, so a benchmark never
silently measures the wrong thing. backend_report() shows the decision and every reason.
Inputs a kernel backend refuses (a head dim, dtype or width its kernels do not take: fit()) raise
under an explicit backend too; under "auto" they run on the next backend that takes them, else
torch, with a warning once per op and reason, so a model of any width runs by default.
"""
import contextlib
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# Kernel backends per op, in "auto" preference order. Ops missing here run on torch only.
# The order comes from the GPU benchmark (bench/gpu_check.sh); ORDER_WHY says, per op, what it
# rests on (backend_report shows it).
KERNELS: Dict[str, tuple] = {
    "attention": ("cuda", "triton"),  # cuda: forward at head dim 48/64, backward on Triton
    "class_attention": ("cuda", "triton"),
    "talking_heads_attention": ("triton",),
    "layerscale_residual": ("cuda", "triton"),
    "layerscale_residual_layernorm": ("cuda", "triton"),
    "layer_norm": ("triton", "cuda"),
    "distillation_loss": ("cuda", "triton"),
}

# Ops whose auto order changes with the row width C: from that C on, this order instead.
WIDE_ORDER: Dict[str, Tuple[int, tuple]] = {
    "layerscale_residual_layernorm": (768, ("triton", "cuda")),
}

_RESULTS = "bench/results/2026-11-27-nvidia-h200.md (H200, bf16, B=256, CUDA-graph replays)"
ORDER_WHY: Dict[str, str] = {
    "attention": f"{_RESULTS}: the CUDA forward (128 x 4 tiling) beat Triton's by 7-8 % at head dim "
                 "64 and N = 197 (105.7 vs 115.2 us at 256x6x197x64), tied at 48 and lost at N = "
                 "577 (305 vs 282 us at 64x12x577x64); its host launch is cheaper; the backward "
                 "is Triton's either way",
    "class_attention": f"{_RESULTS}: cuda fwd+bwd faster at five of six shapes (146.6 vs 157.6 us "
                       "at 256x16x197x48; 70.4 vs 68.2 us at 64x8x577x48)",
    "layerscale_residual": f"{_RESULTS}: cuda fwd+bwd faster at all four widths (67.3 vs 81.6 us "
                           "at 256x197x192)",
    "layerscale_residual_layernorm": f"{_RESULTS}: cuda fwd+bwd faster at C = 192 (142.6 vs "
                                     "162.7 us), tied at 384, slower at 768 (467 vs 388 us: its "
                                     "backward 313 vs 240), so triton first from C = 768 on "
                                     "(WIDE_ORDER; wider rows not measured)",
    "layer_norm": "unmeasured: triton before cuda until bench/gpu_check.sh compares them on a GPU",
    "distillation_loss": f"{_RESULTS}: GPU time favours triton (fwd+bwd 13.5 vs 17.6 us at "
                         "256x1000, 96 vs 121 us at 256x21841), host time cuda (126 vs 278 us a "
                         "call at 256x1000): a few us of a step's GPU time against 150 us of host "
                         "time, which a host-bound step (DeiT-Ti) pays",
}

_current = "auto"
_availability: Dict[tuple, Optional[str]] = {}  # (backend, device type) -> why not, or None


def set_backend(name: str) -> None:
    """Select the backend of every op: "auto", "torch", "triton" or "cuda"."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("triton"): ...` runs the block on that backend, then restores."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_unavailable(device_type: str) -> Optional[str]:
    try:
        from deit_fast import kernels
    except ImportError as e:  # triton missing or broken
        return f"triton does not import: {e}"
    if kernels.INTERPRETED:
        return None  # the interpreter runs CPU and CUDA tensors alike
    if device_type == "cpu":
        return "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type != "cuda":
        return f"triton does not run on {device_type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the kernels need sm_80 or newer, this GPU is sm_{major}{minor}"
    return None


def _cuda_unavailable(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"the CUDA extension runs CUDA tensors only, not {device_type}"
    try:
        from deit_fast import _C  # noqa: F401  (loading it registers torch.ops.deit_fast_C)
    except ImportError as e:
        try:
            from deit_fast._build_info import CUDA_EXTENSION_WHY as why
        except ImportError:
            why = "deit_fast was not installed with setup.py"
        return f"deit_fast._C is not available: {why or e}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from deit_fast._build_info import CUDA_ARCHS
    major, minor = torch.cuda.get_device_capability()
    if not arch_supported(CUDA_ARCHS, major, minor):
        return (f"deit_fast._C holds code for TORCH_CUDA_ARCH_LIST {CUDA_ARCHS!r}, not for this "
                f"GPU (sm_{major}{minor}): reinstall with its arch in the list")
    return None


def arch_supported(archs: str, major: int, minor: int) -> bool:
    """Whether a build for `archs` (TORCH_CUDA_ARCH_LIST: "8.0;9.0", "9.0a", "8.6+PTX") runs on
    a GPU of compute capability major.minor: machine code runs on its own major at an equal or
    higher minor; PTX is compiled by the driver for any GPU from its arch on."""
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        name = arch.strip()
        if not name:
            continue
        m, n = (int(x) for x in name.split("+")[0].rstrip("af").split("."))
        if (m == major and n <= minor) or ("+PTX" in name and (m, n) <= (major, minor)):
            return True
    return False


def unavailable(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why `backend` cannot run `op` on `device_type`, or None when it can."""
    if backend == "torch":
        return None
    if backend not in KERNELS[op]:
        return f"no {backend} kernel for {op} yet"
    for name in (backend, "triton") if (op, backend) == ("attention", "cuda") else (backend,):
        # (attention on cuda: its backward, and the forwards it has no CUDA kernel for, are Triton's)
        key = (name, device_type)
        if key not in _availability:  # probed once (the current GPU): imports and queries are not free
            check = _triton_unavailable if name == "triton" else _cuda_unavailable
            _availability[key] = check(device_type)
        if _availability[key] is not None:
            return _availability[key]
    return None


def order(op: str, width: Optional[int] = None) -> tuple:
    """auto's preference order of kernel backends for `op` at row width `width` (WIDE_ORDER)."""
    wide = WIDE_ORDER.get(op)
    return wide[1] if wide and width is not None and width >= wide[0] else KERNELS[op]


def resolve(op: str, device: torch.device, width: Optional[int] = None) -> str:
    """The backend that runs `op` on `device` under the current setting; width: the rows' C,
    for the ops whose auto order depends on it."""
    if _current == "torch":
        return "torch"
    if _current == "auto":
        if device.type == "cpu":  # the interpreter is a test vehicle, not a fast path
            return "torch"
        for name in order(op, width):
            if unavailable(op, name, device.type) is None:
                return name
        return "torch"
    why = unavailable(op, _current, device.type)
    if why is not None:
        raise RuntimeError(f"backend {_current!r} cannot run {op} on {device.type}: {why}")
    return _current


_warned: Set[tuple] = set()


def fit(op: str, device: torch.device, check: Callable[[str], None],
        width: Optional[int] = None) -> str:
    """resolve(op, device, width), once check(backend) has passed: check raises ValueError for
    inputs the backend's kernels refuse. An explicit backend raises it; "auto" takes the next
    kernel backend of its order whose check passes, else torch (and warns once)."""
    backend = resolve(op, device, width)
    if backend == "torch":
        return backend
    if _current != "auto":
        check(backend)
        return backend
    refusals = []
    for name in order(op, width):
        if unavailable(op, name, device.type) is None:
            try:
                check(name)
                return name
            except ValueError as e:
                refusals.append(f"{name}: {e}")
    why = "; ".join(refusals)
    # not while torch.compile traces (a warning breaks a fullgraph trace): eager calls say it
    if not torch.compiler.is_compiling() and (op, why) not in _warned:
        _warned.add((op, why))
        warnings.warn(f"{op} runs on the torch backend for these inputs ({why})", stacklevel=3)
    return "torch"


def backend_report() -> Dict[str, Dict[str, dict]]:
    """Per op and device type: the backend that runs under the current setting (for inputs its
    kernels take: see fit), why each other
    backend cannot run there, and (for "auto" with several kernel backends) what the preference
    order rests on.

    >>> deit_fast.ops.backend_report()["layerscale_residual"]["cuda"]
    {'runs': 'cuda', 'unavailable': {}, 'order': ('cuda', 'triton'), 'why': 'bench/results/...'}
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for op in KERNELS:
        report[op] = {}
        for dev in devices:
            try:
                runs = resolve(op, torch.device(dev))
            except RuntimeError as e:
                runs = f"error: {e}"
            why = {b: unavailable(op, b, dev) for b in ("triton", "cuda")}
            report[op][dev] = {"runs": runs, "unavailable": {b: w for b, w in why.items() if w}}
            if _current == "auto" and dev != "cpu" and op in ORDER_WHY:
                report[op][dev].update(order=KERNELS[op], why=ORDER_WHY[op])
                if op in WIDE_ORDER:
                    width, wide = WIDE_ORDER[op]
                    report[op][dev]["order_from_width"] = {width: wide}
    return report
