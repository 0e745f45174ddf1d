"""The GPU report: merge bench .jsonl files, pytest JUnit XML and step logs into
<results-dir>/<YYYY-MM-DD>-<device-slug>.json and .md (the last step of bench/gpu_check.sh).

    python -m bench.report --steps steps.tsv --junit gpu=pytest-gpu.xml out/layerscale_residual.jsonl out/models*.jsonl
"""
import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from bench import common

LOG_TAIL = 30  # lines of a failed step's log quoted in the report


def junit_summary(path: str) -> dict:
    """Counts and failing test ids from a pytest --junitxml file."""
    if not Path(path).exists():
        return {"error": f"{path} missing (pytest did not finish?)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                         if case.find("failure") is not None or case.find("error") is not None]
    return summary


def read_steps(path: str) -> list:
    """gpu_check.sh's steps.tsv: name, rc (or 'skipped'), seconds, log path; failed logs' tails."""
    steps = []
    for line in Path(path).read_text().splitlines():
        name, rc, seconds, log = (line.split("\t") + [""] * 4)[:4]
        step = {"name": name, "rc": rc, "seconds": int(seconds or 0)}
        if rc not in ("0", "skipped") and log and Path(log).exists():
            step["log_tail"] = Path(log).read_text(errors="replace").splitlines()[-LOG_TAIL:]
        steps.append(step)
    return steps


def merge(paths) -> dict:
    """Bench name -> header (of its first file), rows of all its files, speedups recomputed."""
    benches = {}
    for path in paths:
        if not Path(path).exists():
            continue
        header, rows, footer = common.read_jsonl(path)
        if not header:  # killed before the header was written
            continue
        bench = benches.setdefault(header["bench"], {"header": header, "rows": [], "footer": {"not_run": []}})
        bench["rows"] += rows
        if footer is None or bench["footer"] is None:
            bench["footer"] = None  # one killed run makes the merged section incomplete
        else:
            bench["footer"]["not_run"] += footer["not_run"]
    for bench in benches.values():
        common.add_speedups(bench["rows"])
    return benches


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check {env['date'][:10]}: {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, timm {env['timm']}, "
             f"git {env['git']}", ""]
    if report["steps"]:
        lines += ["| step | exit | s |", "|---|---|---|"]
        lines += [f"| {s['name']} | {'timeout' if s['rc'] in ('124', '137') else s['rc']} | {s['seconds']} |"
                  for s in report["steps"]]
        for s in report["steps"]:
            if "log_tail" in s:
                lines += ["", f"`{s['name']}` log, last lines:", "```", *s["log_tail"], "```"]
        lines.append("")
    for name, summary in report["tests"].items():
        if "error" in summary:
            lines.append(f"- pytest {name}: {summary['error']}")
            continue
        lines.append(f"- pytest {name}: {summary['tests']} tests, {summary['failures']} failures, "
                     f"{summary['errors']} errors, {summary['skipped']} skipped")
        lines += [f"  - failed: {t}" for t in summary["failed"]]
    for bench in report["benches"].values():
        lines += ["", common.markdown(bench["header"], bench["rows"], bench["footer"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("jsonl", nargs="*", help="bench outputs; files of one bench are merged")
    p.add_argument("--steps", help="steps.tsv written by gpu_check.sh")
    p.add_argument("--junit", action="append", default=[], metavar="NAME=XML")
    p.add_argument("--results-dir", default="bench/results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = common.environment(device)
    report = {"environment": env, "steps": read_steps(args.steps) if args.steps else [],
              "tests": {name: junit_summary(xml) for name, xml in (j.split("=", 1) for j in args.junit)},
              "benches": merge(args.jsonl)}
    stem = Path(args.results_dir) / f"{env['date'][:10]}-{common.slug(env['device'])}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    print(f"{stem}.json\n{stem}.md")


if __name__ == "__main__":
    main()
