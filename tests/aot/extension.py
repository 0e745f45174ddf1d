"""What the tier-2 tests of the CUDA extension (tests/aot/test_cuda_*.py) share, no GPU needed:
whether deit_fast._C was built and where it is, the cuobjdump that reads its cubins, and what
cuobjdump reports about them (the archs per source, registers and spills per kernel).

Plain functions; tests/aot/conftest.py wraps the ones the tests take as fixtures."""
import importlib.util
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ARCHS = {"sm_80", "sm_90"}


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def why_not_built():
    """Why deit_fast._C was not built (as deit_fast/_build_info.py records it), or None."""
    try:
        from deit_fast._build_info import CUDA_EXTENSION_WHY
    except ImportError:
        return "deit_fast/_build_info.py is missing: install with `pip install --no-build-isolation -e .`"
    return CUDA_EXTENSION_WHY


def so_path() -> Path:
    """The built deit_fast._C; skips the test when it was not built."""
    why = why_not_built()
    if why is not None:  # test_cuda_extension.py::test_extension_is_built decides whether that fails
        pytest.skip(f"deit_fast._C was not built: {why}")
    spec = importlib.util.find_spec("deit_fast._C")
    assert spec is not None and spec.origin, "_build_info says built, but deit_fast._C is not found"
    path = Path(spec.origin)
    assert path.is_file() and path.name.startswith("_C") and path.suffix == ".so", path
    return path


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the one shipped inside triton; skips when there is none."""
    candidates = [os.path.join(cuda_home(), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("no cuobjdump (CUDA toolkit or triton) to inspect the cubins with")


def run(*cmd) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def cubin_listing(so: Path, objdump: str) -> str:
    """cuobjdump's list of the cubins in `so`: lines like "ELF file 1: layerscale.sm_80.cubin"."""
    return run(objdump, "--list-elf", str(so))


def archs_per_source(listing: str) -> dict:
    """{source stem ("layerscale"): {"sm_80", ...}} from cubin_listing's text."""
    per_source = defaultdict(set)
    for stem, arch in re.findall(r"ELF file\s+\d+:\s+(\S+?)\.(sm_\w+)\.cubin", listing):
        per_source[stem].add(arch)
    return per_source


def parse_resource_usage(text: str) -> dict:
    """{arch: {kernel (mangled): {"REG": n, "STACK": n, "LOCAL": n, ...}}} from the text of
    `cuobjdump --dump-resource-usage`, with any 'N bytes spill stores/loads' it reports added as
    SPILL."""
    usage, arch, kernel = defaultdict(dict), None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+?):?\s*$", line):
            kernel = m.group(1)
            usage[arch][kernel] = {"SPILL": 0}
        elif kernel is not None and "REG:" in line:
            usage[arch][kernel].update({k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)})
        elif kernel is not None and (spills := re.findall(r"(\d+) bytes spill (?:stores|loads)", line)):
            usage[arch][kernel]["SPILL"] += sum(map(int, spills))
    return usage


def resource_usage(so: Path, objdump: str) -> dict:
    """parse_resource_usage of the cubins in `so`."""
    return parse_resource_usage(run(objdump, "--dump-resource-usage", str(so)))


def named(kernels: dict, *names: str) -> dict:
    """The kernels (of one arch of resource_usage) whose mangled name contains any of `names`."""
    return {k: u for k, u in kernels.items() if any(name in k for name in names)}


def assert_no_spills(kernels: dict, max_regs: int, where: str) -> None:
    """None of `kernels` spills: spilled registers live in local memory (LOCAL) and stack frames
    (STACK); and each uses at most `max_regs` registers a thread."""
    spilled = {k: u for k, u in kernels.items() if u["SPILL"] or u["LOCAL"] or u["STACK"]}
    assert not spilled, f"{where}: {len(spilled)} kernels spill or use local memory: {spilled}"
    over = {k: u["REG"] for k, u in kernels.items() if u["REG"] > max_regs}
    assert not over, f"{where}: kernels over {max_regs} registers: {over}"


def flag_values(argument: str, call) -> list:
    """(op, value of `argument`) for each deit_fast_C op with that argument that call() runs (on
    meta tensors, through the Meta kernels): the value as passed, positional or keyword, else the
    schema's default. How a test sees that an op module passes its switch to the extension."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            names = [a.name for a in func._schema.arguments]
            if str(func).startswith("deit_fast_C.") and argument in names:
                at = names.index(argument)
                default = func._schema.arguments[at].default_value
                self.seen.append((str(func), args[at] if len(args) > at else kwargs.get(argument, default)))
            return func(*args, **kwargs)

    with Calls() as calls:
        call()
    return calls.seen


def sass_functions(so: Path, objdump: str, arch: str = "sm_90") -> list:
    """(mangled name, SASS) of every kernel in `so`'s cubins for `arch`."""
    sass = run(objdump, "-sass", "-arch", arch, str(so))
    return [(body.split(None, 1)[0], body) for body in re.split(r"\n\s*Function : ", sass)[1:]]


def cp_async_use(sass: str) -> dict:
    """What one kernel's SASS does with cp.async: its copies (LDGSTS), commit groups (LDGDEPBAR),
    the pending-group counts it waits down to (DEPBAR.LE SB0), and whether it uses local memory."""
    return {"copies": len(re.findall(r"\bLDGSTS\b", sass)),
            "commits": len(re.findall(r"\bLDGDEPBAR\b", sass)),
            "waits": {int(x, 16) for x in re.findall(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", sass)},
            "local": bool(re.search(r"\b(LDL|STL)\b", sass))}


def prefetch_kernels(so: Path, objdump: str, pattern: str, waits: set) -> list:
    """(match, SASS) of each sm_90 kernel whose name matches `pattern` with its prefetch flag
    (named group pf) set, after checking every match: without pf a kernel copies nothing by
    cp.async; with it, it is a vector-path kernel (named group vec), copies in two commit groups'
    code (a prologue's and the loop's), waits down to exactly `waits` pending groups and keeps
    nothing in local memory."""
    found = []
    for name, body in sass_functions(so, objdump):
        m = re.search(pattern, name)
        if not m:
            continue
        use = cp_async_use(body)
        if m.group("pf") == "0":
            assert use["copies"] == 0, name
            continue
        assert m.group("vec") == "1", f"{name}: prefetch is built for the vector path only"
        assert use["copies"] > 0 and use["commits"] == 2 and not use["local"], (name, use)
        assert use["waits"] == waits, (name, use)
        found.append((m, body))
    return found
