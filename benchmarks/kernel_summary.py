"""One line per (op, shape, mode) from kernel_bench.py JSON files: the Triton kernel against torch eager and
torch.compile measured in the same run, as a markdown table.

    python benchmarks/kernel_summary.py benchmarks/results/kernels_h200_20261126/run3_kernel_bench_fp32.json --ops soft_argmax
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TRITON = ("triton", "triton gate + conv")     # the default Triton path of each op


def summarize(path: Path, ops: set[str] | None, extra_provider: str | None = "triton fused") -> list[str]:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "error" not in r and (not ops or r["op"] in ops)]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r
    meta = data["meta"]
    out = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, copy bandwidth "
           f"{meta['copy_gbs']:.0f} GB/s ({path.name})", "",
           "| op | shape | mode | eager ms | compile ms | Triton ms | Triton GB/s | % of copy bw | × eager | "
           "× compile | Triton peak MiB |" + (f" {extra_provider} ms |" if extra_provider else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra_provider else "")]
    for (op, shape, mode), prov in by_key.items():
        tri = next((prov[p] for p in TRITON if p in prov), None)
        if tri is None:
            continue
        eager, comp = prov.get("eager"), prov.get("compile")
        cell = lambda r: f"{r['ms']:.3f}" if r else "—"  # noqa: E731
        ratio = lambda r: f"{r['ms'] / tri['ms']:.2f}" if r else "—"  # noqa: E731
        peak = "—" if tri.get("peak_extra_bytes") is None else f"{tri['peak_extra_bytes'] / 2 ** 20:.0f}"
        line = (f"| {op} | {shape} | {mode} | {cell(eager)} | {cell(comp)} | {tri['ms']:.3f} | {tri['gbs']:.0f} | "
                f"{100 * tri['frac_bw']:.0f} % | {ratio(eager)} | {ratio(comp)} | {peak} |")
        if extra_provider:
            line += f" {cell(prov.get(extra_provider))} |"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, nargs="+", help="kernel_bench_*.json files")
    ap.add_argument("--ops", default="", help="comma-separated ops to keep (default: all)")
    args = ap.parse_args(argv)
    ops = {o for o in args.ops.split(",") if o} or None
    for path in args.json:
        print("\n".join(summarize(path, ops)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
