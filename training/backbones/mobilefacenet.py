"""MobileFaceNet (insightface arcface_torch layout, width 1, blocks (1, 4, 6, 2)): a CPU-sized backbone."""

from __future__ import annotations

import torch
from torch import nn

from crfiqa.training.backbones import register_backbone
from crfiqa.training.backbones.base import QualityNet


class ConvBlock(nn.Sequential):
    """Conv -> BN -> PReLU (``linear=True`` drops the PReLU)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, groups: int = 1,
                 linear: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups), ConvBlock(groups, groups, 3, stride, 1, groups=groups),
            ConvBlock(groups, cout, linear=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block with optional identity shortcut."""
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Sequential):
    """``n`` residual DepthWise blocks of constant width."""

    def __init__(self, c: int, n: int, groups: int) -> None:
        super().__init__(*[DepthWise(c, c, groups, residual=True) for _ in range(n)])


class MobileFaceNet(QualityNet):
    """MobileFaceNet with a global depthwise (GDC) head and the ``qs`` quality unit."""

    def __init__(self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2)) -> None:
        super().__init__(embedding_size)
        self.layers = nn.Sequential(
            ConvBlock(3, 64, 3, 2, 1),
            ConvBlock(64, 64, 3, 1, 1, groups=64) if blocks[0] == 1 else Residual(64, blocks[0], 128),
            DepthWise(64, 64, 128, stride=2), Residual(64, blocks[1], 128),
            DepthWise(64, 128, 256, stride=2), Residual(128, blocks[2], 256),
            DepthWise(128, 128, 512, stride=2), Residual(128, blocks[3], 256),
            ConvBlock(128, 512))
        self.gdc = ConvBlock(512, 512, 7, 1, 0, groups=512, linear=True)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """112x112 input -> embedding."""
        return self.features(self.fc(torch.flatten(self.gdc(self.layers(x)), 1)))


@register_backbone
def mobilefacenet(embedding_size: int = 512) -> MobileFaceNet:
    """MobileFaceNet, about 1 GFLOP, 2 M parameters."""
    return MobileFaceNet(embedding_size)
