"""Training-step throughput (samples/s) of MultiHipPoseNet at two sizes, with and without MT-GALM, side by side."""
import pytest
import torch

from models import MODELS, build_criterion
from models.codecs import render_heatmaps_torch

SIZES = {
    # the demo model (launch/configs/hip_demo.yaml) and a wider ResNet-34-style variant
    "demo-r18w16@128x160": (dict(expert_depth=18, width=16, num_experts=3, decoder_norm="gn"), (128, 160)),
    "r34w32@192x256": (dict(expert_depth=34, width=32, num_experts=3, decoder_norm="gn"), (192, 256)),
}
BATCH = 8  # the demo's batch


def _batch(hw, k=6, classes=8):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(BATCH, 3, *hw, generator=g)
    mask = torch.randint(0, classes, (BATCH, *hw), generator=g)
    kpts = torch.rand(BATCH, k, 2, generator=g) * torch.tensor([hw[1] - 1, hw[0] - 1])
    vis = torch.ones(BATCH, k, dtype=torch.bool)
    return image, {"mask_BHW": mask, "heatmap_BKHW": render_heatmaps_torch(kpts, vis, hw, 2.0),
                   "kpts_visible_BK": vis, "kpts_px_BK2": kpts}


@pytest.mark.parametrize("galm", ["gcn", "none"])
@pytest.mark.parametrize("size", list(SIZES))
def test_train_step(benchmark, record, size, galm):
    benchmark.group = f"train step {size}"
    args, hw = SIZES[size]
    torch.manual_seed(0)
    model = MODELS["multihipposenet"](galm=galm, **args)
    criterion = build_criterion("multihipposenet")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    image, targets = _batch(hw)

    def step():
        out = model(image)
        loss = criterion(out, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()  # warm-up (allocations, first-call overheads)
    benchmark.pedantic(step, rounds=3, iterations=1)
    record(batch=BATCH, input_hw=list(hw), params=sum(p.numel() for p in model.parameters()),
           samples_per_s=BATCH / benchmark.stats.stats.mean)
