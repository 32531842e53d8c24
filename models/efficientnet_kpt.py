"""EfficientNet keypoint models for paediatric hip X-rays (docs/systems/hip_xray_efficientnet.md): coordinate
regression, with CBAM, with multi-scale CBAM features, and a heatmap variant.

Backbones: any torchvision EfficientNet (`efficientnet_b0..b7`, `efficientnet_v2_s|m|l`; default
`efficientnet_v2_m`, whose last three stages give the published 304, 512 and 1280 channels at stride 32, i.e. 7x7
for a 224 input) or any timm EfficientNet-family model as "timm:<name>" (e.g. "timm:test_efficientnet", tiny, for
tests). Nothing is ever downloaded: backbones are built with weights=None / pretrained=False; `weights` may name a
local file holding the backbone's own state_dict (the torchvision / timm model's keys), loaded with strict=False.

A backbone is a sequence of stages (torchvision: `features[i]`; timm: stem, `blocks[i]`, head conv) whose outputs
are all returned, so heads can tap any of them.

Regression outputs "kpts_px_BK2" in network-input pixels. Parameterisation (`coords`):
  "normalized" (default): the head emits u in ~[-1, 1] and x = (u_x + 1) / 2 * W - 0.5, y = (u_y + 1) / 2 * H - 0.5,
      so u = -1 / +1 are the outer pixel edges (-0.5 and W - 0.5 with pixel centres at integers) and the untrained
      head (u ~ 0) predicts the image centre: targets are O(1), so the head's gradients and Adam's step sizes are
      well scaled whatever the input size. No tanh: points outside the frame stay representable.
  "pixels": the head emits pixels directly (the published model: raw 224-px coordinates).
The heatmap variant outputs "heatmap_BKHW" at the input resolution, decodable by soft-argmax / DARK.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import CBAM

log = logging.getLogger("medpose")
WHERE = "models/efficientnet_kpt.py"
COORD_MODES = ("normalized", "pixels")


# ----------------------------------------------------------------------------------------------------- weights file
def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{WHERE}: weights file {path} does not hold a state_dict (a dict of tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_backbone_weights(net: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local state_dict into `net` with strict=False; tensors whose shape differs (e.g. the stem conv when
    in_channels != 3) are skipped. Logs and returns {"missing", "unexpected", "skipped_shape"}; an unreadable file,
    or one of which no tensor fits, raises an error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{WHERE}: weights file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        raise ValueError(f"{WHERE}: weights file {p} is not readable by torch.load ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    state = _state_dict_of(obj, p)
    own = net.state_dict()
    skipped = sorted(k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape))
    usable = {k: v for k, v in state.items() if k not in skipped}
    result = net.load_state_dict(usable, strict=False)
    loaded = len(usable) - len(result.unexpected_keys)
    if loaded == 0:
        raise ValueError(f"{WHERE}: weights file {p}: none of its {len(state)} tensors matches the backbone "
                         f"(first key '{next(iter(state))}')")
    log.info("backbone weights %s: %d tensors loaded, %d missing, %d unexpected, %d skipped (shape)", p, loaded,
             len(result.missing_keys), len(result.unexpected_keys), len(skipped))
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
            "skipped_shape": skipped}


# -------------------------------------------------------------------------------------------------------- backbone
def _torchvision_net(name: str, in_channels: int) -> tuple[nn.Module, list[tuple[str, ...]]]:
    import torchvision
    try:
        net = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ValueError(f"{WHERE}: unknown torchvision backbone '{name}' (e.g. efficientnet_v2_m, efficientnet_b0, "
                         f"or 'timm:<name>')") from None
    if not isinstance(getattr(net, "features", None), nn.Sequential):
        raise ValueError(f"{WHERE}: torchvision model '{name}' has no `features` stages (not an EfficientNet)")
    net.classifier = nn.Identity()
    if in_channels != 3:
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                       bias=old.bias is not None)
    return net, [(f"features.{i}",) for i in range(len(net.features))]


def _timm_net(name: str, in_channels: int) -> tuple[nn.Module, list[tuple[str, ...]]]:
    import timm
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    except RuntimeError as err:
        raise ValueError(f"{WHERE}: timm backbone '{name}': {err}") from None
    if not all(hasattr(net, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        raise ValueError(f"{WHERE}: timm model '{name}' is not an EfficientNet-family model (needs conv_stem, bn1, "
                         f"blocks, conv_head, bn2)")
    return net, [("conv_stem", "bn1")] + [(f"blocks.{i}",) for i in range(len(net.blocks))] + [("conv_head", "bn2")]


class EfficientNetBackbone(nn.Module):
    """forward(image_BCHW) -> list of every stage's output. `channels[i]`, `strides[i]` describe stage i."""

    def __init__(self, name: str = "efficientnet_v2_m", in_channels: int = 3, weights: str | Path | None = None,
                 probe_hw: tuple[int, int] = (64, 64)):
        super().__init__()
        if name.startswith("timm:"):
            self.net, self.stage_paths = _timm_net(name[len("timm:"):], in_channels)
        else:
            self.net, self.stage_paths = _torchvision_net(name, in_channels)
        self.name, self.in_channels = name, in_channels
        if weights is not None:
            load_backbone_weights(self.net, weights)
        self.channels, self.strides = self._probe(probe_hw)

    @torch.no_grad()
    def _probe(self, hw: tuple[int, int]) -> tuple[list[int], list[int]]:
        """Channels and strides of every stage from one eval-mode pass on zeros (BN statistics untouched)."""
        was_training = self.training
        self.eval()
        feats = self(torch.zeros(1, self.in_channels, *hw))
        self.train(was_training)
        return [f.shape[1] for f in feats], [int(round(hw[0] / f.shape[2])) for f in feats]

    def forward(self, image_BCHW: torch.Tensor) -> list[torch.Tensor]:
        x, out = image_BCHW, []
        for paths in self.stage_paths:
            for p in paths:
                x = self.net.get_submodule(p)(x)
            out.append(x)
        return out


# ----------------------------------------------------------------------------------------------------------- heads
def _check_args(num_keypoints: int, input_hw: Sequence[int], coords: str) -> tuple[int, int]:
    if num_keypoints < 1:
        raise ValueError(f"{WHERE}: num_keypoints must be >= 1, got {num_keypoints}")
    hw = tuple(int(v) for v in input_hw)
    if len(hw) != 2 or min(hw) < 32:
        raise ValueError(f"{WHERE}: input_hw must be (H, W) with both >= 32, got {tuple(input_hw)}")
    if coords not in COORD_MODES:
        raise ValueError(f"{WHERE}: coords='{coords}' is not one of {COORD_MODES}")
    return hw


class _CoordRegressor(nn.Module):
    """Shared tail of the regression models: raw (B, 2K) head output -> kpts_px_BK2 (module docstring)."""

    def __init__(self, num_keypoints: int, input_hw: tuple[int, int], coords: str):
        super().__init__()
        self.num_keypoints, self.input_hw, self.coords = num_keypoints, input_hw, coords

    def _check_input(self, image_BCHW: torch.Tensor) -> None:
        if tuple(image_BCHW.shape[-2:]) != self.input_hw:
            raise ValueError(f"{WHERE}: input is {tuple(image_BCHW.shape[-2:])} but the model was built for "
                             f"input_hw={self.input_hw} (its coordinates are scaled by it)")

    def _to_px(self, raw_B2K: torch.Tensor) -> torch.Tensor:
        raw_BK2 = raw_B2K.float().view(raw_B2K.shape[0], self.num_keypoints, 2)
        if self.coords == "pixels":
            return raw_BK2
        h, w = self.input_hw
        size = raw_BK2.new_tensor([w, h])
        return (raw_BK2 + 1.0) * 0.5 * size - 0.5


class EfficientNetKpt(_CoordRegressor):
    """Backbone -> [CBAM on the last stage] -> global average pool -> Dropout -> Linear(C_last, 2K)."""

    def __init__(self, backbone: EfficientNetBackbone, num_keypoints: int, input_hw: tuple[int, int],
                 dropout: float, coords: str, cbam_reduction: int | None = None):
        super().__init__(num_keypoints, input_hw, coords)
        self.backbone = backbone
        c = backbone.channels[-1]
        self.cbam = CBAM(c, cbam_reduction) if cbam_reduction else None
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, 2 * num_keypoints))

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(image_BCHW)
        x = self.backbone(image_BCHW)[-1]
        if self.cbam is not None:
            x = self.cbam(x)
        return {"kpts_px_BK2": self._to_px(self.head(x.mean(dim=(2, 3))))}


class EfficientNetMSCBAM(_CoordRegressor):
    """Last `num_scales` stages, each -> own CBAM -> global average pool; concat -> LayerNorm -> Linear(., hidden)
    -> GELU -> Dropout -> Linear(hidden, 2K) (docs/systems/hip_xray_efficientnet.md; the published model has no dropout:
    dropout=0)."""

    def __init__(self, backbone: EfficientNetBackbone, num_keypoints: int, input_hw: tuple[int, int],
                 dropout: float, coords: str, num_scales: int = 3, hidden: int = 512, cbam_reduction: int = 16):
        super().__init__(num_keypoints, input_hw, coords)
        if not 1 <= num_scales <= len(backbone.channels):
            raise ValueError(f"{WHERE}: num_scales={num_scales} but the backbone has {len(backbone.channels)} stages")
        self.backbone, self.num_scales = backbone, num_scales
        chans = backbone.channels[-num_scales:]
        self.cbams = nn.ModuleList(CBAM(c, cbam_reduction) for c in chans)
        self.concat_width = sum(chans)
        self.head = nn.Sequential(nn.LayerNorm(self.concat_width), nn.Linear(self.concat_width, hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, 2 * num_keypoints))

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(image_BCHW)
        feats = self.backbone(image_BCHW)[-self.num_scales:]
        pooled = torch.cat([cbam(f).mean(dim=(2, 3)) for cbam, f in zip(self.cbams, feats)], dim=1)
        return {"kpts_px_BK2": self._to_px(self.head(pooled))}


class EfficientNetHeatmap(nn.Module):
    """Backbone + a light FPN-style head: for each stride >= 4 the last stage at that stride -> Conv1x1 to D; top-down
    sum with bilinear upsampling; Conv3x3 + BN + ReLU + Conv1x1(D -> K) at stride 4; bilinear to the input size
    (align_corners=False keeps pixel centres aligned), times `heatmap_peak` so the head's output is O(1)."""

    def __init__(self, backbone: EfficientNetBackbone, num_keypoints: int, input_hw: tuple[int, int],
                 head_channels: int = 128, heatmap_peak: float = 1.0):
        super().__init__()
        self.backbone, self.input_hw, self.heatmap_peak = backbone, input_hw, float(heatmap_peak)
        last_at = {s: i for i, s in enumerate(backbone.strides) if s >= 4}  # dict keeps the last stage per stride
        if not last_at:
            raise ValueError(f"{WHERE}: backbone {backbone.name} has no stage at stride >= 4")
        self.taps = sorted(last_at.values(), key=lambda i: backbone.strides[i])  # finest (stride 4) first
        self.lateral = nn.ModuleList(nn.Conv2d(backbone.channels[i], head_channels, 1) for i in self.taps)
        self.smooth = nn.Sequential(nn.Conv2d(head_channels, head_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True),
                                    nn.Conv2d(head_channels, num_keypoints, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(image_BCHW)
        x = None
        for i, lat in reversed(list(zip(self.taps, self.lateral))):  # coarsest first
            y = lat(feats[i])
            x = y if x is None else y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
        heat = F.interpolate(self.smooth(x), size=image_BCHW.shape[-2:], mode="bilinear", align_corners=False)
        return {"heatmap_BKHW": heat * self.heatmap_peak}


# -------------------------------------------------------------------------------------------------------- builders
def build_efficientnet(backbone: str = "efficientnet_v2_m", num_keypoints: int = 12,
                       input_hw: Sequence[int] = (224, 224), dropout: float = 0.3, in_channels: int = 3,
                       weights: str | None = None, coords: str = "normalized") -> nn.Module:
    """Published model (a): backbone -> GAP -> Dropout(0.3) -> Linear(C_last = 1280 for v2_m, 2K)."""
    hw = _check_args(num_keypoints, input_hw, coords)
    return EfficientNetKpt(EfficientNetBackbone(backbone, in_channels, weights), num_keypoints, hw, dropout, coords)


def build_efficientnet_cbam(backbone: str = "efficientnet_v2_m", num_keypoints: int = 12,
                            input_hw: Sequence[int] = (224, 224), dropout: float = 0.3, in_channels: int = 3,
                            weights: str | None = None, coords: str = "normalized",
                            cbam_reduction: int = 16) -> nn.Module:
    """Model (a) with a CBAM on the last stage's features before the pooling."""
    hw = _check_args(num_keypoints, input_hw, coords)
    return EfficientNetKpt(EfficientNetBackbone(backbone, in_channels, weights), num_keypoints, hw, dropout, coords,
                           cbam_reduction=cbam_reduction)


def build_efficientnet_ms_cbam_3scales(backbone: str = "efficientnet_v2_m", num_keypoints: int = 12,
                                       input_hw: Sequence[int] = (224, 224), dropout: float = 0.0,
                                       in_channels: int = 3, weights: str | None = None,
                                       coords: str = "normalized", hidden: int = 512,
                                       cbam_reduction: int = 16) -> nn.Module:
    """Published model (b): last three stages (304 + 512 + 1280 = 2096 channels for v2_m) with a CBAM each."""
    hw = _check_args(num_keypoints, input_hw, coords)
    return EfficientNetMSCBAM(EfficientNetBackbone(backbone, in_channels, weights), num_keypoints, hw, dropout,
                              coords, num_scales=3, hidden=hidden, cbam_reduction=cbam_reduction)


def build_efficientnet_heatmap(backbone: str = "efficientnet_v2_m", num_keypoints: int = 12,
                               input_hw: Sequence[int] = (224, 224), in_channels: int = 3,
                               weights: str | None = None, head_channels: int = 128,
                               heatmap_peak: float = 1.0) -> nn.Module:
    """Heatmap variant: same backbone, FPN-style head, heatmap_BKHW at the input resolution."""
    hw = _check_args(num_keypoints, input_hw, "normalized")
    return EfficientNetHeatmap(EfficientNetBackbone(backbone, in_channels, weights), num_keypoints, hw,
                               head_channels, heatmap_peak)


MODELS_KPT: dict[str, Callable[..., nn.Module]] = {
    "efficientnet": build_efficientnet,
    "efficientnet_cbam": build_efficientnet_cbam,
    "efficientnet_ms_cbam_3scales": build_efficientnet_ms_cbam_3scales,
    "efficientnet_heatmap": build_efficientnet_heatmap,
}
