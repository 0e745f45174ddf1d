"""Which implementation runs each op: "torch" (reference.py), "triton" (kernels/), "cuda" (csrc/).

The choice is global (set_backend / use_backend) and resolved per op and device at call time.
"auto" takes the first kernel backend in the op's preference order that can run on the device,
else torch. An explicit backend that cannot run raises and says why, so a benchmark never
silently measures the wrong thing. backend_report() shows the decision and every reason.
"""
import contextlib
from typing import Dict, Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# Kernel backends per op, in "auto" preference order. Ops missing here run on torch only.
# The order is a default until the GPU benchmark (bench/gpu_check.sh) says otherwise; ORDER_WHY
# says, per op, what the order rests on (backend_report shows it).
KERNELS: Dict[str, tuple] = {
    "attention": ("triton", "cuda"),  # cuda: forward at head dim 48/64, backward on Triton
    "class_attention": ("triton", "cuda"),
    "talking_heads_attention": ("triton",),
    "layerscale_residual": ("triton", "cuda"),
    "layerscale_residual_layernorm": ("triton", "cuda"),
    "layer_norm": ("triton", "cuda"),
    "distillation_loss": ("triton", "cuda"),
}

# No GPU benchmark has compared the triton and cuda kernels yet (bench/results/ holds none): Triton
# goes first everywhere because it is the backend tested on every tier, the interpreter included.
UNMEASURED = "unmeasured: triton before cuda until bench/gpu_check.sh compares them on a GPU"
ORDER_WHY: Dict[str, str] = {op: UNMEASURED for op, kernels in KERNELS.items() if len(kernels) > 1}

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
    return None


def unavailable(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why `backend` cannot run `op` on `device_type`, or None when it can."""
    if backend == "torch":
        return None
    if backend not in KERNELS[op]:
        return f"no {backend} kernel for {op} yet"
    key = (backend, device_type)
    if key not in _availability:  # probed once: imports and device queries are not free
        check = _triton_unavailable if backend == "triton" else _cuda_unavailable
        _availability[key] = check(device_type)
    return _availability[key]


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device` under the current setting."""
    if _current == "torch":
        return "torch"
    if _current == "auto":
        if device.type == "cpu":  # the interpreter is a test vehicle, not a fast path
            return "torch"
        for name in KERNELS[op]:
            if unavailable(op, name, device.type) is None:
                return name
        return "torch"
    why = unavailable(op, _current, device.type)
    if why is not None:
        raise RuntimeError(f"backend {_current!r} cannot run {op} on {device.type}: {why}")
    return _current


def backend_report() -> Dict[str, Dict[str, dict]]:
    """Per op and device type: the backend that runs under the current setting, why each other
    backend cannot run there, and (for "auto" with several kernel backends) what the preference
    order rests on.

    >>> deit_fast.ops.backend_report()["layerscale_residual"]["cuda"]
    {'runs': 'triton', 'unavailable': {}, 'order': ('triton', 'cuda'), 'why': 'unmeasured: ...'}
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
    return report
