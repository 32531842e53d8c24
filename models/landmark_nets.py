"""Heatmap landmark networks for any number of landmarks K, sized for large (1-4 Mpx) grey or RGB medical images.

Contract (the one of models/hourglass.py): forward(image_BCHW) -> {"heatmap_BKHW": (B, K, H, W)} at the INPUT
resolution. The head predicts at a coarser stride and its map is upsampled bilinearly inside the model
(align_corners=False, so pixel centres stay aligned), so decoding (models/codecs.py), the losses, device-rendered
targets and evaluation all see input-frame pixels. The head's map is multiplied by `heatmap_peak` (set it to
data.heatmap_peak): targets are unnormalised Gaussians of that peak while the last conv works at O(1). That conv
starts near zero (normal, std 1e-3, HRNet's pose-head choice), so the first steps are not spent undoing a random,
peak-scaled map.

"landmark_unet": a UNet (Ronneberger et al., MICCAI 2015) cut down to what a heatmap at stride s = heatmap_stride
needs. Encoder level l works at stride 2^l with c_l = width * 2^l channels (l = 0..depth).
  plain encoder, s = 1: models/unet.py's encoder (double conv at full resolution, then max-pool 2 + double conv
      per level);
  plain encoder, s = 2 or 4: levels finer than s are never read by the decoder, so the encoder passes through them
      with one stride-2 Conv4x4-norm-ReLU each (in -> c_1 [-> c_2]) and refines level log2(s) with a double conv
      (c -> c): no double conv at full resolution at all;
  encoder="smp:<name>": a segmentation-models-pytorch encoder (depth 5, encoder_weights=None); its feature at
      stride 2^l (its own width e_l; at stride 1 the image itself) stands in for level l;
  decoder: from the deepest level up to level log2(s): bilinear x2 to the skip's size, concat with the skip, double
      conv to c_l; head Conv1x1 (c_log2(s) -> K), then up to the input size.
  Multiply-adds per input pixel, in units of width^2 (plain, depth 5): 256 at s = 1, 216 at s = 2, 175 at s = 4 (a
  decoder level costs 36 at any depth, as channels double where the area quarters; an encoder level 13.5). Time on a
  CPU falls further (forward + backward, width 16, 2 cores: 1.5x at s = 2 and 2.1x at s = 4 at 320x256, 2.0x and
  2.9x at 512x416) because full-resolution layers are bound by memory traffic more than by arithmetic: the stride
  is what makes large inputs affordable.
  Parameters (plain, with a norm): double conv a -> b: 9ab + 9b^2 + 4b; stride-2 conv a -> b: 16ab + 2b; head
  c K + K (norm "none": biases instead, 2b and b). tests/test_landmark_nets.py checks the total.

"landmark_hrnet": HRNet (Sun et al., CVPR 2019) from timm (pretrained=False, features_only, feature_location="":
the four parallel branches at strides 4, 8, 16, 32 themselves, not the classification "incre" features). With
`fuse` (default; HRNetV2, Wang et al., TPAMI 2020, the variant used for facial landmarks) the four branches are
upsampled to stride 4 and concatenated (C = sum of the branch widths); without it the stride-4 branch alone is used,
which the network's last exchange unit has already mixed with the others (then the last unit only computes that
branch, so no parameter is left without a gradient). Head: Conv1x1 (C -> D) BN ReLU, Conv3x3 (D -> D) BN ReLU,
Conv1x1 (D -> K), D = head_channels: C D + 9 D^2 + 4 D + D K + K parameters.

Weights: `weights` names a local state_dict file of the library network (an smp encoder's keys, e.g. a torchvision
resnet34 state_dict; a timm HRNet's keys; for the plain encoder this model's `encoder.` keys without the prefix),
loaded by the rules of models/efficientnet_kpt.load_backbone_weights (strict=False, tensors of another shape
skipped, counts logged). Nothing is ever downloaded. With in_channels = 1 a library network is built for RGB, loaded, then its first conv is summed
over the RGB inputs: a grey image replicated to RGB gives exactly that response, so the stem keeps its filters.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet_kpt import _state_dict_of
from .losses_kpt import HeatmapCoordLoss
from .unet import NORMS, DoubleConv, _norm

log = logging.getLogger("medpose")
WHERE = "models/landmark_nets.py"
HEATMAP_STRIDES = (1, 2, 4)
SMP_PREFIX = "smp:"
SMP_DEPTH = 5  # smp encoders are used whole: a shallower smp ResNet still holds (unused) layer3/layer4


# ------------------------------------------------------------------------------------------------------- shared
def _check_common(num_keypoints: int, in_channels: int, heatmap_peak: float) -> None:
    if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, int) or num_keypoints < 1:
        raise ValueError(f"{WHERE}: num_keypoints must be an integer >= 1, got {num_keypoints!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{WHERE}: in_channels must be an integer >= 1 (1 grey, 3 RGB), got {in_channels!r}")
    if not heatmap_peak > 0:
        raise ValueError(f"{WHERE}: heatmap_peak must be > 0 (data.heatmap_peak), got {heatmap_peak!r}")


def check_input(image_BCHW: torch.Tensor, in_channels: int, multiple: int, what: str) -> None:
    """A clear error for a wrong channel count or an input size the network's strides cannot divide."""
    if image_BCHW.dim() != 4 or image_BCHW.shape[1] != in_channels:
        raise ValueError(f"{WHERE} {what}: image_BCHW must be (B, {in_channels}, H, W) for in_channels="
                         f"{in_channels}, got {tuple(image_BCHW.shape)}")
    h, w = image_BCHW.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"{WHERE} {what}: input {h}x{w} must have H and W divisible by {multiple}, the network's "
                         f"multiple (set data.input_hw to multiples of {multiple})")


def heatmap_head(in_channels: int, num_keypoints: int) -> nn.Conv2d:
    """The last Conv1x1 (C -> K), started near zero (module docstring)."""
    conv = nn.Conv2d(in_channels, num_keypoints, 1)
    nn.init.normal_(conv.weight, std=1e-3)
    nn.init.zeros_(conv.bias)
    return conv


def to_input_size(heat_BKhw: torch.Tensor, hw: tuple[int, int], peak: float) -> torch.Tensor:
    """Bilinear upsampling of the head's map to the input size (a no-op at stride 1), scaled to the target peak."""
    if tuple(heat_BKhw.shape[-2:]) != tuple(hw):
        heat_BKhw = F.interpolate(heat_BKhw, size=tuple(hw), mode="bilinear", align_corners=False)
    return heat_BKhw * peak


def _sum_rgb_stem(net: nn.Module) -> None:
    """Turn the first 3-input conv (module order: the stem of torchvision, timm and smp networks) into a 1-input conv
    whose kernel is the sum over R, G, B: conv(grey) = conv_rgb(grey replicated three times)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise ValueError(f"{WHERE}: in_channels=1 with weights: no 3-input stem conv to adapt in {type(net).__name__}")
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True))
    conv.in_channels = 1


def load_local_weights(net: nn.Module, path: str | Path) -> None:
    """A local state_dict file into `net` by the rules of models/efficientnet_kpt.load_backbone_weights (checkpoint
    wrappers and "module." prefixes removed, strict=False, tensors of another shape skipped, a file of which nothing
    fits is an error naming it; counts logged). nn.Module.load_state_dict is called explicitly because library
    modules may override it: smp's ResNetEncoder drops fc.* and returns no key report."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{WHERE}: weights={str(p)!r}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        raise ValueError(f"{WHERE}: weights file {p} is not readable by torch.load ({type(err).__name__})") from None
    state = _state_dict_of(obj, p)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        raise ValueError(f"{WHERE}: weights file {p}: none of its {len(state)} tensors matches the network "
                         f"(first key '{next(iter(state))}')")
    missing = nn.Module.load_state_dict(net, usable, strict=False).missing_keys
    log.info("weights %s: %d tensors loaded, %d missing, %d unused (other name or shape)", p, len(usable),
             len(missing), len(state) - len(usable))


def _load(net: nn.Module, weights: str | None, in_channels: int, built_channels: int) -> None:
    if weights is not None:
        load_local_weights(net, weights)
        if built_channels != in_channels:
            _sum_rgb_stem(net)


@torch.no_grad()
def _probe_and_prune(encoder: nn.Module, in_channels: int, multiple: int) -> list[int]:
    """Channel count of each feature the encoder returns, from one eval-mode pass (BN statistics untouched). Modules
    holding parameters that this pass never called (smp keeps e.g. EfficientNet's classification conv head) are
    replaced by Identity: no parameter is left without a gradient (DDP would need find_unused_parameters) and the
    parameter count is what runs."""
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: called.add(id(mod))) for m in encoder.modules()]
    was_training = encoder.training
    encoder.eval()
    try:
        feats = encoder(torch.zeros(1, in_channels, multiple, multiple))
    finally:
        encoder.train(was_training)
        for h in hooks:
            h.remove()
    for name, module in list(encoder.named_modules()):
        if name and id(module) not in called and next(module.parameters(recurse=False), None) is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(encoder.get_submodule(parent), leaf, nn.Identity())
    return [int(f.shape[1]) for f in feats]


# ------------------------------------------------------------------------------------------------- landmark_unet
def strided_conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """Conv4x4 stride 2 padding 1 -> norm -> ReLU (bias only without a norm). Output pixel i reads inputs 2i-1..2i+2,
    centred on 2i + 0.5: the centre max pooling and the align_corners=False upsampling assume, so the stride-s map
    sits where the final upsampling puts it (a 3x3 stride-2 conv centres on 2i, a shift the network must learn)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=norm == "none"), _norm(norm, c_out),
                         nn.ReLU(inplace=True))


class PlainEncoder(nn.Module):
    """Levels first..depth of the plain encoder (module docstring); forward -> their features, finest first."""

    def __init__(self, in_channels: int, width: int, depth: int, norm: str, first: int):
        super().__init__()
        chans = [width * 2 ** level for level in range(depth + 1)]
        if first == 0:
            self.stem = DoubleConv(in_channels, chans[0], norm)
        else:
            steps = [strided_conv(in_channels if lv == 1 else chans[lv - 1], chans[lv], norm)
                     for lv in range(1, first + 1)]
            self.stem = nn.Sequential(*steps, DoubleConv(chans[first], chans[first], norm))
        self.down = nn.ModuleList(DoubleConv(chans[lv - 1], chans[lv], norm) for lv in range(first + 1, depth + 1))
        self.channels = chans[first:]

    def forward(self, image_BCHW: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(image_BCHW)]
        for block in self.down:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        return feats


class SmpEncoder(nn.Module):
    """A segmentation-models-pytorch encoder (encoder_weights=None) returning its features at strides
    2^first .. 32, finest first; `channels` lists their widths."""

    def __init__(self, name: str, in_channels: int, first: int, weights: str | None):
        super().__init__()
        import segmentation_models_pytorch as smp
        built = 3 if weights is not None and in_channels == 1 else in_channels
        try:
            self.net = smp.encoders.get_encoder(name, in_channels=built, depth=SMP_DEPTH, weights=None)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{WHERE}: encoder='{SMP_PREFIX}{name}' is not a segmentation-models-pytorch encoder "
                             f"(e.g. smp:resnet18, smp:resnet34, smp:efficientnet-b0, smp:tu-<timm name>): "
                             f"{str(err).splitlines()[0][:200]}") from None
        _load(self.net, weights, in_channels, built)
        self.first = first
        self.channels = _probe_and_prune(self, in_channels, 2 ** SMP_DEPTH)

    def forward(self, image_BCHW: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(image_BCHW))[self.first:]


class UNetDecoder(nn.Module):
    """From the deepest feature up to the finest one given: bilinear x2 (align_corners=False: the pixel-centre
    convention of max pooling) to the skip's size, concat, double conv to width * 2^level channels."""

    def __init__(self, enc_channels: list[int], width: int, first: int, norm: str):
        super().__init__()
        blocks, below = [], enc_channels[-1]
        for i in range(len(enc_channels) - 2, -1, -1):       # level first + i, deepest skip first
            out = width * 2 ** (first + i)
            blocks.append(DoubleConv(below + enc_channels[i], out, norm))
            below = out
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = below

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class LandmarkUNet(nn.Module):
    """forward(image_BCHW) -> {"heatmap_BKHW": (B, K, H, W)}; the head works at stride `heatmap_stride`."""

    def __init__(self, encoder: nn.Module, in_channels: int, num_keypoints: int, width: int, depth: int,
                 norm: str, heatmap_stride: int, heatmap_peak: float):
        super().__init__()
        first = int(math.log2(heatmap_stride))
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels, width, first, norm)
        self.head = heatmap_head(self.decoder.out_channels, num_keypoints)
        self.in_channels, self.multiple = in_channels, 2 ** depth
        self.heatmap_stride, self.heatmap_peak = heatmap_stride, float(heatmap_peak)

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(image_BCHW, self.in_channels, self.multiple, "landmark_unet")
        heat = self.head(self.decoder(self.encoder(image_BCHW)))
        return {"heatmap_BKHW": to_input_size(heat, image_BCHW.shape[-2:], self.heatmap_peak)}


def _check_unet_args(width: int, depth: int, norm: str, heatmap_stride: int, encoder: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{WHERE}: norm must be one of {NORMS}, got {norm!r}")
    if heatmap_stride not in HEATMAP_STRIDES:
        raise ValueError(f"{WHERE}: heatmap_stride must be one of {HEATMAP_STRIDES}, got {heatmap_stride!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{WHERE}: width must be an integer >= 1, got {width!r}")
    first = int(math.log2(heatmap_stride))
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= first:
        raise ValueError(f"{WHERE}: depth must be an integer > log2(heatmap_stride) = {first} (the decoder needs "
                         f"at least one level), got {depth!r}")
    if encoder != "plain" and not (isinstance(encoder, str) and encoder.startswith(SMP_PREFIX)
                                   and len(encoder) > len(SMP_PREFIX)):
        raise ValueError(f"{WHERE}: encoder must be 'plain' or '{SMP_PREFIX}<encoder name>' (e.g. smp:resnet34), "
                         f"got {encoder!r}")
    if encoder != "plain" and depth != SMP_DEPTH:
        raise ValueError(f"{WHERE}: depth must be {SMP_DEPTH} with an smp encoder (it is used whole, strides 2..32), "
                         f"got {depth}")


def build_landmark_unet(num_keypoints: int = 19, in_channels: int = 3, width: int = 16, depth: int = 5,
                        norm: str = "gn", heatmap_stride: int = 2, encoder: str = "plain",
                        weights: str | None = None, heatmap_peak: float = 255.0) -> LandmarkUNet:
    """Heatmap-only UNet for K = num_keypoints landmarks (module docstring). Input H, W divisible by 2^depth.
    norm: "gn" (default: batch-size independent, which matters at the few images per step that large inputs allow;
    as fast as "bn" on a CPU), "bn", "none" (for the decoder only with an smp encoder). encoder: "plain" or
    "smp:<name>" (depth must then be 5). weights: local state_dict of the encoder. heatmap_peak: data.heatmap_peak."""
    _check_common(num_keypoints, in_channels, heatmap_peak)
    _check_unet_args(width, depth, norm, heatmap_stride, encoder)
    first = int(math.log2(heatmap_stride))
    if encoder == "plain":
        enc: nn.Module = PlainEncoder(in_channels, width, depth, norm, first)
        _load(enc, weights, in_channels, in_channels)
    else:
        enc = SmpEncoder(encoder[len(SMP_PREFIX):], in_channels, first, weights)
    return LandmarkUNet(enc, in_channels, num_keypoints, width, depth, norm, heatmap_stride, heatmap_peak)


# ------------------------------------------------------------------------------------------------ landmark_hrnet
def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class LandmarkHRNet(nn.Module):
    """forward(image_BCHW) -> {"heatmap_BKHW": (B, K, H, W)}; the head works at stride 4 (module docstring)."""

    multiple = 32

    def __init__(self, num_keypoints: int, in_channels: int, backbone: str, weights: str | None,
                 head_channels: int, fuse: bool, heatmap_peak: float):
        super().__init__()
        import timm
        built = 3 if weights is not None and in_channels == 1 else in_channels
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, feature_location="",
                                              out_indices=(1, 2, 3, 4), in_chans=built)
        except (RuntimeError, TypeError, AssertionError) as err:
            raise ValueError(f"{WHERE}: backbone={backbone!r} is not a timm HRNet (e.g. hrnet_w18_small, "
                             f"hrnet_w18_small_v2, hrnet_w32): {str(err).splitlines()[0][:200]}") from None
        _load(self.backbone, weights, in_channels, built)
        chans = self.backbone.feature_info.channels()
        if not fuse:
            # only the stride-4 output of the last exchange unit is read: let that unit compute only it
            last = self.backbone.stage4[-1]
            last.fuse_layers = nn.ModuleList(last.fuse_layers[:1])
        c = sum(chans) if fuse else chans[0]
        self.head = nn.Sequential(_conv_bn_relu(c, head_channels, 1), _conv_bn_relu(head_channels, head_channels, 3),
                                  heatmap_head(head_channels, num_keypoints))
        self.in_channels, self.fuse, self.heatmap_peak = in_channels, bool(fuse), float(heatmap_peak)

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(image_BCHW, self.in_channels, self.multiple, "landmark_hrnet")
        feats = self.backbone(image_BCHW)
        x = feats[0]
        if self.fuse:
            x = torch.cat([x] + [F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
                                 for f in feats[1:]], dim=1)
        return {"heatmap_BKHW": to_input_size(self.head(x), image_BCHW.shape[-2:], self.heatmap_peak)}


def build_landmark_hrnet(num_keypoints: int = 19, in_channels: int = 3, backbone: str = "hrnet_w18_small",
                         weights: str | None = None, head_channels: int = 64, fuse: bool = True,
                         heatmap_peak: float = 255.0) -> LandmarkHRNet:
    """HRNet landmark network for K = num_keypoints (module docstring). Input H, W divisible by 32. backbone: a timm
    HRNet name; weights: a local timm-keyed state_dict; heatmap_peak: data.heatmap_peak."""
    _check_common(num_keypoints, in_channels, heatmap_peak)
    if not isinstance(backbone, str) or not backbone.startswith("hrnet"):
        raise ValueError(f"{WHERE}: backbone must name a timm HRNet (hrnet_w18_small, hrnet_w18_small_v2, "
                         f"hrnet_w32, ...), got {backbone!r}")
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise ValueError(f"{WHERE}: head_channels must be an integer >= 1, got {head_channels!r}")
    return LandmarkHRNet(num_keypoints, in_channels, backbone, weights, head_channels, fuse, heatmap_peak)


MODELS_LANDMARK: dict[str, Callable[..., nn.Module]] = {
    "landmark_unet": build_landmark_unet,
    "landmark_hrnet": build_landmark_hrnet,
}
# Per-map heatmap MSE over the visible landmarks (+ optional soft-argmax term); it renders its targets from the
# keypoints when the loader did not (engine/run.make_criterion passes data.sigma_px and data.heatmap_peak).
CRITERIA_LANDMARK: dict[str, Callable[..., nn.Module]] = {name: HeatmapCoordLoss for name in MODELS_LANDMARK}
