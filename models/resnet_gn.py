"""ResNet "experts" with GroupNorm instead of BatchNorm (MultiHipPoseNet encoder,
docs/systems/hip_us_multihipposenet.md).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016: basic blocks (ResNet-18/34) or bottleneck
blocks with expansion 4 (ResNet-50). Every BatchNorm is a GroupNorm (Wu & He, ECCV 2018) because the published model
trains with batch 4, where batch statistics are too noisy. The stem's max-pool is 3x3 / stride 2 with ceil_mode and no
padding, which maps an even H/2 exactly to H/4 (192 -> 96), so a 384x512 input gives the published pyramid
64@192x256, 256@96x128, 512@48x64, 1024@24x32, 2048@12x16.
"""
from __future__ import annotations

import torch
from torch import nn

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def num_groups_for(channels: int, max_groups: int) -> int:
    """Largest divisor of `channels` that is <= max_groups, so GroupNorm works at any width (16, 24, ...)."""
    if channels < 1 or max_groups < 1:
        raise ValueError(f"models/resnet_gn.py: channels={channels} and gn_groups={max_groups} must be >= 1")
    for g in range(min(channels, max_groups), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels, max_groups), channels)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlockGN(nn.Module):
    """Two 3x3 convs + identity (ResNet-18/34)."""

    def __init__(self, c_in: int, planes: int, stride: int, gn_groups: int):
        super().__init__()
        self.conv1, self.gn1 = conv3x3(c_in, planes, stride), group_norm(planes, gn_groups)
        self.conv2, self.gn2 = conv3x3(planes, planes), group_norm(planes, gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, planes, stride, gn_groups)

    @property
    def last_norm(self) -> nn.GroupNorm:
        return self.gn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu(out + identity)


class BottleneckGN(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, "ResNet v1.5") -> 1x1 expand x4, + projection shortcut."""

    def __init__(self, c_in: int, planes: int, stride: int, gn_groups: int):
        super().__init__()
        c_out = planes * EXPANSION["bottleneck"]
        self.conv1, self.gn1 = conv1x1(c_in, planes), group_norm(planes, gn_groups)
        self.conv2, self.gn2 = conv3x3(planes, planes, stride), group_norm(planes, gn_groups)
        self.conv3, self.gn3 = conv1x1(planes, c_out), group_norm(c_out, gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride, gn_groups)

    @property
    def last_norm(self) -> nn.GroupNorm:
        return self.gn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.relu(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(c_in: int, c_out: int, stride: int, gn_groups: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(conv1x1(c_in, c_out, stride), group_norm(c_out, gn_groups))


class ResNetGN(nn.Module):
    """One expert: returns the 5 feature levels [stem @1/2, layer1 @1/4, layer2 @1/8, layer3 @1/16, layer4 @1/32].

    `width` is the stem width; stage widths are width x (1, 2, 4, 8) x expansion (64 -> 64/256/512/1024/2048 for
    ResNet-50). `out_channels` lists the channels of the 5 levels.
    """

    def __init__(self, depth: int = 50, width: int = 64, in_channels: int = 3, gn_groups: int = 32,
                 zero_init_residual: bool = True):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"models/resnet_gn.py: expert_depth={depth} is not one of {sorted(RESNET_LAYOUTS)}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"models/resnet_gn.py: width={width} and in_channels={in_channels} must be >= 1")
        kind, blocks = RESNET_LAYOUTS[depth]
        block_cls = BasicBlockGN if kind == "basic" else BottleneckGN
        expansion = EXPANSION[kind]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                                  group_norm(width, gn_groups), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            layer = [block_cls(c_in if j == 0 else planes * expansion, planes, 2 if (i > 0 and j == 0) else 1,
                               gn_groups) for j in range(n)]
            stages.append(nn.Sequential(*layer))
            c_in = planes * expansion
        self.layers = nn.ModuleList(stages)
        self.out_channels = [width] + [width * 2 ** i * expansion for i in range(4)]
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017: each residual branch starts as zero, so the untrained expert is close to identity
            # maps; this makes from-scratch training (no ImageNet weights here) start faster and steadier.
            for m in self.modules():
                if isinstance(m, (BasicBlockGN, BottleneckGN)):
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, image_BCHW: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.stem(image_BCHW)
        x = self.maxpool(f1)
        feats = [f1]
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats
