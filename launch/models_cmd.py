"""`medpose models` (every registered model with its parameter count) and `medpose models NAME` (one forward pass:
output shapes, parameter count, approximate FLOPs) — the published zoo's "debug" mode
(docs/systems/segmentation_zoo.md)."""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

# input the single-model report uses when --hw is not given: a multiple of every zoo stride (32)
DEFAULT_HW = (256, 256)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(name: str, args: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    from models.registry import MODELS
    if name not in MODELS:
        raise SystemExit(f"medpose models: no model named '{name}' (see `medpose models`)")
    with torch.device(device):
        return MODELS[name](**args)


# what the landmark networks are (the zoo's entries carry their paper in SegSpec)
LANDMARK_REFS = {
    "landmark_unet": "heatmap UNet for any landmarks, head at stride 1/2/4 (plain or smp encoder)",
    "landmark_hrnet": "HRNet (timm) + fused stride-4 heatmap head, any landmarks (HRNetV2-style)",
    "multihipposenet": "MultiHipPoseNet: ME-GCT experts + MT-GALM graph layer, hip ultrasound seg + 6 landmarks",
    "hourglass": "stacked hourglass + multi-level attention, spine disc labelling",
    "efficientnet": "EfficientNet keypoint regressor, hip X-ray (12 landmarks)",
    "efficientnet_cbam": "EfficientNet + CBAM on the last stage, hip X-ray",
    "efficientnet_ms_cbam_3scales": "EfficientNet + CBAM on 3 scales, hip X-ray (published)",
    "efficientnet_heatmap": "EfficientNet + FPN-style heatmap head",
    "unet_multitask": "small UNet, segmentation + landmark heatmaps (Ronneberger et al. 2015)",
}


def model_rows() -> list[dict[str, Any]]:
    """name, family, source, parameters (default build, 3 channels in, 2 classes for the zoo), paper."""
    from models.registry import MODELS
    from models.seg import SEG_SPECS
    rows = []
    for name in sorted(MODELS):
        spec = SEG_SPECS.get(name)
        model = _build(name, {}, "meta")         # no memory, no init cost: only the shapes
        rows.append({"name": name, "family": "segmentation" if spec else "landmarks",
                     "source": spec.source if spec else "own", "multiple": spec.multiple if spec else None,
                     "params": count_parameters(model),
                     "paper": spec.paper if spec else LANDMARK_REFS.get(name, type(model).__name__)})
    return rows


def flop_count(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], int]:
    """Outputs of one eval-mode forward and its FLOPs (torch.utils.flop_counter: 2 per multiply-add of convolutions
    and matrix products; element-wise work is not counted, hence 'approximate')."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    return out, int(counter.get_total_flops())


def _fmt_shape(v: Any) -> str:
    if torch.is_tensor(v):
        return str(tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_shape(t) for t in v) + "]"
    return type(v).__name__


def _parse_args(items: list[str]) -> dict[str, Any]:
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"medpose models: model argument '{item}' must look like key=value")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def run(args: argparse.Namespace) -> int:
    if not args.name:
        rows = model_rows()
        print(f"{'model':28s} {'family':13s} {'source':11s} {'parameters':>12s}  reference")
        for r in rows:
            print(f"{r['name']:28s} {r['family']:13s} {r['source']:11s} {r['params'] / 1e6:>10.2f} M  {r['paper']}")
        print(f"\n{len(rows)} models. `medpose models NAME` runs one forward pass (shapes, FLOPs); "
              f"train one with model.name=NAME (configs: seg_zoo for the segmentation zoo).")
        return 0
    from models.seg import SEG_SPECS
    arch = _parse_args(args.model_args)
    spec = SEG_SPECS.get(args.name)
    if spec is not None:
        arch.setdefault("in_channels", args.in_channels)
        arch.setdefault("num_classes", args.classes)
    hw = tuple(args.hw) if args.hw else tuple(arch.get("input_hw", DEFAULT_HW))
    if spec is not None and (hw[0] % spec.multiple or hw[1] % spec.multiple):
        raise SystemExit(f"medpose models: {args.name} needs H and W divisible by {spec.multiple}, got {hw}")
    torch.manual_seed(0)
    model = _build(args.name, arch)
    n_in = arch.get("in_channels", args.in_channels)
    x = torch.randn(args.batch, n_in, *hw)
    out, flops = flop_count(model, x)
    print(f"{args.name}: {count_parameters(model):,} parameters "
          f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable)")
    if spec is not None:
        print(f"  source {spec.source}; input H, W multiple of {spec.multiple}; {spec.paper}")
    print(f"  input  {tuple(x.shape)}")
    for k, v in (out.items() if isinstance(out, dict) else [("output", out)]):
        print(f"  output {k}: {_fmt_shape(v)}")
    per = flops / max(args.batch, 1)
    print(f"  ~{per / 1e9:.2f} GFLOPs per image at {hw[0]}x{hw[1]} (convolutions and matrix products, "
          f"2 per multiply-add)" if math.isfinite(per) else "  FLOPs: n/a")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list every model with its parameter count, or inspect one",
                       description="Without NAME: every registered model (segmentation zoo and landmark "
                                   "networks) with its default parameter count. With NAME: build it, run one "
                                   "forward pass on a random input and print the output shapes, the parameter "
                                   "count and an approximate FLOP count.")
    m.add_argument("name", nargs="?", help="model name (see the list)")
    m.add_argument("model_args", nargs="*", metavar="KEY=VALUE", help="builder arguments, e.g. base=32")
    m.add_argument("--hw", type=int, nargs=2, metavar=("H", "W"),
                   help=f"input size (default {DEFAULT_HW[0]} {DEFAULT_HW[1]})")
    m.add_argument("--in-channels", type=int, default=3, help="input channels for zoo models (default 3)")
    m.add_argument("--classes", type=int, default=2, help="classes for zoo models (default 2)")
    m.add_argument("--batch", type=int, default=1)
