"""bench/plot.py: the SVG bar charts say what the rows say (lengths, order, colours, metric)."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import plot

SVG = "{" + plot.NS + "}"
ROOT = Path(__file__).resolve().parents[2]
HEADER = {"bench": "attention", "device": "NVIDIA H100", "date": "2026-11-26T15:23:32+00:00", "git": "abc1234"}


def row(impl, us, direction="fwd", shape="2x3x197x48", baseline=False, **extra):
    return {"op": "attention", "shape": shape, "dtype": "bf16", "direction": direction, "impl": impl,
            "baseline": baseline, **({"us": us} if us is not None else {}), **extra}


def bars(doc: str):
    """(impl, width, fill) of every bar, top to bottom."""
    rects = ET.fromstring(doc).iter(SVG + "rect")
    return [(r.get("data-impl"), float(r.get("width")), r.get("fill")) for r in rects if r.get("data-impl")]


def texts(doc: str):
    return [t.text for t in ET.fromstring(doc).iter(SVG + "text")]


def test_lengths_order_and_colours_follow_the_rows():
    rows = [row("ours", 80.0), row("cudnn", 100.0, baseline=True), row("flash", 200.0, baseline=True),
            row("ours", 300.0, "bwd"), row("cudnn", 240.0, "bwd", baseline=True)]
    doc = plot.svg(HEADER, rows)
    got = bars(doc)
    assert [impl for impl, _, _ in got] == ["ours", "cudnn", "flash", "cudnn", "ours"]  # fastest first
    widths = {(impl, i < 3): w for i, (impl, w, _) in enumerate(got)}
    # one scale per panel: the slowest bar (bwd ours, 300 us) spans the whole bar area
    assert widths[("ours", False)] == plot.BAR_W
    assert abs(widths[("ours", True)] / widths[("flash", True)] - 80 / 200) < 1e-4
    assert abs(widths[("cudnn", False)] / widths[("ours", False)] - 240 / 300) < 1e-4
    fills = [fill for _, _, fill in got]
    assert fills == [plot.OURS, plot.BEST, plot.BASELINE, plot.BEST, plot.OURS]
    words = texts(doc)
    assert "80 us  1.25x vs cudnn" in words and "300 us  0.80x vs cudnn" in words
    assert "per call (host time included)" in " ".join(words)


def test_graph_times_only_where_every_timed_row_has_one():
    both = [row("ours", 500.0, graph_us=50.0), row("cudnn", 400.0, baseline=True, graph_us=100.0)]
    assert [w for _, w, _ in bars(plot.svg(HEADER, both))] == [plot.BAR_W / 2, plot.BAR_W]
    assert "CUDA-graph replay" in " ".join(texts(plot.svg(HEADER, both)))
    mixed = [row("ours", 500.0, graph_us=50.0), row("cudnn", 400.0, baseline=True)]
    assert [w for _, w, _ in bars(plot.svg(HEADER, mixed))] == [plot.BAR_W * 400 / 500, plot.BAR_W]


def test_models_are_drawn_in_images_per_second_highest_first():
    rows = [row("ours", 9.0, "train", img_s=3000.0), row("timm", 12.0, "train", baseline=True, img_s=2000.0),
            {**row("ours", 9.0, "train", img_s=25000.0), "op": "deit_small"}]
    doc = plot.svg(HEADER, rows)
    assert [impl for impl, _, _ in bars(doc)] == ["ours", "timm", "ours"]
    assert "3000 img/s  1.50x vs timm" in texts(doc) and "25000 img/s" in texts(doc)
    # a model bench's op is the model: same input shape, two panels, each on its own scale
    assert [t.split()[0] for t in texts(doc) if t.endswith("img/s") and "bf16" in t] == ["attention", "deit_small"]
    assert bars(doc)[2][1] == plot.BAR_W


def test_untimed_rows_are_named_and_text_is_escaped():
    rows = [row("a<b&c", 10.0), row("cudnn", 20.0, baseline=True), row("cuda", None, note="unavailable: x"),
            row("ours", 5.0, shape="1x1x7x48")]
    doc = plot.svg({**HEADER, "device": "GPU <&>"}, rows)  # parses: everything is escaped
    assert [impl for impl, _, _ in bars(doc)] == ["a<b&c", "cudnn", "ours"]
    assert "not timed here: cuda" in texts(doc)
    assert any(t.startswith("attention 1x1x7x48 bf16") for t in texts(doc))  # a panel per shape


def test_cli_writes_one_svg_per_bench_of_a_report(tmp_path):
    rows = [row("ours", 80.0), row("cudnn", 100.0, baseline=True)]
    report = {"benches": {"attention": {"header": HEADER, "rows": rows, "footer": None},
                          "layer_norm": {"header": {**HEADER, "bench": "layer_norm"}, "rows": rows, "footer": None}}}
    (tmp_path / "2026-11-26-gpu.json").write_text(json.dumps(report))
    jsonl = tmp_path / "att.jsonl"
    jsonl.write_text("\n".join(json.dumps({"type": t, **r}) for t, r in
                               [("header", HEADER)] + [("row", r) for r in rows]))
    out = subprocess.run([sys.executable, "-m", "bench.plot", str(tmp_path / "2026-11-26-gpu.json"), str(jsonl),
                          "--out-dir", str(tmp_path / "plots")], cwd=ROOT, capture_output=True, text=True, check=True)
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["2026-11-26-gpu-attention.svg", "2026-11-26-gpu-layer_norm.svg", "att.svg"]
    assert len(out.stdout.split()) == 3
    for path in (tmp_path / "plots").iterdir():
        assert len(bars(path.read_text())) == 2
