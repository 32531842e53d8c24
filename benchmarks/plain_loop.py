"""The baseline every training-throughput ratio is measured against: the same model and losses trained by a plain
PyTorch loop with no engine (no strategy, no NaN guard, no checkpoints, torch's defaults everywhere), fed by a
DataLoader — what a published training script does.

    python benchmarks/plain_loop.py --steps 5                 # the published MultiHipPoseNet, 3 x 192 x 256, batch 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import MODELS, build_criterion  # noqa: E402
from models.codecs import render_heatmaps_torch  # noqa: E402


def synthetic_tensors(n: int, hw: tuple[int, int], keypoints: int = 6, classes: int = 8, seed: int = 0):
    """(images, masks, heatmaps, visible): random images and labels at the published target scale (sigma 7 px at
    384 x 512, peak 255)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, *hw, generator=g)
    mask = torch.randint(0, classes, (n, *hw), generator=g)
    kpts = torch.rand(n, keypoints, 2, generator=g) * torch.tensor([hw[1] - 1, hw[0] - 1])
    vis = torch.ones(n, keypoints, dtype=torch.bool)
    heat = render_heatmaps_torch(kpts, vis, hw, 7.0 * hw[0] / 384, peak=255.0)
    return image, mask, heat, vis


def plain_training(model, criterion, loader, steps: int, lr: float = 1e-4, device: str = "cpu") -> list[float]:
    """The plain loop: seconds per step for `steps` steps (data loading included, as in a training script)."""
    model.to(device).train()
    criterion.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    times, it = [], iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            image, mask, heat, vis = next(it)
        except StopIteration:
            it = iter(loader)
            image, mask, heat, vis = next(it)
        image, mask, heat, vis = (t.to(device) for t in (image, mask, heat, vis))
        out = model(image)
        loss = criterion(out, {"mask_BHW": mask, "heatmap_BKHW": heat, "kpts_visible_BK": vis})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        float(loss)                      # the script prints its loss: the step is complete
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hw", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = ap.parse_args(argv)
    torch.manual_seed(967)
    model, criterion = MODELS["multihipposenet"](), build_criterion("multihipposenet")
    data = TensorDataset(*synthetic_tensors(args.batch * 4, tuple(args.hw)))
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=args.device == "cuda", persistent_workers=args.workers > 0)
    times = plain_training(model, criterion, loader, args.steps + 1, device=args.device)[1:]
    print(f"plain loop: {sum(times) / len(times):.3f} s/step ({args.batch / (sum(times) / len(times)):.2f} "
          f"samples/s) on {args.device}, batch {args.batch}, {args.hw[0]} x {args.hw[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
