"""ResNet / ResNeXt / wide ResNet with torchvision's module names and initialisation.

One spec covers them all: block type, blocks per stage, groups and width per group
(ResNeXt), the stem width and the stage-1 width (SwAV's ResNet-50 wN widens both), and a
small-image stem (3x3 stride 1, no max-pool) for the CPU nets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from seerlike.models.backbone import STAGE_KEYS, Backbone, ResidualBlock, drop_path
from seerlike.models.counting import Cx


@dataclass(frozen=True)
class ResNetSpec:
    """A concrete ResNet-family network."""

    block: Literal["basic", "bottleneck"]
    """BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1 with expansion 4)."""
    layers: tuple[int, int, int, int]
    """Blocks in each of the four stages."""
    groups: int = 1
    """Groups of the 3x3 conv (ResNeXt cardinality)."""
    width_per_group: int = 64
    """Bottleneck channels per group at 64 planes (torchvision's base_width)."""
    planes: int = 64
    """Planes of stage 1, doubled at each later stage (64 in torchvision; 64 * N in SwAV's wN)."""
    stem_width: int = 64
    """Channels of the stem conv."""
    small_stem: bool = False
    """3x3 stride-1 stem conv and no max-pool, for 32-96 px images."""

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block={self.block!r}; choose 'basic' or 'bottleneck'")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (as torchvision)")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    def stage_table(self) -> list[dict]:
        rows, stride = [], 1 if self.small_stem else 4
        for i, (key, d) in enumerate(zip(STAGE_KEYS, self.layers)):
            stride *= 2 if i else 1
            planes = self.planes * 2**i
            inner = int(planes * (self.width_per_group / 64.0)) * self.groups if self.block == "bottleneck" else planes
            rows.append({"stage": key, "depth": d, "width": planes * self.expansion, "bottleneck_width": inner,
                         "group_width": inner // self.groups, "groups": self.groups, "stride": stride})
        return rows

    def build(self, num_classes: int | None = None) -> ResNet:
        return ResNet(self, num_classes=num_classes)

    def complexity(self, resolution: int = 224, num_classes: int | None = 1000) -> dict:
        cx = Cx(resolution, resolution)
        start = cx.mark()
        if self.small_stem:
            cx.conv(3, self.stem_width, 3).norm(self.stem_width)
        else:
            cx.conv(3, self.stem_width, 7, stride=2).norm(self.stem_width).pool(self.stem_width, 3, stride=2)
        cx.part("stem", start)
        w_in = self.stem_width
        for i, row in enumerate(self.stage_table()):
            for j in range(row["depth"]):
                start = cx.mark()
                stride = 2 if (i and j == 0) else 1
                w_out, inner = row["width"], row["bottleneck_width"]
                if w_in != w_out or stride != 1:
                    h, w = cx.h, cx.w
                    cx.conv(w_in, w_out, 1, stride=stride).norm(w_out)
                    cx.h, cx.w = h, w
                if self.block == "basic":
                    cx.conv(w_in, w_out, 3, stride=stride).norm(w_out).conv(w_out, w_out, 3).norm(w_out)
                else:
                    cx.conv(w_in, inner, 1).norm(inner)
                    cx.conv(inner, inner, 3, stride=stride, groups=self.groups).norm(inner)
                    cx.conv(inner, w_out, 1).norm(w_out)
                cx.part(f"layer{i + 1}.{j}", start)
                w_in = w_out
        start = cx.mark()
        cx.gap()
        if num_classes:
            cx.linear(w_in, num_classes)
        cx.part("head", start)
        return cx.result(stages=self.stage_table())


def _conv(w_in: int, w_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(w_in, w_out, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False)


def _downsample(w_in: int, w_out: int, stride: int) -> nn.Sequential | None:
    if w_in == w_out and stride == 1:
        return None
    return nn.Sequential(_conv(w_in, w_out, 1, stride), nn.BatchNorm2d(w_out))


class BasicBlock(ResidualBlock):
    """torchvision's BasicBlock: relu(x + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, w_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(w_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(w_in, planes, stride)
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class Bottleneck(ResidualBlock):
    """torchvision's Bottleneck (v1.5: stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, w_in: int, planes: int, stride: int, groups: int, width_per_group: int) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = _conv(w_in, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(w_in, planes * self.expansion, stride)
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class ResNet(Backbone):
    """torchvision's ResNet: ``conv1``, ``bn1``, ``maxpool``, ``layer1..layer4``, ``avgpool``, ``fc``."""

    stem_conv_name = "conv1"

    def __init__(self, spec: ResNetSpec, num_classes: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        if spec.small_stem:
            self.conv1 = _conv(3, spec.stem_width, 3)
        else:
            self.conv1 = nn.Conv2d(3, spec.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if spec.small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        w_in = spec.stem_width
        for i, row in enumerate(spec.stage_table()):
            planes = spec.planes * 2**i
            blocks = []
            for j in range(row["depth"]):
                stride = 2 if (i and j == 0) else 1
                if spec.block == "basic":
                    blocks.append(BasicBlock(w_in, planes, stride))
                else:
                    blocks.append(Bottleneck(w_in, planes, stride, spec.groups, spec.width_per_group))
                w_in = row["width"]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_classes = num_classes
        self.fc = nn.Linear(w_in, num_classes) if num_classes else None
        self.out_dim = w_in
        self.feature_dims = {**{r["stage"]: r["width"] for r in spec.stage_table()}, "pool": w_in}
        self.feature_strides = {r["stage"]: r["stride"] for r in spec.stage_table()}
        # torchvision's ResNet init; fc keeps nn.Linear's default, as in torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem_forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]


def _bottleneck(layers, groups=1, width_per_group=64, widen=1) -> ResNetSpec:
    return ResNetSpec("bottleneck", layers, groups, width_per_group, planes=64 * widen, stem_width=64 * widen)


# name: (spec, where it comes from)
CONFIGS: dict[str, tuple[ResNetSpec, str]] = {
    "resnet18": (ResNetSpec("basic", (2, 2, 2, 2)), "torchvision"),
    "resnet34": (ResNetSpec("basic", (3, 4, 6, 3)), "torchvision"),
    "resnet50": (_bottleneck((3, 4, 6, 3)), "torchvision"),
    "resnet101": (_bottleneck((3, 4, 23, 3)), "torchvision"),
    "resnet152": (_bottleneck((3, 8, 36, 3)), "torchvision"),
    "resnext50_32x4d": (_bottleneck((3, 4, 6, 3), 32, 4), "torchvision"),
    "resnext101_32x8d": (_bottleneck((3, 4, 23, 3), 32, 8), "torchvision"),
    "resnext101_32x16d": (_bottleneck((3, 4, 23, 3), 32, 16), "FB WSL (torch.hub resnext101_32x16d_wsl)"),
    "resnext101_64x4d": (_bottleneck((3, 4, 23, 3), 64, 4), "torchvision"),
    "wide_resnet50_2": (_bottleneck((3, 4, 6, 3), width_per_group=128), "torchvision (wider bottleneck only)"),
    # SwAV's wide ResNet-50s widen everything: stem, bottleneck and block outputs.
    "resnet50w2": (_bottleneck((3, 4, 6, 3), widen=2), "SwAV resnet50w2"),
    "resnet50w4": (_bottleneck((3, 4, 6, 3), widen=4), "SwAV resnet50w4"),
    "resnet50w5": (_bottleneck((3, 4, 6, 3), widen=5), "SwAV resnet50w5"),
    "resnet10_cifar": (ResNetSpec("basic", (1, 1, 1, 1), planes=32, stem_width=32, small_stem=True), "seerlike CPU net"),
    "resnet18_cifar": (ResNetSpec("basic", (2, 2, 2, 2), small_stem=True), "CIFAR ResNet-18 (3x3 stem)"),
    "resnet10_cifar_w16": (ResNetSpec("basic", (1, 1, 1, 1), planes=16, stem_width=16, small_stem=True),
                           "seerlike CPU net, half width (the quickstart's distillation student)"),
}
