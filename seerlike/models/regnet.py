"""RegNet X / Y (Radosavovic et al. 2020, "Designing Network Design Spaces").

The generator is a handful of pure functions, as in pycls: per-block widths from the
linear rule (depth, w0, wa, wm), quantized in log space to multiples of 8, grouped into
stages, then made compatible with the group width. The modules reproduce torchvision's
``RegNet`` exactly (names, shapes, initialisation), so a state dict loads into
``torchvision.models.regnet_*`` with ``strict=True``.

torchvision and pycls differ in one place: the group-width compatibility rounding.
pycls (and VISSL/ClassyVision, hence SEER) rounds to the nearest multiple
(``round(w / g) * g``, ties to even); torchvision uses ``_make_divisible`` (ties up, never
more than 10% below). Five published configs come out different (RegNetX-400MF,
RegNetX-4GF, RegNetY-800MF, RegNetY-4GF, RegNetY-8GF). Each named config therefore
carries its rounding: torchvision's for torchvision's names, pycls's for the others, and
``*_pycls`` names give the pycls model where torchvision's differs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from seerlike.models.backbone import STAGE_KEYS, Backbone, ResidualBlock, drop_path
from seerlike.models.counting import Cx

Rounding = Literal["torchvision", "pycls"]

# ---------------------------------------------------------------- the generator (pure functions)


def block_widths(depth: int, w0: int, wa: float, wm: float, quant: int = 8) -> list[int]:
    """Per-block widths: u_j = w0 + wa * j, snapped to w0 * wm^round(log_wm(u_j / w0)), to multiples of quant."""
    if depth < 1 or w0 <= 0 or wa < 0 or wm <= 1 or w0 % quant:
        raise ValueError(
            f"invalid RegNet parameters depth={depth} w0={w0} wa={wa} wm={wm}: "
            f"need depth >= 1, wa >= 0, wm > 1 and w0 a positive multiple of {quant}"
        )
    caps = [round(math.log((w0 + wa * j) / w0) / math.log(wm)) for j in range(depth)]
    return [int(round(w0 * wm**c / quant) * quant) for c in caps]


def stages_from_blocks(widths: list[int]) -> tuple[list[int], list[int]]:
    """Runs of equal block width become stages: (stage widths, stage depths)."""
    stage_widths: list[int] = []
    depths: list[int] = []
    for w in widths:
        if stage_widths and stage_widths[-1] == w:
            depths[-1] += 1
        else:
            stage_widths.append(w)
            depths.append(1)
    return stage_widths, depths


def make_divisible(v: float, divisor: int) -> int:
    """torchvision's rounding: nearest multiple (ties up), at least ``divisor``, never 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def adjust_widths_groups(
    widths: list[int], bottleneck: float, group_width: int, rounding: Rounding
) -> tuple[list[int], list[int]]:
    """Make each stage's bottleneck width a multiple of its group width (shrunk to fit narrow stages)."""
    bot = [int(w * bottleneck) for w in widths]
    groups = [min(group_width, b) for b in bot]
    if rounding == "torchvision":
        bot = [make_divisible(b, g) for b, g in zip(bot, groups)]
    elif rounding == "pycls":
        bot = [int(round(b / g) * g) for b, g in zip(bot, groups)]
    else:
        raise ValueError(f"rounding={rounding!r}; choose 'torchvision' or 'pycls'")
    return [int(b / bottleneck) for b in bot], groups


@dataclass(frozen=True)
class RegNetSpec:
    """A concrete RegNet: per-stage widths, depths and group widths."""

    widths: tuple[int, ...]
    """Output width of each stage."""
    depths: tuple[int, ...]
    """Number of blocks in each stage."""
    group_widths: tuple[int, ...]
    """Channels per group of the 3x3 conv in each stage."""
    bottleneck: float = 1.0
    """Bottleneck ratio b: inner width = round(width * b)."""
    se_ratio: float = 0.0
    """Squeeze-excitation width as a fraction of the block input width (0 = RegNetX, 0.25 = RegNetY)."""
    stem_width: int = 32
    """Channels of the 3x3 stem conv."""
    stem_stride: int = 2
    """Stride of the stem conv (1 for small-image variants)."""

    def __post_init__(self) -> None:
        if not len(self.widths) == len(self.depths) == len(self.group_widths) == len(STAGE_KEYS):
            raise ValueError(
                f"a RegNet backbone needs exactly {len(STAGE_KEYS)} stages (res2..res5), got widths {list(self.widths)} "
                f"depths {list(self.depths)}: change wa / wm so the widths step exactly three times"
            )
        for w, g in zip(self.widths, self.group_widths):
            wb = int(round(w * self.bottleneck))
            if wb % g:
                raise ValueError(f"stage bottleneck width {wb} is not a multiple of its group width {g}")

    @classmethod
    def generate(
        cls,
        *,
        depth: int,
        w0: int,
        wa: float,
        wm: float,
        group_width: int,
        se_ratio: float = 0.0,
        bottleneck: float = 1.0,
        rounding: Rounding = "torchvision",
        stem_width: int = 32,
        stem_stride: int = 2,
    ) -> RegNetSpec:
        widths, depths = stages_from_blocks(block_widths(depth, w0, wa, wm))
        widths, groups = adjust_widths_groups(widths, bottleneck, group_width, rounding)
        return cls(tuple(widths), tuple(depths), tuple(groups), bottleneck, se_ratio, stem_width, stem_stride)

    def stage_table(self) -> list[dict]:
        rows, stride = [], self.stem_stride
        for key, w, d, g in zip(STAGE_KEYS, self.widths, self.depths, self.group_widths):
            stride *= 2
            wb = int(round(w * self.bottleneck))
            rows.append({"stage": key, "depth": d, "width": w, "bottleneck_width": wb,
                         "group_width": g, "groups": wb // g, "stride": stride})
        return rows

    def build(self, num_classes: int | None = None) -> RegNet:
        return RegNet(self, num_classes=num_classes)

    def complexity(self, resolution: int = 224, num_classes: int | None = 1000) -> dict:
        cx = Cx(resolution, resolution)
        start = cx.mark()
        cx.conv(3, self.stem_width, 3, stride=self.stem_stride).norm(self.stem_width)
        cx.part("stem", start)
        w_in = self.stem_width
        for i, (w, d, g) in enumerate(zip(self.widths, self.depths, self.group_widths), start=1):
            for j in range(d):
                start = cx.mark()
                _block_cx(cx, w_in, w, 2 if j == 0 else 1, g, self.bottleneck, self.se_ratio)
                cx.part(f"trunk_output.block{i}.block{i}-{j}", start)
                w_in = w
        start = cx.mark()
        cx.gap()
        if num_classes:
            cx.linear(w_in, num_classes)
        cx.part("head", start)
        return cx.result(stages=self.stage_table())


def _block_cx(cx: Cx, w_in: int, w_out: int, stride: int, group_width: int, bottleneck: float, se_ratio: float) -> None:
    if w_in != w_out or stride != 1:
        h, w = cx.h, cx.w
        cx.conv(w_in, w_out, 1, stride=stride).norm(w_out)
        cx.h, cx.w = h, w
    w_b = int(round(w_out * bottleneck))
    w_se = int(round(w_in * se_ratio))
    cx.conv(w_in, w_b, 1).norm(w_b)
    cx.conv(w_b, w_b, 3, stride=stride, groups=w_b // group_width).norm(w_b)
    if w_se:
        cx.se(w_b, w_se)
    cx.conv(w_b, w_out, 1).norm(w_out)


# ---------------------------------------------------------------- modules (torchvision's names)


def _conv_bn(w_in: int, w_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: children 0 (conv, no bias), 1 (BN), 2 (ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(w_in, w_out, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(w_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class ResBottleneckBlock(ResidualBlock):
    """x + f(x) with f = 1x1, grouped 3x3 [+ SE], 1x1; a 1x1 projection when the shape changes."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int, bottleneck: float, se_ratio: float) -> None:
        super().__init__()
        self.proj = _conv_bn(w_in, w_out, 1, stride, relu=False) if (w_in != w_out or stride != 1) else None
        w_b = int(round(w_out * bottleneck))
        f: OrderedDict[str, nn.Module] = OrderedDict()
        f["a"] = _conv_bn(w_in, w_b, 1)
        f["b"] = _conv_bn(w_b, w_b, 3, stride, groups=w_b // group_width)
        if se_ratio:
            # SE width follows the block input width (pycls, torchvision), not the bottleneck.
            f["se"] = SqueezeExcitation(w_b, int(round(se_ratio * w_in)))
        f["c"] = _conv_bn(w_b, w_out, 1, relu=False)
        self.f = nn.Sequential(f)
        self.activation = nn.ReLU(inplace=True)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.f.c[1]

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + drop_path(self.f(x), self.drop_path_rate, self.training))


class AnyStage(nn.Sequential):
    """A stage: blocks named ``block{i}-{j}`` as in torchvision."""

    def __init__(self, w_in: int, w_out: int, depth: int, index: int, group_width: int, bottleneck: float, se_ratio: float):
        super().__init__()
        for j in range(depth):
            block = ResBottleneckBlock(w_in if j == 0 else w_out, w_out, 2 if j == 0 else 1, group_width, bottleneck, se_ratio)
            self.add_module(f"block{index}-{j}", block)


class RegNet(Backbone):
    """torchvision's RegNet: ``stem``, ``trunk_output.block1..block4``, ``avgpool``, ``fc``."""

    stem_conv_name = "stem.0"

    def __init__(self, spec: RegNetSpec, num_classes: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.stem = _conv_bn(3, spec.stem_width, 3, spec.stem_stride)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        w_in = spec.stem_width
        for i, (w, d, g) in enumerate(zip(spec.widths, spec.depths, spec.group_widths), start=1):
            stages[f"block{i}"] = AnyStage(w_in, w, d, i, g, spec.bottleneck, spec.se_ratio)
            w_in = w
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_classes = num_classes
        self.fc = nn.Linear(w_in, num_classes) if num_classes else None
        self.out_dim = w_in
        self.feature_dims = {**dict(zip(STAGE_KEYS, spec.widths)), "pool": w_in}
        self.feature_strides = {row["stage"]: row["stride"] for row in spec.stage_table()}
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's RegNet init (ResNet-style fan-out normal, fc N(0, 0.01)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def stem_forward(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def stages(self) -> list[nn.Module]:
        return list(self.trunk_output.children())


# ---------------------------------------------------------------- named configs


@dataclass(frozen=True)
class RegNetConfig:
    """A named RegNet's generator parameters."""

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int
    se_ratio: float
    rounding: Rounding
    source: str
    """Where the config comes from."""
    stem_stride: int = 2


def _x(depth, w0, wa, wm, g, rounding, source, **kw) -> RegNetConfig:
    return RegNetConfig(depth, w0, wa, wm, g, 0.0, rounding, source, **kw)


def _y(depth, w0, wa, wm, g, rounding, source, **kw) -> RegNetConfig:
    return RegNetConfig(depth, w0, wa, wm, g, 0.25, rounding, source, **kw)


TV = "torchvision"
CONFIGS: dict[str, RegNetConfig] = {
    "regnet_x_200mf": _x(13, 24, 36.44, 2.49, 8, "pycls", "pycls RegNetX-200MF"),
    "regnet_x_400mf": _x(22, 24, 24.48, 2.54, 16, TV, TV),
    "regnet_x_600mf": _x(16, 48, 36.97, 2.24, 24, "pycls", "pycls RegNetX-600MF"),
    "regnet_x_800mf": _x(16, 56, 35.73, 2.28, 16, TV, TV),
    "regnet_x_1_6gf": _x(18, 80, 34.01, 2.25, 24, TV, TV),
    "regnet_x_3_2gf": _x(25, 88, 26.31, 2.25, 48, TV, TV),
    "regnet_x_4gf": _x(23, 96, 38.65, 2.43, 40, "pycls", "pycls RegNetX-4.0GF"),
    "regnet_x_6_4gf": _x(17, 184, 60.83, 2.07, 56, "pycls", "pycls RegNetX-6.4GF"),
    "regnet_x_8gf": _x(23, 80, 49.56, 2.88, 120, TV, TV),
    "regnet_x_12gf": _x(19, 168, 73.36, 2.37, 112, "pycls", "pycls RegNetX-12GF"),
    "regnet_x_16gf": _x(22, 216, 55.59, 2.1, 128, TV, TV),
    "regnet_x_32gf": _x(23, 320, 69.86, 2.0, 168, TV, TV),
    "regnet_y_200mf": _y(13, 24, 36.44, 2.49, 8, "pycls", "pycls RegNetY-200MF"),
    "regnet_y_400mf": _y(16, 48, 27.89, 2.09, 8, TV, TV),
    "regnet_y_600mf": _y(15, 48, 32.54, 2.32, 16, "pycls", "pycls RegNetY-600MF"),
    "regnet_y_800mf": _y(14, 56, 38.84, 2.4, 16, TV, TV),
    "regnet_y_1_6gf": _y(27, 48, 20.71, 2.65, 24, TV, TV),
    "regnet_y_3_2gf": _y(21, 80, 42.63, 2.66, 24, TV, TV),
    "regnet_y_4gf": _y(22, 96, 31.41, 2.24, 64, "pycls", "pycls RegNetY-4.0GF"),
    "regnet_y_6_4gf": _y(25, 112, 33.22, 2.27, 72, "pycls", "pycls RegNetY-6.4GF"),
    "regnet_y_8gf": _y(17, 192, 76.82, 2.19, 56, TV, TV),
    "regnet_y_12gf": _y(19, 168, 73.36, 2.37, 112, "pycls", "pycls RegNetY-12GF"),
    "regnet_y_16gf": _y(18, 200, 106.23, 2.48, 112, TV, TV),
    "regnet_y_32gf": _y(20, 232, 115.89, 2.53, 232, TV, TV),
    "regnet_y_64gf": _y(20, 352, 147.48, 2.4, 328, "pycls", "SEER RegNetY-64GF (VISSL)"),
    "regnet_y_128gf": _y(27, 456, 160.83, 2.52, 264, TV, "torchvision (SEER RegNetY-128GF)"),
    "regnet_y_256gf": _y(27, 640, 230.83, 2.53, 373, "pycls", "SEER RegNetY-256GF (VISSL)"),
    "regnet_y_10b": _y(27, 1744, 620.83, 2.52, 1010, "pycls", "SEER RegNet-10B (VISSL)"),
    # pycls's own models where torchvision's rounding gives a different network of the same name.
    "regnet_x_400mf_pycls": _x(22, 24, 24.48, 2.54, 16, "pycls", "pycls RegNetX-400MF"),
    "regnet_y_800mf_pycls": _y(14, 56, 38.84, 2.4, 16, "pycls", "pycls RegNetY-800MF"),
    "regnet_y_8gf_pycls": _y(17, 192, 76.82, 2.19, 56, "pycls", "pycls RegNetY-8.0GF"),
    # Small-image RegNetY for CPU runs: RegNetY-200MF with a stride-1 stem (32 px -> 16, 8, 4, 2).
    "regnet_y_200mf_cifar": _y(13, 24, 36.44, 2.49, 8, "pycls", "seerlike CPU net", stem_stride=1),
}


def named_spec(name: str) -> RegNetSpec:
    c = CONFIGS[name]
    return RegNetSpec.generate(
        depth=c.depth, w0=c.w0, wa=c.wa, wm=c.wm, group_width=c.group_width, se_ratio=c.se_ratio,
        rounding=c.rounding, stem_stride=c.stem_stride,
    )


def regnet(
    *,
    depth: int,
    w0: int,
    wa: float,
    wm: float,
    group_width: int,
    se_ratio: float = 0.0,
    bottleneck: float = 1.0,
    rounding: Rounding = "pycls",
    num_classes: int | None = None,
    zero_init_residual: bool = False,
    drop_path: float = 0.0,
) -> RegNet:
    """Any RegNet from its generator parameters (pycls rounding, as SEER/VISSL, by default)."""
    spec = RegNetSpec.generate(
        depth=depth, w0=w0, wa=wa, wm=wm, group_width=group_width, se_ratio=se_ratio, bottleneck=bottleneck, rounding=rounding
    )
    return spec.build(num_classes).apply_options(zero_init_residual, drop_path)
