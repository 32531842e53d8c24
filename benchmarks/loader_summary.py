"""One line per (input size, image format) from loader_bench.py JSON files: every provider's samples/s side by side
(and its multiple of torch-pil-w2), then the training-step ratios to the in-memory step, as markdown tables.

    python benchmarks/loader_summary.py benchmarks/results/loaders_h100/loader_bench.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINE = "torch-pil-w2"


def _order(providers: set[str]) -> list[str]:
    """torch-pil, torch-cv2, dali-cpu, dali-gpu, each by increasing worker / thread count."""
    families = ("torch-pil", "torch-cv2", "dali-cpu", "dali-gpu")

    def key(p: str):
        fam = next((i for i, f in enumerate(families) if p.startswith(f + "-")), len(families))
        tail = p.rsplit("-", 1)[-1][1:]
        return fam, int(tail) if tail.isdigit() else 0, p
    return sorted(providers, key=key)


def summarize(data: dict, name: str = "") -> list[str]:
    meta, rows = data["meta"], data["rows"]
    thr = [r for r in rows if r["section"] == "throughput" and "samples_per_s" in r]
    providers = _order({r["provider"] for r in thr})
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in thr:
        cells.setdefault((r["size"], r["format"]), {})[r["provider"]] = r["samples_per_s"]
    host = "" if meta["device"] == f"CPU {meta['cpu']}" else f" (CPU {meta['cpu']})"
    out = [f"{meta['device']}{host}, torch {meta['torch']}, DALI {meta['dali']}"
           + (f" ({name})" if name else ""), "",
           "samples/s (x " + BASELINE + ")", "",
           "| size | format | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for (size, fmt), by in cells.items():
        base = by.get(BASELINE)
        vals = [f"{by[p]:.0f}" + (f" ({by[p] / base:.2f}x)" if base else "") if p in by else "-" for p in providers]
        out.append(f"| {size} | {fmt} | " + " | ".join(vals) + " |")
    steps = [r for r in rows if r["section"] == "step" and "ms_per_step" in r]
    mem = {r["size"]: r["ms_per_step"] for r in steps if r["provider"] == "in-memory"}
    if steps:
        out += ["", "training step: ms/step (ratio to in-memory)", "",
                "| loader | size | format | ms/step | ratio |", "|---|---|---|---|---|"]
        for r in steps:
            ratio = f"{r['ms_per_step'] / mem[r['size']]:.2f}" if r["size"] in mem else "-"
            out.append(f"| {r['provider']} | {r['size']} | {r['format']} | {r['ms_per_step']:.1f} | {ratio} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        out += ["", "failed: " + "; ".join(f"{r['provider']} {r['size']} {r['format']}: {r['error'][:100]}"
                                          for r in failed)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, nargs="+", help="loader_bench.json files")
    args = ap.parse_args(argv)
    for path in args.json:
        print("\n".join(summarize(json.loads(path.read_text()), path.name)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
