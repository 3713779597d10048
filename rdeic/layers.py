"""Residual blocks of the latent compression module (ELIC / CompressAI style)."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride)


class SubpelConv(nn.Module):
    """1x1 convolution to ``out_ch * r**2`` channels followed by a pixel shuffle (x r)."""

    def __init__(self, in_ch: int, out_ch: int, r: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch * r * r, kernel_size=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class ResidualBlock(nn.Module):
    """Two 3x3 convs, each followed by LeakyReLU(0.01); 1x1 adaptor on the skip if widths differ."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.act = nn.LeakyReLU(0.01)
        self.adaptor = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.adaptor is None else self.adaptor(x)
        out = self.act(self.conv2(self.act(self.conv1(x))))
        return out + identity


class ResidualBlockWithStride(nn.Module):
    """Stride-2 residual block: conv3x3/2, LeakyReLU(0.01), conv3x3, LeakyReLU(0.1); 1x1/2 skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=2)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.act1 = nn.LeakyReLU(0.01)
        self.act2 = nn.LeakyReLU(0.1)
        self.skip = conv1x1(in_ch, out_ch, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x)))) + self.skip(x)


class ResidualBlockUpsample(nn.Module):
    """x2 residual block: subpel conv, LeakyReLU(0.01), conv3x3, LeakyReLU(0.1); subpel skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.subpel = SubpelConv(in_ch, out_ch)
        self.conv = conv3x3(out_ch, out_ch)
        self.act1 = nn.LeakyReLU(0.01)
        self.act2 = nn.LeakyReLU(0.1)
        self.skip = SubpelConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv(self.act1(self.subpel(x)))) + self.skip(x)


class ChannelContext(nn.Module):
    """Channel context from the already decoded slices: three 5x5 convs with GELU."""

    def __init__(self, in_ch: int, out_ch: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, h1, 5, padding=2),
            nn.GELU(),
            nn.Conv2d(h1, h2, 5, padding=2),
            nn.GELU(),
            nn.Conv2d(h2, out_ch, 5, padding=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EntropyParameters(nn.Module):
    """Three 1x1 convs (widths 5/3 and 4/3 of the output) with GELU: context -> (scales, means)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, out_ch * 5 // 3, 1),
            nn.GELU(),
            nn.Conv2d(out_ch * 5 // 3, out_ch * 4 // 3, 1),
            nn.GELU(),
            nn.Conv2d(out_ch * 4 // 3, out_ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
