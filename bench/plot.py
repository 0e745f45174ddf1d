"""Bar charts of bench rows as SVG (DESIGN.md section 7: JSON lines, a markdown table, plots).

    python -m bench.plot bench/results/2026-11-26-nvidia-h200.json   # a bench.report file: one SVG per bench
    python -m bench.plot out/attention.jsonl --out-dir out              # one bench's .jsonl

common.run also writes <out>.svg beside <out>.md. Plain SVG text, so no plotting package is
needed on the GPU machine or here. One panel per (op, shape, dtype) (a model bench's op is the model); in it one group of bars per
direction, best first, all on the panel's scale. Ops are drawn in microseconds (shorter is
better), models and training steps in img/s (longer is better). A panel uses the CUDA-graph
replay (graph_us, the GPU's time without the host's) when every timed row in it has one, else
the per-call time with host (us): bars of one panel are never mixed. Ours are blue, baselines
grey, the best baseline of each group dark grey with a line across the group at its value; our
bars say their ratio to it. Rows without a value (unavailable, failed) are named under the panel.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from xml.sax.saxutils import escape, quoteattr

OURS, BASELINE, BEST = "#1f6fb4", "#b4b4b4", "#5a5a5a"
NS = "http://www.w3.org/2000/svg"
WIDTH, LABEL_W, BAR_W, BAR_H, GAP = 960, 190, 560, 14, 3


def _metric(rows: List[dict]) -> Tuple[str, bool, str]:
    """(row field, higher is better, axis words) for one panel's rows."""
    timed = [r for r in rows if r.get("us") or r.get("img_s")]
    if any(r.get("img_s") for r in timed):
        graph = bool(timed) and all(r.get("graph_img_s") for r in timed)
        return ("graph_img_s" if graph else "img_s"), True, \
            "img/s, CUDA-graph replay" if graph else "img/s"
    graph = bool(timed) and all(r.get("graph_us") for r in timed)
    return ("graph_us" if graph else "us"), False, \
        "us, CUDA-graph replay (GPU time)" if graph else "us per call (host time included)"


def _panels(rows: List[dict]) -> Dict[Tuple[str, str, str], List[dict]]:
    """(op, shape, dtype) -> its rows: a model bench's op is the model."""
    panels: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in rows:
        panels.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    return panels


def _number(value: float) -> str:
    return f"{value:.4g}" if value < 10000 else f"{value:.0f}"


def _bar(y: float, width: float, colour: str, label: str, value_text: str, row: dict,
         field: str) -> List[str]:
    tip = escape(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()))
    return [f'<text x="{LABEL_W - 6}" y="{y + BAR_H - 3}" text-anchor="end">{escape(label)}</text>',
            f'<rect x="{LABEL_W}" y="{y}" width="{width:.2f}" height="{BAR_H}" fill="{colour}" '
            f'data-impl={quoteattr(row["impl"])} data-{field.replace("_", "-")}="{row[field]:.6g}">'
            f'<title>{tip}</title></rect>',
            f'<text x="{LABEL_W + width + 4:.2f}" y="{y + BAR_H - 3}">{escape(value_text)}</text>']


def svg(header: dict, rows: List[dict]) -> str:
    """The SVG document of one bench's rows (header: a bench .jsonl header)."""
    body: List[str] = []
    y = 22.0
    title = (f"{header.get('bench', '?')} on {header.get('device', '?')}, {str(header.get('date', ''))[:10]}, "
             f"git {header.get('git', '?')}")
    body.append(f'<text x="8" y="16" font-size="14" font-weight="bold">{escape(title)}</text>')
    for (op, shape, dtype), panel in _panels(rows).items():
        field, higher, words = _metric(panel)
        timed = [r for r in panel if r.get(field)]
        y += 14
        heading = f"{op} {shape} {dtype}: {words}"
        body.append(f'<text x="8" y="{y + 12}" font-size="13" font-weight="bold">{escape(heading)}</text>')
        y += 20
        top = max((r[field] for r in timed), default=1.0)
        directions: List[str] = []
        for r in timed:
            if r["direction"] not in directions:
                directions.append(r["direction"])
        for direction in directions:
            group = sorted((r for r in timed if r["direction"] == direction),
                           key=lambda r: r[field], reverse=higher)
            baselines = [r for r in group if r.get("baseline")]
            best: Optional[dict] = baselines[0] if baselines else None
            if best is not None:  # first, so that the bars and their labels lie over it
                x = LABEL_W + BAR_W * best[field] / top
                height = len(group) * (BAR_H + GAP) + 2
                body.append(f'<line x1="{x:.2f}" y1="{y - 2}" x2="{x:.2f}" y2="{y + height}" '
                            f'stroke="{BEST}" stroke-dasharray="3,2"/>')
            for r in group:
                width = BAR_W * r[field] / top
                colour = BEST if r is best else (BASELINE if r.get("baseline") else OURS)
                text = f"{_number(r[field])} {'img/s' if higher else 'us'}"
                if best is not None and not r.get("baseline"):
                    ratio = r[field] / best[field] if higher else best[field] / r[field]
                    text += f"  {ratio:.2f}x vs {best['impl']}"
                body += _bar(y, width, colour, f"{direction}  {r['impl']}", text, r, field)
                y += BAR_H + GAP
            y += 6
        untimed = sorted({r["impl"] for r in panel if not r.get(field)})
        if untimed:
            body.append(f'<text x="{LABEL_W}" y="{y + 10}" fill="#888">not timed here: '
                        f'{escape(", ".join(untimed))}</text>')
            y += 16
    return (f'<svg xmlns="{NS}" width="{WIDTH}" height="{y + 12:.0f}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def benches(path: Path) -> Dict[str, Tuple[dict, List[dict]]]:
    """Bench name -> (header, rows) of a bench.report .json or one bench's .jsonl."""
    if path.suffix == ".json":
        report = json.loads(path.read_text())
        return {name: (b["header"], b["rows"]) for name, b in report["benches"].items()}
    from bench.common import read_jsonl  # not at the top: bench.common imports this module
    header, rows, _ = read_jsonl(path)
    return {header.get("bench", path.stem): (header, rows)} if header else {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="bench.report .json files or bench .jsonl files")
    p.add_argument("--out-dir", help="where the SVGs go (default: beside each file)")
    args = p.parse_args(argv)
    for name in args.files:
        path = Path(name)
        out_dir = Path(args.out_dir) if args.out_dir else path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        found = benches(path)
        for bench, (header, rows) in found.items():
            target = out_dir / (f"{path.stem}-{bench}.svg" if path.suffix == ".json" else f"{path.stem}.svg")
            target.write_text(svg(header, rows))
            print(target)
        if not found:
            raise SystemExit(f"{path}: no bench header in it")


if __name__ == "__main__":
    main()
