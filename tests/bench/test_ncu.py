"""bench/ncu.py without a GPU: its cases build through the op benches' setups, ncu's raw CSV is
read into per-case kernel tables, and the driver runs ncu as METHOD.md asks (a stand-in ncu)."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import common, ncu

ROOT = Path(__file__).resolve().parents[2]
HEADER = ['ID', 'Process ID', 'Process Name', 'Host Name', 'Kernel Name', 'Context', 'Stream', 'Block Size',
          'Grid Size', 'Device', 'CC', 'gpu__time_duration.sum', 'sm__throughput.avg.pct_of_peak_sustained_elapsed',
          'launch__registers_per_thread',
          'smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_wait_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_selected_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio']
UNITS = ['', '', '', '', '', '', '', '', '', '', '', 'nsecond', '%', 'register/thread', 'ratio', 'ratio', 'ratio', 'ratio']


def kernel_row(i, name, grid, ns, sm, regs, long_sb, wait, selected, barrier):
    return [str(i), '4242', 'python3', 'host', name, '1', '7', '(256, 1, 1)', grid, '0', '9.0',
            ns, sm, regs, long_sb, wait, selected, barrier]


def raw_csv(rows) -> str:
    quote = lambda cells: ",".join(f'"{c}"' for c in cells)  # noqa: E731  (ncu quotes every cell)
    return "\n".join(["==PROF== Connected to process 4242 (python3)", "==PROF== Profiling \"x\": 0%....100%",
                      quote(HEADER), quote(UNITS), *map(quote, rows)]) + "\n"


SAMPLE = raw_csv([
    kernel_row(0, "_ncu_case_marker", "(1, 1, 1)", "2,048", "0.5", "16", "1", "2", "1", "0"),
    kernel_row(1, "_th_fwd_tc", "(3136, 1, 1)", "1,234,567", "41.5", "254", "3.5", "0.25", "9", "7.5"),
    kernel_row(2, "_ncu_case_marker", "(2, 1, 1)", "2,048", "0.5", "16", "1", "2", "1", "0"),
    kernel_row(3, "void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", "(10, 1, 1)",
               "1,500", "n/a", "16", "0.5", "0.1", "1", "0"),
    kernel_row(4, "_th_bwd_dq_tc", "(3136, 1, 1)", "2,000,000", "38", "255", "1", "6.25", "1", "2"),
])


def test_raw_csv_is_read_per_case_with_units_and_stalls():
    kernels = ncu.parse_raw(SAMPLE)
    assert [k["id"] for k in kernels] == [0, 1, 2, 3, 4]
    assert kernels[1]["metrics"]["gpu__time_duration.sum"] == (1234567.0, "nsecond")
    assert kernels[3]["metrics"]["sm__throughput.avg.pct_of_peak_sustained_elapsed"] == (None, "%")
    cases = ncu.by_case(kernels, ["th_fwd", "th_bwd"])
    assert [(name, [k["id"] for k in ks]) for name, ks in cases] == [("th_fwd", [1]), ("th_bwd", [3, 4])]
    # cycles per issued instruction, largest first; `selected` (issuing) is not a stall
    assert ncu.stalls(kernels[1]) == "barrier 7.5, long_scoreboard 3.5, wait 0.25"
    report = ncu.markdown(cases, "NVIDIA H100", "ncu ...")
    th_fwd = next(line for line in report.splitlines() if line.startswith("| _th_fwd_tc"))
    cells = [c.strip() for c in th_fwd.strip("|").split("|")]
    assert cells[:5] == ["_th_fwd_tc", "(3136, 1, 1)", "(256, 1, 1)", "1235", "41.5"]  # ns -> us
    assert cells[[c for c, _, _ in ncu.COLUMNS].index("regs") + 3] == "254"
    assert "## th_bwd" in report and "vectorized_elementwise_kernel" in report


def test_no_csv_header_means_no_kernels():
    assert ncu.parse_raw("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n") == []


@pytest.mark.parametrize("name", sorted(ncu.CASES))
def test_every_case_names_what_its_bench_has(name):
    module, _, dtype, impl, direction, _ = ncu.CASES[name]
    bench = importlib.import_module(f"bench.ops.{module}")
    assert impl in bench.IMPLS and direction in common.DIRECTIONS
    assert dtype in bench.DTYPES
    assert set(ncu.PROFILES) and all(set(cases) <= set(ncu.CASES) for cases in ncu.PROFILES.values())


def test_cases_run_through_the_bench_setups_on_cpu():
    """The same path as on the GPU (setup, warm-up, one call in the window), at tiny shapes in
    the interpreter: the Triton and torch cases (the cuda and cuDNN ones need a GPU)."""
    windows = []

    class Window:
        def __enter__(self):
            windows.append("open")

        def __exit__(self, *exc):
            windows.append("closed")

    overrides = {"th_fwd": ((1, 2, 9, 16), "fp16"), "th_bwd": ((1, 2, 9, 16), "fp16"),
                 "th_bwd_chunked": ((1, 2, 9, 16), "fp16"), "attn_fwd_triton": ((1, 2, 9, 48), "fp32"),
                 "loss_triton": ((3, 10), "fp32")}
    assert ncu.run_cases(list(overrides), "cpu", overrides, Window) == list(overrides)
    assert windows == ["open", "closed"] * 5


FAKE_NCU = """\
#!{python}
# A stand-in for ncu: checks the options bench.ncu must give, writes a canned raw page.
import sys
args = sys.argv[1:]
for option, value in (("--profile-from-start", "off"), ("--clock-control", "none"), ("--page", "raw")):
    assert args[args.index(option) + 1] == value, (option, args)
assert "--csv" in args and args[args.index("-m") + 1] == "bench.ncu" and "--target" in args, args
assert args[args.index("--target") + 1] == "th_fwd,th_bwd,th_fwd_chunked,th_bwd_chunked", args
open(args[args.index("--log-file") + 1], "w").write(open({sample!r}).read())
"""


def test_driver_runs_ncu_and_writes_the_report(tmp_path):
    (tmp_path / "sample.csv").write_text(SAMPLE)
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.format(python=sys.executable, sample=str(tmp_path / "sample.csv")))
    fake.chmod(0o755)
    code = ("import torch; torch.cuda.get_device_name = lambda *a: 'stand-in GPU'; "
            "from bench import ncu; ncu.main()")
    proc = subprocess.run([sys.executable, "-c", code, "--profiles", "talking_heads", "--ncu", str(fake),
                           "--out", str(tmp_path / "prof")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "prof.md").read_text()
    assert report.startswith("# Nsight Compute, stand-in GPU") and "## th_fwd" in report
    assert (tmp_path / "prof.csv").read_text() == SAMPLE


def test_driver_without_ncu_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.ncu", "--ncu", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PATH": str(tmp_path), "NCU": "", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "ncu (Nsight Compute) not found: --ncu" in proc.stderr


def test_a_failing_ncu_run_reports_its_tail(tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        print("==ERROR== ERR_NVGPUCTRPERM - no access to the GPU performance counters")
        sys.exit(1)
        """))
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "bench.ncu", "--ncu", str(fake), "--out", str(tmp_path / "p")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "ERR_NVGPUCTRPERM" in proc.stderr and "ncu exited 1" in proc.stderr


def test_a_run_past_its_timeout_reports_what_was_profiled(tmp_path):
    (tmp_path / "sample.csv").write_text(SAMPLE)
    fake = tmp_path / "ncu"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        args = sys.argv[1:]
        open(args[args.index("--log-file") + 1], "w").write(open({str(tmp_path / "sample.csv")!r}).read())
        time.sleep(60)
        """))
    fake.chmod(0o755)
    code = ("import torch; torch.cuda.get_device_name = lambda *a: 'stand-in GPU'; "
            "from bench import ncu; ncu.main()")
    proc = subprocess.run([sys.executable, "-c", code, "--profiles", "talking_heads", "--ncu", str(fake),
                           "--timeout", "3", "--out", str(tmp_path / "p")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "ncu stopped after 3 s with 5 kernels profiled" in proc.stderr
    assert "## th_bwd" in (tmp_path / "p.md").read_text()


def test_ncu_is_found_as_given_or_in_order(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "ncu", tmp_path / "b" / "ncu"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(second.parent))
    monkeypatch.setenv("NCU", str(first))
    assert ncu.find_ncu() == str(first)  # $NCU before the PATH
    monkeypatch.setenv("NCU", "")
    assert ncu.find_ncu() == str(second)
    assert ncu.find_ncu(str(second)) == str(second)
    assert ncu.find_ncu(str(tmp_path / "missing")) is None  # a given one that is not there: no fallback
