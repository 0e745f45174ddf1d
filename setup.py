"""Builds deit_fast: the pure Python package (kernels/ ships as deit_fast.kernels) and, where
CUDA is there, the extension deit_fast._C from csrc/*.cu + csrc/*.cpp.

    pip install --no-build-isolation -e .    (the extension builds against the installed torch)

DEIT_FAST_BUILD_CUDA   0: skip the extension; 1: any failure to build it is fatal; unset: build it
                       when torch has CUDA and nvcc is under CUDA_HOME, else (or if the build
                       fails) install without it, printing one line that says why.
CUDA_HOME              default /usr/local/cuda
TORCH_CUDA_ARCH_LIST   default "8.0;9.0" (A100, H100)
MAX_JOBS               parallel compile jobs (ninja)

The outcome is written to deit_fast/_build_info.py (gitignored): CUDA_EXTENSION_WHY is None when
the extension was built, else the reason; deit_fast.ops.backend_report() shows it. Run pip with
-v to see the compiler output, including ptxas's register and spill report for every kernel.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(ROOT, "deit_fast")
MODE = os.environ.get("DEIT_FAST_BUILD_CUDA", "")
if MODE not in ("", "0", "1"):
    sys.exit(f"error: DEIT_FAST_BUILD_CUDA must be 0, 1 or unset, got {MODE!r}")
# torch.utils.cpp_extension reads both when it is imported. Without CUDA_HOME it would guess from
# `which nvcc`, and a wrapper script in /usr/local/bin makes that /usr/local (no CUDA headers).
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"]


def say(line: str) -> None:
    print(f"deit_fast: {line}", file=sys.stderr, flush=True)


def write_build_info(why, *package_dirs) -> None:
    text = (
        '"""Written by setup.py: how deit_fast._C was built (or why it was not)."""\n'
        f"CUDA_EXTENSION_WHY = {why!r}  # None: built\n"
        f"CUDA_ARCHS = {ARCHS!r}\n"
    )
    for d in package_dirs:
        if os.path.isdir(d):
            with open(os.path.join(d, "_build_info.py"), "w") as f:
                f.write(text)


def why_not_cuda():
    """None when the extension can be attempted, else the one-line reason."""
    if MODE == "0":
        return "DEIT_FAST_BUILD_CUDA=0"
    try:
        import torch
    except ImportError as e:
        return f"torch does not import at build time ({e}); install with --no-build-isolation"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a build without CUDA"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"nvcc not found at {nvcc} (set CUDA_HOME)"
    return None


WHY = why_not_cuda()
ext_modules, cmdclass = [], {}
if WHY is None:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class BuildCudaExtension(BuildExtension):
        """BuildExtension that, unless DEIT_FAST_BUILD_CUDA=1, survives a failed build (the
        package then runs on the Triton and torch backends), and records the outcome."""

        def run(self):
            why = None
            try:
                super().run()
            except Exception as e:  # compiler or linker error, missing toolchain piece ...
                if MODE == "1":
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:200]
                why = (f"building it failed ({type(e).__name__}: {first}); "
                       "reinstall with pip -v for the compiler output")
                say(f"not building the CUDA extension deit_fast._C: {why}")
                self.extensions = []  # nothing for install / editable_wheel to pick up
            # In place (editable) the package is the source tree; otherwise build_lib, which
            # build_py has filled already. The source tree is left alone then: its deit_fast/
            # has no _C.
            inplace = self.inplace or getattr(self, "editable_mode", False)
            write_build_info(why, PACKAGE if inplace else os.path.join(self.build_lib, "deit_fast"))

    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    ext_modules = [CUDAExtension(
        name="deit_fast._C",
        sources=sources,
        depends=sorted(glob.glob("csrc/*.cuh")) + sorted(glob.glob("csrc/*.h")),
        extra_compile_args={
            "cxx": ["-O3", "-g0"],
            # -Xptxas -v: registers, shared memory and spills of every kernel in the build log;
            # -lineinfo: source lines in compute-sanitizer / Nsight reports, no runtime cost.
            # No --use_fast_math: the kernels are memory-bound and the tests compare to fp64.
            "nvcc": ["-O3", "-Xptxas", "-v", "-lineinfo"],
        },
    )]
    cmdclass["build_ext"] = BuildCudaExtension.with_options(use_ninja=True)
else:
    if MODE == "1":
        sys.exit(f"error: DEIT_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {WHY}")
    say(f"not building the CUDA extension deit_fast._C: {WHY}")
    write_build_info(WHY, PACKAGE)  # before build_py copies the package (no build_ext runs)

with open(os.path.join(PACKAGE, "__init__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="deit_fast",
    version=VERSION,
    description="DeiT and CaiT on fused Triton and CUDA C++ kernels, timm-compatible",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # deit_fast/kernels is a symlink to ../kernels: find_packages follows it, and build_py
    # copies the files, so kernels/ ships as deit_fast.kernels. bench/ and tests/ stay out.
    packages=find_packages(include=["deit_fast", "deit_fast.*"]),
    # torch unpinned: the extension builds against whatever torch is installed, and a pin could
    # make pip swap the CUDA wheel for a CPU one (DESIGN.md section 6).
    install_requires=["torch", "timm>=1.0.15,<1.1", "numpy"],
    entry_points={"console_scripts": ["deit-fast = deit_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
